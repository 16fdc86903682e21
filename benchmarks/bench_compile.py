"""The compiled step's cost and gain: first start against a start from the compile cache, and
compiled against eager ms a frame, in one run.

Each start is a fresh process (dynamo keeps compiled code in memory, so only a new process shows
what the disk cache saves) that builds random weights of the preset, quantizes them (`--quantize`),
makes an engine of `--slots` slots (buckets 1, 2, 4, ... slots) with `compile=True` and times its
warm-up, which compiles (or loads) the step for every bucket and both prefill graphs. The first
start uses an empty cache directory, the second the same directory. The second process then
times frames (`--batches`), compiled and uncompiled on the same weights (on CUDA both captured,
one graph per bucket), interleaved in rounds so that a busy machine blurs both alike. Prints
progress on stderr and one JSON line last.

    python benchmarks/bench_compile.py --preset csm-1b --quantize int8 --slots 4
    python benchmarks/bench_compile.py --device cuda --quantize none --slots 256 --batches 1,64,256
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def start(args) -> dict:
    """One start in this process: model, engine, warm-up; then, if asked, frames compiled and eager."""
    from torch._dynamo.utils import counters

    from fastcsm.bench import frame_times, random_codec, random_model
    from fastcsm.engine.engine import Engine
    from fastcsm.engine.sampling import SamplingParams, SamplingPath
    from fastcsm.model import quant
    from fastcsm.model.config import preset

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = preset(args.preset)
    device = torch.device(args.device)
    model = random_model(cfg, device, torch.float32 if device.type == "cpu" else torch.bfloat16)
    if quant.check_mode(args.quantize, device) is not None:
        model = quant.quantized_copy(model, args.quantize)
    codec = None if args.no_codec else random_codec(cfg, device)
    kw = dict(max_slots=args.slots, codec=codec, sample_candidates=args.candidates)
    t = time.perf_counter()
    engine = Engine(model, compile=True, compile_cache=args.cache, **kw)
    if args.default_path_only:  # the one variant requests with default settings run, in every bucket
        path = SamplingPath.of([SamplingParams()], args.candidates)
        t0 = time.perf_counter()
        engine.runner.warmup(engine.buffers, [(b, path) for b in engine.buckets], lambda p: log(f"  {p}"))
        warmup_s = time.perf_counter() - t0
    else:
        warmup_s = engine.warmup(progress=lambda p: log(f"  {p}"))
    out = {"warmup_s": round(time.perf_counter() - t, 1), "warmup_only_s": round(warmup_s, 1),
           "buckets": engine.buckets, "variants": len(engine.runner.built),
           "graphs_compiled": counters["stats"]["unique_graphs"],
           "fx_graph_cache": {k: v for k, v in counters["inductor"].items() if k.startswith("fxgraph_cache")},
           "cache_entry": str(engine.runner.cache_entry)}
    if args.rounds:
        # The peer: the same engine uncompiled (on CUDA still captured, one graph per bucket).
        eager = Engine(model, **kw)
        batches = [int(b) for b in args.batches.split(",")]
        ms = {(name, b): [] for name in ("compiled", "eager") for b in batches}
        for _ in range(args.rounds):
            for b in batches:
                for name, e in (("compiled", engine), ("eager", eager)):
                    ms[name, b] += [1000 * s for s in frame_times(e, b, args.frames, warmup=1)]
        out["ms_per_frame"] = {f"{name} batch {b}": {"best": round(min(v), 2), "median": round(statistics.median(v), 2),
                                                    "all": [round(x, 2) for x in v]} for (name, b), v in ms.items()}
    return out


def child(args, cache: str, rounds: int) -> dict:
    cmd = [sys.executable, __file__, "--child", "--cache", cache, "--rounds", str(rounds), "--preset", args.preset,
           "--device", args.device, "--quantize", args.quantize, "--slots", str(args.slots), "--candidates",
           str(args.candidates), "--threads", str(args.threads), "--frames", str(args.frames),
           "--batches", args.batches]
    cmd += ["--no-codec"] if args.no_codec else []
    cmd += ["--default-path-only"] if args.default_path_only else []
    t = time.perf_counter()
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["process_s"] = round(time.perf_counter() - t, 1)
    return result


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="csm-1b")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quantize", default="int8", choices=("none", "int8", "fp8"))
    p.add_argument("--slots", type=int, default=4, help="engine slots: buckets 1, 2, 4, ... up to it")
    p.add_argument("--candidates", type=int, default=64,
                   help="the engine's sample_candidates (0: one sampling variant, the full sort)")
    p.add_argument("--no-codec", action="store_true", help="leave Mimi out of the step")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--frames", type=int, default=3, help="frames timed per round and engine")
    p.add_argument("--rounds", type=int, default=3, help="interleaved compiled / eager rounds (second start)")
    p.add_argument("--batches", default="1", help="batches whose frames are timed, e.g. 1,64,256 (at most --slots)")
    p.add_argument("--default-path-only", action="store_true",
                   help="build only the sampling variant of default requests (top-k 50) in every bucket")
    p.add_argument("--cache", help="compile cache directory (default: a fresh temporary one)")
    p.add_argument("--only", choices=("first", "second"),
                   help="run one of the two starts (the second needs the --cache the first filled)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        result = start(args)
        print(json.dumps(result))
        return result
    cache = args.cache or tempfile.mkdtemp(prefix="fastcsm-compile-")
    log(f"bench_compile: {args.preset} {args.quantize} on {args.device}, {args.slots} slots, cache {cache}")
    load = os.getloadavg()
    first = second = None
    if args.only != "second":
        first = child(args, cache, 0)
        log(f"  first start: warm-up {first['warmup_s']} s ({first['graphs_compiled']} graphs)")
    if args.only != "first":
        second = child(args, cache, args.rounds)
        log(f"  start from the cache: warm-up {second['warmup_s']} s")
    frames = second.get("ms_per_frame", {}) if second else {}
    result = {
        "preset": args.preset, "device": args.device, "quantize": args.quantize, "torch": torch.__version__,
        "slots": args.slots, "codec_in_step": not args.no_codec, "sample_candidates": args.candidates,
        "cpus": os.cpu_count(), "load_before": [round(x, 2) for x in load],
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "first_start": first, "start_from_cache": second,
        "cache_speedup": round(first["warmup_s"] / max(second["warmup_s"], 1e-9), 2) if first and second else None,
        "compiled_over_eager": {b: round(frames[f"compiled batch {b}"]["median"]
                                         / frames[f"eager batch {b}"]["median"], 3)
                                for b in args.batches.split(",") if f"compiled batch {b}" in frames},
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
