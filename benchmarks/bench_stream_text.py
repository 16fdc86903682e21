"""Text that streams in: time from an LLM's first token to the first audio, streamed against waiting.

A simulated LLM writes a reply of a few sentences at --tokens-per-s (a token is about 4
characters). Over `/v1/conversations` on a `fastcsm serve` in a subprocess (the tiny random
checkpoint by default), two ways of speaking it are timed from the LLM's first token:

  streamed  `speak` with the first token and `more: true`, then one `append_text` per token as it
            is written (the last with `more: false`): speaking starts once the first sentence is
            complete;
  whole     wait for the LLM to finish, then `speak` the whole line.

    python benchmarks/bench_stream_text.py                         # CPU, tiny checkpoint
    python benchmarks/bench_stream_text.py --preset csm-1b --device cuda

Prints one line per run on stderr and a JSON object on the last line of stdout: for each way the
first-audio time p50 / max (ms, from the first token), the server's own `first_audio.ms`, and
the time the LLM took to write the line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_server import device_name, log, start_server, stop  # noqa: E402

REPLY = ("Sure, I can help with that. The train leaves at half past nine from platform four, and the trip takes "
         "about two hours. Would you like me to book a seat for you?")


def tokens(text: str, size: int = 4) -> list[str]:
    return [text[i:i + size] for i in range(0, len(text), size)]


async def one_run(url: str, mode: str, tps: float, piece_ms: int, seed: int) -> dict:
    import websockets

    parts = tokens(REPLY)
    speak = {"type": "speak", "voice": "0", "seed": seed, "max_audio_length_ms": piece_ms}
    async with websockets.connect(url.replace("http", "ws") + "/v1/conversations", max_size=None) as ws:
        assert json.loads(await ws.recv())["type"] == "ready"
        first_audio_at, server_ms, done = None, None, None

        async def receive():
            nonlocal first_audio_at, server_ms, done
            async for msg in ws:
                if isinstance(msg, bytes):
                    if first_audio_at is None:
                        first_audio_at = time.perf_counter()
                    continue
                event = json.loads(msg)
                if event["type"] == "first_audio":
                    server_ms = event["ms"]
                elif event["type"] == "error":
                    raise RuntimeError(event["message"])
                elif event["type"] == "done":
                    done = event
                    return

        reader = asyncio.create_task(receive())
        t0 = time.perf_counter()  # the LLM's first token
        if mode == "streamed":
            await ws.send(json.dumps({**speak, "text": parts[0], "more": True}))
            for i, part in enumerate(parts[1:], start=1):
                await asyncio.sleep(max(0.0, t0 + i / tps - time.perf_counter()))
                await ws.send(json.dumps({"type": "append_text", "text": part, "more": i < len(parts) - 1}))
        else:
            await asyncio.sleep(max(0.0, t0 + (len(parts) - 1) / tps - time.perf_counter()))
            await ws.send(json.dumps({**speak, "text": REPLY}))
        llm_ms = (len(parts) - 1) / tps * 1000
        await asyncio.wait_for(reader, 600)
    return {"first_audio_ms": round((first_audio_at - t0) * 1000, 1), "server_first_audio_ms": round(server_ms, 1),
            "llm_ms": round(llm_ms, 1), "pieces": done["pieces"], "frames": done["frames"]}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny-checkpoint", help="tiny-checkpoint (default), or tiny, csm-1b "
                                                               "with random weights")
    p.add_argument("--model", help="a real checkpoint directory instead")
    p.add_argument("--device", default="cpu")
    p.add_argument("--tokens-per-s", type=float, default=30.0, help="the simulated LLM's speed")
    p.add_argument("--runs", type=int, default=3, help="runs of each way")
    p.add_argument("--piece-ms", type=int, default=800,
                   help="frame bound of each piece (a random model never ends a piece by itself)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--startup-timeout", type=float, default=600.0)
    args = p.parse_args(argv)
    if args.threads is None:
        args.threads = 1 if args.device == "cpu" else 0
    args.slots, args.seconds = 4, 10.0
    proc, url = start_server(args)
    results = {"streamed": [], "whole": []}
    try:
        asyncio.run(one_run(url, "whole", 1000.0, 160, 0))  # warm-up
        for run in range(args.runs):
            for mode in ("streamed", "whole"):
                r = asyncio.run(one_run(url, mode, args.tokens_per_s, args.piece_ms, run))
                results[mode].append(r)
                log(f"{mode:8s} run {run}: first audio {r['first_audio_ms']} ms after the first token "
                    f"(server: {r['server_first_audio_ms']} ms; the LLM took {r['llm_ms']} ms)")
    finally:
        stop(proc)
    summary = {}
    for mode, runs in results.items():
        values = [r["first_audio_ms"] for r in runs]
        summary[mode] = {"first_audio_ms_p50": statistics.median(values), "first_audio_ms_max": max(values),
                         "server_first_audio_ms_p50": statistics.median(r["server_first_audio_ms"] for r in runs),
                         "pieces": runs[0]["pieces"]}
    print(json.dumps({
        "benchmark": "stream_text_first_audio",
        "model": args.model or args.preset,
        "device": device_name(args.device),
        "cpu_count": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "tokens_per_s": args.tokens_per_s,
        "reply_chars": len(REPLY),
        "llm_ms": results["streamed"][0]["llm_ms"],
        **summary,
        "speedup_p50": round(summary["whole"]["first_audio_ms_p50"] / summary["streamed"]["first_audio_ms_p50"], 2),
    }))


if __name__ == "__main__":
    main()
