"""The server under attack, on loopback: no client may stall the others, exhaust memory, write
where it should not, or read a key out of a log. Every attack is bounded in count and time, and
every bound that is the point of a test is generous (seconds, never milliseconds): the suite
passes with both cores busy. `benchmarks/bench_attacks.py` reports the latencies.
"""

from __future__ import annotations

import io
import json
import logging
import socket
import threading
import time

import httpx
import numpy as np
import pytest
import soundfile as sf

pytest.importorskip("openai")
from server_harness import LiveServer  # noqa: E402
from test_server import AUTH, FRAME, KEY, recv_json, wav_bytes  # noqa: E402
from websockets.sync.client import connect  # noqa: E402

from fastcsm.server.settings import Settings  # noqa: E402

ALLOWED = "https://app.example"
NAMES = ["tts.example", "*.voices.example"]  # --allowed-hosts


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # The default body limit (16 MiB), as in the attacks this file repeats.
    with LiveServer(slots=16, max_queue=48, api_keys=[KEY], cors_origins=[ALLOWED], max_audio_length_ms=8000,
                    allowed_hosts=NAMES, voices_dir=str(tmp_path_factory.mktemp("voices"))) as s:
        yield s


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """One slot, short deadlines, a small body limit."""
    with LiveServer(slots=1, max_queue=4, api_keys=[KEY], max_audio_length_ms=20_000, header_timeout_s=1.0,
                    body_timeout_s=2.0, max_body_bytes=64 * 1024,
                    voices_dir=str(tmp_path_factory.mktemp("voices"))) as s:
        yield s


def ws(server, path="/v1/conversations", **kw):
    kw.setdefault("additional_headers", AUTH)
    return connect(server.url.replace("http", "ws") + path, open_timeout=10, **kw)


def wait_idle(server, seconds=10.0) -> float:
    """Seconds until no stream holds a slot or waits for one (or `seconds`)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        s = server.service.scheduler
        if s.active == 0 and s.queued == 0:
            break
        time.sleep(0.01)
    return time.monotonic() - t0


def short_speech(server, frames=3) -> bytes:
    body = {"input": "Still here.", "voice": "0", "response_format": "pcm", "max_audio_length_ms": 80 * frames}
    r = httpx.post(server.url + "/v1/audio/speech", json=body, headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text
    assert len(r.content) == frames * FRAME * 2
    return r.content


# -- 1. the WebSocket's interrupt always ends its utterance ---------------------------------------

def test_speak_interrupt_burst_leaves_no_stream_behind(server):
    """80 x (speak, interrupt) at once: every utterance ends with its done, nothing keeps
    generating for nobody, and another client is served normally. The dones count the rows
    each line prefilled (queued, prefilling or running when interrupted) exactly once."""
    wait_idle(server)
    before = server.metrics()
    with ws(server) as c:
        assert recv_json(c)["type"] == "ready"
        for i in range(80):
            c.send(json.dumps({"type": "speak", "text": "A line nobody hears.", "voice": "0", "id": str(i),
                               "max_audio_length_ms": 8000}))
            c.send(json.dumps({"type": "interrupt"}))
        started, done, busy = set(), {}, 0
        deadline = time.monotonic() + 60
        while len(done) < len(started) or len(started) + busy < 80:
            assert time.monotonic() < deadline, (len(started), len(done), busy)
            msg = c.recv(timeout=30)
            if isinstance(msg, bytes):
                continue
            e = json.loads(msg)
            if e["type"] == "started":
                started.add(e["id"])
            elif e["type"] == "done":
                done[e["id"]] = e
            elif e["type"] == "error":
                assert e["code"] == "busy", e  # a full queue may refuse a speak: it is said, never lost
                busy += 1
        assert set(done) == started and len(started) >= 40
        assert all(d["reason"] == "interrupted" for d in done.values())
        # Still on the socket: nothing is generating for it any more.
        settle = wait_idle(server)
        assert server.service.scheduler.active <= 1 and settle < 5.0, settle
        wait_idle(server)
        rows = server.metrics()
        for kind in ("prefill", "reused"):
            total = rows[f"fastcsm_{kind}_rows_total"] - before[f"fastcsm_{kind}_rows_total"]
            assert sum(d[f"{kind}_rows"] for d in done.values()) == total, kind
        short_speech(server)  # another client's short request completes normally
    frames = server.metrics()["fastcsm_frames_total"] - before["fastcsm_frames_total"]
    assert frames < 80 * 100, frames  # not 80 full lines (100 frames each) for nobody


def test_interrupt_ends_a_queued_utterance_and_a_closed_socket_ends_its_own(small):
    # Long enough that its length guard (3 s + 150 ms a character) leaves it running a while.
    body = {"input": "Hold the only slot for a good long while, so that the next has to wait.", "voice": "0",
            "response_format": "pcm", "max_audio_length_ms": 20_000}
    with httpx.Client(base_url=small.url, timeout=30, headers=AUTH) as http:
        with http.stream("POST", "/v1/audio/speech", json=body) as holding:
            audio = holding.iter_raw()
            next(audio)
            with ws(small) as c:
                assert recv_json(c)["type"] == "ready"
                c.send(json.dumps({"type": "speak", "text": "Queued.", "voice": "0", "id": "q"}))
                assert recv_json(c)["type"] == "started"
                assert small.service.scheduler.queued == 1
                c.send(json.dumps({"type": "interrupt"}))
                e = recv_json(c, timeout=10)
                assert (e["type"], e["reason"], e["frames"]) == ("done", "interrupted", 0)
                assert (e["prefill_rows"], e["reused_rows"], e["pieces"]) == (0, 0, 1)  # it never got a slot
                assert _eventually(lambda: small.service.scheduler.queued == 0)
                # A queued line whose socket closes leaves the queue too.
                c.send(json.dumps({"type": "speak", "text": "Queued again.", "voice": "0"}))
                assert recv_json(c)["type"] == "started"
            assert _eventually(lambda: small.service.scheduler.queued == 0)
    assert wait_idle(small) < 10
    # A running line whose socket closes frees its slot.
    with ws(small) as c:
        assert recv_json(c)["type"] == "ready"
        c.send(json.dumps({"type": "speak", "text": "I will hang up.", "voice": "0"}))
        while not isinstance(c.recv(timeout=30), bytes):
            pass
    assert _eventually(lambda: small.service.scheduler.active == 0)


def test_one_utterance_in_flight_a_second_speak_is_an_error(server):
    with ws(server) as c:
        assert recv_json(c)["type"] == "ready"
        c.send(json.dumps({"type": "speak", "text": "First.", "voice": "0", "id": "a", "max_audio_length_ms": 400}))
        c.send(json.dumps({"type": "speak", "text": "Second.", "voice": "0", "id": "b"}))
        events, frames = [], 0
        while not any(e["type"] == "done" for e in events):
            msg = c.recv(timeout=30)
            if isinstance(msg, bytes):
                frames += 1
            else:
                events.append(json.loads(msg))
        errors = [e for e in events if e["type"] == "error"]
        assert len(errors) == 1 and errors[0]["code"] == "busy" and errors[0]["id"] == "b"
        done = next(e for e in events if e["type"] == "done")
        assert (done["id"], done["reason"], done["frames"], frames) == ("a", "max_length", 5, 5)


def _eventually(check, seconds=10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.01)
    return check()


# -- 2. large JSON bodies never stall the event loop ----------------------------------------------

def _healthz_while(server, work) -> tuple[float, object]:
    """Run `work()` in a thread, polling /healthz meanwhile: (slowest healthz in s, work's result)."""
    result = {}
    t = threading.Thread(target=lambda: result.update(r=work()))
    t.start()
    worst = 0.0
    with httpx.Client(timeout=30) as http:
        while t.is_alive():
            t0 = time.perf_counter()
            assert http.get(server.url + "/healthz").status_code == 200
            worst = max(worst, time.perf_counter() - t0)
            time.sleep(0.02)
    t.join()
    return worst, result["r"]


@pytest.mark.parametrize("shape", ["long list", "unknown keys"])
def test_largest_allowed_json_body_is_refused_quickly_and_healthz_answers(server, shape):
    limit = server.settings.max_body_bytes
    if shape == "long list":
        head = b'{"input": "hi", "voice": "0", "context": ['
        body = head + b"1," * ((limit - len(head) - 64) // 2) + b"1]}"
    else:
        body = b'{"input": "hi", "voice": "0"' + b"".join(b',"k%07d":1' % i for i in range((limit - 64) // 13)) + b"}"
    assert limit - 1024 < len(body) <= limit

    def send():
        t0 = time.perf_counter()
        r = httpx.post(server.url + "/v1/audio/speech", content=body,
                       headers={**AUTH, "Content-Type": "application/json"}, timeout=60)
        return r, time.perf_counter() - t0

    worst, (r, took) = _healthz_while(server, send)
    assert r.status_code == 400 and "too many JSON values" in r.json()["error"]["message"]
    assert took < 20 and worst < 2.0, (took, worst)


def test_large_websocket_message_is_refused_quickly_and_healthz_answers(server):
    message = '{"type": "speak", "text": "hi"' + "".join(f',"k{i:07d}":1' for i in range(1_200_000)) + "}"
    assert len(message) > 15_000_000
    with ws(server, max_size=None) as c:
        assert recv_json(c)["type"] == "ready"

        def send():
            t0 = time.perf_counter()
            c.send(message)
            return recv_json(c), time.perf_counter() - t0

        worst, (e, took) = _healthz_while(server, send)
        assert e["type"] == "error" and "too many JSON values" in e["message"], e
        assert took < 20 and worst < 2.0, (took, worst)
        events, audio = [], 0  # the session goes on
        c.send(json.dumps({"type": "speak", "text": "Still here.", "voice": "0", "max_audio_length_ms": 160}))
        while not events or events[-1]["type"] != "done":
            msg = c.recv(timeout=30)
            if isinstance(msg, bytes):
                audio += 1
            else:
                events.append(json.loads(msg))
        assert audio == 2


def test_long_base64_context_audio_is_parsed_off_the_event_loop(server):
    """A legitimately large body (context audio near the limit) is accepted with healthz answering."""
    import base64

    audio = base64.b64encode(wav_bytes(50.0)).decode()  # 2.4 MB of WAV
    body = {"input": "Go on.", "voice": "0", "response_format": "pcm", "max_audio_length_ms": 160,
            "context": [{"speaker": 1, "text": "A long story.", "audio": audio}]}
    worst, r = _healthz_while(server, lambda: httpx.post(server.url + "/v1/audio/speech", json=body, headers=AUTH,
                                                        timeout=120))
    assert r.status_code == 200 and len(r.content) == 2 * FRAME * 2
    assert worst < 5.0, worst


def test_body_limits_are_per_route_and_lists_are_bounded(server):
    # Routes without audio in their body take 64 KiB, not the upload limit.
    r = httpx.request("DELETE", server.url + "/v1/voices/x", content=b"x" * 100_000, headers=AUTH)
    assert r.status_code == 413 and "65536" in r.json()["error"]["message"]
    too_many = [{"speaker": 1, "text": "hi"}] * (server.settings.max_context_turns + 1)
    r = httpx.post(server.url + "/v1/audio/speech", json={"input": "hi", "voice": "0", "context": too_many},
                   headers=AUTH)
    assert r.status_code == 400 and "at most 64" in r.json()["error"]["message"]


# -- 3. slow clients ------------------------------------------------------------------------------

def _closed(sock: socket.socket) -> bool:
    try:
        sock.settimeout(0.01)
        data = sock.recv(65536)
    except (TimeoutError, BlockingIOError):
        return False
    except OSError:
        return True
    return data == b"" or data.startswith(b"HTTP/1.1 408")


def test_slow_headers_and_trickled_bodies_are_cut_off(small):
    heads = [socket.create_connection(("127.0.0.1", small.port)) for _ in range(20)]
    bodies = [socket.create_connection(("127.0.0.1", small.port)) for _ in range(5)]
    host = f"Host: 127.0.0.1:{small.port}\r\n".encode()
    for b in bodies:
        b.sendall(b"POST /v1/audio/speech HTTP/1.1\r\n" + host + b"Authorization: Bearer " + KEY.encode()
                  + b"\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{")
    replies = {}
    try:
        t0 = time.monotonic()
        line = b"GET /healthz HTTP/1.1\r\n" + host
        for i in range(120):  # one byte every 0.1 s, on every connection
            for s in [*heads, *bodies]:
                try:
                    s.sendall(line[i % len(line):i % len(line) + 1] if s in heads else b" ")
                except OSError:
                    pass
            open_heads = [s for s in heads if not _closed(s)]
            for b in bodies:
                if b not in replies:
                    try:
                        b.settimeout(0.01)
                        data = b.recv(65536)
                        if data:
                            replies[b] = data
                    except (TimeoutError, BlockingIOError, OSError):
                        pass
            if not open_heads and len(replies) == len(bodies):
                break
            time.sleep(0.1)
        elapsed = time.monotonic() - t0
        assert not open_heads, f"{len(open_heads)} slow heads still open after {elapsed:.1f} s"
        assert len(replies) == len(bodies) and all(r.startswith(b"HTTP/1.1 408") for r in replies.values())
        assert elapsed < 10
    finally:
        for s in [*heads, *bodies]:
            s.close()
    short_speech(small)


def test_timeouts_and_connection_cap_reach_uvicorn():
    from fastcsm.server.limits import uvicorn_config

    s = Settings(header_timeout_s=3, keep_alive_s=2, max_connections=7, body_timeout_s=9)
    config = uvicorn_config(object(), s)
    assert (config.timeout_keep_alive, config.limit_concurrency) == (2, 7)
    assert config.http.__name__ == "TimedH11Protocol"


# -- 4. decoded audio size is checked from the header ---------------------------------------------

def _silence(seconds: float, rate: int, channels: int, format: str = "FLAC") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, np.zeros((int(seconds * rate), channels), np.int16), rate, format=format)
    return buf.getvalue()


def test_audio_headers_are_checked_before_decoding(server):
    for data, why in ((_silence(1.0, 655_350, 8), "655350 Hz"), (_silence(0.1, 24_000, 9, "WAV"), "9 channels")):
        assert len(data) < 100_000
        r = httpx.post(server.url + "/v1/voices", headers=AUTH, data={"name": "huge", "text": "Silence."},
                       files={"audio": ("huge.flac", data, "audio/flac")})
        assert r.status_code == 400 and why in r.json()["error"]["message"], r.text


def test_decoding_mixes_to_mono_block_by_block():
    import tracemalloc

    from fastcsm.audio import read_audio

    frames = 40 * 24_000
    data = _silence(40.0, 24_000, 8)  # 8 channels: 31 MB as float32
    tracemalloc.start()
    try:
        wav = read_audio(data, max_duration_s=60)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert wav.shape == (frames,)
    assert peak < frames * 8 * 4 / 2, peak  # a few mono copies, never the 8 channels at once


# -- 5. concurrent uploads of one name ------------------------------------------------------------

def _upload(server, name, overwrite=False, origin=None, host=None):
    headers = {**AUTH, **({"Origin": origin} if origin else {}), **({"Host": host} if host else {})}
    return httpx.post(server.url + "/v1/voices", headers=headers, timeout=60,
                      data={"name": name, "text": "Hello there.", "overwrite": str(overwrite).lower()},
                      files={"audio": ("v.wav", wav_bytes(0.5), "audio/wav")})


def _no_paths(server, responses) -> None:
    root = server.settings.voices_dir
    for r in responses:
        assert root not in r.text and "/tmp" not in r.text and ".safetensors" not in r.text, r.text


def test_concurrent_uploads_of_one_name_have_one_winner(server):
    for overwrite in (False, True):
        name = f"race-{overwrite}"
        barrier, out = threading.Barrier(6), []

        def go(barrier, out, name, overwrite):
            barrier.wait()
            out.append(_upload(server, name, overwrite))

        threads = [threading.Thread(target=go, args=(barrier, out, name, overwrite)) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        codes = sorted(r.status_code for r in out)
        assert codes == ([201] * 6 if overwrite else [201] + [409] * 5), [r.text for r in out]
        _no_paths(server, out)
    from pathlib import Path

    leftovers = [p.name for p in Path(server.settings.voices_dir).iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


def test_store_create_if_absent_is_atomic(tmp_path):
    import torch

    from fastcsm.speech.voices import Voice, VoiceError, VoiceStore

    store = VoiceStore(tmp_path)
    barrier = threading.Barrier(8)
    won, lost = [], []

    def add(i):
        v = Voice(0, f"take {i}", torch.full((4, 32), i, dtype=torch.long))
        barrier.wait()
        try:
            store.add(v, "one")
            won.append(i)
        except VoiceError as e:
            assert "already exists" in str(e)
            lost.append(i)

    threads = [threading.Thread(target=add, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(lost) == 7
    assert store.get("one").text == f"take {won[0]}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.safetensors"]


def test_kill_9_while_writing_leaves_only_whole_voices(tmp_path):
    import signal
    import subprocess
    import sys

    writer = f"""
import torch
from fastcsm.speech.voices import Voice, VoiceStore
store = VoiceStore({str(tmp_path)!r})
i = 0
while True:
    v = Voice(0, "take %d" % i, torch.full((200, 32), i % 2048, dtype=torch.long))
    try:
        store.add(v, "v%d" % (i % 4), overwrite=i % 2 == 0)
    except ValueError:
        pass
    i += 1
    if i == 8:
        print("writing", flush=True)
"""
    from fastcsm.speech.voices import Voice, VoiceStore

    for delay in (0.2,):  # one kill mid-stream of writes (a subprocess start costs seconds)
        proc = subprocess.Popen([sys.executable, "-c", writer], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "writing"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        store = VoiceStore(tmp_path)
        names = store.names()
        assert names and set(names) <= {"v0", "v1", "v2", "v3"}
        for name in names:  # every listed voice is whole: a temp file or nothing, never a part
            assert Voice.load(store.path(name)).codes.shape == (200, 32)


def test_stale_temporary_files_of_unfinished_writes_are_removed_at_start_up(tmp_path):
    """What a write killed before its move leaves (`.NAME.safetensors.RANDOM.tmp`) goes when a
    server starts, if older than ten minutes; a younger one may be another process's write in
    progress and stays, as does everything that is not such a file."""
    import os

    import torch

    from fastcsm.speech.voices import Voice

    stale, fresh, other = ".v0.safetensors.k3j_x9a1.tmp", ".v1.safetensors.q8w2e7rt.tmp", ".notes.tmp"
    for name in (stale, fresh, other):
        (tmp_path / name).write_bytes(b"\0" * 100)
    Voice(0, "Kept.", torch.zeros(4, 32, dtype=torch.long)).save(tmp_path / "kept.safetensors")
    (tmp_path / ".v2.safetensors.dir0000.tmp").mkdir()  # not a file: never removed
    hour_ago = time.time() - 3600
    for path in tmp_path.iterdir():
        if path.name != fresh:
            os.utime(path, (hour_ago, hour_ago))
    with LiveServer(voices_dir=str(tmp_path)) as s:
        left = sorted(p.name for p in tmp_path.iterdir())
        assert [v["name"] for v in httpx.get(s.url + "/v1/voices").json()["data"]] == ["kept"]
    assert left == sorted([fresh, other, "kept.safetensors", ".v2.safetensors.dir0000.tmp"])


# -- 6, 7. keys never logged, never empty ---------------------------------------------------------

def test_api_key_never_reaches_a_log_line(tmp_path):
    records = []

    class Capture(logging.Handler):
        def emit(self, record):
            records.append(self.format(record))

    handler = Capture(level=logging.DEBUG)
    with LiveServer(log_level="debug", api_keys=[KEY], voices_dir=str(tmp_path)) as s:
        loggers = [logging.getLogger(n) for n in ("", "uvicorn", "uvicorn.error", "uvicorn.access", "fastcsm")]
        for logger in loggers:
            logger.addHandler(handler)
        try:
            with connect(s.url.replace("http", "ws") + f"/v1/conversations?api_key={KEY}&x=1") as c:
                assert recv_json(c)["type"] == "ready"
            with connect(s.url.replace("http", "ws") + f"/v1/conversations?api_key={KEY}x") as c:
                assert recv_json(c)["code"] == "unauthorized"
            assert httpx.get(s.url + f"/v1/voices?api_key={KEY}", headers=AUTH).status_code == 200
            assert httpx.get(s.url + f"/healthz?api_key={KEY}").status_code == 200
            time.sleep(0.2)
        finally:
            for logger in loggers:
                logger.removeHandler(handler)
    assert any("/v1/conversations" in r for r in records) and any("/healthz" in r for r in records), records
    assert not [r for r in records if KEY in r]


def test_empty_api_keys_are_start_up_errors_and_open_binds_warn(capsys):
    from fastcsm.cli import main
    from fastcsm.server.app import create_app
    from fastcsm.server.settings import security_warnings

    for env in ({"FASTCSM_API_KEYS": " , "}, {"FASTCSM_API_KEYS": ""}):
        with pytest.raises(ValueError, match="API key is empty"):
            Settings.from_env(env)
    with pytest.raises(ValueError, match="API key is empty"):
        create_app(Settings(api_keys=[""]))
    assert main(["serve", "--api-key", "", "--model", "/no/such/checkpoint"]) == 2
    assert "API key is empty" in capsys.readouterr().err
    assert Settings.from_env({"FASTCSM_API_KEYS": "a, b,,"}).api_keys == ["a", "b"]
    assert security_warnings(Settings(host="0.0.0.0")) and "--api-key" in security_warnings(Settings(host="::"))[0]
    assert not security_warnings(Settings(host="0.0.0.0", api_keys=["k"]))
    assert not security_warnings(Settings(host="127.0.0.1")) and not security_warnings(Settings(host="::1"))


# -- 8. cross-site writes -------------------------------------------------------------------------

def test_cross_site_writes_and_sockets_are_refused(server):
    assert _upload(server, "victim").status_code == 201
    r = _upload(server, "victim", overwrite=True, origin="https://evil.example")
    assert r.status_code == 403 and "--cors-origin" in r.json()["error"]["message"]
    assert httpx.get(server.url + "/v1/voices/victim", headers=AUTH).json()["created"]
    r = httpx.delete(server.url + "/v1/voices/victim", headers={**AUTH, "Origin": "null"})
    assert r.status_code == 403
    # The server's own page, a loopback page and the --cors-origin may write.
    for origin in (server.url, "http://localhost:3000", ALLOWED):
        assert _upload(server, "victim", overwrite=True, origin=origin).status_code == 201, origin
    # Reads need no Origin check (CORS decides what a browser may see).
    assert httpx.get(server.url + "/v1/voices", headers={**AUTH, "Origin": "https://evil.example"}).status_code == 200
    from websockets.exceptions import InvalidStatus

    with pytest.raises(InvalidStatus) as e:
        ws(server, origin="https://evil.example").close()
    assert e.value.response.status_code == 403
    for origin in (ALLOWED, server.url):
        with ws(server, origin=origin) as c:
            assert recv_json(c)["type"] == "ready"


def _socket_by_name(server, host: str, **kw):
    """The conversation WebSocket as a page at `host` opens it: its URL (so the Host header)
    and Origin name `host`, while the connection goes to the server on loopback."""
    sock = socket.create_connection(("127.0.0.1", server.port))
    return connect(f"ws://{host}/v1/conversations", sock=sock, origin=f"http://{host}", additional_headers=AUTH,
                   open_timeout=10, **kw)


def test_a_rebound_name_is_refused_on_every_route_and_the_socket(server):
    """DNS rebinding: a page at http://evil.example:PORT whose name now points at this server
    is the server's own page by Origin (Origin == Host), so the Host itself must be one of the
    server's names: loopback names, IP addresses, --host, this machine's, --allowed-hosts."""
    from websockets.exceptions import InvalidStatus

    assert _upload(server, "kept").status_code == 201
    evil = f"evil.example:{server.port}"
    page = {**AUTH, "Host": evil, "Origin": f"http://{evil}"}
    responses = [httpx.delete(server.url + "/v1/voices/kept", headers=page),
                 _upload(server, "kept", overwrite=True, origin=f"http://{evil}", host=evil),
                 httpx.get(server.url + "/v1/voices", headers=page),  # the page could read the answer
                 httpx.get(server.url + "/", headers={"Host": evil}),
                 httpx.get(server.url + "/healthz", headers={"Host": "voices.example"})]  # *. is for subdomains
    for r in responses:
        assert r.status_code == 400, r.text
        assert ("evil.example" in r.text or "voices.example" in r.text) and "--allowed-hosts" in r.text, r.text
    with pytest.raises(InvalidStatus) as e:
        _socket_by_name(server, evil).close()
    assert e.value.response.status_code == 403
    assert httpx.get(server.url + "/v1/voices/kept", headers=AUTH).status_code == 200  # untouched
    # The server's own names: loopback, its IP, the configured ones (any case, a final dot).
    for name in ("127.0.0.1", "localhost", "[::1]", "LocalHost.", "tts.example", "a.voices.example"):
        host = f"{name}:{server.port}"
        assert _upload(server, "kept", overwrite=True, origin=f"http://{host}", host=host).status_code == 201, name
        with _socket_by_name(server, host) as c:
            assert recv_json(c)["type"] == "ready"
    assert httpx.get(server.url + "/", headers={"Host": f"localhost:{server.port}"}).status_code == 200


# -- 9. chunked bodies over the limit -------------------------------------------------------------

def test_chunked_body_over_the_limit_is_413(small):
    limit = small.settings.max_body_bytes

    def chunked(body: bytes):  # a generator: httpx sends it without Content-Length
        for i in range(0, len(body), 8192):
            yield body[i:i + 8192]

    form = (b'--b\r\nContent-Disposition: form-data; name="name"\r\n\r\nbig\r\n'
            b'--b\r\nContent-Disposition: form-data; name="text"\r\n\r\nToo big.\r\n'
            b'--b\r\nContent-Disposition: form-data; name="audio"; filename="a.wav"\r\n'
            b"Content-Type: audio/wav\r\n\r\n" + b"\0" * (limit + 10_000) + b"\r\n--b--\r\n")
    r = httpx.post(small.url + "/v1/voices", headers={**AUTH, "Content-Type": "multipart/form-data; boundary=b"},
                   content=chunked(form))
    assert r.status_code == 413 and str(limit) in r.json()["error"]["message"], r.text
    speech = json.dumps({"input": "x" * (limit + 10), "voice": "0"}).encode()
    r = httpx.post(small.url + "/v1/audio/speech", headers={**AUTH, "Content-Type": "application/json"},
                   content=chunked(speech))
    assert r.status_code == 413, r.text
    short_speech(small)


# -- 10. a damaged voice file ---------------------------------------------------------------------

def test_damaged_voice_is_reported_by_name_and_can_be_replaced_or_deleted(server):
    from pathlib import Path

    assert _upload(server, "cut").status_code == 201
    path = Path(server.settings.voices_dir) / "cut.safetensors"
    path.write_bytes(path.read_bytes()[:40])  # cut short, as by a crash of another writer
    listing = httpx.get(server.url + "/v1/voices", headers=AUTH).json()
    assert "cut" in listing["broken"] and "cut" not in [v["name"] for v in listing["data"]]
    responses = [httpx.get(server.url + "/v1/voices/cut", headers=AUTH), _upload(server, "cut"),
                 httpx.post(server.url + "/v1/audio/speech", json={"input": "hi", "voice": "cut"}, headers=AUTH)]
    for r in responses:
        assert r.status_code == 409 and "'cut' is damaged" in r.text or "already exists" in r.text, r.text
    assert "damaged" in responses[0].text and "damaged" in responses[2].text
    _no_paths(server, responses)
    assert _upload(server, "cut", overwrite=True).status_code == 201
    assert httpx.get(server.url + "/v1/voices/cut", headers=AUTH).status_code == 200
    path.write_bytes(b"junk")
    assert httpx.delete(server.url + "/v1/voices/cut", headers=AUTH).status_code == 200
    assert "cut" not in httpx.get(server.url + "/v1/voices", headers=AUTH).json()["broken"]


def test_a_delete_or_read_that_loses_a_race_with_a_delete_is_not_found(server, tmp_path):
    """Two DELETEs of one voice at once: one 200, the other 404 (never a 500, which also cost
    other requests their keep-alive connection); a read racing them finds the voice or does not,
    never calls it damaged (409). The service alone takes many rounds, the server a few."""
    import torch
    from test_voices import at_once

    from fastcsm.server.service import ApiError, Service
    from fastcsm.speech.voices import Voice

    def status(call, *args) -> int:
        try:
            call(*args)
            return 200
        except ApiError as e:
            return e.status

    voice = Voice(0, "Hello there.", torch.zeros(4, 32, dtype=torch.long))
    service = Service(Settings(voices_dir=str(tmp_path)))
    for _ in range(100):
        service.store.add(voice, "v", overwrite=True)
        out = at_once(lambda: status(service.delete_voice, "v"), lambda: status(service.delete_voice, "v"),
                      lambda: status(service.voice, "v"))
        assert sorted(out[:2]) == [200, 404] and out[2] in (200, 400), out
    url = server.url + "/v1/voices/gone"
    for _ in range(5):
        server.service.store.add(voice, "gone", overwrite=True)
        out = at_once(lambda: httpx.delete(url, headers=AUTH), lambda: httpx.delete(url, headers=AUTH),
                      lambda: httpx.get(url, headers=AUTH))
        codes = [r.status_code for r in out]
        assert sorted(codes[:2]) == [200, 404] and codes[2] in (200, 404), [r.text for r in out]


# -- 11. the smaller ones -------------------------------------------------------------------------

@pytest.mark.parametrize("bad, says", [
    ({"seed": True}, "seed"), ({"temperature": True}, "temperature"), ({"topk": True}, "topk"),
    ({"speaker": True}, "speaker"), ({"speed": True}, "speed"), ({"voice": "9999999"}, "1000000"),
    ({"input": "\x00"}, "control character"), ({"input": "\u200b\u200b"}, "nothing to speak"),
    ({"temperature": float("nan")}, "finite number"), ({"temperature": "0.5"}, "temperature"),
])
def test_bad_values_are_refused_with_the_reason(server, bad, says):
    body = {"input": "hi", "voice": "0", "max_audio_length_ms": 160, **bad}
    r = httpx.post(server.url + "/v1/audio/speech", content=json.dumps(body),  # json.dumps writes NaN
                   headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 400 and says in r.json()["error"]["message"], r.text


def test_websocket_refuses_booleans_too(server):
    with ws(server) as c:
        assert recv_json(c)["type"] == "ready"
        c.send(json.dumps({"type": "speak", "text": "hi", "speaker": True}))
        e = recv_json(c)
        assert e["type"] == "error" and "speaker" in e["message"]


def test_digit_only_voice_names_are_refused_at_upload(server):
    """"007" would be read as speaker 7 wherever a voice is named, never as this voice."""
    responses = [_upload(server, "007"),
                 httpx.post(server.url + "/v1/audio/voices", headers=AUTH, data={"name": "42", "text": "Hello."},
                            files={"audio_sample": ("v.wav", wav_bytes(0.5), "audio/wav")})]
    for r in responses:
        assert r.status_code == 400 and "digits alone" in r.json()["error"]["message"], r.text
        assert r.json()["error"]["param"] == "name"
    assert _upload(server, "007a").status_code == 201
    names = [v["name"] for v in httpx.get(server.url + "/v1/voices", headers=AUTH).json()["data"]]
    assert "007" not in names and "42" not in names and "007a" in names


def test_invalid_utf8_transcript_is_refused(server):
    r = httpx.post(server.url + "/v1/voices", headers=AUTH,
                   files={"name": (None, b"garbled"), "text": (None, b"caf\xc3 \x80\x81 bad"),
                          "audio": ("v.wav", wav_bytes(0.5), "audio/wav")})
    assert r.status_code == 400 and "text" in r.json()["error"]["message"], r.text
    assert httpx.get(server.url + "/v1/voices/garbled", headers=AUTH).status_code == 404


def test_head_healthz_and_auth_before_routing(server):
    r = httpx.head(server.url + "/healthz")
    assert r.status_code == 200
    assert httpx.get(server.url + "/v1/nope").status_code == 401
    assert httpx.post(server.url + "/v1/models").status_code == 401
    r = httpx.get(server.url + "/v1/nope", headers=AUTH)
    assert r.status_code == 404 and "no route" in r.json()["error"]["message"]


# -- 12. streamed lines and pinned voices ---------------------------------------------------------

def test_append_text_flood_costs_the_same_per_fragment_and_healthz_answers(server, monkeypatch):
    """A 4 KB streamed line (one sentence of initials, that never ends) and then a thousand
    fragments: each is split from the last complete piece on (the text the splitter squashes stays
    a few characters per fragment, where re-splitting the line squashed all of it, three times,
    per fragment) and the socket's messages take turns with everything else."""
    import fastcsm.speech.text

    squashed = []
    squash = fastcsm.speech.text._squash
    monkeypatch.setattr(fastcsm.speech.text, "_squash", lambda text: squashed.append(len(text)) or squash(text))
    fragments = 1000
    with ws(server) as c:
        assert recv_json(c)["type"] == "ready"

        def flood():
            c.send(json.dumps({"type": "speak", "text": "a. " * 1350, "more": True, "voice": "0", "id": "flood"}))
            squashed.clear()
            for i in range(fragments):
                c.send(json.dumps({"type": "append_text", "text": "b " if i % 50 == 0 else "", "more": True}))
            c.send(json.dumps({"type": "interrupt"}))
            events = [recv_json(c)]
            while events[-1]["type"] != "done":
                events.append(recv_json(c))
            return events

        worst, events = _healthz_while(server, flood)
        assert [e["type"] for e in events] == ["done"] and events[0]["reason"] == "interrupted", events
        assert sum(squashed) < 20 * fragments, sum(squashed)
        assert worst < 2.0, worst


def test_switching_voices_never_breaks_a_conversation(server):
    """Three long voices do not fit the window together: speaking in the third unpins the oldest
    (with an event) instead of refusing every line from then on; a speak that fails pins nothing,
    and reset unpins what speaking pinned (and pins the configured voices again)."""
    import torch

    from fastcsm.speech.voices import Voice, VoiceStore

    store = VoiceStore(server.settings.voices_dir)
    frames = 737  # 59 s each: three are 2,265 rows with their text, more than the 2,048-row window
    for i in range(3):
        store.add(Voice(i, f"This is voice {i}.", torch.zeros(frames, 32, dtype=torch.long)), f"long{i}",
                  overwrite=True)

    with ws(server) as c:
        assert recv_json(c)["type"] == "ready"

        def speak(**fields) -> list[dict]:
            c.send(json.dumps({"type": "speak", "text": "Hi.", "max_audio_length_ms": 160, **fields}))
            events = [recv_json(c)]
            while events[-1]["type"] not in ("done", "error"):
                events.append(recv_json(c))
            return events

        assert speak(voice="long0", max_audio_length_ms=10**9)[-1]["type"] == "error"  # above the limit
        assert speak(voice="0")[0]["prompt_rows"] < 50  # long0 was not pinned
        assert speak(voice="long0")[-1]["reason"] == "max_length"
        assert speak(voice="long1")[0]["prompt_rows"] > 2 * frames
        events = speak(voice="long2")
        unpinned = [e for e in events if e["type"] == "voice_unpinned"]
        assert [e["voice"] for e in unpinned] == ["long0"] and unpinned[0]["rows"] > frames
        assert events[-1]["type"] == "done" and events[-1]["reason"] == "max_length"
        assert speak(voice="long0")[-1]["reason"] == "max_length"  # and back: long1 makes room
        c.send(json.dumps({"type": "reset"}))
        assert speak(voice="0")[0]["prompt_rows"] < 50
        # A configured voice may make room too; reset pins it again.
        c.send(json.dumps({"type": "configure", "voices": ["long1"]}))
        assert recv_json(c)["type"] == "configured"
        assert speak(voice="long0")[-1]["reason"] == "max_length"
        assert [e["voice"] for e in speak(voice="long2") if e["type"] == "voice_unpinned"] == ["long1"]
        c.send(json.dumps({"type": "reset"}))
        assert frames < speak(voice="0")[0]["prompt_rows"] < frames + 50
