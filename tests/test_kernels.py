"""The 8-bit Triton matmul (`fastcsm.model.kernels.qlinear`) against (x @ w.T) * s in fp32.

On a CPU the kernel runs under Triton's interpreter (TRITON_INTERPRET=1, numpy): the default run
starts this file again in a subprocess with the interpreter on and FASTCSM_QUANT_KERNEL=triton,
which is where the tests below the wrapper run. On a CUDA machine they run on the GPU directly,
every autotuning candidate included. Shapes are tiny: interpreted kernels are slow.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton", reason="the 8-bit Triton kernel needs the triton package (pip install triton)")

from fastcsm.engine.engine import Engine, Request  # noqa: E402
from fastcsm.engine.sampling import SamplingParams  # noqa: E402
from fastcsm.model import (
    kernels,  # noqa: E402
    quant,
)
from fastcsm.model.config import tiny_config  # noqa: E402
from fastcsm.model.network import CSM  # noqa: E402
from fastcsm.model.prompt import Segment, TextTokenizer, build_prompt  # noqa: E402
from fastcsm.testing import byte_tokenizer_json, randomize_  # noqa: E402

INTERPRETED = kernels.interpreting()
CUDA = torch.cuda.is_available() and not INTERPRETED
DEVICE = "cuda" if CUDA else "cpu"
here = pytest.mark.skipif(not (INTERPRETED or CUDA), reason="runs interpreted in the subprocess of "
                          "test_under_the_interpreter, or on a CUDA device")
config = kernels._config

# Each path of the kernel: element-wise products (BLOCK_M < 16) and tensor cores, split-K or not.
PATHS = {"fma": config(1, 32, 64, 1, 4, 1), "fma-rows": config(4, 32, 64, 1, 4, 1),
         "fma-split": config(4, 32, 32, 3, 4, 1), "dot": config(16, 32, 64, 1, 4, 1),
         "dot-split": config(16, 32, 16, 4, 4, 1)}
# Rows and (N, K): multiples of every block, N and K that are not, and N that is not.
SHAPES = [(1, 64, 128), (3, 33, 100), (17, 40, 96)]


@pytest.mark.slow
@pytest.mark.skipif(INTERPRETED or CUDA, reason="this process already runs the kernel tests")
def test_under_the_interpreter():
    """Run this file's kernel tests with Triton's interpreter on the CPU, in a fresh process
    (the interpreter is chosen when the kernels are defined, at import)."""
    env = dict(os.environ, TRITON_INTERPRET="1", FASTCSM_QUANT_KERNEL="triton", PYTHONPATH=os.pathsep.join(
        [str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    assert " passed" in done.stdout and " failed" not in done.stdout


@pytest.mark.skipif(not os.environ.get("FASTCSM_SLOW_TESTS") or INTERPRETED,
                    reason="compiles ~50 kernels (a minute); set FASTCSM_SLOW_TESTS=1")
def test_every_candidate_compiles_for_hopper():
    """Each autotuning candidate, int8 and e4m3 weights, compiles for sm_90 (H100/H200) with
    Triton's own ptxas, no GPU needed; so do fp32 and fp16 x with K not a multiple of the block."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn, names = kernels._qlinear_kernel, kernels._qlinear_kernel.arg_names
    aligned = ["x_ptr", "w_ptr", "s_ptr", "y_ptr", "ws_ptr", "lock_ptr", "K", "stride_xm", "stride_wn"]

    def compile_for_sm90(x, w, config, even_k, x_f32):
        sig = {n: "i32" for n in names[6:13]}
        sig.update(x_ptr=f"*{x}", w_ptr=f"*{w}", s_ptr="*fp32", y_ptr=f"*{x}", ws_ptr="*fp32", lock_ptr="*i32")
        consts = dict(config.kwargs, EVEN_K=even_k, X_F32=x_f32)
        sig.update({k: "constexpr" for k in consts})
        src = ASTSource(fn=fn, signature={n: sig[n] for n in names},
                        constexprs={(names.index(k),): v for k, v in consts.items()},
                        attrs={(names.index(k),): [["tt.divisibility", 16]] for k in aligned})
        triton.compile(src, target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": config.num_warps, "num_stages": config.num_stages})

    try:
        compile_for_sm90("bf16", "i8", kernels.CONFIGS[1][0], True, False)
    except (TypeError, KeyError, AttributeError) as e:  # ASTSource's arguments differ in this Triton
        pytest.skip(f"this Triton's ASTSource takes other arguments: {e}")
    for w in ["i8", "fp8e4nv"]:
        for c in kernels._ALL:
            compile_for_sm90("bf16", w, c, True, False)
    for x, x_f32 in [("fp32", True), ("fp16", False)]:
        for c in kernels.CONFIGS[1] + kernels.CONFIGS[16][:2]:
            compile_for_sm90(x, "i8", c, False, x_f32)


def reference(x, q, s):
    return x.float() @ q.float().T * s


def assert_close(y, ref, dtype):
    """fp32: equal to float rounding; bf16 and fp16: within half an output ulp of the fp32 result
    (plus a little for the order of the sum)."""
    assert y.dtype == dtype and y.shape == ref.shape
    ulp = {torch.float32: 2 ** -23, torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7}[dtype]
    scale = ref.abs().max()
    bound = ulp * ref.abs() + 1e-6 * scale if dtype != torch.float32 else 1e-6 * scale
    assert ((y.float() - ref).abs() <= bound).all(), float((y.float() - ref).abs().max() / scale)


def dtypes_for(path):
    # fp32 everywhere; bf16 on the element-wise paths and fp16 on the tensor-core ones (the
    # interpreter of Triton 3.9 multiplies bf16 tl.dot inputs as raw bits; on a GPU, all three).
    if CUDA:
        return [torch.float32, torch.float16, torch.bfloat16]
    return [torch.float32, torch.float16 if path.startswith("dot") else torch.bfloat16]


@here
@pytest.mark.parametrize("mode", ["int8", "fp8"])
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("M, N, K", SHAPES)
def test_kernel_equals_reference(mode, path, M, N, K):
    if INTERPRETED and M > 3 and PATHS[path].kwargs["BLOCK_M"] == 1:
        pytest.skip("the same code as 3 rows, slow when interpreted")
    gen = torch.Generator().manual_seed(M * N + K)
    q, s = (t.to(DEVICE) for t in quant.quantize(torch.randn(N, K, generator=gen) * 0.02, mode))
    for dtype in dtypes_for(path):
        x = torch.randn(M, K, generator=gen).to(DEVICE, dtype)
        y = kernels.qlinear(x, q, s, PATHS[path])
        assert_close(y, reference(x, q, s), dtype)
        if PATHS[path].kwargs["SPLIT_K"] > 1:  # the split's reduction is deterministic
            assert torch.equal(y, kernels.qlinear(x, q, s, PATHS[path]))


@here
def test_default_config_leading_dims_and_strided_rows():
    """Without a named config (autotuned on a GPU, fixed in the interpreter); x [2, 3, K] gives
    y [2, 3, N]; rows taken from a wider tensor; an fp8 weight."""
    gen = torch.Generator().manual_seed(1)
    for mode in ["int8", "fp8"]:
        q, s = (t.to(DEVICE) for t in quant.quantize(torch.randn(70, 48, generator=gen) * 0.02, mode))
        x = torch.randn(2, 3, 48, generator=gen).to(DEVICE)
        y = kernels.qlinear(x, q, s)
        assert y.shape == (2, 3, 70)
        assert_close(y, reference(x, q, s), torch.float32)
        wide = torch.randn(5, 96, generator=gen).to(DEVICE)
        assert_close(kernels.qlinear(wide[:, ::2], q, s), reference(wide[:, ::2], q, s), torch.float32)
        assert_close(kernels.qlinear(wide[:, :48], q, s), reference(wide[:, :48], q, s), torch.float32)


@here
def test_bad_arguments_are_refused():
    q, s = quant.quantize(torch.randn(8, 16), "int8")
    q, s = q.to(DEVICE), s.to(DEVICE)
    x = torch.randn(2, 16, device=DEVICE)
    with pytest.raises(ValueError, match="do not match"):
        kernels.qlinear(torch.randn(2, 15, device=DEVICE), q, s)
    with pytest.raises(ValueError, match="int8 or float8"):
        kernels.qlinear(x, q.float(), s)
    with pytest.raises(ValueError, match="scale must be fp32"):
        kernels.qlinear(x, q, s.half())
    with pytest.raises(ValueError, match="bf16, fp16 or fp32"):
        kernels.qlinear(x.double(), q, s)
    assert kernels.qlinear(x[:0], q, s).shape == (0, 8)


@here
def test_the_device_check_passes():
    dtype = torch.float16 if INTERPRETED else torch.bfloat16  # (bf16 tl.dot: see dtypes_for)
    assert quant.check_kernel(kernels, torch.device(DEVICE), dtype) is None


@pytest.mark.skipif(not CUDA, reason="autotuning candidates run on a CUDA device")
@pytest.mark.parametrize("bucket", sorted(kernels.CONFIGS))
def test_every_candidate_equals_reference_on_cuda(bucket):
    """Each config the autotuner may pick, in bf16 on a csm-like shape with a remainder (N = 2051),
    and the autotuned choice; fp8 where fastcsm runs it through this kernel (below 16 rows)."""
    gen = torch.Generator().manual_seed(bucket)
    fp8 = torch.cuda.get_device_capability() >= (8, 9) and bucket < quant.SCALED_MM_ROWS
    for mode in ["int8"] + (["fp8"] if fp8 else []):
        N, K = 2051, 1024
        q, s = (t.cuda() for t in quant.quantize(torch.randn(N, K, generator=gen) * 0.02, mode))
        x = torch.randn(bucket, K, generator=gen).to("cuda", torch.bfloat16)
        ref = reference(x, q, s)
        for c in kernels.CONFIGS[bucket]:
            if kernels._fits(c, bucket, N):
                assert_close(kernels.qlinear(x, q, s, c), ref, torch.bfloat16)
        assert_close(kernels.qlinear(x, q, s), ref, torch.bfloat16)  # autotuned


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_cuda_runs_the_triton_kernel():
    """On a GPU with Triton, the device check passes and the 8-bit linears run the kernel."""
    assert quant.cuda_kernel() == "triton", quant._kernel_reasons.get("cuda")


@pytest.mark.skipif(INTERPRETED, reason="checks the choice outside the interpreter")
def test_the_choice_of_kernel(monkeypatch):
    """FASTCSM_QUANT_KERNEL: torch or triton, anything else refused; on a CPU the Triton kernel
    runs only under the interpreter; the choice is made once and reported."""
    for value, cpu in [("torch", "torch"), ("triton", "torch"), ("", "torch")]:
        monkeypatch.setattr(quant, "_kernels", {})
        monkeypatch.setenv(quant.KERNEL_ENV, value)
        assert quant._device_kernel("cpu") == cpu
    monkeypatch.setattr(quant, "_kernels", {})
    monkeypatch.setenv(quant.KERNEL_ENV, "cuBLAS")
    with pytest.raises(ValueError, match="use 'torch' or 'triton'"):
        quant._device_kernel("cpu")
    monkeypatch.setattr(quant, "_kernels", {"cuda": "torch"})
    monkeypatch.setenv(quant.KERNEL_ENV, "torch")
    assert quant._choose_cuda_kernel() == ("torch", "FASTCSM_QUANT_KERNEL=torch")


# -- a quantized CSM through the kernel -------------------------------------------------------------

def tiny_quantized(mode):
    cfg = tiny_config(num_codebooks=2)
    m = CSM(cfg)
    randomize_(m, seed=3)
    for p in m.parameters():  # N(0, 0.02)-like weights, as in test_quant
        p.data.mul_(0.1)
    q = quant.quantized_copy(m.to(DEVICE).eval().requires_grad_(False), mode)
    tok = TextTokenizer.from_json(byte_tokenizer_json())
    codes = torch.randint(0, 2048, (3, 2), generator=torch.Generator().manual_seed(0))
    p = build_prompt("Through the kernel.", 0, [Segment(1, "Voice.", codes=codes)], tok, cfg)
    return q, Request(p, 2, SamplingParams(temperature=0.0), seed=0)


def with_kernel(kernel, fn, *args, **kw):
    """fn(*args, **kw) with the 8-bit linears of this device forced onto `kernel`."""
    saved = dict(quant._kernels)
    quant._kernels[DEVICE] = kernel
    try:
        torch._dynamo.reset()
        return fn(*args, **kw)
    finally:
        quant._kernels.clear()
        quant._kernels.update(saved)
        torch._dynamo.reset()


def greedy_codes(model, request, compile=False):
    engine = Engine(model, max_slots=1, compile="aot_eager" if compile else False, cuda_graphs=False)
    return torch.stack([e.codes for e in engine.run(request)])


SLOW = pytest.mark.skipif(not os.environ.get("FASTCSM_SLOW_TESTS") and INTERPRETED,
                          reason="10-25 s interpreted (the kernel itself is checked above); set FASTCSM_SLOW_TESTS=1")


@here
@SLOW
@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_quantized_csm_through_the_kernel_equals_weight_only(mode, monkeypatch):
    """Every 8-bit linear of a tiny CSM through the Triton op gives the weight-only path's logits
    (teacher-forced, every codebook, eager) and its greedy frames (under torch.compile(fullgraph=True)
    against weight-only eager)."""
    q, request = tiny_quantized(mode)
    for mod in q.modules():
        if isinstance(mod, (quant.QuantLinear, quant.QuantHeads)):
            mod.fbgemm = False  # the weight-only matmul is the reference, not fbgemm's int8 activations
    calls = []
    original = quant._triton_linear
    monkeypatch.setattr(quant, "_triton_linear", lambda *a: calls.append(1) or original(*a))
    p = request.prompt
    rows = list(range(len(p) - 4, len(p)))
    ref = with_kernel("torch", quant.teacher_forced_logits, q, p.tokens, p.mask, rows)
    assert not calls
    got = with_kernel("triton", quant.teacher_forced_logits, q, p.tokens, p.mask, rows)
    assert len(calls) >= 2 * 4 + 2 + 2 * 4 + 1  # backbone, projection, heads, decoder (4 linears a layer)
    for r, g in zip(ref, got, strict=True):
        assert torch.allclose(g, r, rtol=1e-4, atol=1e-5 * float(r.abs().max()))
    ref_codes = with_kernel("torch", greedy_codes, q, request)
    assert torch.equal(with_kernel("triton", greedy_codes, q, request, compile=True), ref_codes)
