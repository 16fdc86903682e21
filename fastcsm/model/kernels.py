"""Triton kernels: the 8-bit weight matmul y = (x @ w.T) * s that reads the weight once, as 8 bits.

`qlinear(x, w, s)`: x [..., K] in bf16, fp16 or fp32; w [N, K] int8 or float8_e4m3fn; s [N] fp32,
one scale per output channel; y [..., N] in x's dtype. Each weight tile is loaded as 8 bits and
converted in registers; products are summed in fp32 and scaled once at the end.

One kernel covers every batch. For a few rows (M < 16) a program multiplies element-wise and keeps
a [BLOCK_M, BLOCK_N, BLOCK_K] fp32 sum that it reduces once at the end (M = 1 is a GEMV); from 16
rows it uses `tl.dot`. At small M the kernel is bound by reading the weight, so a linear with few
output channels (N = 1024) can split K across programs (SPLIT_K) to fill every SM. The split is
reduced deterministically: each program writes its fp32 partial sums to a workspace and counts in
on its tile's counter (an integer atomic); the program that counts last adds the partials in split
order, writes y and puts the counter back to zero. No float atomics: the same inputs give the same
bits, whichever program finishes first. The counters are one int32 buffer per device that the
kernels leave at zero, so launches must not overlap on two streams (fastcsm runs one at a time).

Block sizes, split and warps are chosen by `triton.autotune` on the GPU, once per process for
each (row bucket, N, K) and dtypes, and kept on disk where this Triton can (`cache_results`); the
engine's warm-up runs every step variant twice before capturing it, so tuning is done by then.
Under `TRITON_INTERPRET=1` (CPU tensors, numpy) one fixed config runs, or the one a test names.
Only Triton features of 3.2+ are used.
"""

from __future__ import annotations

import inspect
import os

import torch
import triton
import triton.language as tl
import triton.testing

LOCKS = 4096  # tile counters per device: the most tiles one split-K launch may have
SPLIT_TILES = 512  # autotuning splits K only while a launch has this many tiles or fewer (too few to fill a GPU)
_locks: dict[torch.device, torch.Tensor] = {}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def bucket(m: int) -> int:
    """The autotuning bucket of a row count: the next power of two."""
    return 1 << max(0, m - 1).bit_length()


@triton.jit(do_not_specialize=["M", "N", "M_BUCKET"])
def _qlinear_kernel(x_ptr, w_ptr, s_ptr, y_ptr, ws_ptr, lock_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
                    M_BUCKET, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr, X_F32: tl.constexpr):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    tiles_m = tl.cdiv(M, BLOCK_M)
    pid_m = pid % tiles_m  # neighbouring programs share a weight tile (read once from memory)
    pid_n = pid // tiles_m
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Rows and channels past the end load a valid row again (no load masks); only stores are masked.
    rm_in = rm % M
    rn_in = rn % N
    k_span = tl.cdiv(K, BLOCK_K * SPLIT_K) * BLOCK_K  # each split's share of K, whole blocks
    rk = pid_k * k_span + tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rm_in.to(tl.int64)[:, None] * stride_xm + rk[None, :]
    w_ptrs = w_ptr + rn_in.to(tl.int64)[:, None] * stride_wn + rk[None, :]
    x_dtype = x_ptr.dtype.element_ty
    if BLOCK_M >= 16:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    elif BLOCK_M == 1:  # a GEMV: the weight tile's own layout throughout, x broadcast over its rows
        acc2 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    else:
        acc3 = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k in range(0, k_span, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_ptrs)
            w = tl.load(w_ptrs)
        else:
            in_k = (rk[None, :] + k) < K
            x = tl.load(x_ptrs, mask=in_k, other=0.0)
            w = tl.load(w_ptrs, mask=in_k, other=0.0)
        if BLOCK_M >= 16:  # int8 and e4m3 values are exact in bf16, fp16 and fp32
            if X_F32:  # full fp32 products, not tf32
                acc = tl.dot(x, tl.trans(w.to(x_dtype)), acc, input_precision="ieee")
            else:
                acc = tl.dot(x, tl.trans(w.to(x_dtype)), acc)
        elif BLOCK_M == 1:
            acc2 += w.to(tl.float32) * x.to(tl.float32)  # [BLOCK_N, BLOCK_K] * [1, BLOCK_K]
        else:
            acc3 += x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if BLOCK_M == 1:
        acc = tl.sum(acc2, axis=1)[None, :]
    elif BLOCK_M < 16:
        acc = tl.sum(acc3, axis=2)

    out_mask = (rm[:, None] < M) & (rn[None, :] < N)
    y_ptrs = y_ptr + rm.to(tl.int64)[:, None] * stride_ym + rn[None, :]
    scale = tl.load(s_ptr + rn_in)
    if SPLIT_K == 1:
        tl.store(y_ptrs, (acc * scale[None, :]).to(y_ptr.dtype.element_ty), mask=out_mask)
    else:
        plane = M * N
        ws_tile = rm.to(tl.int64)[:, None] * N + rn[None, :]
        tl.store(ws_ptr + pid_k * plane + ws_tile, acc, mask=out_mask)
        tl.debug_barrier()  # every thread's partials are written before the count is released
        arrived = tl.atomic_add(lock_ptr + pid, 1, sem="acq_rel")
        tl.debug_barrier()
        if arrived == SPLIT_K - 1:  # the last of this tile's splits: add them all, in split order
            total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for s in tl.static_range(SPLIT_K):
                total += tl.load(ws_ptr + s * plane + ws_tile, mask=out_mask, other=0.0, volatile=True)
            tl.store(y_ptrs, (total * scale[None, :]).to(y_ptr.dtype.element_ty), mask=out_mask)
            tl.atomic_xchg(lock_ptr + pid, 0)  # ready for the next launch


def _config(bm, bn, bk, split, warps, stages) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split},
                         num_warps=warps, num_stages=stages)


# Candidates per row bucket (a few each: every new (bucket, N, K) benchmarks them all once).
# BLOCK_M < 16: element-wise products (one weight tile serves BLOCK_M rows); 16+: tensor cores.
_CANDIDATES = {
    1: [(1, 8, 512, 1, 4, 3), (1, 16, 256, 1, 4, 4), (1, 8, 256, 4, 4, 3), (1, 4, 512, 8, 4, 2)],
    2: [(2, 8, 256, 1, 4, 3), (2, 8, 256, 4, 4, 3), (16, 32, 128, 1, 4, 4), (16, 32, 128, 4, 4, 4)],
    4: [(4, 8, 256, 1, 4, 3), (4, 8, 256, 4, 4, 3), (16, 32, 128, 1, 4, 4), (16, 32, 128, 4, 4, 4)],
    8: [(8, 8, 128, 1, 4, 3), (16, 32, 128, 1, 4, 4), (16, 32, 128, 4, 4, 4), (16, 64, 128, 1, 4, 4)],
    16: [(16, 32, 128, 1, 4, 4), (16, 32, 128, 4, 4, 4), (16, 64, 128, 1, 4, 4), (16, 64, 128, 4, 4, 4)],
    32: [(32, 32, 128, 1, 4, 4), (32, 64, 128, 1, 4, 4), (32, 64, 128, 4, 4, 4), (16, 64, 128, 1, 4, 4)],
    64: [(64, 64, 64, 1, 4, 4), (64, 64, 128, 1, 4, 3), (32, 64, 128, 1, 4, 4), (64, 64, 128, 2, 4, 3)],
    128: [(64, 64, 64, 1, 4, 4), (64, 128, 64, 1, 8, 3), (128, 64, 64, 1, 8, 3), (64, 64, 128, 1, 4, 3)],
    256: [(64, 128, 64, 1, 8, 3), (128, 64, 64, 1, 8, 3), (128, 128, 64, 1, 8, 3), (64, 64, 64, 1, 4, 4)],
}
CONFIGS = {b: [_config(*c) for c in cands] for b, cands in _CANDIDATES.items()}
_ALL = list({str(c): c for cs in CONFIGS.values() for c in cs}.values())
INTERPRETER_CONFIG = _config(16, 128, 64, 2, 4, 1)  # one fixed config in the interpreter unless a test names one


def _max_split(m_bucket: int, n: int) -> int:
    """The largest SPLIT_K any candidate of this bucket may use for N channels (1: no workspace)."""
    return max([c.kwargs["SPLIT_K"] for c in CONFIGS[m_bucket] if _fits(c, m_bucket, n)] + [1])


def _fits(config: triton.Config, m_bucket: int, n: int) -> bool:
    kw = config.kwargs
    tiles = triton.cdiv(m_bucket, kw["BLOCK_M"]) * triton.cdiv(n, kw["BLOCK_N"])
    return kw["SPLIT_K"] == 1 or tiles <= SPLIT_TILES


def _prune(configs, named_args, **kwargs):
    b, n, k = named_args["M_BUCKET"], named_args["N"], named_args["K"]
    keep = [c for c in configs if str(c) in {str(x) for x in CONFIGS[b]} and _fits(c, b, n)
            and c.kwargs["BLOCK_K"] * c.kwargs["SPLIT_K"] <= max(k, c.kwargs["BLOCK_K"])]
    return keep or [c for c in CONFIGS[b] if c.kwargs["SPLIT_K"] == 1][:1]


def _even_k(args) -> bool:
    return args["K"] % (args["BLOCK_K"] * args["SPLIT_K"]) == 0


def _x_f32(args) -> bool:
    return args["x_ptr"].dtype == torch.float32


_HEURISTICS = {"EVEN_K": _even_k, "X_F32": _x_f32}


def _bench(fn, quantiles=None, **_):
    # Triton's do_bench clears L2 before every call (as the real frame does: its weights are far
    # larger than L2) and times the kernel alone; a short run is enough to rank a few configs.
    return triton.testing.do_bench(fn, warmup=2, rep=10, quantiles=quantiles)


def _autotuned():
    kernel = triton.heuristics(_HEURISTICS)(_qlinear_kernel)
    tune = {"configs": _ALL, "key": ["M_BUCKET", "N", "K"], "prune_configs_by": {"early_config_prune": _prune}}
    params = inspect.signature(triton.autotune).parameters
    if "cache_results" in params:
        # Choices kept in Triton's cache directory (per Triton, GPU, kernel source and key): a restart
        # reuses them instead of tuning again, and so runs the same configs, giving the same bits.
        tune["cache_results"] = True
    if "do_bench" in params:
        return triton.autotune(**tune, do_bench=_bench)(kernel)
    return triton.autotune(**tune, warmup=2, rep=10)(kernel)  # a Triton without do_bench=


_tuned = None if interpreting() else _autotuned()
_fixed = triton.heuristics(_HEURISTICS)(_qlinear_kernel)


def _lock_buffer(device: torch.device) -> torch.Tensor:
    locks = _locks.get(device)
    if locks is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("fastcsm's 8-bit Triton kernel ran first inside a CUDA graph capture: warm it up first")
        locks = _locks[device] = torch.zeros(LOCKS, dtype=torch.int32, device=device)
    return locks


def qlinear(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, config: triton.Config | None = None) -> torch.Tensor:
    """(x @ w.T) * s in x's dtype, summed in fp32; w int8 or float8_e4m3fn [N, K], s fp32 [N].
    `config` forces one configuration (tests); else autotuned on the GPU, fixed in the interpreter."""
    if w.dim() != 2 or x.shape[-1] != w.shape[1]:
        raise ValueError(f"qlinear: x {tuple(x.shape)} and weight {tuple(w.shape)} do not match ([..., K] and [N, K])")
    if w.dtype not in (torch.int8, torch.float8_e4m3fn):
        raise ValueError(f"qlinear: the weight must be int8 or float8_e4m3fn, not {w.dtype}")
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"qlinear: x must be bf16, fp16 or fp32, not {x.dtype}")
    if s.shape != (w.shape[0],) or s.dtype != torch.float32:
        raise ValueError(f"qlinear: scale must be fp32 [{w.shape[0]}], not {s.dtype} {tuple(s.shape)}")
    if not (x.device == w.device == s.device):
        raise ValueError(f"qlinear: x, weight and scale on {x.device}, {w.device}, {s.device}")
    N, K = w.shape
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    w = w if w.stride(-1) == 1 else w.contiguous()
    M = x2.shape[0]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return y.view(*x.shape[:-1], N)
    if K == 0:
        return y.zero_().view(*x.shape[:-1], N)
    b = min(bucket(M), max(CONFIGS))  # more rows: the largest bucket's configs
    if config is None and interpreting():
        config = INTERPRETER_CONFIG
    split = config.kwargs["SPLIT_K"] if config is not None else _max_split(b, N)
    ws = torch.empty((split, M, N) if split > 1 else (1,), dtype=torch.float32, device=x.device)
    locks = _lock_buffer(x.device)
    args = (x2, w, s, y, ws, locks, M, N, K, x2.stride(0), w.stride(0), y.stride(0), b)
    if config is None:
        def grid(meta):
            return triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), meta["SPLIT_K"]
        _tuned[grid](*args)
    else:
        kw = config.kwargs
        tiles = triton.cdiv(M, kw["BLOCK_M"]) * triton.cdiv(N, kw["BLOCK_N"])
        if kw["SPLIT_K"] > 1 and tiles > LOCKS:
            raise ValueError(f"qlinear: {tiles} tiles split over K need more than {LOCKS} counters")
        _fixed[(tiles, kw["SPLIT_K"])](*args, **kw, num_warps=config.num_warps, num_stages=config.num_stages)
    return y.view(*x.shape[:-1], N)


def tuned_configs() -> dict[str, str]:
    """What autotuning chose so far in this process: {key: config} (benchmarks report it)."""
    cache = getattr(_tuned, "cache", None) or {}
    return {", ".join(map(str, key)): " ".join(f"{k}={v}" for k, v in config.kwargs.items())
            + f" warps={config.num_warps} stages={config.num_stages}" for key, config in cache.items()}
