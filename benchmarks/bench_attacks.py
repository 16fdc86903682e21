"""How the server fares under the attacks of tests/test_server_attacks.py, in milliseconds.

Starts `fastcsm serve` (the tiny random checkpoint, one torch thread) on loopback, then:

- big_body: sends the largest allowed speech body (16 MiB of `"context": [1, 1, ...]`) while
  polling /healthz; reports how long the refusal took and /healthz latency p50 / max;
- burst: one WebSocket sends 80 x (speak, interrupt) at once; reports the time until every
  `done` arrived and until no stream held a slot or waited (/readyz), then the time another
  client's short request took;
- append_text_flood: one WebSocket opens a 4 KB streamed line (a sentence of initials that never
  ends, as in the attack) and sends 6,000 `append_text` fragments, while another client streams
  speech over HTTP; reports how long the socket took to get its `done`, /healthz latency p50 / max,
  and the largest gap between the other client's audio chunks (next to the 80 ms frame period).

    python benchmarks/bench_attacks.py

Prints one JSON object on the last line of stdout.
"""

from __future__ import annotations

import json
import os
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

    return {**out, **healthz_while(url, threading.Thread(target=send))}


def healthz_while(url: str, attack: threading.Thread) -> dict:
    """Start `attack` and poll /healthz until it ends: the latencies' count, p50 and max."""
    attack.start()
    lat = []
    with httpx.Client(timeout=300) as http:
        while attack.is_alive():
            t0 = time.perf_counter()
            http.get(url + "/healthz")
            lat.append((time.perf_counter() - t0) * 1000)
            time.sleep(0.005)
    attack.join()
    return {"healthz_polls": len(lat), "healthz_p50_ms": pct(lat, 50), "healthz_max_ms": pct(lat, 100)}


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


def stream_gaps(url: str, gaps: list, streaming: threading.Event, during: threading.Event | None = None) -> int:
    """Stream speech over HTTP, appending the gaps between audio chunks (ms) to `gaps` (only while
    `during` is set, if given); returns the status."""
    body = {"input": "Still here, and talking all the while another socket floods the server with fragments.",
            "voice": "0", "response_format": "pcm", "max_audio_length_ms": 8000}
    with httpx.stream("POST", url + "/v1/audio/speech", json=body, timeout=300) as r:
        last = None
        for _ in r.iter_raw():
            now = time.perf_counter()
            if last is not None and (during is None or during.is_set()):
                gaps.append((now - last) * 1000)
            last = now
            streaming.set()
    return r.status_code


def append_text_flood(url: str, fragments: int = 6000) -> dict:
    from websockets.sync.client import connect

    quiet, gaps, out = [], [], {}
    stream_gaps(url, quiet, threading.Event())  # the other client's gaps with no attack, for comparison
    streaming, flooding = threading.Event(), threading.Event()

    def flood():
        with connect(url.replace("http", "ws") + "/v1/conversations") as ws:
            json.loads(ws.recv(timeout=30))
            flooding.set()
            t0 = time.perf_counter()
            ws.send(json.dumps({"type": "speak", "text": "a. " * 1350, "more": True, "voice": "0"}))
            for _ in range(fragments):
                ws.send(json.dumps({"type": "append_text", "text": "", "more": True}))
            ws.send(json.dumps({"type": "interrupt"}))
            while not (isinstance(msg := ws.recv(timeout=300), str) and json.loads(msg)["type"] == "done"):
                pass
            out["flood_ms"] = round((time.perf_counter() - t0) * 1000, 1)
            flooding.clear()

    other = threading.Thread(target=lambda: out.update(other_status=stream_gaps(url, gaps, streaming, flooding)))
    other.start()
    streaming.wait(120)
    healthz = healthz_while(url, threading.Thread(target=flood))
    other.join()
    return {"fragments": fragments, **out, **healthz, "other_stream_chunks": len(gaps),
            "other_stream_max_gap_ms": pct(gaps, 100) if gaps else None,
            "quiet_stream_max_gap_ms": pct(quiet, 100), "frame_ms": 80}


def main() -> None:
    proc, url = start()
    try:
        result = {"big_body": big_body(url), "burst": burst(url), "append_text_flood": append_text_flood(url)}
    finally:
        stop(proc)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
