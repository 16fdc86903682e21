"""The 8-bit matmuls of csm-1b's linears on a CUDA GPU, one kernel call at a time.

For each linear shape of csm-1b (backbone, depth decoder, projection, heads; q/k/v and gate/up
fused as well) and M in {1, 64, 256} rows, microseconds per call and GB/s of weight bytes for:
bf16 `F.linear`; int8 weight-only (`quant._weight_only_linear`: the weight converted to bf16 by
a kernel of its own, then cuBLAS); the Triton kernel (`kernels.qlinear`) with int8 and e4m3
weights; and fp8 `torch._scaled_mm` with per-row activation scales (`quant._scaled_mm_linear`,
from 16 rows, as fastcsm runs it). Each variant is warmed up (the Triton kernel autotunes there),
then 50 calls are captured in one CUDA graph and replayed; the calls cycle through copies of the
weight that together exceed twice the L2 cache where memory allows, so weights come from HBM as in
a real frame ("l2_resident" marks shapes too small for that). Prints progress on stderr and one
JSON line; refuses to run without CUDA.

    python benchmarks/bench_quant_kernels.py [--rows 1,64,256] [--calls 50] [--replays 5]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from fastcsm.model.config import preset


def linear_shapes(cfg) -> list[tuple[str, int, int]]:
    """(name, N, K) of every linear of a CSM config: each stack's (q and output are square), q/k/v
    and gate/up also fused as the model runs them, the projection between the stacks, codebook 0's
    head and one audio head."""
    shapes = []
    for name, t in (("backbone", cfg.backbone), ("decoder", cfg.decoder)):
        q, kv, hidden = t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim, t.intermediate_size
        shapes += [(f"{name}.q_o", q, t.dim), (f"{name}.k_v", kv, t.dim), (f"{name}.gate_up", hidden, t.dim),
                   (f"{name}.down", t.dim, hidden), (f"{name}.qkv_fused", q + 2 * kv, t.dim),
                   (f"{name}.gate_up_fused", 2 * hidden, t.dim)]
    V = cfg.audio_vocab_size
    return shapes + [("projection", cfg.decoder.dim, cfg.backbone.dim), ("codebook0_head", V, cfg.backbone.dim),
                     ("audio_head", V, cfg.decoder.dim)]


SHAPES = linear_shapes(preset("csm-1b"))


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def time_graph(fn, calls: int, replays: int) -> float:
    """Microseconds per call: `calls` calls of fn(i) captured in one CUDA graph (as the engine
    captures its step), best of `replays`."""
    from fastcsm.engine.runner import capture

    graph = capture(lambda: [fn(i) for i in range(calls)])
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / calls)
    del graph
    return min(times)


def cycling(op, x: torch.Tensor, weights: list[tuple]):
    """fn(i) = op(x, *weights[i % len(weights)]): each call of a graph reads the next copy."""
    return lambda i: op(x, *weights[i % len(weights)])


def copies_of(make, nbytes: int, calls: int, l2: int) -> list[tuple]:
    """Enough copies of a weight (up to one per call) to exceed twice the L2 cache together."""
    first = make()
    return [first] + [tuple(t.clone() for t in first) for _ in range(min(calls, math.ceil(2 * l2 / nbytes)) - 1)]


def run(args, device: torch.device | None = None, timer=time_graph, shapes=SHAPES) -> dict:
    from fastcsm.model import kernels, quant

    dev = device or torch.device("cuda")
    cuda = dev.type == "cuda"
    l2 = int(getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 50 << 20)) if cuda else 50 << 20
    fp8 = not cuda or torch.cuda.get_device_capability(dev) >= (8, 9)
    rows = [int(r) for r in args.rows.split(",")]
    gen = torch.Generator(device=dev).manual_seed(0)
    out = {"device_name": torch.cuda.get_device_name(dev) if cuda else "cpu", "torch": torch.__version__,
           "triton": __import__("triton").__version__, "l2_bytes": l2, "calls_per_graph": args.calls,
           "x_dtype": "bfloat16", "fp8": fp8, "results": []}
    t0 = time.perf_counter()
    for name, N, K in shapes:
        w = torch.randn(N, K, device=dev, generator=gen) * 0.02
        nbytes = {"bf16": 2 * N * K, "int8": N * K + 4 * N, "fp8": N * K + 4 * N}
        weights = {"bf16": copies_of(lambda w=w: (w.to(torch.bfloat16),), nbytes["bf16"], args.calls, l2),
                   "int8": copies_of(lambda w=w: quant.quantize(w, "int8"), nbytes["int8"], args.calls, l2)}
        if fp8:
            weights["fp8"] = copies_of(lambda w=w: quant.quantize(w, "fp8"), nbytes["fp8"], args.calls, l2)
        del w
        for M in rows:
            x = torch.randn(M, K, device=dev, generator=gen).to(torch.bfloat16)
            variants = {"bf16": (F.linear, "bf16"), "weight_only_int8": (quant._weight_only_linear, "int8"),
                        "triton_int8": (kernels.qlinear, "int8")}
            if fp8:
                variants["triton_fp8"] = (kernels.qlinear, "fp8")
                if M >= quant.SCALED_MM_ROWS and N % 16 == 0 and K % 16 == 0:
                    variants["scaled_mm_fp8"] = (quant._scaled_mm_linear, "fp8")
            row = {"shape": name, "N": N, "K": K, "M": M,
                   "l2_resident": len(weights["int8"]) * nbytes["int8"] < 2 * l2}
            for vname, (op, kind) in variants.items():
                try:
                    us = timer(cycling(op, x, weights[kind]), args.calls, args.replays)
                    row[vname] = {"us": round(us, 2), "gbps": round(nbytes[kind] / us / 1e3, 1)}
                except Exception as e:  # report and go on: one failing variant must not hide the others
                    row[vname] = {"error": f"{type(e).__name__}: {e}"[:300]}
            ref = row["bf16"].get("us")
            for vname in variants:
                if vname != "bf16" and ref and "us" in row[vname]:
                    row[vname]["x_bf16"] = round(row[vname]["us"] / ref, 2)
            out["results"].append(row)
            log(f"[{time.perf_counter() - t0:5.1f} s] {name:24s} M={M:<4d} " + "  ".join(
                f"{v} {row[v]['us']:.1f}us" if "us" in row[v] else f"{v} ERROR" for v in variants))
        del weights
        if cuda:
            torch.cuda.empty_cache()
    summary = {}
    for M in rows:
        rs = [r for r in out["results"] if r["M"] == M]
        for v in ["bf16", "weight_only_int8", "triton_int8", "triton_fp8", "scaled_mm_fp8"]:
            us = [r[v]["us"] for r in rs if "us" in r.get(v, {})]
            if us:
                summary.setdefault(f"M={M}", {})[f"{v}_us_sum"] = round(sum(us), 1)
        ratios = [r["triton_int8"]["x_bf16"] for r in rs if "x_bf16" in r.get("triton_int8", {})]
        if ratios:
            summary[f"M={M}"]["triton_int8_x_bf16_median"] = round(statistics.median(ratios), 2)
    out["summary"] = summary
    out["errors"] = sum(1 for r in out["results"] for v in r.values() if isinstance(v, dict) and "error" in v)
    out["tuned_configs"] = kernels.tuned_configs()
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="1,64,256", help="comma-separated row counts (batch) per call")
    p.add_argument("--calls", type=int, default=50, help="calls captured per CUDA graph")
    p.add_argument("--replays", type=int, default=5, help="graph replays timed (best one counts)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        log("bench_quant_kernels: no CUDA device here; it times CUDA kernels, run it on a GPU machine")
        return 2
    try:
        import triton  # noqa: F401
    except ImportError:
        log("bench_quant_kernels: triton does not import (pip install triton); the Triton kernel cannot run")
        return 2
    print(json.dumps(run(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
