"""Frame time on a CPU with its cores idle and with one core busy, for each thread policy.

Each model and policy runs in a fresh process (OpenMP reads its wait policy once, when torch
loads): a model of random weights built with fastcsm's own code (`bench.random_model`, and
`quant.quantized_copy` for int8), a one-slot engine with Mimi decode in the step, the median ms
of `--steps` frame steps after a warm-up, first with the cores idle, then "busy": with one more
process spinning on a core. csm-1b is built in fp32 before its int8 copy: about 8 GB of memory.
The "speak" rows time `fastcsm speak` itself (its own generation time for 4 s of audio, the model
load excluded; the median of 3 runs) on a tiny random checkpoint, at default settings ("auto")
and with `--threads 1`.

Policies:
  torch   torch's own default: one thread a core, OpenMP's spinning waiters (fastcsm's default before threads.py)
  one     one thread
  cores   a thread for every core this process may use, idle threads sleeping (OMP_WAIT_POLICY=PASSIVE)
  auto    fastcsm's default (fastcsm/threads.py): one thread for small models, else every
          usable core; idle threads sleeping

    python benchmarks/bench_threads.py                       # tiny, csm-1b int8 and speak: minutes
    python benchmarks/bench_threads.py --models tiny --steps 40

Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

POLICIES = ("torch", "one", "cores", "auto")
MODELS = {"tiny": ("tiny", "none"), "csm-1b-int8": ("csm-1b", "int8")}
SPEAK_TEXT = "Hello from fastcsm, speaking on a shared machine."


def worker(model_name: str, policy: str, steps: int) -> dict:
    """One model and policy, in this process (torch must not be loaded yet): the model is built
    once, then timed with the cores idle and again with one core busy. `auto` chooses its threads
    anew once the core is busy, as a fresh `fastcsm` process would."""
    from fastcsm import threads

    if policy in ("cores", "auto"):
        threads.quiet_pool()
    import torch

    from fastcsm.bench import frame_times, random_codec, random_model
    from fastcsm.engine.engine import Engine
    from fastcsm.model import quant
    from fastcsm.model.config import preset

    name, mode = MODELS[model_name]
    cfg = preset(name)
    count = {"one": 1, "cores": threads.usable_cores(), "auto": 0}.get(policy)
    model = random_model(cfg, torch.device("cpu"), torch.float32)
    if mode != "none":
        model = quant.quantized_copy(model, mode)
    engine = Engine(model, max_slots=1, codec=random_codec(cfg, torch.device("cpu")))
    out = {"wait_policy": os.environ.get("OMP_WAIT_POLICY", "default")}
    for scenario in ("idle", "busy"):
        spinner = busy_process() if scenario == "busy" else None
        try:
            if spinner:
                time.sleep(0.5)
            if count is not None:
                threads.apply(count, cfg.param_count())
            times = frame_times(engine, 1, steps, warmup=2)
            out[scenario] = {"ms_per_step": 1000 * statistics.median(times), "threads": torch.get_num_threads(),
                             "load": load()}
        finally:
            if spinner:
                spinner.kill()
                spinner.wait()
    return out


def run_cell(model_name: str, policy: str, steps: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS",
                                                              "FASTCSM_THREADS")}
    out = subprocess.run([sys.executable, __file__, "--worker", model_name, policy, str(steps)], env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def speak_seconds(checkpoint: str, policy: str) -> dict:
    """`fastcsm speak`'s own generation time ("in X s") for 4 s of audio at most."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS",
                                                              "FASTCSM_THREADS")}
    extra = {"one": ["--threads", "1"], "auto": []}[policy]
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run([sys.executable, "-m", "fastcsm", "speak", SPEAK_TEXT, "--model", checkpoint,
                              "--device", "cpu", "--seed", "1", "--max-audio-length-ms", "4000", "-q",
                              "-o", os.path.join(tmp, "out.wav"), *extra], env=env, capture_output=True, text=True,
                             check=True)
    m = re.search(r"([\d.]+) s of audio .* in ([\d.]+) s", out.stdout + out.stderr)
    return {"audio_s": float(m.group(1)), "seconds": float(m.group(2))}


def busy_process() -> subprocess.Popen:
    """One core's worth of other work: a process that spins until killed."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def load() -> str:
    return " ".join(open("/proc/loadavg").read().split()[:3])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="tiny,csm-1b-int8", help="comma-separated: tiny, csm-1b-int8, speak "
                                                                "(default: %(default)s,speak)")
    p.add_argument("--policies", default=",".join(POLICIES), help="comma-separated (default: %(default)s)")
    p.add_argument("--steps", type=int, default=None, help="timed frame steps (default: 20 tiny, 3 csm-1b)")
    p.add_argument("--large-policies", default="torch,auto",
                   help="the policies csm-1b runs (each builds the 1.5 B model; default: %(default)s)")
    p.add_argument("--worker", nargs=3, metavar=("MODEL", "POLICY", "STEPS"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.worker[1], int(args.worker[2]))))
        return {}
    models = args.models.split(",") + (["speak"] if argv is None and args.models == p.get_default("models")
                                       else [])
    policies = args.policies.split(",")
    result = {"cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)), "load_before": load(),
              "cells": []}
    checkpoint = None
    if "speak" in models:
        from fastcsm.testing import write_hf_checkpoint

        checkpoint = tempfile.mkdtemp(prefix="bench_threads_")
        write_hf_checkpoint(checkpoint, seed=0)
    for model_name in models:
        for policy in policies:
            if model_name == "speak" and policy not in ("one", "auto"):
                continue
            if model_name == "csm-1b-int8" and policy not in args.large_policies.split(","):
                continue
            if model_name == "speak":
                cell = {}
                for scenario in ("idle", "busy"):
                    spinner = busy_process() if scenario == "busy" else None
                    try:
                        time.sleep(0.5 if spinner else 0)
                        runs = [speak_seconds(checkpoint, policy) for _ in range(3)]  # the median of 3
                        cell[scenario] = {**sorted(runs, key=lambda r: r["seconds"])[1], "load": load()}
                    finally:
                        if spinner:
                            spinner.kill()
                            spinner.wait()
            else:
                try:
                    cell = run_cell(model_name, policy, args.steps or (20 if model_name == "tiny" else 3))
                except subprocess.CalledProcessError as e:  # e.g. killed for memory: csm-1b is built in fp32 first
                    cell = {"model": model_name, "policy": policy, "error": f"the worker ended with {e.returncode}"}
                    result["cells"].append(cell)
                    print(f"{model_name:12s} {policy:6s} {cell['error']}", flush=True)
                    continue
            cell.update(model=model_name, policy=policy)
            key = "seconds" if model_name == "speak" else "ms_per_step"
            cell["busy_over_idle"] = round(cell["busy"][key] / cell["idle"][key], 2)
            result["cells"].append(cell)
            print_row(cell, key)
    print(json.dumps(result))
    return result


def print_row(cell: dict, key: str) -> None:
    unit = "s (speak)" if key == "seconds" else "ms/frame"
    threads = "/".join(str(cell[s].get("threads", "-")) for s in ("idle", "busy"))
    print(f"{cell['model']:12s} {cell['policy']:6s} threads {threads:>5}  idle {cell['idle'][key]:9.2f} {unit}"
          f"  one core busy {cell['busy'][key]:9.2f}  busy/idle {cell['busy_over_idle']:5.2f}"
          f"  (load {cell['idle']['load']} / {cell['busy']['load']})", flush=True)


if __name__ == "__main__":
    main()
