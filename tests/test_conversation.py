"""A conversation's utterance against a socket that holds a frame in its write buffer (a client
reading slowly): an interrupt then must not lose count of a frame that was already handed to
the socket. The live-server tests cannot make loopback push back reliably, so the socket and
the scheduler's stream are stand-ins here; the rest is the real `Conversation`."""

from __future__ import annotations

import asyncio
import json
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fastcsm.model.config import tiny_config
from fastcsm.model.prompt import Segment, TextTokenizer, segment_rows
from fastcsm.server.conversation import Conversation, Utterance
from fastcsm.server.scheduler import End, Frame
from fastcsm.speech.conversation import Saying
from fastcsm.speech.line import Line
from fastcsm.speech.speech import SpeakOptions
from fastcsm.testing import byte_tokenizer_json

CFG = tiny_config()
TOK = TextTokenizer.from_json(byte_tokenizer_json())


class SlowSocket:
    """Writes a binary message at once, then waits in its drain, as a transport under
    back-pressure does, until `drained` is set."""

    def __init__(self):
        self.sent: list = []
        self.drained = asyncio.Event()

    async def send_text(self, text: str) -> None:
        self.sent.append(json.loads(text))

    async def send_bytes(self, data: bytes) -> None:
        self.sent.append(data)
        await self.drained.wait()


class OneFrameStream:
    """A stream that gives one frame, then none until it is cancelled; its End counts 7 rows."""

    def __init__(self):
        self.frames = [Frame(0, torch.zeros(CFG.num_codebooks, dtype=torch.long), np.zeros(1920, np.float32))]
        self.end: End | None = None

    async def next(self):
        if self.frames:
            return self.frames.pop()
        await asyncio.Event().wait()  # until cancelled

    def cancel(self) -> None:
        self.end = self.end or End("cancelled", 1, prefill_rows=7)

    async def wait_end(self) -> End:
        return self.end


def test_a_frame_handed_to_the_socket_is_counted_when_the_line_is_interrupted():
    async def main():
        ws = SlowSocket()
        service = SimpleNamespace(settings=SimpleNamespace(max_input_chars=100, max_messages_per_s=500), cfg=CFG)
        conv = Conversation(ws, service)
        line = Line("Hi.", 0, [], [], TOK, CFG, SpeakOptions(), 0, streamed=True)
        line.next()  # the piece in flight, submitted as `stream`
        stream = OneFrameStream()
        u = Utterance("x", 0, Saying(line), t0=time.perf_counter(), stream=stream, streams=[stream])
        conv.current = u
        u.task = asyncio.create_task(conv.play(u))
        while not ws.sent:  # the frame is written; its send waits in the drain
            await asyncio.sleep(0)
        stopping = asyncio.create_task(conv.stop_pump())  # interrupt
        await asyncio.sleep(0.05)
        ws.drained.set()
        await stopping
        return ws.sent, conv.state.turns

    sent, turns = asyncio.run(main())
    audio = [m for m in sent if isinstance(m, bytes)]
    done = sent[-1]
    assert done["type"] == "done" and done["reason"] == "interrupted" and done["prefill_rows"] == 7
    assert done["frames"] == len(audio) == 1  # what the client got
    line = segment_rows(Segment(0, "Hi."), TOK, CFG)
    assert len(turns[-1]) == len(line) + 1 + 1  # the line, its one frame heard, the end frame


class QueuedSocket:
    """A socket whose client messages are all in already (a flood): `receive` never waits."""

    def __init__(self, messages: list[str]):
        self.messages = [{"type": "websocket.receive", "text": m} for m in messages]
        self.messages.append({"type": "websocket.disconnect"})
        self.sent: list = []

    async def receive(self) -> dict:
        return self.messages.pop(0)

    async def send_text(self, text: str) -> None:
        self.sent.append(json.loads(text))


def test_a_flood_of_messages_lets_other_work_run_between_them():
    """Messages already queued are handled one per turn of the event loop: another task (another
    client's stream, /healthz) runs between any two of them, not after the whole flood."""
    from fastcsm.server.settings import Settings

    async def main():
        ws = QueuedSocket([json.dumps({"type": "interrupt"})] * 200)
        service = SimpleNamespace(settings=Settings(), cfg=CFG)
        ticks = 0

        async def other_client():
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        other = asyncio.create_task(other_client())
        await asyncio.sleep(0)
        await Conversation(ws, service).run()
        other.cancel()
        return ticks

    assert asyncio.run(main()) >= 200


def test_an_unknown_message_type_is_named_with_the_known_ones():
    from fastcsm.server.settings import Settings

    async def main():
        ws = QueuedSocket([json.dumps({"type": "spek", "text": "Hi."}), json.dumps({"text": "Hi."})])
        await Conversation(ws, SimpleNamespace(settings=Settings(), cfg=CFG)).run()
        return [m for m in ws.sent if m["type"] == "error"]

    unknown, untyped = asyncio.run(main())
    assert unknown["message"].startswith('unknown message type "spek"')
    for name in ("configure", "add_turn", "speak", "append_text", "interrupt", "reset"):
        assert name in unknown["message"]
    assert untyped["message"].startswith('the message needs a "type"')


def test_a_socket_past_its_pace_waits_between_messages():
    """The token bucket: a burst passes at once (yielding only), then each message waits for its
    share of the rate; time refills the bucket, never past the burst."""
    from fastcsm.server.limits import Pace

    now, slept = [0.0], []

    async def sleep(s):
        slept.append(s)
        now[0] += s

    async def main():
        pace = Pace(rate=100, burst=5, clock=lambda: now[0], sleep=sleep)
        for _ in range(8):
            await pace.wait()
        assert slept[:5] == [0] * 5 and slept[5:] == pytest.approx([0.01] * 3)
        now[0] += 10.0  # a long quiet: the bucket is full again, and only full
        slept.clear()
        for _ in range(6):
            await pace.wait()
        assert slept[:5] == [0] * 5 and slept[5] == pytest.approx(0.01)

    asyncio.run(main())
