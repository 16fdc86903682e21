"""GPU paths: CUDA-graph replay equals eager, bf16 runs, warm-up captures every variant.
Skipped where there is no CUDA device."""

import pytest
import torch

from fastcsm.config import tiny_config
from fastcsm.engine import Engine, Request
from fastcsm.model import CSM
from fastcsm.prompt import Segment, TextTokenizer, build_prompt
from fastcsm.sampling import SamplingParams
from fastcsm.testing import byte_tokenizer_json, randomize_

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CFG = tiny_config()
TOK = TextTokenizer.from_json(byte_tokenizer_json())


def model(dtype):
    m = CSM(CFG)
    randomize_(m, seed=0)
    return m.to("cuda", dtype).eval().requires_grad_(False)


def codec():
    from fastcsm.testing import random_mimi

    return random_mimi().cuda()


def requests(n):
    out = []
    for i in range(n):
        codes = torch.randint(0, 2048, (4, 32), generator=torch.Generator().manual_seed(i))
        p = build_prompt(f"Line number {i}.", i % 2, [Segment(1, "Voice.", codes=codes)], TOK, CFG)
        out.append(Request(p, 10, SamplingParams(temperature=[0.9, 0.0, 1.1][i % 3], topk=[50, 0, 20][i % 3]),
                           seed=i))
    return out


def run(engine, rs):
    got = {id(r): ([], []) for r in rs}
    for r in rs:
        engine.add(r)
    while not all(r.done for r in rs):
        for e in engine.step():
            if e.codes is not None:
                got[id(e.request)][0].append(e.codes)
                got[id(e.request)][1].append(e.pcm)
    return [(torch.stack(c), torch.cat(p)) for c, p in (got[id(r)] for r in rs)]


def test_graphs_equal_eager_fp32():
    m, c = model(torch.float32), codec()
    eager = run(Engine(m, max_slots=4, codec=c, cuda_graphs=False), requests(3))
    graphed_engine = Engine(m, max_slots=4, codec=c, cuda_graphs=True)
    graphed = run(graphed_engine, requests(3))
    assert graphed_engine._graphs
    for (c1, p1), (c2, p2) in zip(eager, graphed, strict=True):
        assert torch.equal(c1, c2)
        assert torch.allclose(p1, p2, atol=1e-4)


def test_bf16_with_graphs_and_warmup():
    m, c = model(torch.bfloat16), codec()
    engine = Engine(m, max_slots=4, codec=c)
    assert engine.cuda_graphs and engine.one_frame_late
    assert engine.warmup() > 0
    assert len(engine._graphs) == 2 * len(engine.buckets)
    out = run(engine, requests(4))
    assert all(codes.shape == (10, 32) and pcm.shape == (10 * 1920,) for codes, pcm in out)
    assert all(torch.isfinite(pcm).all() for _, pcm in out)
