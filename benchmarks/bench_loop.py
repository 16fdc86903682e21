"""The conversation loop, stage by stage: a user turn in, the assistant's first audio out.

Starts `fastcsm serve --llm-url ... --llm-model ...` in a subprocess on loopback (the tiny random
checkpoint by default, or --model), with the stand-in language model (`fastcsm.testing_llm`,
scripted replies at --tokens-per-s after --first-token-ms, in a thread of this process), opens a
conversation in assistant mode and sends --turns user turns, one after the other's reply, timing:

    user turn sent -> first model token -> first piece complete -> first audio frame sent
                   -> first audio frame received (this client)

The three middle stamps are the server's (`assistant_reply`: from the moment it took the turn);
the first and last are this client's. The total is sent -> received, and fastcsm's own share is
the total less the model's time to its first sentence, which the stand-in makes known exactly:
first-token delay + (tokens of the first sentence - 1) / rate (a stand-in token carries the space
after its word, so the sentence is known complete with its last token). The share holds the
WebSocket both ways, the HTTP request, SSE and `openai` SDK parsing of each token, the speakable
filter and piece cutting, planning, CSM's prefill and first frame, Mimi's decode and the send;
the stand-in's own timer jitter (it shares this process) counts against it too: an upper bound.

Turns are typed (`add_turn`). A listened turn (microphone audio) adds stages before these:
end of speech -> VAD end of turn -> transcript ready; `TypedTurns` is the source to replace, and
`STAGES` the list to extend, the rest of the loop is the same.

    python benchmarks/bench_loop.py [--turns 20] [--tokens-per-s 50] [--first-token-ms 200]

Prints a row per turn, p50/p90 per stage, and one line of JSON last.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from bench_server import launch, stop

from fastcsm.server.urls import free_port
from fastcsm.testing_llm import Scripted, StandInLLM, tokens

FIRST_SENTENCE = "Sure, I can help with that. "
REPLY = FIRST_SENTENCE + "The weather tomorrow looks mild, with a little rain in the afternoon. Anything else?"
# (stage, what it is measured from): every stage is in ms from the user turn being sent.
STAGES = ["first_token", "first_piece", "first_audio_sent", "first_audio_received"]


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]


class TypedTurns:
    """User turns as text (`add_turn` of the user's speaker): the turn is complete when sent."""

    def __init__(self):
        self.n = 0

    async def send(self, ws) -> dict:
        """Send the next user turn; the stamps of its own stages (none for typed text)."""
        self.n += 1
        await ws.send(json.dumps({"type": "add_turn", "speaker": 1, "text": f"Question number {self.n}?"}))
        return {}


async def one_turn(ws, source: TypedTurns) -> dict:
    t0 = time.perf_counter()
    row = await source.send(ws)
    received = None
    while True:
        msg = await ws.recv()
        if isinstance(msg, bytes):
            if received is None:
                received = (time.perf_counter() - t0) * 1e3
            continue
        event = json.loads(msg)
        if event["type"] == "error":
            raise RuntimeError(f"the server answered an error: {event['message']}")
        if event["type"] == "assistant_reply":
            break
    return {**row, "first_token": event["first_token_ms"], "first_piece": event["first_piece_ms"],
            "first_audio_sent": event["first_audio_ms"], "first_audio_received": received}


async def conversation(url: str, turns: int, piece_ms: float) -> list[dict]:
    from websockets.asyncio.client import connect

    async with connect(url.replace("http", "ws") + "/v1/conversations", max_size=None) as ws:
        await ws.recv()  # ready
        await ws.send(json.dumps({"type": "configure", "assistant": True, "max_audio_length_ms": piece_ms}))
        await ws.recv()  # configured
        source, rows = TypedTurns(), []
        for i in range(turns + 1):  # the first turn warms the model's connection and the engine: not counted
            row = await one_turn(ws, source)
            if i:
                rows.append(row)
            await ws.send(json.dumps({"type": "reset"}))  # every turn from the same history length
    return rows


def start_server(args, llm_url: str) -> tuple[subprocess.Popen, str]:
    model = args.model
    if model is None:
        from fastcsm.testing import write_hf_checkpoint

        model = tempfile.mkdtemp(prefix="fastcsm-bench-loop-")
        write_hf_checkpoint(model, seed=0)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTCSM_")}
    cmd = [sys.executable, "-m", "fastcsm", "serve", "--model", model, "--device", args.device, "--host", "127.0.0.1",
           "--port", str(port), "--voices-dir", tempfile.mkdtemp(), "--llm-url", llm_url, "--llm-model", "stand-in"]
    return launch(cmd, port, args.startup_timeout, env=env)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--turns", type=int, default=20)
    ap.add_argument("--tokens-per-s", type=float, default=50.0, help="the stand-in model's writing rate")
    ap.add_argument("--first-token-ms", type=float, default=200.0, help="the stand-in model's time to its first token")
    ap.add_argument("--piece-ms", type=float, default=800.0, help="audio bound of each piece (keeps turns short)")
    ap.add_argument("--model", help="a checkpoint directory (default: the tiny random one)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--startup-timeout", type=float, default=600.0)
    args = ap.parse_args()

    llm = StandInLLM([Scripted(REPLY)], tokens_per_s=args.tokens_per_s, first_token_s=args.first_token_ms / 1e3)
    with llm:
        proc, url = start_server(args, llm.url)
        try:
            rows = asyncio.run(conversation(url, args.turns, args.piece_ms))
        finally:
            stop(proc)
    model_ms = args.first_token_ms + (len(tokens(FIRST_SENTENCE)) - 1) * 1e3 / args.tokens_per_s
    for r in rows:
        r["fastcsm_share"] = r["first_audio_received"] - model_ms
        r["piece_to_audio_sent"] = r["first_audio_sent"] - r["first_piece"]
    keys = STAGES + ["piece_to_audio_sent", "fastcsm_share"]
    print(f"{'turn':>4} " + " ".join(f"{k:>21}" for k in keys))
    for i, r in enumerate(rows):
        print(f"{i:>4} " + " ".join(f"{r[k]:21.1f}" for k in keys))
    summary = {k: {"p50": pct([r[k] for r in rows], 50), "p90": pct([r[k] for r in rows], 90)} for k in keys}
    for k in keys:
        print(f"{k:>21}: p50 {summary[k]['p50']:7.1f} ms  p90 {summary[k]['p90']:7.1f} ms")
    print(f"the model's own time to its first sentence: {model_ms:.1f} ms (first token {args.first_token_ms:g} ms, "
          f"{args.tokens_per_s:g} tokens/s); fastcsm's share p50 {summary['fastcsm_share']['p50']:.1f} ms")
    print(json.dumps({"turns": len(rows), "device": args.device, "model": args.model or "tiny random checkpoint",
                      "tokens_per_s": args.tokens_per_s, "first_token_ms": args.first_token_ms,
                      "model_first_sentence_ms": model_ms, "ms_from_user_turn_sent": summary,
                      "mean_fastcsm_share_ms": statistics.mean(r["fastcsm_share"] for r in rows)}))


if __name__ == "__main__":
    main()
