"""Home Assistant's Wyoming protocol, with the `wyoming` package's own client: `describe`,
`synthesize` and streaming `synthesize-start/-chunk/-stop`, in front of a real server
(`--server`) and as `fastcsm wyoming` with the model in its own process."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("wyoming", reason="the wyoming package is not installed: pip install \"fastcsm[wyoming]\"")
from server_harness import LiveServer, free_port, tiny_checkpoint  # noqa: E402
from wyoming.audio import AudioChunk, AudioStart, AudioStop  # noqa: E402
from wyoming.client import AsyncTcpClient  # noqa: E402
from wyoming.info import Describe, Info  # noqa: E402
from wyoming.tts import (  # noqa: E402
    Synthesize,
    SynthesizeChunk,
    SynthesizeStart,
    SynthesizeStop,
    SynthesizeStopped,
    SynthesizeVoice,
)

from fastcsm.integrations.wyoming import Backend, serve  # noqa: E402

FRAME_BYTES = 1920 * 2


@pytest.fixture(scope="module")
def server():
    with LiveServer(slots=4, max_audio_length_ms=400) as s:
        yield s


@pytest.fixture(scope="module")
def wyoming(server):
    """The Wyoming service in front of `server`, on its own event loop in a thread."""
    port = free_port()
    loop = asyncio.new_event_loop()
    started = asyncio.Event()
    task = loop.create_task(serve(f"tcp://127.0.0.1:{port}", Backend(server.url, "0"), started))
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not started.is_set() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    yield port

    async def stop():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run_coroutine_threadsafe(stop(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()


async def exchange(port: int, events, until: str) -> list:
    async with AsyncTcpClient("127.0.0.1", port) as client:
        for e in events:
            await client.write_event(e.event())
        out = []
        while True:
            event = await asyncio.wait_for(client.read_event(), 60)
            assert event is not None, "the service closed the connection"
            out.append(event)
            if event.type == until:
                return out


def test_describe_lists_the_voices(wyoming):
    events = asyncio.run(exchange(wyoming, [Describe()], "info"))
    info = Info.from_event(events[-1])
    program = info.tts[0]
    assert program.name == "fastcsm" and program.supports_synthesize_streaming
    names = [v.name for v in program.voices]
    assert {"alloy", "echo", "cedar"} <= set(names)


def check_audio(events, frames: int) -> None:
    types = [e.type for e in events]
    assert types[0] == "audio-start" and types.count("audio-stop") == 1
    start = AudioStart.from_event(events[0])
    assert (start.rate, start.width, start.channels) == (24_000, 2, 1)
    chunks = [AudioChunk.from_event(e) for e in events if AudioChunk.is_type(e.type)]
    assert len(chunks) == frames and all(len(c.audio) == FRAME_BYTES for c in chunks)  # one per 80 ms frame
    assert AudioStop.is_type(events[types.index("audio-stop")].type)


def test_synthesize(wyoming):
    events = asyncio.run(exchange(wyoming, [Synthesize("Hello there.", voice=SynthesizeVoice(name="alloy"))],
                                  "audio-stop"))
    check_audio(events, 5)  # the server's 400 ms bound


def test_streaming_synthesize(wyoming):
    request = [SynthesizeStart(voice=SynthesizeVoice(name="0")), SynthesizeChunk("Hello there."),
               SynthesizeChunk(" How are"), SynthesizeChunk(" you?"),
               Synthesize("Hello there. How are you?"),  # what a streaming client also sends; not spoken twice
               SynthesizeStop()]
    events = asyncio.run(exchange(wyoming, request, "synthesize-stopped"))
    assert SynthesizeStopped.is_type(events[-1].type)
    check_audio(events[:-1], 10)  # two pieces of five frames, in one audio stream


def test_fastcsm_wyoming_command_with_the_model_in_process(tmp_path):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]),
           "FASTCSM_MAX_AUDIO_LENGTH_MS": "240"}
    proc = subprocess.Popen([sys.executable, "-m", "fastcsm", "wyoming", "--uri", f"tcp://127.0.0.1:{port}",
                             "--model", str(tiny_checkpoint()), "--device", "cpu", "--voices-dir", str(tmp_path)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()  # printed once listening
        assert "listening" in line, proc.stderr.read() if proc.poll() is not None else line
        info = Info.from_event(asyncio.run(exchange(port, [Describe()], "info"))[-1])
        assert "alloy" in [v.name for v in info.tts[0].voices]
        check_audio(asyncio.run(exchange(port, [Synthesize("Hi there.")], "audio-stop")), 3)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
