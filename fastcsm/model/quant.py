"""Eight-bit weights: every linear of CSM in int8 (or fp8) with one scale per output channel.

What is quantized: every linear of the backbone and the depth decoder, the projection,
`codebook0_head` and the 31 audio heads; embeddings and norms stay in the model's dtype
(`QUANTIZED` matches the names). A weight row w[n] is stored as q[n] = round(w[n] / s[n]) with
s[n] = max|w[n]| / 127 (int8) or / 448 (fp8 e4m3), and y = (x @ q.T) * s. A layer's q/k/v and
its gate/up run as one linear each (`model.FusedLinears`), in 8 bits as in full precision: one
`QuantLinear` over the stacked rows, whose per-row scales are exactly the separate linears'.

The kernel is chosen per device and mode, by measurement (docs/performance.md, "Eight-bit kernels"):
- int8 on CPU: fbgemm's int8 GEMM (`quantized::linear_dynamic`, VNNI where the CPU has it)
  behind an op of its own (`fastcsm::fbgemm_rows`), so `torch.compile(fullgraph=True)` keeps the
  GEMM as one opaque call and fuses the rows' quantization around it. fbgemm
  quantizes activations with one scale per call; each row is first divided by its own max|x|
  and a fixed row [1, -1, 0...] rides along, so every row is quantized on the same [-1, 1]
  grid and a request's result never depends on the other rows of its batch.
- int8 on CUDA: `kernels.qlinear`, a Triton kernel that reads the weight once as 8 bits and
  converts it in registers (fp32 sums, split-K reduced deterministically, autotuned per row
  bucket and shape during warm-up), up to `TRITON_MAX_ROWS` rows; an opaque custom op under
  `torch.compile`, captured in the CUDA graphs like any kernel. `cuda_kernel()` decides once per
  process: "triton" if Triton imports and the kernel equals the reference on the GPU, else
  "torch"; FASTCSM_QUANT_KERNEL=torch|triton overrides. Its speed is still to be measured on a
  GPU (`benchmarks/bench_quant_kernels.py`). Otherwise, and above that many rows (prefill):
  weight-only, y = F.linear(x, q.to(x.dtype)) * s, also an opaque custom op. Weight-only saves
  memory, not time: measured on an H200 (torch 2.11), the conversion is a kernel of its own, so
  an int8 step was slower than bf16 (docs/performance.md).
- fp8 (CUDA sm_89+): e4m3 weights. Where enough rows come at once (`scaled_mm_rows`) and the
  shapes suit the tensor cores, activations are cast to e4m3 per row and `torch._scaled_mm`
  runs; otherwise the int8 paths above (the Triton kernel takes e4m3 weights too).

A model is quantized on the meta device (`prepare`) and filled while loading, tensor by tensor
(`convert`), so a full-precision copy never exists; `quantized_copy` makes a quantized model
from a loaded one, sharing its embeddings (benchmarks and accuracy checks).
"""

from __future__ import annotations

import functools
import itertools
import os
import re
import warnings
import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F

MODES = ("none", "int8", "fp8")
QMAX = {"int8": 127.0, "fp8": 448.0}
STORAGE = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}
SCALE_SUFFIX = "_scale"  # a checkpoint stores the scale of tensor NAME as NAME_scale
# fastcsm names of the weights that are quantized (the audio heads are one tensor, `audio_head`).
QUANTIZED = re.compile(r"^((backbone|decoder)\.layers\.\d+\.(attn|mlp)\.\w+\.weight|projection\.weight|"
                       r"codebook0_head\.weight|audio_head)$")
# fp8 `_scaled_mm` needs both matrix dims in multiples of 16; on CUDA it runs from this many rows
# (below, the weight-only matmul reads the same bytes without casting activations).
_SCALED_MM_ALIGN = 16
SCALED_MM_ROWS = 16


def check_mode(mode: str | None, device: torch.device | str | None = None) -> str | None:
    """A `quantize=` argument -> "int8", "fp8", or None for full precision; refuses what the
    device cannot run."""
    if mode is None or mode == "none":
        return None
    if mode not in MODES:
        raise ValueError(f"unknown quantize={mode!r}; use one of {list(MODES)}")
    device = torch.device(device) if device is not None else None
    if mode == "fp8" and device is not None and device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            raise ValueError(f"quantize='fp8' needs a GPU with fp8 tensor cores (compute capability 8.9+, e.g. L4, "
                             f"H100); {torch.cuda.get_device_name(device)} is {major}.{minor}: use quantize='int8'")
    return mode


def mode_of(model: nn.Module) -> str | None:
    """The quantization of a model's linears: "int8", "fp8" or None."""
    for m in model.modules():
        if isinstance(m, (QuantLinear, QuantHeads)):
            return m.mode
    return None


# -- the numbers ---------------------------------------------------------------------------------

def quantize(w: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., N, K] (rows are output channels) -> (q [..., N, K] int8/fp8, scale [..., N] fp32)."""
    w = w.float()
    scale = (w.abs().amax(dim=-1) / QMAX[mode]).clamp(min=1e-12)
    x = w / scale[..., None]
    q = x.round().clamp(-127, 127).to(torch.int8) if mode == "int8" else x.to(torch.float8_e4m3fn)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * scale.float()[..., None]).to(dtype)


def stored_mode(t: torch.Tensor) -> str | None:
    return {torch.int8: "int8", torch.float8_e4m3fn: "fp8"}.get(t.dtype)


# -- the CPU int8 kernel -------------------------------------------------------------------------

def _vnni() -> bool:
    is_vnni = getattr(torch.cpu, "_is_vnni_supported", None)
    return bool(is_vnni and is_vnni())


# Without VNNI fbgemm's int8 dot products pass through saturating int16 sums, so activations get
# 7 bits there (as `quantize_dynamic` does); with VNNI they get all 8 (half the rounding error).
REDUCE_RANGE = not _vnni()
_keys = itertools.count()
# fbgemm packed weights, made on first use, by the key of their linear (or audio head).
_packed: dict[int, object] = {}
_pins: dict[int, torch.Tensor] = {}  # width -> the row [1, -1, 0, ...] that pins the activation grid
_linear_dynamic = None  # fbgemm's op, resolved by `fbgemm_available`


def _new_key(owner) -> int:
    key = next(_keys)
    weakref.finalize(owner, _forget, key)
    return key


def _forget(key: int) -> None:
    """Drop the packed weight of the linear `key` (it is gone or has new weights)."""
    _packed.pop(key, None)


def _pack(weight: torch.Tensor, scale: torch.Tensor, key: int):
    zero = torch.zeros(weight.shape[0], dtype=torch.long, device="cpu")
    with warnings.catch_warnings():  # torch 2.13 deprecates quantized tensors; `fbgemm_available` checks
        warnings.simplefilter("ignore", UserWarning)
        qw = torch._make_per_channel_quantized_tensor(weight.contiguous(), scale.double(), zero, 0)
    packed = _packed[key] = torch.ops.quantized.linear_prepack(qw, None)
    return packed


def _pin(width: int) -> torch.Tensor:
    pin = _pins.get(width)
    if pin is None:
        pin = _pins[width] = _pin_row(width, "cpu")
    return pin


def _linear_dynamic_op():
    """fbgemm's `quantized::linear_dynamic` as the C++ op itself: the Python packet around it checks
    every call's arguments for fake script objects (a few microseconds, ~600 calls a frame), which
    only tracing could pass, and tracing runs the custom op's fake below instead."""
    packet = torch.ops.quantized.linear_dynamic
    return getattr(packet, "_op", packet)


def _packed_for(weight: torch.Tensor, scale: torch.Tensor, key: int):
    """The packed fbgemm weight of the linear `key`, packed on first use."""
    packed = _packed.get(key)
    return packed if packed is not None else _pack(weight, scale, key)


def _on_the_grid(x: torch.Tensor, gemm) -> torch.Tensor:
    """x [..., K] @ W.T by `gemm` (fbgemm over rows [M + 1, K]), each row of x quantized on its own:
    divided by its max|x|, behind the pinned row that fixes fbgemm's activation grid at [-1, 1]
    whatever else the batch holds, and scaled back after."""
    K = x.shape[-1]
    rows = x.reshape(-1, K)
    rows = rows if rows.dtype == torch.float32 else rows.float()  # (no-op calls cost, ~600 a frame)
    amax = rows.abs().amax(dim=-1, keepdim=True).clamp_(min=1e-30)  # (vector_norm(inf) is 10x slower here)
    pin = _pin(K) if not torch.compiler.is_compiling() else _pin_row(K, x.device)
    y = gemm(torch.cat([pin, rows / amax]))[1:].mul_(amax)
    y = y if x.dim() == 2 else y.view(*x.shape[:-1], y.shape[-1])
    return y if x.dtype == torch.float32 else y.to(x.dtype)


def _run_packed(x: torch.Tensor, packed) -> torch.Tensor:
    return _on_the_grid(x, lambda rows: _linear_dynamic(rows, packed, REDUCE_RANGE))


def _int8_linear_cpu(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, key: int) -> torch.Tensor:
    """x [..., K] @ weight [N, K].T * scale [N] with one fbgemm call, each row of x quantized on its
    own; `weight` is packed on first use and kept under `key`."""
    return _run_packed(x, _packed_for(weight, scale, key))


def _fbgemm_rows(rows: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, key: int) -> torch.Tensor:
    """fbgemm's call alone, over rows already on the grid (`_on_the_grid`)."""
    return _linear_dynamic(rows, _packed_for(weight, scale, key), REDUCE_RANGE)


def _pin_row(width: int, device) -> torch.Tensor:
    """The pinned row [1, 0, ..., 0, -1]: kept per width by `_pin` for eager code, made inside a
    compiled graph (a constant there)."""
    pin = torch.zeros(1, width, device=device)
    pin[:, 0], pin[:, -1] = 1.0, -1.0
    return pin


def _packed_eager(key: int):
    """The packed fbgemm weight of the linear `key` if eager code may run it straight away (it was
    packed from CPU weights that have not changed or moved since), else None."""
    return None if torch.compiler.is_compiling() else _packed.get(key)


# What compiled graphs keep as one opaque call: fbgemm's GEMM alone, so that inductor fuses the
# rows' quantization around it (five small ops a linear, ~600 linears a frame). It is registered
# with a CPU kernel of its own rather than through `custom_op`, whose Python dispatch cost 6-11 us
# a call against 2.5-4 us. Eager code calls the functions themselves.
_library = torch.library.Library("fastcsm", "FRAGMENT")
_library.define("fbgemm_rows(Tensor rows, Tensor weight, Tensor scale, int key) -> Tensor")
_library.impl("fbgemm_rows", _fbgemm_rows, "CPU")


@torch.library.register_fake("fastcsm::fbgemm_rows", lib=_library)
def _(rows, weight, scale, key):
    return rows.new_empty(rows.shape[0], weight.shape[0], dtype=torch.float32)


@functools.cache
def fbgemm_available() -> bool:
    """Whether this torch still has the quantized CPU ops (deprecated in 2.13); if not, CPU int8
    runs weight-only like CUDA."""
    global _linear_dynamic
    try:  # on the CPU: models are built under `torch.device("meta")`, where this is first asked
        _linear_dynamic = _linear_dynamic_op()
        with torch.device("cpu"):
            _int8_linear_cpu(torch.ones(2, 8), torch.ones(8, 8, dtype=torch.int8), torch.ones(8), -1)
        return True
    except (RuntimeError, AttributeError, NotImplementedError):
        return False
    finally:
        _forget(-1)


# -- modules -------------------------------------------------------------------------------------

def _fbgemm(module, weight: torch.Tensor) -> bool:
    return (module.mode == "int8" and weight.device.type == "cpu" and module.fbgemm
            and _device_kernel("cpu") != "triton")


def _int8_cpu(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, key: int):
    if torch.compiler.is_compiling():
        return _on_the_grid(x, lambda rows: torch.ops.fastcsm.fbgemm_rows(rows, weight, scale, key))
    return _int8_linear_cpu(x, weight, scale, key)


def _linear(module, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, key: int) -> torch.Tensor:
    if _fbgemm(module, weight):
        return _int8_cpu(x, weight, scale, key)
    N, K = weight.shape
    rows = x.numel() // K
    from_rows = module.scaled_mm_rows if module.scaled_mm_rows is not None else \
        (SCALED_MM_ROWS if weight.device.type == "cuda" else None)
    # CUDA's row-wise scaled matmul writes bf16 only; an fp32 / fp16 model stays weight-only there.
    dtype_ok = x.dtype == torch.bfloat16 or weight.device.type != "cuda"
    if (module.mode == "fp8" and from_rows is not None and rows >= from_rows and N % _SCALED_MM_ALIGN == 0
            and K % _SCALED_MM_ALIGN == 0 and dtype_ok):
        return _scaled_mm_linear(x, weight, scale)
    if rows <= TRITON_MAX_ROWS and _device_kernel(weight.device.type) == "triton":
        op = triton_linear if torch.compiler.is_compiling() else _triton_linear
        return op(x, weight, scale)
    op = weight_only_linear if torch.compiler.is_compiling() else _weight_only_linear
    return op(x, weight, scale)


def _scaled_mm_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x @ weight.T * scale for an e4m3 weight on fp8 tensor cores, x cast to e4m3 row by row."""
    N, K = weight.shape
    x2 = x.reshape(-1, K).float()
    xs = (x2.abs().amax(dim=-1, keepdim=True) / QMAX["fp8"]).clamp(min=1e-12)  # [M, 1]
    xq = (x2 / xs).to(torch.float8_e4m3fn)
    y = torch._scaled_mm(xq, weight.t(), scale_a=xs, scale_b=scale.float()[None], out_dtype=x.dtype)
    return y.reshape(*x.shape[:-1], N)


def _weight_only_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x @ weight.T * scale, the 8-bit weight converted to x's dtype first."""
    return F.linear(x, weight.to(x.dtype)) * scale.to(x.dtype)


# Compiled graphs keep the weight-only matmul as one opaque call. Inductor (torch 2.11, H200)
# neither fused the int8 -> bf16 conversion into the matmul (a 8192x2048 linear, captured: 23.7 us
# against 8.3 us in bf16, with or without prologue fusion) nor always lowered it: an int8 step
# failed to compile (`AssertionError: Pointwise` in the mm's extern choice). As a custom op it
# compiles everywhere and runs exactly as in eager.
weight_only_linear = torch.library.custom_op("fastcsm::weight_only_linear", _weight_only_linear, mutates_args=())


@weight_only_linear.register_fake
def _(x, weight, scale):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


# -- the CUDA kernel: Triton, fused -----------------------------------------------------------------

KERNEL_ENV = "FASTCSM_QUANT_KERNEL"  # "torch" or "triton": overrides the choice `cuda_kernel` makes
# Rows up to which the Triton kernel runs; larger matmuls (prefill chunks) are compute-bound and go
# to cuBLAS through the weight-only path, whose conversion costs little against them.
TRITON_MAX_ROWS = 256
_kernels: dict[str, str] = {}  # device type -> "triton" or "torch", decided once per process
_kernel_reasons: dict[str, str] = {}


def _triton_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x @ weight.T * scale with the weight read as 8 bits (`kernels.qlinear`)."""
    from . import kernels

    return kernels.qlinear(x, weight, scale)


# One opaque call under `torch.compile` (like `weight_only_linear`): the step compiles with
# fullgraph=True and the kernel, tuned during warm-up, is captured in the CUDA graphs as it is.
triton_linear = torch.library.custom_op("fastcsm::triton_linear", _triton_linear, mutates_args=())


@triton_linear.register_fake
def _(x, weight, scale):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _forced_kernel() -> str | None:
    forced = os.environ.get(KERNEL_ENV, "").strip().lower() or None
    if forced not in (None, "torch", "triton"):
        raise ValueError(f"{KERNEL_ENV}={forced!r}: use 'torch' or 'triton'")
    return forced


def cuda_kernel() -> str:
    """The kernel of the 8-bit linears on CUDA, decided once per process: "triton" (`kernels.qlinear`,
    the weight read as 8 bits) when Triton imports and the kernel equals the reference on this GPU,
    else "torch" (weight-only: the weight converted by a kernel of its own, then cuBLAS).
    FASTCSM_QUANT_KERNEL=torch|triton overrides (triton: an error where it cannot run)."""
    if "cuda" not in _kernels:
        _kernels["cuda"], _kernel_reasons["cuda"] = _choose_cuda_kernel()
    return _kernels["cuda"]


def _choose_cuda_kernel() -> tuple[str, str]:
    forced = _forced_kernel()
    if forced == "torch":
        return "torch", f"{KERNEL_ENV}=torch"
    try:
        from . import kernels
    except ImportError as e:
        if forced:
            raise RuntimeError(f"{KERNEL_ENV}=triton, but triton does not import: {e}") from e
        return "torch", f"triton does not import: {e}"
    try:
        problem = check_kernel(kernels, torch.device("cuda", torch.cuda.current_device()))
    except Exception as e:  # a compile or launch failure on this GPU: the kernel cannot serve here
        problem = f"{type(e).__name__}: {e}"
    if problem:
        if forced:
            raise RuntimeError(f"{KERNEL_ENV}=triton, but the Triton kernel fails its check on this GPU: {problem}")
        return "torch", f"the Triton kernel failed its check: {problem}"
    return "triton", "equals the reference on this GPU" + (f" ({KERNEL_ENV}=triton)" if forced else "")


def check_kernel(kernels, device: torch.device, dtype: torch.dtype = torch.bfloat16) -> str | None:
    """Run each path of the Triton kernel (element-wise and tensor-core products, with and without
    split-K) on `device` against (x @ w.T) * s in fp32, twice (the same bits both times); None if
    all pass, else what failed."""
    gen = torch.Generator().manual_seed(0)
    modes = ["int8"]
    if device.type != "cuda" or torch.cuda.get_device_capability(device) >= (8, 9):
        modes.append("fp8")
    cases = [(1, kernels._config(1, 16, 64, 3, 4, 2)), (5, kernels._config(4, 16, 64, 1, 4, 2)),
             (20, kernels._config(16, 32, 64, 1, 4, 2)), (20, kernels._config(16, 32, 32, 3, 4, 2))]
    for mode in modes:
        w = torch.randn(72, 200, generator=gen) * 0.02  # neither a multiple of the blocks
        q, s = (t.to(device) for t in quantize(w, mode))
        for rows, config in cases:
            x = torch.randn(rows, 200, generator=gen).to(device, dtype)
            ref = x.float() @ q.float().T * s
            y = kernels.qlinear(x, q, s, config)
            again = kernels.qlinear(x, q, s, config)
            err = float((y.float() - ref).abs().max() / ref.abs().max())
            if not err < 2 ** -7:
                return f"{mode}, {rows} rows, {config}: max error {err:.3g} of max |y|"
            if not torch.equal(y, again):
                return f"{mode}, {rows} rows, {config}: two runs differ"
    return None


@torch.compiler.assume_constant_result
def _device_kernel(device_type: str) -> str:
    """"triton" or "torch": what runs an 8-bit linear on this device type. CUDA: `cuda_kernel()`.
    Elsewhere "torch" (fbgemm or weight-only), unless FASTCSM_QUANT_KERNEL=triton and Triton's
    interpreter is on (TRITON_INTERPRET=1: the kernel runs on CPU tensors, to test it)."""
    if device_type == "cuda":
        return cuda_kernel()
    if device_type not in _kernels:
        interpreted = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
        forced = _forced_kernel() == "triton" and interpreted
        _kernels[device_type] = "triton" if forced else "torch"
        _kernel_reasons[device_type] = f"{KERNEL_ENV}=triton, TRITON_INTERPRET=1" if forced else "not CUDA"
    return _kernels[device_type]


def kernel_report(model: nn.Module) -> dict | None:
    """Which kernel runs the 8-bit linears of `model` on its device, and why (benchmarks report it)."""
    mode = mode_of(model)
    if mode is None:
        return None
    device = model.codebook0_head.weight.device
    if _device_kernel(device.type) == "triton":
        out = {"kernel": "triton", "up_to_rows": TRITON_MAX_ROWS, "above": "weight-only"}
    elif device.type == "cpu" and mode == "int8" and fbgemm_available():
        out = {"kernel": "fbgemm"}
    else:
        out = {"kernel": "weight-only"}
    out["why"] = _kernel_reasons.get(device.type, "")
    if mode == "fp8" and device.type == "cuda":
        out["scaled_mm_from_rows"] = SCALED_MM_ROWS
    return out


class QuantLinear(nn.Module):
    """A bias-free linear with 8-bit weight [N, K] and fp32 scale [N] (one per output channel). A
    layer's fused q/k/v or gate/up linear (model.FusedLinears) is one of these over the stacked
    rows: per-row scales make it exactly the separate linears quantized on their own."""

    scaled_mm_rows: int | None = None  # rows from which fp8 uses `_scaled_mm` (None: SCALED_MM_ROWS on CUDA only)

    def __init__(self, in_features: int, out_features: int, mode: str, device=None):
        super().__init__()
        self.mode = mode
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=STORAGE[mode], device=device))
        self.register_buffer("scale", torch.empty(out_features, dtype=torch.float32, device=device))
        self.key = _new_key(self)
        self.fbgemm = fbgemm_available()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed = _packed_eager(self.key)
        if packed is not None:
            return _run_packed(x, packed)
        return _linear(self, x, self.weight, self.scale, self.key)

    def _load_from_state_dict(self, *args, **kwargs):
        _forget(self.key)  # new weights: pack again on first use
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, *args, **kwargs):
        _forget(self.key)  # moved or cast: pack again on first use (if still on the CPU)
        return super()._apply(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}"


class QuantHeads(nn.Module):
    """The K-1 audio heads: weight [K-1, V, d] (each head's output channels as rows), scale [K-1, V].
    `forward(h, i)` is `h @ audio_head[i]` of the full-precision model."""

    scaled_mm_rows: int | None = None

    def __init__(self, heads: int, dim: int, vocab: int, mode: str, device=None):
        super().__init__()
        self.mode = mode
        self.register_buffer("weight", torch.empty(heads, vocab, dim, dtype=STORAGE[mode], device=device))
        self.register_buffer("scale", torch.empty(heads, vocab, dtype=torch.float32, device=device))
        self.keys = [_new_key(self) for _ in range(heads)]
        self.fbgemm = fbgemm_available()

    def forward(self, h: torch.Tensor, head: int) -> torch.Tensor:
        packed = _packed_eager(self.keys[head])
        if packed is not None:
            return _run_packed(h, packed)
        return _linear(self, h, self.weight[head], self.scale[head], self.keys[head])

    def _load_from_state_dict(self, *args, **kwargs):
        for k in self.keys:
            _forget(k)
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, *args, **kwargs):
        for k in self.keys:
            _forget(k)
        return super()._apply(*args, **kwargs)


# -- whole models --------------------------------------------------------------------------------

def prepare(model: nn.Module, mode: str | None, device=None) -> nn.Module:
    """Swap the quantized linears of a CSM (built on the meta device) for empty 8-bit ones."""
    if mode is None:
        return model
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.Linear) and QUANTIZED.match(f"{name}.weight"):
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, QuantLinear(m.in_features, m.out_features, mode, device))
    heads, dim, vocab = model.audio_head.shape
    del model.audio_head
    model.audio_head = QuantHeads(heads, dim, vocab, mode, device)
    return model


def convert(target: str, t: torch.Tensor, scale: torch.Tensor | None, mode: str | None, device,
            dtype) -> dict[str, torch.Tensor]:
    """One checkpoint tensor (fastcsm name `target`; `scale` if it is stored quantized) -> the
    state-dict entries of a model quantized as `mode`, on `device` (floats in `dtype`)."""
    if scale is not None:
        if mode == stored_mode(t) and QUANTIZED.match(target):
            q, s = t, scale
            if target == "audio_head":  # stored as [K-1, d, V] like the full-precision tensor
                q, s = q.transpose(1, 2), s
            return _entries(target, q.to(device).contiguous(), s.to(device, torch.float32).contiguous())
        t = dequantize(t.transpose(1, 2), scale, torch.float32).transpose(1, 2) if target == "audio_head" \
            else dequantize(t, scale, torch.float32)
    if mode is None or not QUANTIZED.match(target):
        return {target: t.to(device=device, dtype=dtype).contiguous()}
    w = t.to(device).transpose(1, 2) if target == "audio_head" else t.to(device)
    q, s = quantize(w, mode)
    return _entries(target, q.contiguous(), s)


def _entries(target: str, q: torch.Tensor, s: torch.Tensor) -> dict[str, torch.Tensor]:
    base = "audio_head." if target == "audio_head" else target[: -len("weight")]
    return {f"{base}weight": q, f"{base}scale": s}


def to_checkpoint(target: str, q: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A quantized module's (weight, scale) in checkpoint layout (the inverse of `convert`)."""
    return (q.transpose(1, 2).contiguous(), s) if target == "audio_head" else (q, s)


@torch.no_grad()
def quantized_copy(model: nn.Module, mode: str) -> nn.Module:
    """A quantized CSM made from a loaded full-precision one; embeddings and norms are shared."""
    from .network import CSM, FusedState

    ref = model.codebook0_head.weight
    device = ref.device
    with torch.device("meta"):
        out = prepare(CSM(model.cfg), mode)
    state = FusedState(out)
    for name, t in model.state_dict().items():
        state.add(convert(name, t, None, mode, device, t.dtype) if QUANTIZED.match(name) else {name: t})
    out.load_state_dict(state, assign=True, strict=True)
    out.init_buffers(device)
    return out.eval().requires_grad_(False)


def weight_bytes(model: nn.Module) -> int:
    return sum(t.nbytes for t in model.state_dict().values())


# -- accuracy against full precision -------------------------------------------------------------

@torch.inference_mode()
def teacher_forced_logits(model: nn.Module, tokens: torch.Tensor, mask: torch.Tensor,
                          rows: list[int]) -> list[torch.Tensor]:
    """Logits of every codebook for the audio frames at `rows` of a sequence (tokens, mask
    [T, K+1]), each predicted from the rows before it and, in the depth decoder, from the frame's
    own earlier codes (teacher forcing: a differing code never changes what comes after).
    Returns K tensors [len(rows), codebook_size] (fp32, CPU)."""
    cfg, dev = model.cfg, model.device
    K, C = cfg.num_codebooks, cfg.codebook_size
    T, R = tokens.shape[0], len(rows)
    x = model.embed_rows(tokens[None].to(dev), mask[None].to(dev))
    h = model.run_backbone(x, torch.arange(T, device=dev)[None], model.backbone_cache(1, T))[0]  # [T, D]
    idx = torch.tensor(rows, device=dev)
    hs, codes = h[idx - 1], tokens[rows, :K].to(dev)  # [R, D], [R, K]
    out = [model.codebook0_logits(hs)]
    cache = model.decoder_cache(R)
    x = torch.stack([hs, model.embed_code(codes[:, 0], 0)], dim=1)
    pos = torch.arange(2, device=dev).expand(R, 2)
    for i in range(1, K):
        out.append(model.codebook_logits(model.run_decoder(x, pos, cache)[:, -1], i))
        x = model.embed_code(codes[:, i], i)[:, None]
        pos = pos[:, -1:] + 1
    return [logits[:, :C].float().cpu() for logits in out]


def accuracy(reference: list[torch.Tensor], quantized: list[torch.Tensor]) -> dict:
    """Per codebook: relative RMS error of the logits and top-1 agreement, with summaries."""
    rel = [float((q - r).norm() / r.norm()) for r, q in zip(reference, quantized, strict=True)]
    top1 = [float((q.argmax(-1) == r.argmax(-1)).float().mean()) for r, q in zip(reference, quantized, strict=True)]
    return {
        "frames": reference[0].shape[0],
        "codebook0_rel_rms": round(rel[0], 5), "codebook0_top1": round(top1[0], 4),
        "decoder_rel_rms_mean": round(sum(rel[1:]) / len(rel[1:]), 5), "decoder_rel_rms_max": round(max(rel[1:]), 5),
        "decoder_top1_mean": round(sum(top1[1:]) / len(top1[1:]), 4), "decoder_top1_min": round(min(top1[1:]), 4),
        "rel_rms": [round(e, 5) for e in rel], "top1": [round(a, 4) for a in top1],
    }
