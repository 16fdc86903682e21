"""How many concurrent real-time streams `fastcsm serve` holds, measured from real clients.

Starts the server in a subprocess on loopback (the tiny random checkpoint by default, or random
weights of a preset, or --model), then for each concurrency N sends N streaming
`POST /v1/audio/speech` requests at once (raw PCM, --seconds of audio each) and times every
chunk as it arrives. Each stream's playback starts when its first chunk arrives, plus
--buffer-ms of jitter buffer; a chunk is late if it arrives after the moment its first sample
must play. A concurrency is held when no chunk of any stream is late. The sweep doubles N and
stops after the first concurrency that is not held (or at --max-streams, or the time budget).

    python benchmarks/bench_server.py                                  # CPU, tiny checkpoint
    python benchmarks/bench_server.py --preset csm-1b --device cuda --streams 1,8,32,64,128

Prints one line per concurrency on stderr and one JSON object on the last line of stdout:
realtime_streams (the largest N held), and per N: lateness p50/p99/max (ms, negative = early),
time to first audio p50/p99 (ms), the server's mean frame step (ms), the share of the 80 ms
frame budget it used, and the wall time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter

from fastcsm.server.urls import free_port, wait_ready

SAMPLE_RATE = 24_000
BYTES_PER_SAMPLE = 2  # pcm: signed 16-bit
FRAME_MS = 80


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))]


# -- the server process ---------------------------------------------------------------------------

def serve(args) -> None:
    """Run in the subprocess: build the generator and serve it."""
    import torch
    import uvicorn

    from fastcsm.generator import Generator
    from fastcsm.server.app import create_app
    from fastcsm.server.settings import Settings

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model:
        gen = Generator.from_pretrained(args.model, device=args.device)
    else:
        from fastcsm.bench import random_codec, random_model
        from fastcsm.codec.codec import Codec
        from fastcsm.model.config import preset
        from fastcsm.model.prompt import TextTokenizer
        from fastcsm.testing import byte_tokenizer_json

        cfg = preset(args.preset)
        device = torch.device(args.device)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        gen = Generator(random_model(cfg, device, dtype), TextTokenizer.from_json(byte_tokenizer_json()),
                        codec=Codec(random_codec(cfg, device), cfg.num_codebooks))
    settings = Settings(model=args.model or f"random {args.preset}", device=args.device, slots=args.slots,
                        max_queue=4 * args.slots, compile=args.compile, port=args.port,
                        max_audio_length_ms=int(args.seconds * 1000) + 80, request_timeout_s=600,
                        voices_dir=tempfile.mkdtemp())
    uvicorn.run(create_app(settings, generator=gen), host="127.0.0.1", port=args.port, log_level="warning")


def start_server(args) -> tuple[subprocess.Popen, str]:
    port = free_port()
    model = args.model
    if model is None and args.preset == "tiny-checkpoint":
        from fastcsm.testing import write_hf_checkpoint

        model = tempfile.mkdtemp(prefix="fastcsm-bench-")
        write_hf_checkpoint(model, seed=0)
    cmd = [sys.executable, __file__, "--_serve", "--port", str(port), "--device", args.device,
           "--slots", str(args.slots), "--seconds", str(args.seconds), "--threads", str(args.threads)]
    cmd += ["--model", model] if model else ["--preset", args.preset]
    if args.compile:
        cmd.append("--compile")
    return launch(cmd, port, args.startup_timeout)


def launch(cmd: list[str], port: int, startup_timeout: float, **popen) -> tuple[subprocess.Popen, str]:
    """Start the server command `cmd` (listening on `port`) and wait until it is ready."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **popen)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, startup_timeout, proc)
    except Exception:
        proc.kill()
        raise
    return proc, url


def device_name(device: str | None) -> str:
    """What the server ran on, for the report: "cpu", or the GPU's name."""
    import torch

    return device if device == "cpu" or not torch.cuda.is_available() else torch.cuda.get_device_name(0)


def stop(proc: subprocess.Popen) -> None:
    """Terminate a server process, and kill it if it has not gone in 10 s."""
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


def mean_step_ms(url: str) -> tuple[float, float]:
    import httpx

    text = httpx.get(url + "/metrics", timeout=5).text
    values = dict(line.split() for line in text.splitlines() if line.startswith("fastcsm_frame_seconds_"))
    return float(values.get("fastcsm_frame_seconds_sum", 0)), float(values.get("fastcsm_frame_seconds_count", 0))


# -- the clients ----------------------------------------------------------------------------------

async def one_stream(http, i: int, seconds: float, buffer_s: float) -> dict:
    body = {"model": "csm-1b", "input": f"Stream number {i} is speaking now.", "voice": str(i % 2),
            "response_format": "pcm", "max_audio_length_ms": seconds * 1000, "seed": i}
    t0 = time.perf_counter()
    arrivals: list[tuple[float, int]] = []  # (time, bytes)
    async with http.stream("POST", "/v1/audio/speech", json=body) as r:
        if r.status_code != 200:
            return {"error": r.status_code}
        async for chunk in r.aiter_raw():
            arrivals.append((time.perf_counter(), len(chunk)))
    start = arrivals[0][0] + buffer_s  # playback of the first sample
    late, played = [], 0
    for t, n in arrivals:
        must_play = start + played / BYTES_PER_SAMPLE / SAMPLE_RATE
        late.append(t - must_play)
        played += n
    return {"ttfa": arrivals[0][0] - t0, "late": late, "samples": played // BYTES_PER_SAMPLE,
            "replica": r.headers.get("x-fastcsm-replica")}  # set behind Ray Serve (fastcsm.integrations.ray)


async def run_level(url: str, n: int, seconds: float, buffer_s: float) -> dict:
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=n + 4)) as http:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one_stream(http, i, seconds, buffer_s) for i in range(n)))
        wall = time.perf_counter() - t0
    errors = [r["error"] for r in results if "error" in r]
    late = [x for r in results if "late" in r for x in r["late"]]
    ttfa = [r["ttfa"] for r in results if "ttfa" in r]
    expected = int(seconds * 1000 // 80) * 1920
    return {
        "streams": n,
        "held": not errors and max(late) <= 0 and all(r["samples"] == expected for r in results),
        "errors": errors,
        "chunks": len(late),
        "late_chunks": sum(x > 0 for x in late),
        "lateness_ms_p50": round(1000 * percentile(late, 50), 1),
        "lateness_ms_p99": round(1000 * percentile(late, 99), 1),
        "lateness_ms_max": round(1000 * max(late), 1) if late else None,
        "ttfa_ms_p50": round(1000 * percentile(ttfa, 50), 1),
        "ttfa_ms_p99": round(1000 * percentile(ttfa, 99), 1),
        "wall_s": round(wall, 2),
        **({"per_replica": dict(Counter(r["replica"] for r in results if r.get("replica")))}
           if any(r.get("replica") for r in results) else {}),
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny-checkpoint",
                   help="tiny-checkpoint (default: a tiny random transformers checkpoint on disk), or a config "
                        "preset with random weights: tiny, csm-1b")
    p.add_argument("--model", help="a real checkpoint directory instead")
    p.add_argument("--device", default="cpu")
    p.add_argument("--streams", default="1,2,4,8,16,32,48,64", help="concurrencies to try, in order")
    p.add_argument("--slots", type=int, default=64, help="engine slots of the server")
    p.add_argument("--seconds", type=float, default=3.0, help="audio per stream")
    p.add_argument("--buffer-ms", type=float, default=80.0, help="client jitter buffer before playback starts")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads in the server (default: 1 on CPU, where tiny steps lose to thread "
                        "hand-offs; torch's default on GPU)")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--budget-s", type=float, default=180.0, help="stop the sweep after this long")
    p.add_argument("--startup-timeout", type=float, default=600.0)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--_serve", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads is None:
        args.threads = 1 if args.device == "cpu" else 0
    if args._serve:
        return serve(args)

    levels = [int(x) for x in args.streams.split(",")]
    proc, url = start_server(args)
    sweep, held = [], 0
    t_start = time.perf_counter()
    try:
        asyncio.run(run_level(url, 1, min(args.seconds, 1.0), args.buffer_ms / 1000))  # warm-up
        for n in levels:
            if time.perf_counter() - t_start > args.budget_s:
                log(f"time budget of {args.budget_s:g} s spent; stopping the sweep")
                break
            s0, c0 = mean_step_ms(url)
            level = asyncio.run(run_level(url, n, args.seconds, args.buffer_ms / 1000))
            s1, c1 = mean_step_ms(url)
            level["server_step_ms_mean"] = round(1000 * (s1 - s0) / max(1.0, c1 - c0), 1)
            # The engine's share of the 80 ms a frame lasts: above 1 no serving could keep up.
            level["frame_budget_used"] = round(level["server_step_ms_mean"] / FRAME_MS, 2)
            sweep.append(level)
            log(f"{n:4d} streams: {'held' if level['held'] else 'NOT held'}; lateness p50 "
                f"{level['lateness_ms_p50']} p99 {level['lateness_ms_p99']} max {level['lateness_ms_max']} ms; "
                f"TTFA p50 {level['ttfa_ms_p50']} p99 {level['ttfa_ms_p99']} ms; "
                f"step {level['server_step_ms_mean']} ms")
            if not level["held"]:
                break
            held = n
    finally:
        stop(proc)
    print(json.dumps({
        "benchmark": "server_realtime_streams",
        "model": args.model or args.preset,
        "device": device_name(args.device),
        "cpu_count": os.cpu_count(),
        "seconds_per_stream": args.seconds,
        "buffer_ms": args.buffer_ms,
        "slots": args.slots,
        "realtime_streams": held,
        # The largest concurrency whose engine step fit in a frame: what the engine alone would
        # hold; the gap to realtime_streams is what serving (HTTP, encoding, scheduling) costs.
        "engine_bound_streams": max((lv["streams"] for lv in sweep if lv["frame_budget_used"] <= 1), default=0),
        "sweep": sweep,
    }))


if __name__ == "__main__":
    main()
