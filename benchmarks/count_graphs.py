"""How many graphs dynamo builds for a preset's step and prefill over every batch bucket: the
trace alone (`CompileCounter` as the backend; no inductor), on random weights.

    python benchmarks/count_graphs.py --preset csm-1b --slots 32

A warm-up of the variant default requests run (top-k 50 within 64 candidates) in every bucket
of `--slots` slots, then one JSON line: buckets, graphs, ops traced, seconds.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch._dynamo.testing import CompileCounter

from fastcsm.bench import random_model
from fastcsm.engine.engine import Engine
from fastcsm.engine.runner import Runner
from fastcsm.engine.sampling import SamplingParams, SamplingPath
from fastcsm.model.config import preset


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="csm-1b")
    p.add_argument("--slots", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=64, help="cache positions per slot (small: the trace is the same)")
    args = p.parse_args(argv)
    model = random_model(preset(args.preset), torch.device("cpu"), torch.float32)
    counter = CompileCounter()
    engine = Engine(model, max_slots=args.slots, max_seq_len=args.seq_len, runner=Runner(compile=counter))
    path = SamplingPath.of([SamplingParams()], engine.sample_candidates)
    t = time.perf_counter()
    engine.runner.warmup(engine.buffers, [(b, path) for b in engine.buckets], print)
    result = {"preset": args.preset, "buckets": engine.buckets, "graphs": counter.frame_count,
              "ops": counter.op_count, "variants_built": len(engine.runner.built),
              "seconds": round(time.perf_counter() - t, 1)}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
