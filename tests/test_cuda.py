"""GPU paths: CUDA-graph replay equals eager (fp32 and bf16), warm-up captures every variant,
8-bit weights run captured (int8 everywhere, fp8 on compute capability 8.9+) and compiled.
Skipped where there is no CUDA device; `benchmarks/gpu_check.sh` runs them on a GPU machine."""

import pytest
import torch

from fastcsm.engine.engine import Engine, Request
from fastcsm.engine.sampling import SamplingParams, SamplingPath
from fastcsm.model import quant
from fastcsm.model.config import tiny_config
from fastcsm.model.network import CSM
from fastcsm.model.prompt import Segment, TextTokenizer, build_prompt
from fastcsm.testing import byte_tokenizer_json, randomize_

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CFG = tiny_config()
TOK = TextTokenizer.from_json(byte_tokenizer_json())


def model(dtype):
    m = CSM(CFG)
    randomize_(m, seed=0)
    return m.to("cuda", dtype).eval().requires_grad_(False)


def codec():
    from fastcsm.codec.codec import Codec
    from fastcsm.testing import random_mimi

    return Codec(random_mimi().cuda())


def requests(n):
    out = []
    for i in range(n):
        codes = torch.randint(0, 2048, (4, 32), generator=torch.Generator().manual_seed(i))
        p = build_prompt(f"Line number {i}.", i % 2, [Segment(1, "Voice.", codes=codes)], TOK, CFG)
        out.append(Request(p, 10, SamplingParams(temperature=[0.9, 0.0, 1.1][i % 3], topk=[50, 0, 20][i % 3]),
                           seed=i))
    return out


def run(engine, rs):
    got = {r: ([], []) for r in rs}
    for r in rs:
        engine.add(r)
    while any(r in engine for r in rs):
        for e in engine.step():
            if not e.ended:
                got[e.request][0].append(e.codes)
                got[e.request][1].append(e.pcm)
    return [(torch.stack(c), torch.cat(p)) for c, p in (got[r] for r in rs)]


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-4), (torch.bfloat16, 1e-3)])
def test_graphs_equal_eager(dtype, atol):
    """The captured step gives the eager step's codes for the same batch, in fp32 and in bf16."""
    m, c = model(dtype), codec()
    eager = run(Engine(m, max_slots=4, codec=c, cuda_graphs=False), requests(3))
    graphed_engine = Engine(m, max_slots=4, codec=c, cuda_graphs=True)
    graphed = run(graphed_engine, requests(3))
    assert graphed_engine.runner.built  # captured, then replayed
    for (c1, p1), (c2, p2) in zip(eager, graphed, strict=True):
        assert torch.equal(c1, c2)
        assert torch.allclose(p1, p2, atol=atol)


FP8 = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


@pytest.mark.parametrize("mode", ["int8", pytest.param("fp8", marks=pytest.mark.skipif(
    not FP8, reason="fp8 needs compute capability 8.9+"))])
def test_quantized_runs_captured_and_equals_eager(mode):
    """8-bit linears inside the captured step: the same codes as the same quantized model eager."""
    full = model(torch.bfloat16)
    m, c = quant.quantized_copy(full, mode), codec()
    assert quant.mode_of(m) == mode and m.codebook0_head.weight.dtype == quant.STORAGE[mode]
    eager = run(Engine(m, max_slots=4, codec=c, cuda_graphs=False), requests(3))
    engine = Engine(m, max_slots=4, codec=c)
    assert engine.cuda_graphs and engine.warmup() > 0
    graphed = run(engine, requests(3))
    for (c1, _), (c2, p2) in zip(eager, graphed, strict=True):
        assert torch.equal(c1, c2)
        assert torch.isfinite(p2).all()


@pytest.mark.parametrize("mode", ["int8", pytest.param("fp8", marks=pytest.mark.skipif(
    not FP8, reason="fp8 needs compute capability 8.9+"))])
def test_quantized_compiled_and_captured(mode):
    """torch.compile(fullgraph=True) of the 8-bit step (the weight-only matmul is an opaque custom
    op: inductor 2.11 failed to lower it), captured per bucket: a greedy request's first codes
    equal the eager quantized ones. Four codebooks keep the compile short; the step's code is the same for any count."""
    cfg = tiny_config(num_codebooks=4)
    full = CSM(cfg)
    randomize_(full, seed=0)
    m = quant.quantized_copy(full.to("cuda", torch.bfloat16).eval().requires_grad_(False), mode)
    codes = torch.randint(0, 2048, (4, 4), generator=torch.Generator().manual_seed(0))
    p = build_prompt("Compile me.", 0, [Segment(1, "Voice.", codes=codes)], TOK, cfg)
    greedy = SamplingParams(temperature=0.0)
    eager = torch.stack([e.codes for e in Engine(m, cuda_graphs=False).run(Request(p, 6, greedy, seed=0))])
    engine = Engine(m, compile=True)
    assert engine.cuda_graphs
    compiled = torch.stack([e.codes for e in engine.run(Request(p, 6, greedy, seed=0))])
    assert compiled.shape == eager.shape
    assert torch.equal(compiled[0, 0], eager[0, 0])  # first code: same logits up to fusion order
    assert (compiled[0] == eager[0]).float().mean() >= 0.5


def test_accuracy_of_8_bit_on_cuda():
    """Teacher-forced logits of int8 (and fp8) against bf16 on the same weights, on the GPU."""
    from fastcsm import bench

    full = bench.random_model(CFG, "cuda", torch.bfloat16)
    for mode in ["int8"] + (["fp8"] if FP8 else []):
        acc = bench.quant_accuracy(full, quant.quantized_copy(full, mode), voice_frames=40, frames=8)
        assert acc["codebook0_rel_rms"] < 0.06 and acc["decoder_rel_rms_max"] < 0.12, (mode, acc)


def test_bf16_with_graphs_and_warmup():
    m, c = model(torch.bfloat16), codec()
    engine = Engine(m, max_slots=4, codec=c)
    assert engine.cuda_graphs and engine.one_frame_late
    assert engine.warmup() > 0
    assert engine.runner.built == {(b, p) for b in engine.buckets for p in SamplingPath.every(64)}
    out = run(engine, requests(4))
    assert all(codes.shape == (10, 32) and pcm.shape == (10 * 1920,) for codes, pcm in out)
    assert all(torch.isfinite(pcm).all() for _, pcm in out)


def test_follow_on_audio_under_graphs_equals_eager():
    """A piece that continues the previous piece's audio (`audio_after`) gets the same PCM from
    the captured step as from the eager one: the codec snapshots see what the graphs wrote."""
    from dataclasses import replace

    m, c = model(torch.float32), codec()

    def speak(engine):
        a, b = requests(2)
        a = replace(a, keep_audio=True)
        b = replace(b, audio_after=a)
        return torch.cat([e.pcm for r in (a, b) for e in engine.run(r)])

    eager = speak(Engine(m, max_slots=2, codec=c, cuda_graphs=False))
    graphed = speak(Engine(m, max_slots=2, codec=c))
    assert eager.shape == graphed.shape and torch.allclose(eager, graphed, atol=1e-4)
