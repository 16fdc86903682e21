"""The scheduler alone (no HTTP): frames reach asyncio consumers, equal to the engine run alone;
cancellation frees a slot at once; a full queue refuses; deadlines and bad requests end only
their own stream."""

from __future__ import annotations

import asyncio

import pytest
import torch

from fastcsm.engine.engine import EndReason, Engine, Request
from fastcsm.engine.runner import Runner
from fastcsm.engine.sampling import SamplingParams
from fastcsm.engine.step import engine_step, prefill
from fastcsm.model.config import tiny_config
from fastcsm.model.network import CSM
from fastcsm.model.prompt import TextTokenizer, build_prompt
from fastcsm.server.scheduler import Busy, End, Scheduler
from fastcsm.testing import byte_tokenizer_json, randomize_, run_alone, speech_ending_step

CFG = tiny_config()
TOK = TextTokenizer.from_json(byte_tokenizer_json())


@pytest.fixture(scope="module")
def model():
    m = CSM(CFG)
    randomize_(m, seed=0)
    return m.eval().requires_grad_(False)


def request(i: int, frames: int) -> Request:
    return Request(build_prompt(f"Line {i}.", i % 2, [], TOK, CFG), frames, SamplingParams(), seed=i)


async def collect(stream) -> tuple[list[torch.Tensor], End]:
    frames = [f.codes async for f in stream]
    return frames, stream.end


def test_streams_equal_the_engine_alone_and_cancel_frees_the_slot(model):
    scheduler = Scheduler(Engine(model, max_slots=2), max_queue=8)

    async def main():
        streams = [scheduler.submit(request(i, 6)) for i in range(4)]  # two wait for a slot
        doomed = scheduler.submit(request(9, 500))
        first = await doomed.next()
        assert first.index == 0
        doomed.cancel()
        results = await asyncio.gather(*(collect(s) for s in streams))
        end = await doomed.next()
        while not isinstance(end, End):  # frames made before the cancel was seen
            end = await doomed.next()
        return results, end

    try:
        results, end = asyncio.run(main())
    finally:
        scheduler.close()
    for i, (frames, done) in enumerate(results):
        assert done.reason is EndReason.LENGTH and done.frames == 6
        assert (done.prefill_rows, done.reused_rows) == (len(request(i, 6).prompt), 0)
        assert torch.equal(torch.stack(frames), run_alone(model, request(i, 6)))
    assert end.reason is EndReason.CANCELLED and end.frames < 500 and end.prefill_rows == len(request(9, 500).prompt)
    assert scheduler.metrics.cancelled == 1 and scheduler.active == 0


def test_full_queue_refuses_and_bad_requests_fail_alone(model):
    scheduler = Scheduler(Engine(model, max_slots=1), max_queue=1, timeout_s=60)

    async def main():
        hog = scheduler.submit(request(0, 1000))
        await hog.next()  # running: the queue is empty again
        too_long = scheduler.submit(request(1, 5000))  # more rows than a slot holds
        with pytest.raises(Busy):
            scheduler.submit(request(2, 5))
        hog.cancel()
        frames, end = await collect(too_long)
        late = scheduler.submit(request(3, 3), timeout_s=0.0)  # its deadline has passed when it is seen
        _, late_end = await collect(late)
        fine, fine_end = await collect(scheduler.submit(request(4, 3)))
        return end, late_end, fine_end

    try:
        end, late_end, fine_end = asyncio.run(main())
    finally:
        scheduler.close()
    assert end.reason is EndReason.ERROR and "rows" in end.message
    assert late_end.reason is EndReason.DEADLINE
    assert fine_end.reason is EndReason.LENGTH and fine_end.frames == 3
    assert scheduler.metrics.rejected == 1 and scheduler.metrics.deadline == 1


def test_a_failing_request_ends_alone(model):
    """A prompt whose prefill fails in its third chunk ends alone, with an error that says it
    was the prefill, and an End that counts the rows of the chunks that did go in."""
    bad = request(1, 5)

    def flaky_prefill(model, tokens, mask, start, cache):
        """Fails on the third chunk of `bad`'s prompt, as a broken input or a bug would."""
        if int(start[0]) == 8 and torch.equal(tokens[0], bad.prompt.tokens[8:12]):
            raise RuntimeError("boom")
        return prefill(model, tokens, mask, start, cache)

    engine = Engine(model, max_slots=4, prefill_chunk=4, runner=Runner(prefill=flaky_prefill))
    scheduler = Scheduler(engine, max_queue=8)

    async def main():
        streams = [scheduler.submit(r) for r in (request(0, 5), bad, request(2, 5))]
        return await asyncio.gather(*(collect(s) for s in streams))

    try:
        (a, a_end), (_, bad_end), (c, c_end) = asyncio.run(main())
    finally:
        scheduler.close()
    assert bad_end.reason is EndReason.ERROR and bad_end.frames == 0
    assert bad_end.message == f"prefill failed after 8 of {len(bad.prompt)} prompt rows: RuntimeError"
    assert (bad_end.prefill_rows, bad_end.reused_rows) == (8, 0)
    assert a_end.reason is c_end.reason is EndReason.LENGTH and len(a) == len(c) == 5
    assert a_end.prefill_rows + bad_end.prefill_rows + c_end.prefill_rows == engine.stats["prefill_rows"]
    assert scheduler.metrics.errors == 1 and scheduler.engine.free_slots == 4


def test_a_failing_frame_step_ends_its_batch_and_serving_goes_on(model):
    """A frame-step failure is not blamed on a prompt waiting for prefill: every stream whose
    state is suspect ends with an error, and the next request is served normally."""
    broken = [True]

    def step(*args):
        """Fails once, as a device fault would, when three streams run."""
        if broken[0] and int(args[2].active.sum()) == 3:
            broken[0] = False
            raise RuntimeError("device fault")
        engine_step(*args)

    scheduler = Scheduler(Engine(model, max_slots=4, runner=Runner(step=step)), max_queue=8)

    async def main():
        ends = await asyncio.gather(*(collect(scheduler.submit(request(i, 200))) for i in range(3)))
        after = await collect(scheduler.submit(request(5, 4)))
        return ends, after

    try:
        ends, (frames, after_end) = asyncio.run(main())
    finally:
        scheduler.close()
    assert all(end.reason is EndReason.ERROR and end.message == "generation failed: RuntimeError" for _, end in ends)
    assert all(end.prefill_rows == len(request(i, 200).prompt) for i, (_, end) in enumerate(ends))
    assert after_end.reason is EndReason.LENGTH and len(frames) == 4
    assert scheduler.engine.free_slots == 4


def test_an_end_the_engine_decides_keeps_its_reason(model):
    """The model's end frame and the length bound reach the stream's End as the engine gave them,
    however near the bound the end frame falls; an End takes a reason's name only if it is one."""
    ends = {0: 3}
    scheduler = Scheduler(Engine(model, max_slots=1, runner=Runner(step=speech_ending_step(ends))), max_queue=8)

    async def main():
        out = [await collect(scheduler.submit(request(0, 50))), await collect(scheduler.submit(request(1, 4)))]
        ends[0] = 4  # one frame past the bound
        return [*out, await collect(scheduler.submit(request(2, 4)))]

    try:
        got = asyncio.run(main())
    finally:
        scheduler.close()
    assert [(len(frames), end.reason, end.frames) for frames, end in got] == [
        (3, EndReason.END_OF_SPEECH, 3), (3, EndReason.END_OF_SPEECH, 3), (4, EndReason.LENGTH, 4)]
    assert scheduler.metrics.completed == 3 and scheduler.metrics.errors == 0
    assert End("cancelled", 0).reason is EndReason.CANCELLED
    with pytest.raises(ValueError):
        End("stopped", 0)


def test_every_end_reason_has_its_done_reason_on_the_wire():
    """The WebSocket's `done.reason` is the engine's reason by its stable name; a cancelled line
    was interrupted."""
    from fastcsm.server import protocol as P

    sent = {r: P.Done(id=None, utterance=0, reason=P.done_reason(r), frames=0, audio_ms=0, prefill_rows=0,
                      reused_rows=0).model_dump()["reason"] for r in EndReason}
    assert sent == {EndReason.END_OF_SPEECH: "end", EndReason.LENGTH: "max_length",
                    EndReason.CANCELLED: "interrupted", EndReason.DEADLINE: "deadline", EndReason.ERROR: "error"}
    assert all(type(v) is str for v in sent.values())
