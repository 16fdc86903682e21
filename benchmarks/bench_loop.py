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

Turns are typed (`add_turn`) by default. With --spoken they are listened: the server runs with
`--asr-model pocketsphinx`, the conversation is configured with `input_audio` too, and each turn
is a sentence spoken by espeak-ng (tests/listen_audio.py), streamed as binary 16-bit PCM in 20 ms
chunks paced by the clock (each chunk sent when a microphone would have recorded it: chunk k at
start + (k+1) x 20 ms), followed by silence until the reply has come. The stages then start
earlier, every one in ms from the end of the user's speech (the last sample louder than 1% of
full scale, in the clock of that pacing):

    end of speech -> user_speech_stopped (VAD end of turn) -> user_turn (transcript ready)
                  -> first model token -> first piece complete -> first audio frame sent
                  -> first audio frame received

The events are stamped as this client receives them; the server's three stamps are from its
taking the turn, which is right after it sends `user_turn`, so they are added to this client's
`user_turn` stamp (loopback: the two differ by a WebSocket message). The total (voice to voice)
is end of speech -> first audio frame received, and fastcsm's share is

    total - --turn-silence-ms (the VAD's end-of-turn silence, waited by design) - the model's time
    to its first sentence (as above)

exactly: everything but the silence that ends the turn and the model's time to its first
sentence. Besides the typed turn's share it holds the VAD's lag past that silence (`vad_lag`:
the detector's 32 ms windows and the 20 ms chunks, and what is left of Silero hearing speech for
90-140 ms after the sound ends once the end of speech is taken back to the last loud window),
what is left of pocketsphinx's transcription when the turn ends (`stop_to_transcript`) and the
Mimi encoding of the turn not done while the user spoke. The server transcribes a turn
when the user pauses (its audio is then the turn's, if the silence ends it), so at the end of the
turn the transcript is ready or under way; --no-transcribe-early starts it only at the end of the
turn, for comparison. The server also decodes each turn while it is spoken (`--transcribe-live`,
its default, from the conversation's second turn), leaving only the end of that search at the
pause; the turn takes the whole decode if it is done when the turn ends, else the live one;
--no-transcribe-live measures whole decodes alone. With --preemptive the server asks the model
as soon as a transcript is ready, if it is before the end of turn (`--preemptive-reply`): the
model's time then overlaps the silence, and the total drops by as much (the share, counting the
model's time as waited, drops too). Each turn's words are checked against the sentence said.

    python benchmarks/bench_loop.py [--turns 20] [--tokens-per-s 50] [--first-token-ms 200]
    python benchmarks/bench_loop.py --spoken [--turns 8] [--turn-silence-ms 500] [--no-transcribe-early]
                                    [--no-transcribe-live] [--preemptive]

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

import numpy as np
from bench_server import launch, stop

from fastcsm.server.urls import free_port
from fastcsm.testing_llm import Scripted, StandInLLM, tokens

FIRST_SENTENCE = "Sure, I can help with that. "
REPLY = FIRST_SENTENCE + "The weather tomorrow looks mild, with a little rain in the afternoon. Anything else?"
# Every stage is in ms from the user turn being sent (typed) or the end of the user's speech (--spoken).
STAGES = ["first_token", "first_piece", "first_audio_sent", "first_audio_received"]
SPOKEN_STAGES = ["user_speech_stopped", "user_turn"] + STAGES
RATE = 16_000
CHUNK_S = 0.02


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


class SpokenTurns:
    """User turns spoken by espeak-ng, streamed as a microphone would (see the module docstring)."""

    def __init__(self):
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
        from listen_audio import SENTENCES, pcm16, silence, speech_bounds, spoken

        self.n = 0
        self.takes = []
        for text in SENTENCES:
            wav = np.concatenate([silence(0.3, RATE), spoken(text, RATE)])
            self.takes.append((pcm16(wav), len(wav), speech_bounds(wav, RATE)[1], text))
        self.quiet = pcm16(silence(CHUNK_S, RATE))
        self.streaming: asyncio.Task | None = None

    async def send(self, ws) -> dict:
        """Start streaming the next sentence, then silence until `stop`; the stamps of its stages are
        measured from the end of its speech, `t0` (perf_counter) set to that moment."""
        audio, n, end_s, text = self.takes[self.n % len(self.takes)]
        self.n += 1
        started = time.perf_counter()
        self.t0 = started + end_s
        self.said = text
        self.streaming = asyncio.create_task(self.stream(ws, audio, n, started))
        return {}

    async def stream(self, ws, audio: bytes, n: int, started: float) -> None:
        step = int(CHUNK_S * RATE)
        k = 0
        while True:  # chunk k leaves when its last sample has been "recorded"
            chunk = audio[2 * k * step: 2 * (k + 1) * step] if k * step < n else self.quiet
            await asyncio.sleep(max(0.0, started + (k + 1) * CHUNK_S - time.perf_counter()))
            await ws.send(chunk)
            k += 1

    async def stop(self) -> None:
        self.streaming.cancel()
        await asyncio.gather(self.streaming, return_exceptions=True)


async def one_turn(ws, source: TypedTurns | SpokenTurns) -> dict:
    t0 = time.perf_counter()
    row = await source.send(ws)
    t0 = getattr(source, "t0", t0)
    received, since = None, 0.0
    try:
        while True:
            msg = await ws.recv()
            if isinstance(msg, bytes):
                if received is None:
                    received = (time.perf_counter() - t0) * 1e3
                continue
            event = json.loads(msg)
            if event["type"] == "error":
                raise RuntimeError(f"the server answered an error: {event['message']}")
            if event["type"] in ("user_speech_stopped", "user_turn"):
                row[event["type"]] = since = (time.perf_counter() - t0) * 1e3
            if event["type"] == "user_turn":
                row["heard"], row["said"] = event["text"], source.said
                if not event["added"]:
                    raise RuntimeError(f"nothing was recognised in {source.said!r}")
            if event["type"] == "assistant_reply":
                break
    finally:
        if isinstance(source, SpokenTurns):
            await source.stop()
    return {**row, "first_token": since + event["first_token_ms"], "first_piece": since + event["first_piece_ms"],
            "first_audio_sent": since + event["first_audio_ms"], "first_audio_received": received}


async def conversation(url: str, turns: int, piece_ms: float, spoken: bool) -> list[dict]:
    from websockets.asyncio.client import connect

    async with connect(url.replace("http", "ws") + "/v1/conversations", max_size=None) as ws:
        await ws.recv()  # ready
        listen = {"input_audio": {"sample_rate": RATE}} if spoken else {}
        await ws.send(json.dumps({"type": "configure", "assistant": True, "max_audio_length_ms": piece_ms, **listen}))
        configured = json.loads(await ws.recv())
        if configured["type"] == "error":
            raise RuntimeError(f"the server refused the configure: {configured['message']}")
        source, rows = (SpokenTurns() if spoken else TypedTurns()), []
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
    if args.spoken:
        cmd += ["--asr-model", "pocketsphinx", "--turn-silence-ms", str(args.turn_silence_ms),
                "--transcribe-early" if args.transcribe_early else "--no-transcribe-early",
                "--transcribe-live" if args.transcribe_live else "--no-transcribe-live"]
        cmd += ["--preemptive-reply"] if args.preemptive else []
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
    ap.add_argument("--spoken", action="store_true", help="spoken turns (espeak-ng, streamed in real time, "
                                                           "heard by pocketsphinx) instead of typed ones")
    ap.add_argument("--turn-silence-ms", type=int, default=500, help="--spoken: the server's end-of-turn silence")
    ap.add_argument("--transcribe-early", action=argparse.BooleanOptionalAction, default=True,
                    help="--spoken: the server transcribes a turn at the user's pause (off: at the end of the turn)")
    ap.add_argument("--transcribe-live", action=argparse.BooleanOptionalAction, default=True,
                    help="--spoken: the server also decodes a turn as it is spoken, from the conversation's second "
                         "turn (--transcribe-live, the default; off: whole decodes only)")
    ap.add_argument("--preemptive", action="store_true",
                    help="--spoken: the server asks the model at the user's pause (--preemptive-reply)")
    args = ap.parse_args()

    llm = StandInLLM([Scripted(REPLY)], tokens_per_s=args.tokens_per_s, first_token_s=args.first_token_ms / 1e3)
    with llm:
        proc, url = start_server(args, llm.url)
        try:
            rows = asyncio.run(conversation(url, args.turns, args.piece_ms, args.spoken))
        finally:
            stop(proc)
    model_ms = args.first_token_ms + (len(tokens(FIRST_SENTENCE)) - 1) * 1e3 / args.tokens_per_s
    waited_ms = model_ms + (args.turn_silence_ms if args.spoken else 0)
    for r in rows:
        r["fastcsm_share"] = r["first_audio_received"] - waited_ms
        r["piece_to_audio_sent"] = r["first_audio_sent"] - r["first_piece"]
        if args.spoken:
            r["vad_lag"] = r["user_speech_stopped"] - args.turn_silence_ms
            r["stop_to_transcript"] = r["user_turn"] - r["user_speech_stopped"]
    parts = ["vad_lag", "stop_to_transcript"] if args.spoken else []
    keys = (SPOKEN_STAGES if args.spoken else STAGES) + parts + ["piece_to_audio_sent", "fastcsm_share"]
    print(f"{'turn':>4} " + " ".join(f"{k:>21}" for k in keys))
    for i, r in enumerate(rows):
        print(f"{i:>4} " + " ".join(f"{r[k]:21.1f}" for k in keys))
    summary = {k: {"p50": pct([r[k] for r in rows], 50), "p90": pct([r[k] for r in rows], 90)} for k in keys}
    for k in keys:
        print(f"{k:>21}: p50 {summary[k]['p50']:7.1f} ms  p90 {summary[k]['p90']:7.1f} ms")
    right = sum(r["heard"] == r["said"] for r in rows) if args.spoken else None
    if args.spoken:
        for i, r in enumerate(rows):
            print(f"turn {i} heard: {r['heard']!r}")
        print(f"heard exactly right: {right} of {len(rows)} turns")
    silence_note = f" less the end-of-turn silence {args.turn_silence_ms} ms" if args.spoken else ""
    print(f"the model's own time to its first sentence: {model_ms:.1f} ms (first token {args.first_token_ms:g} ms, "
          f"{args.tokens_per_s:g} tokens/s); fastcsm's share (the total less that{silence_note}) "
          f"p50 {summary['fastcsm_share']['p50']:.1f} ms")
    origin = "ms_from_end_of_speech" if args.spoken else "ms_from_user_turn_sent"
    print(json.dumps({"turns": len(rows), "device": args.device, "model": args.model or "tiny random checkpoint",
                      "spoken": args.spoken, "turn_silence_ms": args.turn_silence_ms if args.spoken else None,
                      "transcribe_early": args.transcribe_early if args.spoken else None,
                      "transcribe_live": args.transcribe_live if args.spoken else None,
                      "preemptive_reply": args.preemptive if args.spoken else None,
                      "tokens_per_s": args.tokens_per_s, "first_token_ms": args.first_token_ms,
                      "model_first_sentence_ms": model_ms, "heard_right": right, origin: summary,
                      "mean_fastcsm_share_ms": statistics.mean(r["fastcsm_share"] for r in rows)}))


if __name__ == "__main__":
    main()
