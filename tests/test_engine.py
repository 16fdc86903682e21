"""The slot engine: compiled equals eager, batched equals alone, slots reuse cleanly, end frames
detected a frame late never leak. Behaviour is injected through the engine's `Runner` (a
scripted step, a recording step), never by patching the engine."""

from dataclasses import replace

import pytest
import torch

from fastcsm.codec.codec import Codec
from fastcsm.engine.engine import KEPT_AUDIO_PER_SLOT, EndReason, Engine, PrefillError, Request
from fastcsm.engine.runner import Runner
from fastcsm.engine.sampling import SamplingParams, SamplingPath
from fastcsm.engine.step import SlotState, engine_step
from fastcsm.model.config import tiny_config
from fastcsm.model.network import CSM
from fastcsm.model.prompt import Segment, TextTokenizer, build_prompt
from fastcsm.testing import (
    assert_compiled_step_equals_eager,
    byte_tokenizer_json,
    randomize_,
    run_alone,
    run_together,
    speech_ending_step,
)

CFG = tiny_config()
K = CFG.num_codebooks
TOK = TextTokenizer.from_json(byte_tokenizer_json())


@pytest.fixture(params=[False, True], ids=["sync", "one-frame-late"])
def late(request):
    """Both ways of reading frames back: right after the step, and during the next step."""
    return request.param


@pytest.fixture(scope="module")
def model():
    m = CSM(CFG)
    randomize_(m, seed=0)
    return m.eval().requires_grad_(False)


def prompt(text, speaker=0, frames=4, seed=0):
    codes = torch.randint(0, 2048, (frames, K), generator=torch.Generator().manual_seed(seed))
    return build_prompt(text, speaker, [Segment(1, "Voice sample.", codes=codes)], TOK, CFG)


def mimi_codec(**config):
    from fastcsm.codec.mimi import tiny_mimi_config
    from fastcsm.testing import random_mimi

    return Codec(random_mimi(tiny_mimi_config(**config) if config else None))


def requests(n=4, frames=6):
    texts = ["Hello there.", "A longer line to speak, with more rows.", "Short.", "Fourth one!"]
    return [Request(prompt(texts[i % 4], i % 3, frames=2 + i, seed=i), frames,
                    SamplingParams(temperature=[0.9, 0.0, 1.2, 0.7][i % 4], topk=[50, 0, 10, 0][i % 4],
                                   topp=[1.0, 1.0, 0.9, 0.8][i % 4]), seed=100 + i) for i in range(n)]


def test_batched_equals_alone(model, late):
    together = run_together(Engine(model, max_slots=4, one_frame_late=late), requests())
    for r, codes in zip(requests(), together, strict=True):
        alone = run_alone(model, r)
        assert codes.shape == (6, K)
        assert torch.equal(codes, alone)


def test_three_requests_pad_to_bucket_four(model):
    engine = Engine(model, max_slots=8)
    rs = requests(3)
    for r in rs:
        engine.add(r)
    for _ in range(4):  # the prefills, one chunk a step
        engine.step()
    assert engine.bucket() == 4


def test_freed_slots_reused_give_fresh_results(model, late):
    engine = Engine(model, max_slots=2, one_frame_late=late)
    first = run_together(engine, requests(2))
    assert engine.free_slots == 2
    again = run_together(engine, requests(2))  # same slots, stale KV beyond each prompt
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a, b)
    # A request joining while another runs, in a slot someone else used before.
    rs = requests(4)
    late = run_together(engine, rs[2:3])
    assert torch.equal(late[0], run_alone(model, requests(4)[2]))


def test_join_mid_stream_does_not_change_others(model, late):
    engine = Engine(model, max_slots=4, one_frame_late=late)
    a, b = requests(2)
    engine.add(a)
    got = {a: [], b: []}
    steps = 0
    while steps <= 3 or a in engine or b in engine:
        if steps == 3:
            engine.add(b)
        for e in engine.step():
            if not e.ended:
                got[e.request].append(e.codes)
        steps += 1
    ref_a, ref_b = (run_alone(model, r) for r in requests(2))
    assert torch.equal(torch.stack(got[a]), ref_a)
    assert torch.equal(torch.stack(got[b]), ref_b)


def test_chunked_prefill_and_prefix_reuse_equal_plain(model):
    ref = run_alone(model, requests(1)[0])
    chunked = run_alone(model, requests(1)[0], prefill_chunk=5)
    assert torch.equal(ref, chunked)
    engine = Engine(model, max_slots=2, prefill_chunk=7)
    r1 = replace(requests(1)[0], prefix_rows=10)
    first = torch.stack([e.codes for e in engine.run(r1)])
    assert engine.stats["reused_rows"] == 0
    r2 = replace(requests(1)[0], prefix_rows=10)
    prefill_before = engine.stats["prefill_rows"]
    second = torch.stack([e.codes for e in engine.run(r2)])
    assert engine.stats["reused_rows"] == 10
    assert engine.stats["prefill_rows"] - prefill_before == len(r2.prompt) - 10
    assert torch.equal(first, ref) and torch.equal(second, ref)


def test_seed_changes_codes(model):
    a = requests(1)[0]
    b = replace(a, seed=a.seed + 1)
    assert not torch.equal(run_alone(model, a), run_alone(model, b))


@pytest.mark.slow
@pytest.mark.parametrize("backend, codebooks", [("aot_eager", 8), ("inductor", 2)])
def test_compiled_frame_step_equals_eager(backend, codebooks):
    """fullgraph=True: the whole frame is one graph (no breaks, no host syncs), and fused kernels
    give the eager numbers. Fewer codebooks than CSM's 32 keep CPU compile times short; the
    step's code is the same for any count. Slow (inductor took minutes on a busy 2-core CPU);
    the default run keeps the whole-step graph check, `test_compiled_engine_with_codec_equals_eager`."""
    cfg = tiny_config(num_codebooks=codebooks)
    m = CSM(cfg)
    randomize_(m, seed=1)
    m = m.eval().requires_grad_(False)
    rs = []
    for i in range(2):
        codes = torch.randint(0, 2048, (3, codebooks), generator=torch.Generator().manual_seed(i))
        p = build_prompt("Compile me.", i, [Segment(1, "Voice.", codes=codes)], TOK, cfg)
        rs.append(Request(p, 8, SamplingParams(temperature=0.9 if i else 0.0, topk=20), seed=i))
    assert_compiled_step_equals_eager(m, rs, backend)


def scripted_step(end_at):
    """A frame step whose codes are scripted: slot s emits frame number f+1 everywhere, and
    the all-zero end frame when f == end_at[s]."""

    def step(model, codec, state: SlotState, cache, decoder_cache, decoder_tables, codec_state, pcm, path):
        ends = torch.tensor(end_at[: state.codes.shape[0]])
        codes = (state.frame + 1)[:, None].expand_as(state.codes)
        codes = torch.where((state.frame == ends)[:, None], torch.zeros_like(codes), codes)
        state.codes.copy_(codes)
        state.frame.add_(state.active.long())
        state.pos.add_(state.active.long())

    return step


def test_end_frame_found_a_frame_late_never_leaks(model, late):
    engine = Engine(model, max_slots=2, one_frame_late=late, runner=Runner(step=scripted_step([3, 5])))
    a, b = requests(2, frames=50)
    out = run_together(engine, [a, b])
    # Frames 1..3 for slot 0 and 1..5 for slot 1: the end frame and the frame computed after it
    # (before the host saw the end) are both dropped.
    assert out[0][:, 0].tolist() == [1, 2, 3]
    assert out[1][:, 0].tolist() == [1, 2, 3, 4, 5]
    assert a not in engine and b not in engine and engine.free_slots == 2


def test_end_events_carry_the_rows_prefilled_and_reused(model, late):
    """Every request ends with exactly one end event, after its last frame, reporting the rows
    it prefilled itself and those it took from the prefix cache; releasing it early gives the
    same report, and releasing it again gives nothing."""
    engine = Engine(model, max_slots=2, one_frame_late=late, prefill_chunk=7)
    first = replace(requests(1, frames=3)[0], prefix_rows=10)
    events = [e for e in engine.run(first)]
    assert len(events) == 3 and not any(e.ended for e in events)
    second = replace(first)
    engine.add(second)
    seen = []
    while second in engine:
        seen += [e for e in engine.step() if e.request is second]
    assert [e.ended for e in seen] == [False] * 3 + [True]
    end = seen[-1]
    assert end.reason is EndReason.LENGTH and end.slot == 0
    assert (end.reused_rows, end.prefill_rows) == (10, len(first.prompt) - 10)
    third = replace(first)
    engine.add(third)
    engine.step()
    gone = engine.release(third)
    assert gone.reason is EndReason.CANCELLED and gone.request is third and gone.reused_rows == 10
    assert engine.release(third) is None and third not in engine


def test_every_end_event_says_why(model, late):
    """A request's one end event, after its frames and without codes, says why it ended, as
    decided where it ended: the model's end frame or the length bound (the engine), a release
    (cancelled unless its caller gives the reason, as the scheduler does for a deadline), a
    prefill that raised (an injected failing runner)."""
    from fastcsm.engine.step import prefill

    ends, failing = {}, []

    def failing_prefill(*args):
        if failing:
            raise RuntimeError("boom")
        return prefill(*args)

    engine = Engine(model, max_slots=1, one_frame_late=late,
                    runner=Runner(step=speech_ending_step(ends), prefill=failing_prefill))
    r = requests(1, frames=6)[0]

    def run():
        *frames, end = engine.events(r)
        assert not any(e.ended for e in frames) and end.ended and end.codes is None and end.pcm is None
        assert torch.equal(torch.stack([e.codes for e in frames]), torch.stack([e.codes for e in engine.run(r)]))
        return len(frames), end.reason

    assert run() == (6, EndReason.LENGTH)  # random weights never say the end frame
    ends[0] = 2
    assert run() == (2, EndReason.END_OF_SPEECH)
    ends[0] = 5  # the end frame in the last place the bound leaves
    assert run() == (5, EndReason.END_OF_SPEECH)
    ends[0] = 6  # the bound comes first
    assert run() == (6, EndReason.LENGTH)
    for reason in (EndReason.CANCELLED, EndReason.DEADLINE, EndReason.ERROR):
        engine.add(r)
        engine.step()
        end = engine.release(r, reason) if reason is not EndReason.CANCELLED else engine.release(r)
        assert end.ended and end.reason is reason and r not in engine
    failing.append(True)
    engine.add(r)
    with pytest.raises(PrefillError) as e:
        engine.step()
    assert e.value.end.reason is EndReason.ERROR and engine.free_slots == 1


def test_max_frames_stops_exactly(model, late):
    engine = Engine(model, max_slots=1, one_frame_late=late, runner=Runner(step=scripted_step([1000])))
    r = requests(1, frames=4)[0]
    assert [int(e.codes[0]) for e in engine.run(r)] == [1, 2, 3, 4]


def test_closing_the_iterator_frees_the_slot(model, late):
    engine = Engine(model, max_slots=1, one_frame_late=late)
    it = engine.run(requests(1, frames=20)[0])
    next(it)
    it.close()
    assert engine.free_slots == 1
    assert len(list(engine.run(requests(1, frames=3)[0]))) == 3


def test_prompt_longer_than_slot_is_refused(model):
    engine = Engine(model, max_slots=1, max_seq_len=64)
    r = requests(1, frames=60)[0]
    with pytest.raises(ValueError, match="more than the 64-row context window"):
        engine.add(r)
    assert engine.free_slots == 1


def test_engine_decodes_each_slot_to_pcm(model, late):
    """PCM that leaves the engine every frame equals decoding each request's codes whole,
    with slots starting at different times and a slot reused by a later request."""
    codec = mimi_codec()
    engine = Engine(model, max_slots=2, codec=codec, one_frame_late=late)
    rs = requests(3, frames=5)
    got = {r: ([], []) for r in rs}
    engine.add(rs[0])
    step, ended = 0, 0
    while ended < len(rs):
        if step == 2:
            engine.add(rs[1])
        if step == 4:
            engine.add(rs[2])  # waits for a free slot below
        for e in engine.step():
            ended += e.ended
            if not e.ended:
                got[e.request][0].append(e.codes)
                got[e.request][1].append(e.pcm)
        step += 1
        if step == 4 and engine.free_slots == 0:
            step = 3  # hold the third request until a slot frees
    for r in rs:
        codes, pcm = got[r]
        assert len(codes) == 5 and all(p.shape == (1920,) for p in pcm)
        assert torch.allclose(torch.cat(pcm), codec.decode(torch.stack(codes)), atol=1e-5)


def test_prefill_budget_is_shared_across_waiting_requests(model):
    """A step prefills at most `prefill_chunk` rows, from as many waiting requests as fit, and
    running streams keep getting a frame every step meanwhile."""
    engine = Engine(model, max_slots=4, prefill_chunk=40)
    first = requests(1, frames=30)[0]
    engine.add(first)
    engine.step()  # its prompt fits in one step
    assert not engine.waiting
    rows = []
    late = requests(3, frames=4)[1:]
    for r in late:
        engine.add(r)
    emitted_first = 0
    while engine.waiting:
        before = engine.stats["prefill_rows"]
        emitted_first += sum(e.request is first and not e.ended for e in engine.step())
        rows.append(engine.stats["prefill_rows"] - before)
    total = sum(len(r.prompt) for r in late)
    assert sum(rows) == total and max(rows) <= 40
    assert len(rows) == -(-total // 40)  # no step left budget unused while requests waited
    assert emitted_first == len(rows)  # the running stream advanced on every one of those steps


@pytest.mark.slow
def test_compiled_engine_with_codec_equals_eager():
    """The engine's whole step (frame + Mimi decode, as captured on CUDA) is one graph under
    torch.compile(fullgraph=True): same codes, same PCM, through the engine's own loop."""
    torch._dynamo.reset()
    cfg = tiny_config(num_codebooks=8)
    m = CSM(cfg)
    randomize_(m, seed=3)
    m = m.eval().requires_grad_(False)
    codec = mimi_codec(num_codebooks=8)

    def run(compiled):
        engine = Engine(m, max_slots=2, codec=codec, runner=Runner(compile="aot_eager") if compiled else None)
        rs = []
        for i in range(2):
            codes = torch.randint(0, 2048, (3, 8), generator=torch.Generator().manual_seed(i))
            p = build_prompt("Compile me.", i, [Segment(1, "Voice.", codes=codes)], TOK, cfg)
            rs.append(Request(p, 4, SamplingParams(temperature=0.9, topk=[20, 0][i]), seed=i))
        out = []
        for r in rs:
            engine.add(r)
        while any(r in engine for r in rs):
            out += [(e.slot, e.codes, e.pcm) for e in engine.step() if not e.ended]
        return out

    eager, compiled = run(False), run(True)
    assert len(eager) == len(compiled) == 8
    for (s1, c1, p1), (s2, c2, p2) in zip(eager, compiled, strict=True):
        assert s1 == s2 and torch.equal(c1, c2)
        assert torch.allclose(p1, p2, atol=1e-5)


def test_slot_prefilled_over_many_steps_is_not_disturbed_by_running_streams(model, late):
    """While a new request's prompt is prefilled chunk by chunk into a slot that an earlier
    request used, the frame steps of other streams must leave that slot's cache and codec
    state alone."""
    codec = mimi_codec()
    engine = Engine(model, max_slots=2, codec=codec, prefill_chunk=8, one_frame_late=late)
    first, other = requests(2, frames=30)
    first = replace(first, max_frames=12)
    engine.add(first)
    engine.add(other)
    while first in engine:  # slot 0 now holds a stale position well inside the next prompt
        engine.step()
    new = Request(prompt("A new line that takes several prefill steps to put in the cache.", 0, frames=20),
                  6, SamplingParams(), seed=9)
    assert len(new.prompt) > 8 * 5
    engine.add(new)
    got, pcm = [], []
    while new in engine:
        for e in engine.step():
            if e.request is new and not e.ended:
                got.append(e.codes)
                pcm.append(e.pcm)
    alone = run_alone(model, Request(new.prompt, 6, SamplingParams(), seed=9))
    assert torch.equal(torch.stack(got), alone)
    assert torch.allclose(torch.cat(pcm), codec.decode(alone), atol=1e-5)


def test_warmup_builds_every_variant_without_advancing_streams(model):
    variants = []

    def step(*args):  # the eager step, recording which variants it ran
        variants.append((args[2].h.shape[0], args[-1]))
        engine_step(*args)

    engine = Engine(model, max_slots=2, runner=Runner(step=step))
    r = requests(1, frames=5)[0]
    engine.add(r)
    engine.step()
    ran = (1, SamplingPath(64, nucleus=False, greedy=False))  # topk 50, topp 1: no nucleus, no argmax
    assert variants == [ran]  # built by running it
    state = [t.clone() for t in vars(engine.buffers.state).values()]
    variants.clear()
    assert engine.warmup() > 0
    every = [(b, p) for b in (1, 2) for p in SamplingPath.every(64)]
    assert len(every) == 2 * 9 and ran in every
    assert sorted(variants, key=str) == sorted(set(every) - {ran}, key=str)
    assert engine.runner.built == set(every)
    assert all(torch.equal(a, b) for a, b in zip(state, vars(engine.buffers.state).values(), strict=True))
    rest = []
    while r in engine:
        rest += [e.codes for e in engine.step() if not e.ended]
    assert torch.equal(torch.stack(rest), run_alone(model, requests(1, frames=5)[0])[1:])


def test_prefill_failure_names_its_request_and_leaves_the_others(model):
    engine = Engine(model, max_slots=2)
    good, bad = requests(2, frames=3)
    engine.add(good)
    engine.step()
    bad.prompt.tokens[3, -1] = CFG.text_vocab_size + 5  # an id the text table does not have
    engine.add(bad)
    with pytest.raises(PrefillError) as e:
        engine.step()
    assert e.value.request is bad and bad not in engine and engine.free_slots == 1
    rest = []
    while good in engine:
        rest += [x.codes for x in engine.step() if x.request is good and not x.ended]
    assert torch.equal(torch.stack(rest), run_alone(model, requests(1, frames=3)[0])[1:])


def test_a_failed_prefill_reports_the_rows_it_prefilled(model):
    """The end event of a request whose prefill fails counts the rows of the chunks that went
    in before the failing one, and those taken from the prefix cache, as the engine's own
    counters do; a request running beside it is untouched."""
    from fastcsm.engine.step import prefill

    fail_at = []  # the start row of the chunk that fails

    def flaky_prefill(model, tokens, mask, start, cache):
        if fail_at and int(start[0]) == fail_at[0]:
            raise RuntimeError("boom")
        return prefill(model, tokens, mask, start, cache)

    engine = Engine(model, max_slots=2, prefill_chunk=7, runner=Runner(prefill=flaky_prefill))
    first, good = replace(requests(1, frames=3)[0], prefix_rows=10), requests(3, frames=4)[2]
    list(engine.run(first))  # its first 10 rows are in the prefix cache now
    bad = replace(first)
    engine.add(good)
    while engine.waiting:  # `good` runs
        engine.step()
    fail_at.append(24)  # `bad` reuses 10 rows, prefills [10, 17) and [17, 24), fails on [24, 31)
    before = dict(engine.stats)
    engine.add(bad)
    engine.step()
    engine.step()
    with pytest.raises(PrefillError) as e:
        engine.step()
    end = e.value.end
    assert e.value.request is bad and end.request is bad and end.ended and bad not in engine
    assert (end.prefill_rows, end.reused_rows) == (14, 10)
    assert engine.stats["prefill_rows"] - before["prefill_rows"] == 14
    assert engine.stats["reused_rows"] - before["reused_rows"] == 10
    assert "after 24 of" in str(e.value) and "RuntimeError: boom" in str(e.value)
    rest = []
    while good in engine:
        rest += [x.codes for x in engine.step() if x.request is good and not x.ended]
    assert torch.equal(torch.stack(rest), run_alone(model, good)[-len(rest):])


def scripted_audio_step(script):
    """Codes from `script[slot][frame]` (the all-zero end frame where the script runs out), then
    the engine's own Mimi decode of them. `script` may change between steps."""

    def step(model, mimi, state, cache, decoder_cache, decoder_tables, codec_state, pcm, path):
        rows = []
        for slot in range(state.codes.shape[0]):
            frames = script.get(slot, [])
            f = int(state.frame[slot])
            rows.append(frames[f] if f < len(frames) else torch.zeros(K, dtype=torch.long))
        state.codes.copy_(torch.stack(rows))
        state.frame.add_(state.active.long())
        state.pos.add_(state.active.long())
        pcm.copy_(mimi.decode_step(state.codes[:, :, None], codec_state)[:, 0])

    return step


@pytest.mark.parametrize("ends_by", ["max_frames", "end_frame"])
def test_a_follow_on_request_continues_the_audio_stream(model, late, ends_by):
    """The pieces of one utterance, as consecutive requests, give the audio of one stream:
    the second starts from the codec state right after the first's last frame (the end frame
    and a frame computed after it are never heard), while another stream runs alongside."""
    codec = mimi_codec()
    g = torch.Generator().manual_seed(5)
    script_a = list(torch.randint(0, 2048, (4, K), generator=g))
    script_b = list(torch.randint(0, 2048, (3, K), generator=g))
    script = {0: script_a, 1: script_b * 20}
    runner = Runner(step=scripted_audio_step(script))
    engine = Engine(model, max_slots=2, codec=codec, one_frame_late=late, runner=runner)
    a, b, other = requests(3, frames=4 if ends_by == "max_frames" else 10)
    a = replace(a, keep_audio=True)
    b, other = replace(b, max_frames=3, audio_after=a), replace(other, max_frames=40)
    engine.add(a)  # slot 0
    engine.add(other)  # slot 1
    pcm = {a: [], b: []}

    def drain(r):
        while r in engine:
            for e in engine.step():
                if e.request in (a, b) and not e.ended:
                    pcm[e.request].append(e.pcm)

    drain(a)
    assert len(pcm[a]) == 4
    engine.step()  # steps in between decode noise into the free slot
    script[0] = script_b
    engine.add(b)
    drain(b)
    whole = codec.decode(torch.stack(script_a + script_b))
    assert torch.allclose(torch.cat(pcm[a] + pcm[b]), whole, atol=1e-5)


def test_kept_audio_is_taken_once_and_bounded(model):
    """A kept codec state serves one follower; a second follower of the same request, or one
    whose predecessor's state was pushed out by newer ones, starts a fresh stream."""
    codec = mimi_codec()
    frames = list(torch.randint(0, 2048, (4, K), generator=torch.Generator().manual_seed(7)))
    engine = Engine(model, max_slots=1, codec=codec, runner=Runner(step=scripted_audio_step({0: frames})))
    base = requests(1, frames=2)[0]

    def audio(**kw):
        request = replace(base, **kw)
        return request, torch.cat([e.pcm for e in engine.run(request)])

    fresh = codec.decode(torch.stack(frames[:2]))
    continued = codec.decode(torch.stack(frames[:2] * 2))[-fresh.numel():]
    assert not torch.allclose(fresh, continued, atol=1e-3)
    first, pcm = audio(keep_audio=True)
    assert torch.allclose(pcm, fresh, atol=1e-5)
    assert torch.allclose(audio(audio_after=first)[1], continued, atol=1e-5)
    assert torch.allclose(audio(audio_after=first)[1], fresh, atol=1e-5)  # taken by the first follower
    oldest, _ = audio(keep_audio=True)
    for _ in range(KEPT_AUDIO_PER_SLOT * engine.max_slots):  # followers that never come
        audio(keep_audio=True)
    assert torch.allclose(audio(audio_after=oldest)[1], fresh, atol=1e-5)


def test_a_runner_serves_one_engine(model):
    runner = Runner()
    list(Engine(model, runner=runner).run(requests(1, frames=1)[0]))
    with pytest.raises(ValueError, match="another engine"):
        list(Engine(model, runner=runner).run(requests(1, frames=1)[0]))
    with pytest.raises(ValueError, match="to the Runner you pass"):
        Engine(model, runner=Runner(), compile=True)
    with pytest.raises(TypeError, match="Codec"):
        Engine(model, codec=object())


class WholeWindow(Runner):
    """Steps and prefills that attend over the whole cache, as compiled and captured ones do."""

    def prefill(self, bufs, slot, tokens, mask, start, window=None):
        return super().prefill(bufs, slot, tokens, mask, start)

    def step(self, bufs, batch, path, window=None):
        super().step(bufs, batch, path)


def test_attention_over_the_live_window_equals_the_whole_cache(model, late):
    windows = []

    def step(*args):  # the eager step, recording the window it was given
        windows.append(args[3].attended)
        engine_step(*args)

    rs = requests(3, frames=5)
    windowed = run_together(Engine(model, max_slots=4, one_frame_late=late, runner=Runner(step=step)), rs)
    whole = run_together(Engine(model, max_slots=4, one_frame_late=late, runner=WholeWindow()), requests(3, frames=5))
    for a, b in zip(windowed, whole, strict=True):
        assert torch.equal(a, b)
    # The window is the furthest running row's position + 1, far below the cache's length.
    longest = max(len(r.prompt) for r in rs)
    assert longest < windows[0] <= longest + 1 + 5 and max(windows) <= longest + 5 + int(late) + 1
    assert max(windows) < CFG.max_seq_len


def test_compiled_runner_keeps_every_variant(model):
    """A compiled runner builds two variants a bucket (every filter, with and without the partial
    top-k), each one compiled graph of the same function: for 6 buckets more than dynamo's default
    recompile limit (8), past which fullgraph=True fails. A trivial step keeps it fast."""
    paths = []

    def step(model, mimi, state, cache, decoder_cache, decoder_tables, codec_state, pcm, path):
        paths.append(path)
        state.codes.add_((path.candidates or 0) + path.nucleus + 2 * path.greedy + 4 * path.sampled)

    torch._dynamo.reset()
    engine = Engine(model, max_slots=32, runner=Runner(step=step, compile="eager"))
    assert engine.warmup() > 0
    assert len(engine.buckets) == 6 and len(engine.runner.built) == 6 * 2
    assert set(paths) == {SamplingPath(64), SamplingPath(None)}
    # A lean path at run time runs its compiled every-filter variant: nothing new is built.
    engine.runner.step(engine.buffers, 1, SamplingPath(64, False, False, True))
    engine.runner.step(engine.buffers, 1, SamplingPath(None, False, True, False))
    assert len(engine.runner.built) == 12 and paths[-2:] == [SamplingPath(64), SamplingPath(None)]


def test_lean_sampling_paths_give_the_codes_of_every_filter(model):
    """Requests with topp 1 mixing temperatures, top-k and greedy rows: the engine runs lean paths
    (no nucleus; no argmax without a greedy row; only the argmax for greedy rows alone) and gets the
    codes that the path with every filter gets."""
    rs = [replace(r, params=replace(r.params, topp=1.0)) for r in requests(4, frames=5)]
    lean_paths = []

    def lean(*args):
        lean_paths.append(args[-1])
        engine_step(*args)

    def every_filter(*args):
        path = args[-1]
        engine_step(*args[:-1], SamplingPath(path.candidates if path.sampled else None))

    for batch in (rs[:1], rs[1:2], rs[2:3], rs):
        got = run_together(Engine(model, max_slots=4, runner=Runner(step=lean)), batch)
        want = run_together(Engine(model, max_slots=4, runner=Runner(step=every_filter)), batch)
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    assert not any(p.nucleus for p in lean_paths)
    assert {SamplingPath(64, False, False), SamplingPath(None, False, True, False), SamplingPath(None, False, True)} \
        <= set(lean_paths)
