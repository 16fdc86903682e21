"""The server against real clients on loopback: the `openai` package, httpx, a WebSocket client.

A tiny random checkpoint never emits its end frame, so every utterance runs to its
`max_audio_length_ms` bound: lengths are exact (frames x 1920 samples).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import threading
import time
from contextlib import contextmanager

import httpx
import numpy as np
import pytest
import soundfile as sf

openai = pytest.importorskip("openai")
from server_harness import LiveServer  # noqa: E402
from websockets.sync.client import connect  # noqa: E402

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
FRAME = 1920
MAX_BODY = 512 * 1024


class Prefill:
    """The served engine's prefill (its runner's, injected when the server starts), which a test
    may replace for a while."""

    def __init__(self):
        self.instead = None

    def __call__(self, *args):
        from fastcsm.engine.step import prefill

        return (self.instead or prefill)(*args)

    @contextmanager
    def replaced_by(self, fn):
        self.instead = fn
        try:
            yield
        finally:
            self.instead = None


PREFILL = Prefill()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from fastcsm.engine.runner import Runner

    with LiveServer(slots=16, max_queue=64, api_keys=[KEY], max_body_bytes=MAX_BODY, max_input_chars=500,
                    max_audio_length_ms=8000, voices_dir=str(tmp_path_factory.mktemp("voices")),
                    runner=Runner(prefill=PREFILL)) as s:
        yield s


def client(server, key=KEY):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=60)


def speak_bytes(server, frames: int, fmt: str = "pcm", **extra) -> bytes:
    body = {"model": "csm-1b", "input": "Hello there.", "voice": "0", "response_format": fmt,
            "max_audio_length_ms": 80 * frames, **extra}
    with httpx.stream("POST", server.url + "/v1/audio/speech", json=body, headers=AUTH, timeout=60) as r:
        assert r.status_code == 200, r.read()
        return r.read()


def flac_with_length(data: bytes, samples: int) -> bytes:
    """A streamed FLAC says "unknown length" in its STREAMINFO; libsndfile needs it filled in."""
    assert data[:4] == b"fLaC"
    word = int.from_bytes(data[18:26], "big")
    assert word & ((1 << 36) - 1) == 0  # unknown while streaming
    return data[:18] + (word | samples).to_bytes(8, "big") + data[26:]


def decode(data: bytes, fmt: str, samples: int) -> np.ndarray:
    if fmt == "pcm":
        return np.frombuffer(data, "<i2").astype(np.float32) / 32768
    if fmt == "flac":
        data = flac_with_length(data, samples)
    audio, sr = sf.read(io.BytesIO(data), dtype="float32")
    assert sr == 24_000
    return audio


def wav_bytes(seconds: float = 1.0) -> bytes:
    t = np.arange(int(24_000 * seconds)) / 24_000
    buf = io.BytesIO()
    sf.write(buf, (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 24_000, format="WAV")
    return buf.getvalue()


# -- the OpenAI-compatible speech API -------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["wav", "pcm", "flac", "mp3", "opus"])
def test_openai_client_streams_valid_audio(server, fmt):
    frames = 5
    with client(server).audio.speech.with_streaming_response.create(
            model="csm-1b", voice="0", input="Hello from fastcsm.", response_format=fmt,
            extra_body={"max_audio_length_ms": 80 * frames, "seed": 7}) as response:
        assert response.headers["x-fastcsm-seed"] == "7"
        data = b"".join(response.iter_bytes())
    audio = decode(data, fmt, frames * FRAME)
    if fmt == "mp3":  # the encoder pads its own delay
        assert frames * FRAME <= audio.shape[0] <= frames * FRAME + 3 * 1152
    else:
        assert audio.shape == (frames * FRAME,)
    assert np.isfinite(audio).all() and np.abs(audio).max() > 0


def test_audio_streams_before_generation_ends(server):
    """The first chunk arrives while the stream is still being generated (told by the server's
    own count of active streams, not by a clock, so a loaded machine cannot fail it)."""
    frames = 100
    body = {"input": "A longer line that goes on for a good while.", "voice": "0", "response_format": "pcm",
            "max_audio_length_ms": 80 * frames}
    with httpx.stream("POST", server.url + "/v1/audio/speech", json=body, headers=AUTH, timeout=60) as r:
        chunks = iter(r.iter_raw())
        first = next(chunks)
        still_generating = server.metrics()["fastcsm_active_streams"]
        rest = b"".join(chunks)
    assert 0 < len(first) < frames * FRAME * 2
    assert len(first) + len(rest) == frames * FRAME * 2
    assert still_generating == 1


def test_server_sent_events(server):
    body = {"input": "Hello.", "voice": "0", "response_format": "pcm", "stream_format": "sse",
            "max_audio_length_ms": 240}
    with httpx.stream("POST", server.url + "/v1/audio/speech", json=body, headers=AUTH, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    assert [e["type"] for e in events] == ["speech.audio.delta"] * 3 + ["speech.audio.done"]
    audio = b"".join(base64.b64decode(e["audio"]) for e in events[:-1])
    assert len(audio) == 3 * FRAME * 2 and events[-1]["usage"]["output_tokens"] == 3


def test_long_text_is_spoken_in_pieces_in_one_stream(server):
    text = " ".join(f"Sentence number {i} is here." for i in range(16))  # ~450 characters
    body = {"input": text, "voice": "0", "response_format": "pcm", "max_audio_length_ms": 160}
    with httpx.stream("POST", server.url + "/v1/audio/speech", json=body, headers=AUTH, timeout=60) as r:
        assert r.status_code == 200
        pieces = int(r.headers["x-fastcsm-pieces"])
        data = r.read()
    assert pieces == 3 and len(data) == pieces * 2 * FRAME * 2


def test_pieces_of_long_text_decode_as_one_audio_stream(server, monkeypatch):
    """The audio of a response spoken in pieces equals one decode of all its codes: each piece
    continues the codec state of the one before (a fresh stream per piece would differ)."""
    import torch

    engine = server.service.scheduler.engine
    codes = []
    step = engine.step

    def recording():  # the engine's public step, noting the codes it hands out
        out = step()
        codes.extend(e.codes for e in out if not e.ended)
        return out

    monkeypatch.setattr(engine, "step", recording)
    text = " ".join(f"Sentence number {i} is here." for i in range(16))
    body = {"input": text, "voice": "0", "response_format": "pcm", "max_audio_length_ms": 160, "seed": 3}
    with httpx.stream("POST", server.url + "/v1/audio/speech", json=body, headers=AUTH, timeout=60) as r:
        assert r.status_code == 200 and r.headers["x-fastcsm-pieces"] == "3"
        got = np.frombuffer(r.read(), dtype="<i2").astype(np.float32) / 32768
    assert len(codes) == 6 and got.size == 6 * FRAME
    codec = server.service.generator.codec
    whole = codec.decode(torch.stack(codes)).clamp(-1, 1).numpy()
    assert np.abs(got - whole).max() < 1e-3
    pieces = np.concatenate([codec.decode(torch.stack(codes[i:i + 2])).clamp(-1, 1).numpy() for i in (0, 2, 4)])
    assert np.abs(pieces - whole).max() > 1e-2, "fresh streams per piece would sound different"


def test_32_concurrent_streams_complete_with_their_lengths(server):
    lengths = [1 + i % 6 for i in range(32)]

    async def one(http, frames, i):
        body = {"input": f"Line number {i}.", "voice": str(i % 3), "response_format": "pcm",
                "max_audio_length_ms": 80 * frames, "seed": i}
        async with http.stream("POST", "/v1/audio/speech", json=body, headers=AUTH) as r:
            assert r.status_code == 200
            return len(await r.aread())

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=120,
                                     limits=httpx.Limits(max_connections=64)) as http:
            return await asyncio.gather(*(one(http, n, i) for i, n in enumerate(lengths)))

    before = server.metrics()
    got = asyncio.run(main())
    assert got == [n * FRAME * 2 for n in lengths]
    after = server.metrics()
    assert after["fastcsm_completed_total"] - before["fastcsm_completed_total"] == 32
    assert after["fastcsm_active_streams"] == 0


def test_client_disconnect_frees_its_slot_while_others_continue(server):
    results = {}

    def full(name, frames):
        results[name] = len(speak_bytes(server, frames))

    others = [threading.Thread(target=full, args=(f"s{i}", 30)) for i in range(2)]
    for t in others:
        t.start()
    before = server.metrics()
    body = {"input": "I will hang up.", "voice": "0", "response_format": "pcm", "max_audio_length_ms": 8000}
    with httpx.stream("POST", server.url + "/v1/audio/speech", json=body, headers=AUTH, timeout=60) as r:
        next(r.iter_raw())  # audio is flowing; now leave
    deadline = time.monotonic() + 30  # generous for a loaded machine: the loop ends as soon as it is seen
    while time.monotonic() < deadline:
        m = server.metrics()
        if m["fastcsm_cancelled_total"] > before["fastcsm_cancelled_total"]:
            break
        time.sleep(0.02)
    assert m["fastcsm_cancelled_total"] == before["fastcsm_cancelled_total"] + 1
    assert m["fastcsm_active_streams"] <= 2  # the two others at most
    for t in others:
        t.join(60)
    assert results == {"s0": 30 * FRAME * 2, "s1": 30 * FRAME * 2}
    assert server.metrics()["fastcsm_active_streams"] == 0


def test_a_serving_process_hands_the_gil_to_the_engine_within_its_switch_interval(server):
    """The scheduler's thread takes the GIL back after every torch call; with Python's 5 ms switch
    interval a busy event loop kept it that long each time, and every stream stalled."""
    import sys

    from fastcsm import threads

    assert threads.SWITCH_INTERVAL_S < 0.005
    assert sys.getswitchinterval() == pytest.approx(threads.SWITCH_INTERVAL_S)


# -- bad input: clear 4xx, and nobody else notices -------------------------------------------------

def test_bad_requests_get_clear_4xx_while_streams_continue(server):
    results = {}
    background = threading.Thread(target=lambda: results.update(n=len(speak_bytes(server, 40))))
    background.start()
    url = server.url
    # malformed JSON
    r = httpx.post(url + "/v1/audio/speech", content=b'{"input": "hi", ',
                   headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    # unknown voice: says how to list voices
    with pytest.raises(openai.BadRequestError) as e:
        client(server).audio.speech.create(model="csm-1b", voice="nobody", input="Hello.")
    assert "GET /v1/voices" in str(e.value)
    # unknown field, bad format, out-of-range sampling
    for bad in ({"colour": "blue"}, {"response_format": "ogg"}, {"temperature": -1}, {"voice": "x" * 100}):
        r = httpx.post(url + "/v1/audio/speech", json={"input": "hi", "voice": "0", **bad}, headers=AUTH)
        assert r.status_code == 400, (bad, r.text)
        assert r.json()["error"]["message"]
    # too-long text
    r = httpx.post(url + "/v1/audio/speech", json={"input": "word " * 200, "voice": "0"}, headers=AUTH)
    assert r.status_code == 400 and "at most 500" in r.json()["error"]["message"]
    # audio longer than the server allows
    r = httpx.post(url + "/v1/audio/speech", json={"input": "hi", "voice": "0", "max_audio_length_ms": 60_000},
                   headers=AUTH)
    assert r.status_code == 400 and "limit" in r.json()["error"]["message"]
    # bad API key, no API key
    with pytest.raises(openai.AuthenticationError):
        client(server, key="wrong").audio.speech.create(model="csm-1b", voice="0", input="Hello.")
    assert httpx.get(url + "/v1/voices").status_code == 401
    # oversized upload
    big = b"\0" * (MAX_BODY + 1)
    r = httpx.post(url + "/v1/voices", headers=AUTH, data={"name": "big", "text": "Too big."},
                   files={"audio": ("big.wav", big, "audio/wav")})
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]
    # an upload that is not audio
    r = httpx.post(url + "/v1/voices", headers=AUTH, data={"name": "noise", "text": "Not audio."},
                   files={"audio": ("x.wav", b"not audio at all", "audio/wav")})
    assert r.status_code == 400 and "audio" in r.json()["error"]["message"]
    # a voice name that tries to leave the voice directory
    r = httpx.post(url + "/v1/voices", headers=AUTH, data={"name": "../escape", "text": "Hi."},
                   files={"audio": ("v.wav", wav_bytes(0.5), "audio/wav")})
    assert r.status_code == 400 and "invalid voice name" in r.json()["error"]["message"]
    background.join(60)
    assert results["n"] == 40 * FRAME * 2
    assert server.metrics()["fastcsm_errors_total"] == 0


def test_full_queue_gets_503_with_retry_after():
    with LiveServer(slots=1, max_queue=1, max_audio_length_ms=20_000, cors_origins=["https://app.example"],
                    api_keys=["ключ", KEY]) as small:
        # CORS: the allowed origin may call from a browser, another may not.
        preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
        ok = httpx.options(small.url + "/v1/audio/speech", headers={"Origin": "https://app.example", **preflight})
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "https://app.example"
        bad = httpx.options(small.url + "/v1/audio/speech", headers={"Origin": "https://evil.example", **preflight})
        assert bad.status_code == 400 and "access-control-allow-origin" not in bad.headers
        # A key with any bytes in it is just a wrong key.
        r = httpx.get(small.url + "/v1/voices", headers={"Authorization": "Bearer ключ".encode()})
        assert r.status_code == 200
        r = httpx.get(small.url + "/v1/voices", headers={"Authorization": "Bearer \xff\xfe".encode("latin-1")})
        assert r.status_code == 401
        # Long enough that its length guard (3 s + 150 ms a character) leaves it running a while.
        body = {"input": "Hold the slot for a good long while, so that the next request has to wait.", "voice": "0",
                "response_format": "pcm", "max_audio_length_ms": 20_000}
        with httpx.Client(base_url=small.url, timeout=30, headers=AUTH) as http, ws_connect(small) as ws:
            assert recv_json(ws)["type"] == "ready"
            with http.stream("POST", "/v1/audio/speech", json=body) as running:
                audio = running.iter_raw()  # keep the iterator: dropping it closes the connection
                next(audio)
                with http.stream("POST", "/v1/audio/speech", json=body) as queued:
                    assert queued.status_code == 200
                    assert small.metrics()["fastcsm_queue_depth"] == 1
                    r = httpx.post(small.url + "/v1/audio/speech", json=body, headers=AUTH, timeout=30)
                    assert r.status_code == 503
                    assert r.headers["retry-after"] == "1"
                    assert "busy" in r.json()["error"]["message"]
                    # A conversation's speak is refused the same way, and leaves no line behind:
                    # trying again is refused for the full queue again, not for a line in flight.
                    for _ in range(2):
                        ws.send(json.dumps({"type": "speak", "text": "Hi.", "voice": "0", "id": "refused"}))
                        e = recv_json(ws)
                        assert (e["type"], e["code"], e["id"]) == ("error", "busy", "refused")
                        assert "the server is busy" in e["message"], e
            deadline = time.monotonic() + 30
            while small.service.scheduler.active + small.service.scheduler.queued and time.monotonic() < deadline:
                time.sleep(0.01)
            events, audio = speak_and_collect(ws, text="Now.", voice="0", max_audio_length_ms=160)
            assert [e["type"] for e in events] == ["started", "first_audio", "done"]
            assert events[0]["utterance"] == 0 and len(audio) == 2  # the refused ones were never begun
        m = small.metrics()
        assert m["fastcsm_rejected_total"] == 3


# -- voices ---------------------------------------------------------------------------------------

def test_voice_upload_list_speak_delete(server):
    url = server.url
    r = httpx.post(url + "/v1/voices", headers=AUTH, data={"name": "alice", "text": "Hello, this is Alice.",
                                                             "speaker": "1"},
                   files={"audio": ("alice.wav", wav_bytes(1.0), "audio/wav")})
    assert r.status_code == 201, r.text
    info = r.json()
    assert info["name"] == "alice" and info["speaker"] == 1 and info["duration_ms"] == 1040  # 13 frames
    r = httpx.post(url + "/v1/voices", headers=AUTH, data={"name": "alice", "text": "Again."},
                   files={"audio": ("alice.wav", wav_bytes(0.5), "audio/wav")})
    assert r.status_code == 409
    names = [v["name"] for v in httpx.get(url + "/v1/voices", headers=AUTH).json()["data"]]
    assert "alice" in names
    before = server.metrics()
    for voice in ("alice", {"id": "alice"}):
        with client(server).audio.speech.with_streaming_response.create(
                model="csm-1b", voice=voice, input="Now in Alice's voice.", response_format="pcm",
                extra_body={"max_audio_length_ms": 240}) as response:
            assert len(response.read()) == 3 * FRAME * 2
    # The second request reused the voice prompt's KV.
    assert server.metrics()["fastcsm_reused_rows_total"] > before["fastcsm_reused_rows_total"]
    assert httpx.delete(url + "/v1/voices/alice", headers=AUTH).status_code == 200
    assert httpx.delete(url + "/v1/voices/alice", headers=AUTH).status_code == 404
    r = httpx.post(url + "/v1/audio/speech", json={"input": "hi", "voice": "alice"}, headers=AUTH)
    assert r.status_code == 400


# -- live conversations ---------------------------------------------------------------------------

def ws_connect(server, **kw):
    return connect(server.url.replace("http", "ws") + "/v1/conversations", additional_headers=AUTH,
                   open_timeout=10, **kw)


def recv_json(ws, timeout=30) -> dict:
    while True:
        msg = ws.recv(timeout=timeout)
        if isinstance(msg, str):
            return json.loads(msg)


def speak_and_collect(ws, **speak) -> tuple[list[dict], list[bytes]]:
    ws.send(json.dumps({"type": "speak", **speak}))
    events, audio = [], []
    while True:
        msg = ws.recv(timeout=30)
        if isinstance(msg, bytes):
            audio.append(msg)
            continue
        event = json.loads(msg)
        events.append(event)
        if event["type"] in ("done", "error"):
            return events, audio


def line_rows(speaker: int, text: str) -> int:
    return len(f"[{speaker}]{text}".encode()) + 2  # byte tokenizer: begin + bytes + end


def test_conversation_reuses_its_kv_cache_turn_by_turn(server):
    with ws_connect(server) as ws:
        assert recv_json(ws)["type"] == "ready"
        ws.send(json.dumps({"type": "configure", "audio_format": "pcm_f32le"}))
        assert recv_json(ws)["type"] == "configured"
        previous_prefix = 0
        for turn, (heard, line) in enumerate([("Hi, how are you?", "Fine, thanks."),
                                              ("What are you up to?", "Writing a server."),
                                              ("Sounds fun.", "It is.")]):
            ws.send(json.dumps({"type": "add_turn", "speaker": 1, "text": heard}))
            added = recv_json(ws)
            assert added["type"] == "turn_added" and added["index"] == 2 * turn
            events, audio = speak_and_collect(ws, text=line, voice="0", max_audio_length_ms=320, id=f"t{turn}")
            kinds = [e["type"] for e in events]
            assert kinds == ["started", "first_audio", "done"], events
            started, done = events[0], events[-1]
            assert done["id"] == f"t{turn}" and done["reason"] == "max_length" and done["frames"] == 4
            assert [len(a) for a in audio] == [FRAME * 4] * 4  # float32 frames
            prompt = started["prompt_rows"]
            assert done["reused_rows"] == previous_prefix
            assert done["prefill_rows"] == prompt - previous_prefix
            previous_prefix = prompt - line_rows(0, line)
        assert done["reused_rows"] > done["prefill_rows"]  # the third turn mostly reuses


def test_interrupt_stops_audio_within_a_frame(server):
    with ws_connect(server) as ws:
        assert recv_json(ws)["type"] == "ready"
        ws.send(json.dumps({"type": "speak", "text": "A long answer that will be cut short.", "voice": "0",
                            "max_audio_length_ms": 8000}))
        assert recv_json(ws)["type"] == "started"
        while not isinstance(ws.recv(timeout=30), bytes):
            pass
        ws.send(json.dumps({"type": "interrupt"}))
        after = 0
        while True:
            msg = ws.recv(timeout=10)
            if isinstance(msg, bytes):
                after += 1
                continue
            event = json.loads(msg)
            if event["type"] == "done":
                break
        assert event["reason"] == "interrupted"
        # Generation runs ahead of real time, so a frame may already be on the wire when the
        # interrupt leaves; once the server reads it, nothing more is sent.
        # Counted in frames, not seconds, so a loaded machine cannot fail it.
        assert after <= 2 and event["frames"] == 1 + after  # every frame sent arrived before done
        # The conversation goes on: the next line speaks after the interrupted one.
        events, audio = speak_and_collect(ws, text="Sorry, go on.", voice="0", max_audio_length_ms=160)
        assert events[-1]["type"] == "done" and events[-1]["frames"] == 2 and len(audio) == 2
    deadline = time.monotonic() + 30
    while server.metrics()["fastcsm_active_streams"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.metrics()["fastcsm_active_streams"] == 0


def idle_engine_stats(server) -> dict:
    """The engine's counters once no stream holds a slot or waits for one."""
    scheduler = server.service.scheduler
    deadline = time.monotonic() + 30
    while (scheduler.active or scheduler.queued) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not (scheduler.active or scheduler.queued)
    return dict(scheduler.engine.stats)


def wait_for_audio(ws, frames: int = 1) -> None:
    while frames:
        if isinstance(ws.recv(timeout=30), bytes):
            frames -= 1


def until_done(ws, audio: list | None = None) -> list[dict]:
    """The events up to the next `done`; the binary frames between them go to `audio`."""
    events = []
    while not events or events[-1]["type"] != "done":
        msg = ws.recv(timeout=30)
        if isinstance(msg, str):
            events.append(json.loads(msg))
        elif audio is not None:
            audio.append(msg)
    return events


def test_done_counts_the_rows_of_every_piece_interrupted_or_not(server):
    """The rows a `done` reports are those the engine prefilled and reused for the line, every
    piece that was submitted counted once, whether it ended, was interrupted mid-line, or had
    not even begun: over a conversation, the dones add up to the engine's own counters."""
    before = idle_engine_stats(server)
    dones = []
    with ws_connect(server) as ws:
        assert recv_json(ws)["type"] == "ready"
        ws.send(json.dumps({"type": "speak", "text": "A long answer that will be cut short.", "voice": "0",
                            "max_audio_length_ms": 8000}))
        started = recv_json(ws)
        wait_for_audio(ws)
        ws.send(json.dumps({"type": "interrupt"}))
        done = until_done(ws)[-1]
        assert done["reason"] == "interrupted" and done["pieces"] == 1 and done["error"] is None
        assert (done["prefill_rows"], done["reused_rows"]) == (started["prompt_rows"], 0)  # a fresh conversation
        dones.append(done)
        ws.send(json.dumps({"type": "add_turn", "speaker": 1, "text": "Go on then."}))
        assert recv_json(ws)["type"] == "turn_added"
        # A line streaming in: its first piece runs to its bound, the second is cut off (or has
        # just ended) by the interrupt while the line waits for more text.
        ws.send(json.dumps({"type": "speak", "text": "One two three. Four", "voice": "0", "more": True,
                            "max_audio_length_ms": 400}))
        started = recv_json(ws)
        # `started` bounds the first piece (400 ms: 5 frames), under its new name and its old one
        assert started["type"] == "started" and started["first_piece_max_frames"] == started["max_frames"] == 5
        ws.send(json.dumps({"type": "append_text", "text": " five six. Seven", "more": True}))
        wait_for_audio(ws, 6)  # a frame of the second piece
        ws.send(json.dumps({"type": "interrupt"}))
        done = until_done(ws)[-1]
        assert done["reason"] == "interrupted" and done["pieces"] == 2 and done["frames"] >= 6
        assert done["frames"] > started["first_piece_max_frames"]  # `done` counts the whole line
        assert done["audio_ms"] == 80 * done["frames"]
        assert done["reused_rows"] > 0 and done["prefill_rows"] > 0  # the conversation so far was kept
        dones.append(done)
        # Interrupted before it was even complete: nothing was submitted, nothing counted.
        ws.send(json.dumps({"type": "speak", "text": "Eight", "voice": "0", "more": True}))
        ws.send(json.dumps({"type": "interrupt"}))
        done = until_done(ws)[-1]
        assert (done["reason"], done["pieces"], done["prefill_rows"], done["reused_rows"]) == ("interrupted", 0, 0, 0)
        events, _ = speak_and_collect(ws, text="Sorry, go on.", voice="0", max_audio_length_ms=160)
        assert events[-1]["reason"] == "max_length" and events[-1]["reused_rows"] > 0
        dones.append(events[-1])
    after = idle_engine_stats(server)
    assert sum(d["prefill_rows"] for d in dones) == after["prefill_rows"] - before["prefill_rows"]
    assert sum(d["reused_rows"] for d in dones) == after["reused_rows"] - before["reused_rows"]


def test_a_failed_prefill_is_an_explicit_error_and_other_streams_go_on(server):
    """A line whose prefill fails ends with an `error` event saying so and a `done` (reason
    error) that counts the rows prefilled before the failure; another conversation's line,
    running meanwhile, ends with all its frames, and the failed session speaks again."""
    from fastcsm.engine.step import prefill

    armed = threading.Event()

    def flaky_prefill(model, tokens, mask, start, cache):
        """Fails on any chunk after a prompt's first (a line after its conversation), when armed."""
        if armed.is_set() and int(start[0]) > 0:
            raise RuntimeError("boom")
        return prefill(model, tokens, mask, start, cache)

    idle_engine_stats(server)
    with PREFILL.replaced_by(flaky_prefill), ws_connect(server) as other, ws_connect(server) as ws:
        assert recv_json(other)["type"] == recv_json(ws)["type"] == "ready"
        other.send(json.dumps({"type": "speak", "text": "I keep talking, whatever happens next door.", "voice": "0",
                               "max_audio_length_ms": 1600, "id": "other"}))
        wait_for_audio(other)  # prefilled in one chunk, from row 0
        armed.set()
        ws.send(json.dumps({"type": "add_turn", "speaker": 1, "text": "A turn nobody said before, 7f3a."}))
        turn = recv_json(ws)
        ws.send(json.dumps({"type": "speak", "text": "This line cannot go in.", "voice": "0", "id": "bad"}))
        audio = []
        events = until_done(ws, audio)
        armed.clear()
        assert [e["type"] for e in events] == ["started", "error", "done"] and audio == []
        started, error, done = events
        message = f"prefill failed after {turn['rows']} of {started['prompt_rows']} prompt rows: RuntimeError"
        assert (error["code"], error["message"], error["id"]) == ("internal", message, "bad")
        assert (done["reason"], done["frames"], done["error"], done["id"]) == ("error", 0, message, "bad")
        assert (done["prefill_rows"], done["reused_rows"]) == (turn["rows"], 0)  # the turn went in, the line not
        others = until_done(other)
        assert others[-1]["reason"] == "max_length" and others[-1]["frames"] == 20
        assert not any(e["type"] == "error" for e in others)
        events, audio = speak_and_collect(ws, text="Still here.", voice="0", max_audio_length_ms=160)
        assert events[-1]["reason"] == "max_length" and len(audio) == 2
        assert events[-1]["reused_rows"] >= turn["rows"]  # the prefix stored before the failure


def test_a_line_past_its_deadline_says_so_in_its_done(server, monkeypatch):
    idle_engine_stats(server)
    monkeypatch.setattr(server.service.scheduler, "timeout_s", 0.0)  # every request is late when first seen
    with ws_connect(server) as ws:
        assert recv_json(ws)["type"] == "ready"
        ws.send(json.dumps({"type": "speak", "text": "Too late.", "voice": "0", "id": "late"}))
        audio = []
        events = until_done(ws, audio)
        assert [e["type"] for e in events] == ["started", "done"] and audio == []
        assert (events[-1]["reason"], events[-1]["error"]) == ("deadline", "the request ran past its deadline")
        assert (events[-1]["prefill_rows"], events[-1]["reused_rows"]) == (0, 0)  # it never got a slot


def test_speech_whose_generation_fails_is_broken_off_not_finished(server):
    """Its 200 went out with the first byte, so a failed prefill cannot change the status: the
    body is broken off without its last chunk (a client sees an incomplete response), never
    finished as a shorter file that looks whole; the next request is served normally."""
    def failing_prefill(*args):
        raise RuntimeError("boom")

    idle_engine_stats(server)
    body = {"input": "Hello there.", "voice": "0", "response_format": "wav", "max_audio_length_ms": 160}
    with PREFILL.replaced_by(failing_prefill):
        for extra in ({}, {"stream_format": "sse"}):
            received = b""
            with pytest.raises(httpx.RemoteProtocolError):
                with httpx.stream("POST", server.url + "/v1/audio/speech", json={**body, **extra}, headers=AUTH,
                                  timeout=60) as r:
                    assert r.status_code == 200
                    for chunk in r.iter_raw():
                        received += chunk
            assert b"speech.audio.done" not in received
    assert len(speak_bytes(server, 2)) == 2 * FRAME * 2


def test_conversation_errors_are_events_and_the_session_survives(server):
    with ws_connect(server) as ws:
        assert recv_json(ws)["type"] == "ready"
        ws.send("{not json")
        e = recv_json(ws)
        assert e["type"] == "error" and "not valid JSON" in e["message"]
        ws.send(json.dumps({"type": "dance"}))
        assert "type" in recv_json(ws)["message"]
        ws.send(json.dumps({"type": "speak", "text": "Hi.", "voice": "nobody"}))
        e = recv_json(ws)
        assert e["type"] == "error" and "GET /v1/voices" in e["message"]
        ws.send(json.dumps({"type": "add_turn", "speaker": 1, "text": "x", "audio": "%%%"}))
        assert "base64" in recv_json(ws)["message"]
        events, audio = speak_and_collect(ws, text="Still here.", voice="0", max_audio_length_ms=160)
        assert events[-1]["type"] == "done" and len(audio) == 2
    with connect(server.url.replace("http", "ws") + "/v1/conversations?api_key=wrong") as ws:
        e = recv_json(ws)
        assert e["type"] == "error" and e["code"] == "unauthorized"


def test_conversation_window_slides_and_says_so(server):
    turn = "blah " * 97  # ~500 rows with the byte tokenizer
    with ws_connect(server) as ws:
        assert recv_json(ws)["type"] == "ready"
        for i in range(3):
            ws.send(json.dumps({"type": "add_turn", "speaker": 1, "text": f"{i} {turn}"}))
            assert recv_json(ws)["type"] == "turn_added"
        events, _ = speak_and_collect(ws, text="Go on.", voice="0", max_audio_length_ms=160)
        assert [e["type"] for e in events] == ["started", "first_audio", "done"]
        for i in range(3, 5):  # now the conversation no longer fits the 2048-row window
            ws.send(json.dumps({"type": "add_turn", "speaker": 1, "text": f"{i} {turn}"}))
            assert recv_json(ws)["type"] == "turn_added"
        events, audio = speak_and_collect(ws, text="Too much talk.", voice="0", max_audio_length_ms=160)
        assert [e["type"] for e in events] == ["context_dropped", "started", "first_audio", "done"]
        dropped, started, done = events[0], events[1], events[-1]
        assert dropped["dropped_turns"] >= 1 and dropped["remaining_rows"] + 2 <= 2048
        assert done["reused_rows"] == 0 and done["prefill_rows"] == started["prompt_rows"]  # prefilled again
        assert len(audio) == 2


def test_conversation_with_a_pinned_voice(server):
    r = httpx.post(server.url + "/v1/voices", headers=AUTH, data={"name": "bob", "text": "I am Bob.", "speaker": "2"},
                   files={"audio": ("bob.wav", wav_bytes(0.5), "audio/wav")})
    assert r.status_code == 201
    with ws_connect(server) as ws:
        assert recv_json(ws)["type"] == "ready"
        ws.send(json.dumps({"type": "configure", "voices": ["bob"], "temperature": 0.5, "topk": 20}))
        configured = recv_json(ws)
        assert configured["voices"] == ["bob"] and configured["pinned_rows"] > 7  # text + 7 frames + end
        first, _ = speak_and_collect(ws, text="Hello.", voice="bob", max_audio_length_ms=160)
        assert first[0]["speaker"] == 2  # the voice's own id
        second, _ = speak_and_collect(ws, text="Again.", voice="bob", max_audio_length_ms=160)
        assert second[-1]["reused_rows"] == first[0]["prompt_rows"] - line_rows(2, "Hello.")
    assert httpx.delete(server.url + "/v1/voices/bob", headers=AUTH).status_code == 200


def test_speech_with_context_reuses_its_kv_on_the_next_request(server):
    context = [{"speaker": 1, "text": "How was your day?", "audio": base64.b64encode(wav_bytes(0.5)).decode()},
               {"speaker": 0, "text": "Long, but good."}]
    before = server.metrics()
    for line in ("Tell me more.", "And then?"):  # the same conversation, a new line each time
        body = {"input": line, "voice": "0", "context": context, "response_format": "pcm",
                "max_audio_length_ms": 160}
        r = httpx.post(server.url + "/v1/audio/speech", json=body, headers=AUTH, timeout=60)
        assert r.status_code == 200 and len(r.content) == 2 * FRAME * 2
    after = server.metrics()
    context_rows = (len("[1]How was your day?") + 2) + 8 + (len("[0]Long, but good.") + 2)  # 0.5 s: 7 frames + end
    assert after["fastcsm_reused_rows_total"] - before["fastcsm_reused_rows_total"] == context_rows
    bad = {"input": "x", "voice": "0", "context": [{"speaker": 1, "text": "hi", "audio": "bm90IGF1ZGlv"}]}
    r = httpx.post(server.url + "/v1/audio/speech", json=bad, headers=AUTH)
    assert r.status_code == 400 and "context[0]" in r.json()["error"]["message"]
