"""Profile one frame step on the device: which kernels a frame launches, how long they keep the
device busy, and how much of the frame is launch gaps.

Random weights of a preset (csm-1b in bf16 on CUDA, as `fastcsm bench`; the tiny preset in fp32
on the CPU), every slot of a batch running a default request (temperature 0.9, top-k 50), the
engine's step (a) eager and (b) captured as a CUDA graph (CUDA only), timed without the profiler,
then a few frames under `torch.profiler`:

    python benchmarks/profile_step.py [--batch 1,64] [--codec] [--top 25]

Prints one JSON line. Per run (mode, batch): wall ms a frame; GPU kernels a frame (memcpy and
memset included) and the sum of their times a frame (busy), so gaps = wall - busy is what
launching costs; the top kernels by total time, grouped by name, with count and mean us, and
which top-level aten op and fastcsm source line launched them where the profiler links them (eager
only: a graph replay has no op around it). On the CPU the "kernels" are the top-level aten ops
that compute (as `count_ops.py` counts them) and busy is their CPU time. If the profiler records
no kernels inside graph replays, that run says so in `note`.
"""

from __future__ import annotations

import argparse
import collections
import json
import time

import torch
from count_ops import VIEWS, outermost_op
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from fastcsm import bench
from fastcsm.engine.engine import Engine, Request
from fastcsm.engine.runner import Runner
from fastcsm.engine.sampling import SamplingParams, SamplingPath
from fastcsm.model.checkpoints import resolve_device_dtype
from fastcsm.model.config import preset


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default=None, help="default: csm-1b on CUDA, tiny on the CPU")
    p.add_argument("--device", default=None, help="cuda (default where present) or cpu")
    p.add_argument("--dtype", default=None, help="bf16 (CUDA default) or fp32 (CPU default)")
    p.add_argument("--batch", default=None, help="comma-separated batch sizes (default: 1,64 on CUDA, 1 on the CPU)")
    p.add_argument("--steps", type=int, default=None, help="timed frames per run (default 20 on CUDA, 3 on the CPU)")
    p.add_argument("--profile-steps", type=int, default=3, help="frames under the profiler per run")
    p.add_argument("--codec", action="store_true", help="decode Mimi inside the step too")
    p.add_argument("--top", type=int, default=25, help="kernels listed per run")
    args = p.parse_args(argv)
    device, dtype = resolve_device_dtype(args.device, args.dtype)
    cuda = device.type == "cuda"
    name = args.preset or ("csm-1b" if cuda else "tiny")
    cfg = preset(name)
    batches = [int(b) for b in (args.batch or ("1,64" if cuda else "1")).split(",")]
    steps = args.steps or (20 if cuda else 3)
    model = bench.random_model(cfg, device, dtype)
    codec = bench.random_codec(cfg, device) if args.codec else None
    params = SamplingParams()
    path = SamplingPath.of([params], 64)
    result = {"preset": name, "device": str(device),
              "device_name": torch.cuda.get_device_name(device) if cuda else "cpu",
              "dtype": str(dtype).removeprefix("torch."), "torch": torch.__version__, "codec_in_step": args.codec,
              "path": path._asdict(), "steps": steps, "profile_steps": args.profile_steps, "runs": []}
    for batch in batches:
        engine = Engine(model, max_slots=batch, codec=codec, cuda_graphs=False, sample_candidates=64)
        for i in range(batch):
            engine.add(Request(bench.dummy_prompt(cfg, 24, 0, seed=i), 1000, params, seed=i))
        while engine.waiting:
            engine.step()
        for mode in ["eager"] + (["graph"] if cuda else []):
            run = {"mode": mode, "batch": batch}
            try:
                run.update(measure(Runner(cuda_graphs=mode == "graph"), engine, batch, path, steps,
                                   args.profile_steps, args.top))
            except Exception as e:  # report it and go on: a cut-off GPU run still tells the rest
                run["error"] = f"{type(e).__name__}: {e}"[:500]
            result["runs"].append(run)
            shown = ("wall_ms", "kernels_per_frame", "busy_ms", "note", "error")
            bench.log(f"profile_step: {mode} batch {batch}: " + ", ".join(f"{k} {run[k]}" for k in shown if k in run))
        del engine
    print(json.dumps(result))
    return result


def measure(runner: Runner, engine: Engine, batch: int, path: SamplingPath, steps: int, profile_steps: int,
            top: int) -> dict:
    """Wall time a frame of `runner`'s step over the engine's buffers, then its kernels under the profiler."""
    bufs, cuda = engine.buffers, engine.device.type == "cuda"
    runner.warmup(bufs, [(batch, path)])  # compiled / captured before anything is timed
    for _ in range(2):
        runner.step(bufs, batch, path)
    bench.sync(engine.device)
    t = time.perf_counter()
    for _ in range(steps):
        runner.step(bufs, batch, path)
    bench.sync(engine.device)
    wall_ms = (time.perf_counter() - t) * 1000 / steps
    traces = []
    for with_stack in (False, True):  # times without the Python tracer's overhead; then who launched what
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else []),
                     with_stack=with_stack) as prof:
            for _ in range(profile_steps):
                runner.step(bufs, batch, path)
            bench.sync(engine.device)
        traces.append(prof.events())
    out = {"wall_ms": round(wall_ms, 3), **kernel_table(*traces, cuda, profile_steps, top)}
    if out["kernels_per_frame"] == 0:
        out["note"] = "the profiler recorded no kernels" + (" inside graph replays" if runner.cuda_graphs else "")
        out["busy_ms"] = out["gaps_ms"] = None
    else:
        out["gaps_ms"] = round(wall_ms - out["busy_ms"], 3)
    return out


def kernel_table(timed, traced, cuda: bool, frames: int, top: int) -> dict:
    """Kernels a frame, their time a frame (from the `timed` events), and the `top` kernel names by
    total time with the ops and source lines that launched them (from the `traced` events)."""
    time_us, count = collections.Counter(), collections.Counter()
    for e in timed:
        if cuda and e.device_type == DeviceType.CUDA and "Sync" not in e.name:
            time_us[e.name] += e.time_range.elapsed_us()
            count[e.name] += 1
        elif not cuda and is_compute_op(e):
            time_us[e.name] += e.cpu_time_total
            count[e.name] += 1
    ops, where = collections.defaultdict(collections.Counter), collections.defaultdict(collections.Counter)
    for e in traced:
        if e.device_type != DeviceType.CPU or not e.name.startswith("aten::"):
            continue
        launcher = outermost_op(e)
        # On CUDA, the kernels an op launched itself (the profiler links them); on the CPU, the op.
        for name in [k.name for k in e.kernels] if cuda else [e.name] if is_compute_op(e) else []:
            ops[name][launcher.name] += 1
            where[name][source_line(launcher)] += 1
    listed = []
    for name, total in time_us.most_common(top):
        row = {"name": name[:200], "per_frame": round(count[name] / frames, 2),
               "us_per_frame": round(total / frames, 1), "mean_us": round(total / count[name], 2)}
        if cuda and ops[name]:
            row["ops"] = dict(ops[name].most_common(3))
        if where[name]:
            row["where"] = dict(where[name].most_common(3))
        listed.append(row)
    return {"kernels_per_frame": round(sum(count.values()) / frames, 1),
            "busy_ms": round(sum(time_us.values()) / frames / 1000, 3), "kernels": len(count), "top": listed}


def is_compute_op(e) -> bool:
    """A top-level aten op that computes (the CPU's "kernel"; `count_ops.py` counts the same)."""
    return (e.device_type == DeviceType.CPU and e.name.startswith("aten::") and outermost_op(e) is e
            and e.name.removeprefix("aten::") not in VIEWS)


def source_line(e) -> str:
    """The innermost fastcsm frame around an op ("fastcsm/engine/sampling.py(190): pick"), from the Python
    events of a trace made `with_stack`."""
    while e is not None:
        if "fastcsm/" in e.name and not e.name.startswith("aten::"):
            return e.name[e.name.rfind("fastcsm/"):]
        e = e.cpu_parent
    return "?"


if __name__ == "__main__":
    main()
