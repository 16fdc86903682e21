"""How the server fares under the attacks of tests/test_server_attacks.py, in milliseconds.

Starts `fastcsm serve` (the tiny random checkpoint, one torch thread) on loopback, then:

- big_body: sends the largest allowed speech body (16 MiB of `"context": [1, 1, ...]`) while
  polling /healthz; reports how long the refusal took and /healthz latency p50 / max;
- burst: one WebSocket sends 80 x (speak, interrupt) at once; reports the time until every
  `done` arrived and until no stream held a slot or waited (/readyz), then the time another
  client's short request took;
- wyoming_leak: through `fastcsm wyoming --server URL` (the `wyoming` extra), one connection
  sends 40 x (`synthesize-start` + a chunk), then 50 clients leave mid-stream; reports the
  server's open sockets (beyond the watchers') after each and once the clients left, and, while
  it lasts, /healthz latency p99 / max and the longest gap in another client's speech stream,
  beside the same for as long without the attack;
- rebinding: requests as a page whose DNS name was rebound to the server would send them (`Host`
  and `Origin` both `evil.example:PORT`): a voice delete, an upload, a read and a WebSocket
  handshake (reports each status and whether the voice survived), then 2 s of rebound deletes
  from 4 connections; reports their answers' latency and, while it lasts, /healthz latency
  p99 / max and the longest gap in another client's speech stream, beside the same flood under
  the server's own name (the peer: 404s from the route) and the same watch without an attack;
- append_text_flood: one WebSocket opens a 4 KB streamed line (a sentence of initials that never
  ends) and sends 6,000 `append_text` fragments; reports how long until its `done` came and, while
  it lasts, /healthz latency p99 / max and the longest gap in another client's speech stream,
  beside the same watch without the attack.

The attacking clients of the three watched cases run in threads whose scheduling priority is
lowered (`--attacker-nice`, 10; 0 runs them as the server runs): an attacker is another
machine, and on a small shared CPU the attacking client's own work would be taken from the
server's engine and counted as the server's stall. The attack is not made lighter: each case
reports how much it sent, and the rebinding flood is held to the same pace by the server's
refusal budget either way (about 217 requests in 2 s).

Another client's stream is watched from processes of its own, two ways: the longest gap between
its chunks (`other_stream_max_gap_ms`), and the most a chunk came after its time for a listener
who plays the audio from the first chunk on (`other_stream_max_late_ms`: what that listener would
hear as a stall; 0 while the server stays ahead of playback).

    python benchmarks/bench_attacks.py [--attacker-nice N] [CASE ...]

Prints one JSON object on the last line of stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import multiprocessing
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

import httpx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_server import free_port, stop, wait_ready  # noqa: E402


def start() -> tuple[subprocess.Popen, str]:
    from fastcsm.testing import write_hf_checkpoint

    model = tempfile.mkdtemp(prefix="fastcsm-bench-")
    write_hf_checkpoint(model, seed=0)
    port = free_port()
    env = {**os.environ, "FASTCSM_VOICES": tempfile.mkdtemp()}
    proc = subprocess.Popen([sys.executable, "-m", "fastcsm", "serve", "--model", model, "--device", "cpu",
                             "--threads", "1", "--port", str(port), "--log-level", "warning",
                             "--max-audio-length-ms", "8000"], env=env, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, 120, proc)
    except Exception:
        proc.kill()
        raise
    return proc, url


ATTACKER_NICE = 10  # --attacker-nice


def as_attacker(fn, *args):
    """fn(*args) in a thread of its own at ATTACKER_NICE (Linux nice is per thread, and the threads
    it starts inherit it), so that the attack runs as from another machine; returns its result."""
    out: dict = {}

    def run():
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), ATTACKER_NICE)
        try:
            out["result"] = fn(*args)
        except BaseException as e:  # noqa: BLE001 (raised again in the caller's thread)
            out["error"] = e

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if "error" in out:
        raise out["error"]
    return out["result"]


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return round(values[min(len(values) - 1, int(q / 100 * len(values)))], 1)


def big_body(url: str) -> dict:
    limit = 16 << 20
    head = b'{"input": "hi", "voice": "0", "context": ['
    body = head + b"1," * ((limit - len(head) - 64) // 2) + b"1]}"
    out = {}

    def send():
        t0 = time.perf_counter()
        r = httpx.post(url + "/v1/audio/speech", content=body, headers={"Content-Type": "application/json"},
                       timeout=300)
        out.update(status=r.status_code, refused_ms=round((time.perf_counter() - t0) * 1000, 1))

    t = threading.Thread(target=send)
    t.start()
    lat = []
    with httpx.Client(timeout=300) as http:
        while t.is_alive():
            t0 = time.perf_counter()
            http.get(url + "/healthz")
            lat.append((time.perf_counter() - t0) * 1000)
            time.sleep(0.005)
    t.join()
    return {**out, "healthz_polls": len(lat), "healthz_p50_ms": pct(lat, 50), "healthz_max_ms": pct(lat, 100)}


def burst(url: str) -> dict:
    from websockets.sync.client import connect

    with connect(url.replace("http", "ws") + "/v1/conversations") as ws:
        json.loads(ws.recv(timeout=30))
        t0 = time.perf_counter()
        for i in range(80):
            ws.send(json.dumps({"type": "speak", "text": "A line nobody hears.", "voice": "0", "id": str(i)}))
            ws.send(json.dumps({"type": "interrupt"}))
        started = done = refused = 0
        while done < started or started + refused < 80:
            msg = ws.recv(timeout=60)
            if isinstance(msg, bytes):
                continue
            kind = json.loads(msg)["type"]
            started += kind == "started"
            done += kind == "done"
            refused += kind == "error"
        all_done = time.perf_counter() - t0
        while True:
            ready = httpx.get(url + "/readyz").json()
            if ready["free_slots"] == ready["slots"] and ready["queued"] == 0:
                break
            time.sleep(0.005)
        idle = time.perf_counter() - t0
        t1 = time.perf_counter()
        r = httpx.post(url + "/v1/audio/speech", json={"input": "Hi.", "voice": "0", "response_format": "pcm",
                                                        "max_audio_length_ms": 240}, timeout=60)
        other = time.perf_counter() - t1
    return {"started": started, "done": done, "refused": refused, "all_done_ms": round(all_done * 1000, 1),
            "idle_ms": round(idle * 1000, 1), "other_status": r.status_code, "other_ms": round(other * 1000, 1)}


class Watch:
    """While an attack runs: /healthz polled, and another client's speech streamed again and again,
    the gaps between its chunks noted. Each watcher is a process of its own, as another client
    is: in the attacker's process it would share the attacker's GIL, and its gaps would be the
    attacker's threads taking turns, not the server's."""

    def __init__(self, url: str):
        ctx = multiprocessing.get_context("spawn")  # the attacker's threads are not forked
        self.done, self.out = ctx.Event(), ctx.Queue()
        self.procs = [ctx.Process(target=watch, args=(kind, url, self.done, self.out)) for kind in ("poll", "listen")]
        self.healthz: list[float] = []
        self.gaps: list[float] = []
        self.late: list[float] = []

    def __enter__(self) -> Watch:
        for p in self.procs:
            p.start()
        for _ in self.procs:  # each has made its first request: the watch is on
            assert self.out.get(timeout=120) == "watching"
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        for _ in self.procs:
            for name, values in self.out.get(timeout=120).items():
                setattr(self, name, values)
        for p in self.procs:
            p.join()

    def report(self) -> dict:
        return {"healthz_polls": len(self.healthz), "healthz_p99_ms": pct(self.healthz, 99),
                "healthz_max_ms": pct(self.healthz, 100), "other_stream_chunks": len(self.gaps) + 1,
                "other_stream_max_gap_ms": pct(self.gaps, 100) if self.gaps else None,
                "other_stream_max_late_ms": pct(self.late, 100) if self.late else None}


def watch(kind: str, url: str, done, out) -> None:
    """One watcher of `Watch`, in its own process: `poll` times /healthz, `listen` notes the gaps
    between the chunks of another client's speech stream, and how late each chunk came for a
    listener who plays the audio from its first chunk on (0 while it came ahead of its time). Says
    "watching" once its first answer came, then, once `done`, (name, ms) for each of its lists."""
    found: dict[str, list[float]] = {"healthz": []} if kind == "poll" else {"gaps": [], "late": []}
    body = {"input": "Another client is listening to this line.", "voice": "1", "response_format": "pcm",
            "max_audio_length_ms": 4000}
    told = False
    with httpx.Client(timeout=60) as http:
        while not done.is_set():
            if kind == "poll":
                t0 = time.perf_counter()
                http.get(url + "/healthz")
                found["healthz"].append((time.perf_counter() - t0) * 1000)
                time.sleep(0.005)
            else:
                with http.stream("POST", url + "/v1/audio/speech", json=body) as r:
                    first = last = None
                    played = 0.0  # seconds of audio before this chunk
                    for chunk in r.iter_raw():
                        now = time.perf_counter()
                        if last is not None:
                            found["gaps"].append((now - last) * 1000)
                            found["late"].append(max(0.0, now - first - played) * 1000)
                        first, last = first or now, now
                        played += len(chunk) / (2 * 24_000)  # 16-bit mono PCM at 24 kHz
                        if not told:
                            out.put("watching")
                            told = True
            if not told:
                out.put("watching")
                told = True
    out.put(found)


def server_sockets(url: str) -> int:
    """TCP connections open on the server's port, from the server's side (Linux: /proc/net/tcp)."""
    port = f"{int(url.rsplit(':', 1)[1]):04X}"
    with open("/proc/net/tcp") as f:
        rows = [line.split() for line in f.readlines()[1:]]
    return sum(row[1].endswith(":" + port) and row[3] == "01" for row in rows)  # 01: ESTABLISHED


def wyoming_leak(url: str) -> dict:
    from wyoming.event import async_read_event, async_write_event
    from wyoming.info import Describe
    from wyoming.tts import SynthesizeChunk, SynthesizeStart

    port = free_port()
    wyoming = subprocess.Popen([sys.executable, "-m", "fastcsm", "wyoming", "--uri", f"tcp://127.0.0.1:{port}",
                                "--server", url], stdout=subprocess.PIPE, text=True)
    held = []

    async def start_and_chunk(times: int) -> asyncio.StreamWriter:
        """A connection that sent `times` x (synthesize-start + "Hi"), once all were handled."""
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for _ in range(times):
            await async_write_event(SynthesizeStart().event(), writer)
            await async_write_event(SynthesizeChunk("Hi").event(), writer)
        await async_write_event(Describe().event(), writer)
        while (await async_read_event(reader)).type != "info":  # answered after every start before it
            pass
        return writer

    async def attack(base: int) -> None:
        one = await start_and_chunk(40)
        await asyncio.sleep(0.5)
        held.append(server_sockets(url) - base)
        one.close()
        many = await asyncio.gather(*(start_and_chunk(1) for _ in range(50)))
        await asyncio.sleep(0.5)
        held.append(server_sockets(url) - base)
        for writer in many:
            writer.transport.abort()  # gone mid-stream, without a word

    try:
        assert "listening" in wyoming.stdout.readline()
        with Watch(url) as quiet:  # the same watch without the attack: what this machine gives anyway
            time.sleep(2)
        with Watch(url) as watch:
            time.sleep(0.5)
            base = server_sockets(url)  # the watchers' own
            t0 = time.perf_counter()
            as_attacker(asyncio.run, attack(base))
            attack_ms = (time.perf_counter() - t0) * 1000
            deadline = time.monotonic() + 10
            while (after := server_sockets(url) - base) > 0 and time.monotonic() < deadline:
                time.sleep(0.1)
        return {"attack_ms": round(attack_ms, 1), "server_sockets_held": held, "server_sockets_after": after,
                **watch.report(), "without_attack": quiet.report()}
    finally:
        wyoming.terminate()
        wyoming.wait(10)


def rebinding(url: str, seconds: float = 2.0, connections: int = 4) -> dict:
    import numpy as np
    import soundfile as sf
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    port = int(url.rsplit(":", 1)[1])
    evil = f"evil.example:{port}"
    page = {"Host": evil, "Origin": f"http://{evil}"}
    wav = io.BytesIO()
    sf.write(wav, np.zeros(12_000, dtype=np.float32), 24_000, format="WAV")
    form = {"data": {"name": "victim", "text": "Hello there.", "overwrite": "true"},
            "files": {"audio": ("v.wav", wav.getvalue(), "audio/wav")}}
    assert httpx.post(url + "/v1/voices", **form, timeout=60).status_code == 201
    status = {"delete": httpx.delete(url + "/v1/voices/victim", headers=page).status_code,
              "upload": httpx.post(url + "/v1/voices", headers=page, **form, timeout=60).status_code,
              "read": httpx.get(url + "/v1/voices", headers=page).status_code}
    try:
        with connect(f"ws://{evil}/v1/conversations", sock=socket.create_connection(("127.0.0.1", port)),
                     origin=f"http://{evil}", open_timeout=10):
            status["websocket"] = 101
    except InvalidStatus as e:
        status["websocket"] = e.response.status_code
    survived = httpx.get(url + "/v1/voices/victim").status_code == 200

    def flood(headers: dict, voice: str) -> dict:
        """DELETE /v1/voices/`voice` with `headers`, from `connections` connections for `seconds`."""
        answered, statuses, end = [], set(), time.monotonic() + seconds

        def one_connection():
            with httpx.Client(headers=headers, timeout=60) as http:
                while time.monotonic() < end:
                    t0 = time.perf_counter()
                    statuses.add(http.delete(url + f"/v1/voices/{voice}").status_code)
                    answered.append((time.perf_counter() - t0) * 1000)

        threads = [threading.Thread(target=one_connection) for _ in range(connections)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return {"requests": len(answered), "statuses": sorted(statuses), "answer_p50_ms": pct(answered, 50)}

    with Watch(url) as quiet:  # the same watch without the attack: what this machine gives anyway
        time.sleep(seconds)
    with Watch(url) as watch:
        rebound = as_attacker(flood, page, "victim")
    with Watch(url) as peer:
        own = as_attacker(flood, {"Host": f"127.0.0.1:{port}"}, "nobody")
    return {"status": status, "voice_survived": survived, **rebound, **watch.report(),
            "own_name_404": {**own, **peer.report()}, "without_attack": quiet.report()}


def append_text_flood(url: str, fragments: int = 6000) -> dict:
    from websockets.sync.client import connect

    def flood() -> float:
        """The line, its fragments and an interrupt, sent at once: ms until its `done`."""
        with connect(url.replace("http", "ws") + "/v1/conversations") as ws:
            json.loads(ws.recv(timeout=30))
            t0 = time.perf_counter()
            ws.send(json.dumps({"type": "speak", "text": "a. " * 1350, "more": True, "voice": "0"}))
            for _ in range(fragments):
                ws.send(json.dumps({"type": "append_text", "text": "", "more": True}))
            ws.send(json.dumps({"type": "interrupt"}))
            while not (isinstance(msg := ws.recv(timeout=300), str) and json.loads(msg)["type"] == "done"):
                pass
            return (time.perf_counter() - t0) * 1000

    with Watch(url) as watch:
        time.sleep(0.5)  # the other client's stream is under way
        took = as_attacker(flood)
    with Watch(url) as quiet:
        time.sleep(0.5 + took / 1000)
    return {"fragments": fragments, "done_ms": round(took, 1), **watch.report(), "without_attack": quiet.report()}


CASES = {"big_body": big_body, "burst": burst, "wyoming_leak": wyoming_leak, "rebinding": rebinding,
         "append_text_flood": append_text_flood}


def main() -> None:
    global ATTACKER_NICE
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cases", nargs="*", metavar="CASE",
                        help=f"the cases to run (default: all, in this order): {', '.join(CASES)}")
    parser.add_argument("--attacker-nice", type=int, default=ATTACKER_NICE, choices=range(20), metavar="N",
                        help=f"the attacking clients' nice value (default {ATTACKER_NICE}; 0: as the server)")
    args = parser.parse_args()
    ATTACKER_NICE = args.attacker_nice
    cases = args.cases or list(CASES)
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        parser.error(f"no case {unknown[0]!r}; the cases are {', '.join(CASES)}")
    proc, url = start()
    try:
        result = {"attacker_nice": ATTACKER_NICE, **{case: CASES[case](url) for case in CASES if case in cases}}
    finally:
        stop(proc)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
