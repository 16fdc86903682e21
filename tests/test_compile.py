"""The compiled step: one compile serves every batch bucket (dynamo's counters say how many graphs
a warm-up builds), compiled equals eager, the compile cache ignores what is not its own, and a
warm-up says what it is doing. Inductor compiles are `slow` (minutes on a busy 2-core CPU)."""

import json
import logging
import os
import re

import pytest
import torch
from torch._dynamo.testing import CompileCounter

from fastcsm.engine import compile_cache
from fastcsm.engine.engine import Engine, Request
from fastcsm.engine.runner import Progress, Runner
from fastcsm.engine.sampling import SamplingParams, SamplingPath
from fastcsm.model.config import tiny_config
from fastcsm.model.network import CSM
from fastcsm.model.prompt import Segment, TextTokenizer, build_prompt
from fastcsm.testing import byte_tokenizer_json, randomize_, run_together

TOK = TextTokenizer.from_json(byte_tokenizer_json())


def tiny_model(codebooks=4, seed=1):
    m = CSM(tiny_config(num_codebooks=codebooks))
    randomize_(m, seed=seed)
    return m.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def requests(cfg, n):
    out = []
    for i in range(n):
        codes = torch.randint(0, 2048, (3, cfg.num_codebooks), generator=torch.Generator().manual_seed(i))
        text = ["Compile me.", "Once for all.", "Every bucket!"][i % 3]
        p = build_prompt(text, i, [Segment(1, "Voice.", codes=codes)], TOK, cfg)
        out.append(Request(p, 5, SamplingParams(temperature=[0.9, 0.0, 1.1][i % 3], topk=[20, 0, 50][i % 3],
                                                topp=[1.0, 1.0, 0.9][i % 3]), seed=i))
    return out


def frames_compiled(model, slots, scripted=False) -> tuple[int, Engine]:
    """Dynamo frames compiled by one warm-up of an engine of `slots` slots."""
    torch._dynamo.reset()
    counter = CompileCounter()
    kw = {"step": scripted_step, "prefill": scripted_prefill} if scripted else {}
    engine = Engine(model, max_slots=slots, runner=Runner(compile=counter, **kw))
    engine.warmup()
    return counter.frame_count, engine


def scripted_step(model, mimi, state, cache, decoder_cache, decoder_tables, codec_state, pcm, path):
    """A step that reads and writes per-row tensors of every kind the real one does."""
    state.codes.add_(state.pos[:, None] + (path.candidates or 0))
    for t in cache.layers + decoder_cache.layers:
        t.mul_(1)


def scripted_prefill(model, tokens, mask, start, cache):
    """A prefill with prefill's inputs and output: the rows' count as every row's hidden state."""
    for t in cache.layers:
        t.mul_(1)
    return (tokens * mask).sum(dim=(1, 2))[:, None].float().expand(-1, model.cfg.backbone.dim)


def test_one_compile_serves_every_bucket(model):
    """Batch 1 and one dynamic batch per sampling variant (2 of them), and prefill's two graphs:
    6 graphs, whether the engine has 3 buckets or 8."""
    few, engine = frames_compiled(model, 4, scripted=True)
    many, more = frames_compiled(model, 128, scripted=True)
    assert engine.buckets == [1, 2, 4] and len(more.buckets) == 8
    assert few == many == 2 * 2 + 2
    assert len(more.runner.built) == 8 * 2  # every bucket has both variants, from those graphs
    # Running any bucket or path afterwards compiles nothing new.
    counter_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for batch in more.buckets:
        more.runner.step(more.buffers, batch, SamplingPath(64, False, False, True))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == counter_before


def test_warmup_reports_each_build_with_its_bucket_variant_and_time(model):
    seen: list[Progress] = []
    torch._dynamo.reset()
    engine = Engine(model, max_slots=4, runner=Runner(step=scripted_step, prefill=scripted_prefill, compile="eager"))
    engine.warmup(progress=seen.append)
    assert [p.done for p in seen] == list(range(len(seen))) and all(p.total == len(seen) for p in seen)
    assert len(seen) == 3 * 2 + 2
    assert [p.what for p in seen[:2]] == ["step batch 1 full sort", "step batch 1 top-64"]
    assert seen[-1].what == "prefill rows 2+"
    assert all(b.elapsed_s >= a.elapsed_s >= 0 for a, b in zip(seen, seen[1:], strict=False))
    assert str(seen[0]).startswith("building step batch 1 full sort (1/8, ")
    engine.warmup(progress=seen.append)  # built already: nothing to report
    assert len(seen) == 3 * 2 + 2


@pytest.mark.slow
def test_tiny_preset_compiles_a_bounded_number_of_graphs_and_equals_eager():
    """The real step of the tiny preset (4 codebooks keep the trace short): as many graphs for 8
    buckets as for 3, whatever window the frames attend over, and the engine compiled with
    aot_eager, Mimi in the step, gives the eager codes for requests at batches 1 to 3."""
    from fastcsm.codec.codec import Codec
    from fastcsm.codec.mimi import tiny_mimi_config
    from fastcsm.testing import random_mimi

    m = tiny_model()
    few, _ = frames_compiled(m, 4)
    many, engine = frames_compiled(m, 128)
    assert few == many == 2 * 2 + 2
    # Frames attend over their window as a span of dynamic length: any window, no new graph.
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for batch in engine.buckets[:3]:
        for window in (5, 97, 400, 2000, None):
            engine.runner.step(engine.buffers, batch, SamplingPath(64, False, False, True), window)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    codec = Codec(random_mimi(tiny_mimi_config(num_codebooks=4)))
    for n in (1, 3):
        torch._dynamo.reset()
        compiled = run_together(Engine(m, max_slots=4, codec=codec, runner=Runner(compile="aot_eager")),
                                requests(m.cfg, n))
        eager = run_together(Engine(m, max_slots=4, codec=codec), requests(m.cfg, n))
        for a, b in zip(compiled, eager, strict=True):
            assert torch.equal(a, b)


@pytest.mark.slow
def test_inductor_with_the_compile_cache_equals_eager(tmp_path):
    """Inductor, batch dynamic, through the engine's loop: the eager codes, and the cache entry made,
    from which a start with compile unset compiles."""
    m = tiny_model(codebooks=2)
    torch._dynamo.reset()
    engine = Engine(m, max_slots=2, compile=True, compile_cache=tmp_path)  # buckets 1 and 2: each builds C++
    engine.warmup()
    compiled = run_together(engine, requests(m.cfg, 2))
    eager = run_together(Engine(m, max_slots=2), requests(m.cfg, 2))
    for a, b in zip(compiled, eager, strict=True):
        assert torch.equal(a, b)
    entry = engine.runner.cache_entry
    assert entry.parent == tmp_path and any((entry / "inductor").rglob("*"))
    assert json.loads((entry / compile_cache.KEY_FILE).read_text())["torch"] == torch.__version__
    # A start with compile unset ("auto") finds that finished build and compiles from it.
    torch._dynamo.reset()
    auto = Engine(m, max_slots=2, compile="auto", compile_cache=tmp_path)
    auto.warmup()
    assert auto.runner.compiled and auto.runner.cache_entry == entry
    for a, b in zip(run_together(auto, requests(m.cfg, 2)), eager, strict=True):
        assert torch.equal(a, b)


# -- the compile cache --------------------------------------------------------------------------

def key_of(model, **change):
    return {**compile_cache.cache_key(model, None, 64), **change}


@pytest.fixture
def inductor_dir(monkeypatch):
    """Opening an entry points inductor at it: the test's own value is put back afterwards."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", os.environ.get("TORCHINDUCTOR_CACHE_DIR", "/tmp/unused"))


def test_cache_entry_is_reused_for_its_own_key(model, tmp_path, caplog, inductor_dir):
    caplog.set_level(logging.INFO, "fastcsm")
    entry = compile_cache.open_entry(tmp_path, key_of(model))
    assert "has nothing yet for" in caplog.text and (entry / "inductor").is_dir()
    (entry / "inductor" / "kernel").write_text("compiled")
    caplog.clear()
    assert compile_cache.open_entry(tmp_path, key_of(model)) == entry
    assert "loading what earlier starts compiled" in caplog.text
    assert (entry / "inductor" / "kernel").read_text() == "compiled"
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(entry / "inductor")


def test_a_cache_for_another_torch_device_or_model_is_ignored_with_a_log_line(model, tmp_path, caplog,
                                                                              inductor_dir):
    caplog.set_level(logging.INFO, "fastcsm")
    other = compile_cache.open_entry(tmp_path, key_of(model, torch="1.0.0", device="cuda Some GPU sm_90"))
    (other / "inductor" / "kernel").write_text("theirs")
    caplog.clear()
    mine = compile_cache.open_entry(tmp_path, key_of(model))
    assert mine != other and not any((mine / "inductor").iterdir())
    code = compile_cache.code_hash()
    assert f"ignoring 1 entries built for: torch 1.0.0, code {code}, cuda Some GPU sm_90" in caplog.text
    older = compile_cache.open_entry(tmp_path, key_of(model, code="0" * 12))  # another fastcsm's graphs
    assert older not in (mine, other)
    assert (other / "inductor" / "kernel").read_text() == "theirs"  # left alone
    bigger = compile_cache.open_entry(tmp_path, compile_cache.cache_key(tiny_model(codebooks=8), None, 64))
    assert bigger not in (mine, other)


def test_the_key_names_the_source_that_compiled_graphs_are_traced_from(tmp_path):
    """An edit or another release of the compiled layers makes another key; other files do not."""
    for d in ("model", "engine", "codec"):
        (tmp_path / d).mkdir()
    (tmp_path / "model" / "network.py").write_text("x = 1\n")
    (tmp_path / "nested.py").write_text("")
    (tmp_path / "server.py").write_text("a = 1\n")
    first = compile_cache.code_hash.__wrapped__(tmp_path)
    (tmp_path / "server.py").write_text("a = 2\n")
    assert compile_cache.code_hash.__wrapped__(tmp_path) == first
    (tmp_path / "model" / "network.py").write_text("x = 2\n")
    assert compile_cache.code_hash.__wrapped__(tmp_path) != first
    assert len(compile_cache.code_hash()) == 12 and compile_cache.code_hash() == compile_cache.code_hash()


@pytest.mark.parametrize("damage", ["garbage", "another key"])
def test_a_damaged_cache_entry_is_cleared_not_trusted(model, tmp_path, caplog, inductor_dir, damage):
    caplog.set_level(logging.INFO, "fastcsm")
    entry = compile_cache.open_entry(tmp_path, key_of(model))
    (entry / "inductor" / "kernel").write_text("stale")
    key_file = entry / compile_cache.KEY_FILE
    if damage == "garbage":
        key_file.write_bytes(b"\x00\xff{not json")
    elif damage == "another key":
        key_file.write_text(json.dumps(key_of(model, torch="0.1")))
    caplog.clear()
    assert compile_cache.open_entry(tmp_path, key_of(model)) == entry
    assert "cleared, compiling afresh" in caplog.text
    assert not (entry / "inductor" / "kernel").exists()
    assert json.loads(key_file.read_text()) == json.loads(json.dumps(key_of(model)))


def test_unset_compile_compiles_only_from_a_finished_build_in_the_cache(model, tmp_path, caplog, inductor_dir,
                                                                       monkeypatch):
    """compile="auto" (a server's default): without a finished build of its warm-up's variants in
    the compile cache the engine runs eagerly and writes nothing there; once a compiled warm-up of
    them has finished in its entry (built.json), it compiles from that entry, and equals eager.
    (Inductor is stood in for by dynamo's counting backend: the decision is what is tested.)"""
    caplog.set_level(logging.INFO, "fastcsm")
    counter, real = CompileCounter(), Runner._compile

    def counted(self, backend):
        real(self, counter)
        self.backend = backend

    monkeypatch.setattr(Runner, "_compile", counted)
    torch._dynamo.reset()

    def auto(slots: int) -> Engine:
        engine = Engine(model, max_slots=slots, compile="auto", compile_cache=tmp_path)
        assert engine.runner.auto and not engine.runner.compiled
        engine.warmup()
        assert not engine.runner.auto
        return engine

    assert not auto(2).runner.compiled and not any(tmp_path.iterdir())
    assert "running the step eagerly" in caplog.text
    key = Engine(model, max_slots=2, compile="auto", compile_cache=tmp_path).runner.cache_key
    entry = compile_cache.open_entry(tmp_path, key)  # a compile that never finished
    assert not auto(2).runner.compiled
    built = Engine(model, max_slots=2, compile=True, compile_cache=tmp_path)
    built.warmup()
    assert built.runner.cache_entry == entry and (entry / compile_cache.BUILT_FILE).is_file()
    torch._dynamo.reset()  # (else the same code, guards and all, is not traced again)
    frames = counter.frame_count
    engine = auto(2)
    assert engine.runner.compiled and engine.runner.cache_entry == entry and counter.frame_count > frames
    assert "compiling from it" in caplog.text
    for a, b in zip(run_together(engine, requests(model.cfg, 2)), run_together(Engine(model, max_slots=2),
                                                                                requests(model.cfg, 2)), strict=True):
        assert torch.equal(a, b)
    assert not auto(4).runner.compiled  # bucket 4 was never built


def test_default_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("FASTCSM_COMPILE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compile_cache.default_dir() == tmp_path / "fastcsm" / "compile"
    monkeypatch.setenv("FASTCSM_COMPILE_CACHE", str(tmp_path / "mine"))
    assert compile_cache.default_dir() == tmp_path / "mine"
    assert Runner().cache_dir == tmp_path / "mine"


def test_readyz_says_what_start_up_is_doing():
    from fastapi.testclient import TestClient

    from fastcsm.server.app import create_app
    from fastcsm.server.settings import Settings

    app = create_app(Settings(model="/nonexistent"))
    # Outside `with`: no lifespan, so nothing loads and the server stays unready.
    client = TestClient(app, base_url="http://127.0.0.1")
    r = client.get("/readyz")
    assert r.status_code == 503 and r.json() == {"ready": False, "slots": 0, "free_slots": 0, "queued": 0,
                                                 "loading": "loading the model"}
    app.state.service.loading = str(Progress(2, 8, "step batch 2 top-64", 31.0))  # as a warm-up reports it
    assert client.get("/readyz").json()["loading"] == "building step batch 2 top-64 (3/8, 31 s so far)"


def _loop_lengths(code: str) -> list[int]:
    """The fixed trip counts of the loops in inductor's generated C++."""
    return [int(n) for n in re.findall(r"<static_cast<int64_t>\((\d+)L\);", code)]


@pytest.mark.slow
def test_compiled_stacks_write_their_caches_in_place():
    """Every layer's KV cache (and each of Mimi's rings) is a graph input of its own, written by an
    indexed write, which inductor does in place. Written into a view of one stacked buffer, or
    with a `scatter_`, the compiled code copied each layer's whole cache every frame; now no
    kernel runs over as much as one head's keys."""
    import dataclasses

    from torch._inductor.utils import run_and_get_code

    from fastcsm.codec.mimi import Mimi, mimi_preset

    def compiled(fn, *args):
        torch._dynamo.reset()
        with torch.inference_mode():
            got, code = run_and_get_code(torch.compile(fn, fullgraph=True), *args)
        return got, max(_loop_lengths("\n".join(code)))

    model, T, pos = tiny_model(), 1024, torch.tensor([[7]])
    c = model.cfg.backbone
    x = torch.randn(1, 1, c.dim)
    cache, ref = model.backbone_cache(1, T), model.backbone_cache(1, T)
    with torch.inference_mode():
        want = model.backbone(x, pos, ref)
    got, longest = compiled(model.backbone, x, pos, cache)
    torch.testing.assert_close(got, want)
    for a, b in zip(cache.layers, ref.layers, strict=True):
        torch.testing.assert_close(a, b)  # written in place, as eager writes them
    assert longest < T * c.head_dim

    mimi = Mimi(dataclasses.replace(mimi_preset("tiny"), sliding_window=512)).eval().requires_grad_(False)
    stack, h = mimi.decoder_transformer, torch.randn(1, 1, mimi.config.dim)
    state, ref = (stack.init_state(1, 1, "cpu", torch.float32) for _ in range(2))
    with torch.inference_mode():
        want = stack(h, ref)
    got, longest = compiled(stack, h, state)
    torch.testing.assert_close(got, want)
    for a, b in zip(state.layers, ref.layers, strict=True):
        torch.testing.assert_close((a.k, a.v), (b.k, b.v))
    assert longest < state.capacity * mimi.config.head_dim


@pytest.mark.slow
def test_inductor_frames_over_any_window_reuse_the_warm_up_graph(tmp_path):
    """Compiled by inductor (whose graphs hold guards dynamo's own trace does not, e.g. on a view
    being contiguous), frames over windows from 5 positions to the cache's whole reach run on the
    warm-up's graph, and equal eager frames over the same windows."""
    from torch._dynamo.utils import counters

    m = tiny_model()
    torch._dynamo.reset()
    path = SamplingPath.of([SamplingParams()], 64)
    compiled = Engine(m, max_slots=1, compile=True, compile_cache=str(tmp_path), sample_candidates=64)
    eager = Engine(m, max_slots=1, sample_candidates=64)
    compiled.runner.warmup(compiled.buffers, [(1, path)])
    graphs = counters["stats"]["unique_graphs"]
    for engine in (compiled, eager):
        engine.buffers.state.active.fill_(True)
    for window in (5, 97, 1000, compiled.max_seq_len, None):
        for engine in (compiled, eager):
            engine.buffers.state.pos.fill_(min(window or compiled.max_seq_len, compiled.max_seq_len) - 1)
            engine.runner.step(engine.buffers, 1, path, window)
        assert torch.equal(compiled.buffers.state.codes, eager.buffers.state.codes), window
    assert counters["stats"]["unique_graphs"] == graphs
