"""Home Assistant's Wyoming protocol, with the `wyoming` package's own client: `describe`,
`synthesize` and streaming `synthesize-start/-chunk/-stop`, in front of a real server
(`--server`) and as `fastcsm wyoming` with the model in its own process; then what a hostile
client tries: a line per `synthesize-start`, clients leaving mid-stream, bad events, events too
large or too slow, idle connections, too many connections."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

pytest.importorskip("wyoming", reason="the wyoming package is not installed: pip install \"fastcsm[wyoming]\"")
from server_harness import LiveServer, free_port, tiny_checkpoint  # noqa: E402
from wyoming.audio import AudioChunk, AudioStart, AudioStop  # noqa: E402
from wyoming.client import AsyncTcpClient  # noqa: E402
from wyoming.error import Error  # noqa: E402
from wyoming.event import Event, async_read_event, async_write_event  # noqa: E402
from wyoming.info import Describe, Info  # noqa: E402
from wyoming.tts import (  # noqa: E402
    Synthesize,
    SynthesizeChunk,
    SynthesizeStart,
    SynthesizeStop,
    SynthesizeStopped,
    SynthesizeVoice,
)

from fastcsm.integrations.wyoming import Backend, WyomingLimits, serve  # noqa: E402

FRAME_BYTES = 1920 * 2


@pytest.fixture(scope="module")
def server():
    with LiveServer(slots=4, max_audio_length_ms=400) as s:
        yield s


@contextlib.contextmanager
def wyoming_service(server, limits: WyomingLimits | None = None):
    """The Wyoming service in front of `server`, on its own event loop in a thread: its port."""
    port = free_port()
    loop = asyncio.new_event_loop()
    started = asyncio.Event()
    task = loop.create_task(serve(f"tcp://127.0.0.1:{port}", Backend(server.url, "0"), started, limits))
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


@pytest.fixture(scope="module")
def wyoming(server):
    with wyoming_service(server) as port:
        yield port


# Tight limits, so that the tests of slow and idle clients take a second.
STRICT = WyomingLimits(wyoming_max_event_bytes=4096, wyoming_event_timeout_s=0.5, wyoming_idle_timeout_s=1.0,
                       wyoming_max_clients=4)


@pytest.fixture(scope="module")
def strict(server):
    with wyoming_service(server, STRICT) as port:
        yield port


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
    """Also: its loopback server is `fastcsm serve`'s (the head deadline of the same settings, a key of
    its own), and the Wyoming limits come from their variables."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]),
           "FASTCSM_MAX_AUDIO_LENGTH_MS": "240", "FASTCSM_HEADER_TIMEOUT_S": "0.5",
           "FASTCSM_WYOMING_EVENT_TIMEOUT_S": "0.5"}
    proc = subprocess.Popen([sys.executable, "-m", "fastcsm", "wyoming", "--uri", f"tcp://127.0.0.1:{port}",
                             "--model", str(tiny_checkpoint()), "--device", "cpu", "--voices-dir", str(tmp_path)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        while not lines or "listening" not in lines[-1]:  # printed once listening
            lines.append(proc.stdout.readline())
            assert lines[-1], proc.stderr.read() if proc.poll() is not None else lines
        info = Info.from_event(asyncio.run(exchange(port, [Describe()], "info"))[-1])
        assert "alloy" in [v.name for v in info.tts[0].voices]
        check_audio(asyncio.run(exchange(port, [Synthesize("Hi there.")], "audio-stop")), 3)

        events, closed = asyncio.run(raw_exchange(port, b'{"type": "describe"'))
        assert closed and "within 0.5 s" in Error.from_event(events[0]).text

        url = next(line.split(" served at ")[1].split()[0] for line in lines if " served at " in line)
        assert url.startswith("http://127.0.0.1:")
        assert httpx.get(url + "/v1/voices", timeout=10).status_code == 401
        with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=20) as s:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # half a request head
            assert s.recv(1024) == b""  # closed at the head deadline
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


# -- a hostile client ---------------------------------------------------------------------------

def server_sockets(server: LiveServer) -> int:
    """WebSockets open on the server: uvicorn's own set of connections (what its connection cap
    counts), less the plain HTTP ones."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    return sum(not isinstance(c, H11Protocol) for c in list(server.server.server_state.connections))


def wait_for_sockets(server: LiveServer, want: int, timeout_s: float = 30) -> int:
    """The server's open WebSockets once they number `want`, or what they number at the deadline."""
    deadline = time.monotonic() + timeout_s
    while (n := server_sockets(server)) != want and time.monotonic() < deadline:
        time.sleep(0.05)
    return n


async def until(client: AsyncTcpClient, kind: str) -> list[Event]:
    """The events up to the first of type `kind`."""
    out = []
    while True:
        event = await asyncio.wait_for(client.read_event(), 60)
        assert event is not None, f"the service closed the connection; got {[e.type for e in out]}"
        out.append(event)
        if event.type == kind:
            return out


def test_a_new_synthesize_start_closes_the_line_before(server, wyoming):
    """40 x (synthesize-start + a chunk) on one connection hold one server WebSocket, not 40."""
    assert wait_for_sockets(server, 0) == 0

    async def attack():
        async with AsyncTcpClient("127.0.0.1", wyoming) as client:
            for _ in range(40):
                await client.write_event(SynthesizeStart(voice=SynthesizeVoice(name="0")).event())
                await client.write_event(SynthesizeChunk("Hi").event())
            await client.write_event(Describe().event())
            events = await until(client, "info")  # every start was handled before the describe
            held = await asyncio.to_thread(wait_for_sockets, server, 1)
            await client.write_event(SynthesizeStop().event())
            events += await until(client, "synthesize-stopped")
        return held, [e.type for e in events]

    held, types = asyncio.run(attack())
    assert held == 1
    assert types.count("audio-start") == 40 and types.count("audio-stop") == 40  # each line's audio ends
    assert types.count("synthesize-stopped") == 1 and "error" not in types
    assert wait_for_sockets(server, 0) == 0


def test_clients_leaving_mid_stream_leave_no_line_open(server, wyoming):
    assert wait_for_sockets(server, 0) == 0
    opened = []

    async def leave():
        reader, writer = await asyncio.open_connection("127.0.0.1", wyoming)
        await async_write_event(SynthesizeStart().event(), writer)
        await async_write_event(SynthesizeChunk("Hi").event(), writer)
        await async_write_event(Describe().event(), writer)
        types = []
        while not types or types[-1] != "info":
            types.append((await asyncio.wait_for(async_read_event(reader), 60)).type)
        opened.append(types[0] == "audio-start")  # the line is open on the server
        writer.transport.abort()  # gone, without a word

    async def attack():
        await asyncio.gather(*(leave() for _ in range(50)))

    asyncio.run(attack())
    assert len(opened) == 50 and all(opened)
    assert wait_for_sockets(server, 0) == 0


@pytest.mark.parametrize("bad", [
    Event("synthesize", {"text": 5}),
    Event("synthesize", {"text": "Hi.", "voice": {"name": 7}}),
    Event("synthesize", {"voice": {"name": "alloy"}}),
], ids=["number as text", "number as voice", "no text"])
def test_a_bad_synthesize_is_answered_with_an_error(server, wyoming, bad):
    async def ask():
        async with AsyncTcpClient("127.0.0.1", wyoming) as client:
            await client.write_event(bad)
            error = await until(client, "error")
            await client.write_event(Describe().event())  # the connection goes on
            return error[-1], await until(client, "info")

    error, _ = asyncio.run(ask())
    assert Error.from_event(error).code == "bad_request" and "synthesize" in Error.from_event(error).text
    assert wait_for_sockets(server, 0) == 0


def test_a_bad_chunk_mid_stream_closes_the_line(server, wyoming):
    async def ask():
        async with AsyncTcpClient("127.0.0.1", wyoming) as client:
            await client.write_event(SynthesizeStart().event())
            await client.write_event(SynthesizeChunk("Hello").event())
            await client.write_event(Describe().event())
            await until(client, "info")
            held = await asyncio.to_thread(wait_for_sockets, server, 1)
            await client.write_event(Event("synthesize-chunk", {"text": 5}))
            events = await until(client, "error")
            closed = await asyncio.to_thread(wait_for_sockets, server, 0)
            await client.write_event(SynthesizeStop().event())  # answered, though no line is open
            events += await until(client, "synthesize-stopped")
            return held, closed, events

    held, closed, events = asyncio.run(ask())
    assert (held, closed) == (1, 0)
    types = [e.type for e in events]
    assert types == ["audio-stop", "error", "synthesize-stopped"]
    assert "text" in Error.from_event(events[1]).text


async def raw_exchange(port: int, data: bytes, then: float = 0.0) -> tuple[list[Event], bool]:
    """Send raw bytes (and `then` seconds later, nothing more); the events the service sent back,
    and whether it closed the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        events = []
        while True:
            event = await asyncio.wait_for(async_read_event(reader), 20)
            if event is None:
                return events, True
            events.append(event)
    except TimeoutError:
        return events, False
    finally:
        writer.close()


def describe_works(port: int) -> bool:
    return Info.is_type(asyncio.run(exchange(port, [Describe()], "info"))[-1].type)


@pytest.mark.parametrize("data", [
    b'{"type": "audio-chunk", "payload_length": 268435456}\n',  # 256 MiB announced: refused before it comes
    b'{"type": "synthesize", "data_length": 100000}\n',
    b'{"type": "synthesize", "data": {"text": "' + b"a" * 8000 + b'"}}\n',  # a JSON line over the cap
    b'{"type": "synthesize", "data_length": -1}\n',
    b"[1, 2]\n",
], ids=["payload", "data", "line", "negative length", "not an object"])
def test_an_event_over_the_limits_closes_its_connection_only(strict, data):
    async def attack():
        return await asyncio.gather(raw_exchange(strict, data), raw_exchange(strict, data))

    for events, closed in asyncio.run(attack()):
        assert closed and [e.type for e in events] == ["error"]
        assert Error.from_event(events[0]).code == "event_refused"
    assert describe_works(strict)


def test_slow_and_idle_connections_are_closed(strict):
    """Half an event line (a slow client) and a silent connection are closed at their deadlines
    (0.5 s and 1 s here); the others are answered meanwhile."""
    async def attack():
        slow = asyncio.create_task(raw_exchange(strict, b'{"type": "describe"'))
        idle = asyncio.create_task(raw_exchange(strict, b""))
        answered = await asyncio.to_thread(describe_works, strict)
        return await slow, await idle, answered

    (slow, slow_closed), (idle, idle_closed), answered = asyncio.run(attack())
    assert answered
    assert slow_closed and "within 0.5 s" in Error.from_event(slow[0]).text
    assert idle_closed and "no event came for 1 s" in Error.from_event(idle[0]).text


async def answered(port: int) -> AsyncTcpClient:
    """A connection the service has answered a `describe` on (tried again while the service is
    still closing earlier connections: it counts a connection until it has seen it go)."""
    deadline = time.monotonic() + 20
    while True:
        client = AsyncTcpClient("127.0.0.1", port)
        await client.connect()
        await client.write_event(Describe().event())
        event = await asyncio.wait_for(client.read_event(), 60)
        if event is not None and event.type == "info":
            return client
        await client.disconnect()
        assert time.monotonic() < deadline, event
        await asyncio.sleep(0.05)


def test_connections_beyond_the_cap_are_refused(strict):
    async def attack():
        clients = [await answered(strict) for _ in range(STRICT.wyoming_max_clients)]
        refused = await raw_exchange(strict, b"")
        await clients.pop().disconnect()
        clients.append(await answered(strict))  # once the service has seen one go, a new one is answered
        for client in clients:
            await client.disconnect()
        return refused

    events, closed = asyncio.run(attack())
    assert closed and Error.from_event(events[0]).code == "busy"
    assert "4 connections are open" in Error.from_event(events[0]).text


def test_bad_limits_are_refused_as_the_server_settings_are(capsys):
    from fastcsm.cli import main

    assert main(["wyoming", "--server", "http://127.0.0.1:9", "--max-clients", "0"]) == 2
    assert "wyoming_max_clients must be at least 1 (--max-clients, FASTCSM_WYOMING_MAX_CLIENTS)" in \
        capsys.readouterr().err
    assert main(["wyoming", "--server", "http://127.0.0.1:9", "--uri", "http://127.0.0.1:1"]) == 2
    assert "tcp://HOST:PORT" in capsys.readouterr().err
    with pytest.raises(ValueError, match="wyoming_event_timeout_s must be at least 0.1"):
        WyomingLimits(wyoming_event_timeout_s=0)


def test_the_servers_refusal_reaches_the_client(server, wyoming):
    events = asyncio.run(exchange(wyoming, [Synthesize("Hello there.", voice=SynthesizeVoice(name="nobody"))],
                                  "audio-stop"))
    types = [e.type for e in events]
    assert types == ["audio-start", "error", "audio-stop"]
    error = Error.from_event(events[1])
    assert error.code == "bad_request" and "unknown voice 'nobody'" in error.text  # the server's own words
    assert wait_for_sockets(server, 0) == 0
