"""Which way of running a full-precision linear is fastest on this CPU, for csm-1b's and Mimi's shapes.

fastcsm runs fp32 linears on the CPU through oneDNN's matmul (`fastcsm.model.network.linear`)
when the weight has `ONEDNN_MIN` elements or more, and through `F.linear` (MKL's GEMM) below that.
This times both, and `weight @ rows.T` (the matmul with the weight on the left), for each shape at
1 to 32 rows: the batch of a frame step, or twice it for Mimi's streamed frame. As in a frame, the
weights come from memory, not cache: each shape cycles through enough copies to pass ~300 MB.
Prints microseconds a call, then one JSON line.

    python benchmarks/bench_linears.py [--threads 2] [--rows 1,2,4,8,16,32] [--dtype fp32]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from fastcsm.model import network

SHAPES = {  # name: (out, in) features
    "backbone q/k/v": (3072, 2048), "backbone out": (2048, 2048), "backbone gate/up": (16384, 2048),
    "backbone down": (2048, 8192), "decoder q/k/v": (2048, 1024), "decoder gate/up": (16384, 1024),
    "decoder down": (1024, 8192), "mimi q/k/v": (1536, 512), "mimi fc1": (2048, 512), "mimi fc2": (512, 2048),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def forms():
    return {
        "F.linear": F.linear,
        "onednn": network._onednn_linear,
        "weight @ rows.T": lambda x, w: (w @ x.T).T.contiguous(),
    }


def time_form(fn, x, weights, repeats: int = 3) -> float:
    """Best microseconds a call over `repeats` passes through `weights`."""
    for w in weights:
        fn(x, w)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for w in weights:
            fn(x, w)
        best = min(best, (time.perf_counter() - t) / len(weights))
    return best * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", default="1,2,4,8,16,32")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--bytes", type=float, default=3e8, help="weight bytes cycled through per shape")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype, rows = DTYPES[args.dtype], [int(r) for r in args.rows.split(",")]
    if not network.ONEDNN:
        raise SystemExit("this torch has no oneDNN: F.linear is the only form")
    g = torch.Generator().manual_seed(0)
    results = []
    print(f"bench_linears: {args.dtype}, {args.threads} thread(s), us a call, weights from memory "
          f"(oneDNN from {network.ONEDNN_MIN} elements)")
    for name, (n_out, n_in) in SHAPES.items():
        copies = max(2, int(args.bytes // (n_out * n_in * dtype.itemsize)))
        weights = [(torch.randn(n_out, n_in, generator=g) * 0.02).to(dtype) for _ in range(copies)]
        for m in rows:
            x = torch.randn(m, n_in, generator=g).to(dtype)
            us = {form: round(time_form(fn, x, weights), 1) for form, fn in forms().items()}
            results.append({"shape": name, "out": n_out, "in": n_in, "rows": m, "us": us})
            cells = "  ".join(f"{form} {v:8.1f}" for form, v in us.items())
            print(f"  {name:17s} {n_out:5d}x{n_in:<5d} rows {m:2d}: {cells}", flush=True)
    totals = {form: round(sum(r["us"][form] for r in results) / 1000, 1) for form in forms()}
    print("  all shapes and rows, ms: " + "  ".join(f"{k} {v}" for k, v in totals.items()))
    print(json.dumps({"dtype": args.dtype, "threads": args.threads, "onednn_min": network.ONEDNN_MIN,
                      "torch": torch.__version__, "results": results, "total_ms": totals}))


if __name__ == "__main__":
    main()
