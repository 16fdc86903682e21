"""What listening costs: transcription speed, the time from the end of a user's speech to the turn,
and what transcription beside them costs the speaking streams.

Three measurements, each printed on stderr as it finishes, all in one JSON object on the last line:

- `rtf`: the real-time factor (seconds of compute per second of audio; below 1 is faster than
  real time) of each recogniser on espeak-ng speech of about --seconds: pocketsphinx, and
  faster-whisper on random weights of Whisper's real sizes (--whisper-shapes; no hub model is
  downloaded), decoding --tokens-per-s tokens a second of audio, about what speech gives.
- `turn`: a `Listener` fed a spoken sentence in 20 ms chunks at 48 kHz, as a microphone sends it,
  with Silero VAD, Mimi (random weights of its real size) and pocketsphinx: per stage, the audio
  time from the end of the speech to the stop decision (the end-of-turn silence, plus the
  detector's lag), the compute of the chunk that decided it, the tail left to encode, and the
  transcription; and the per-chunk cost of listening while the user speaks.
- `lateness`: `fastcsm serve` (tiny random checkpoint, --asr-model) with --streams speaking
  streams, alone and then with transcription requests running back to back beside them; chunk
  lateness as benchmarks/bench_server.py measures it.

    python benchmarks/bench_listen.py                       # all three, CPU
    python benchmarks/bench_listen.py --only rtf --whisper-shapes tiny,base,small
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_server import log, one_stream, percentile, stop  # noqa: E402

SENTENCES = ("the weather is nice today", "i would like a cup of coffee", "what time is it", "thank you very much")


def espeak(text: str, rate: int) -> np.ndarray:
    import soundfile as sf

    from fastcsm.audio import resample

    with tempfile.NamedTemporaryFile(suffix=".wav") as f:
        subprocess.run(["espeak-ng", "-v", "en-us+f2", "-s", "150", "-w", f.name, text], check=True)
        wav, sr = sf.read(f.name, dtype="float32")
    return resample(wav, sr, rate)


def speech(seconds: float, rate: int = 16_000) -> np.ndarray:
    """The sentences, over and over with short pauses, for about `seconds`."""
    parts, n = [], 0
    while n < seconds * rate:
        for s in SENTENCES:
            parts += [espeak(s, rate), np.zeros(rate // 4, np.float32)]
            n += len(parts[-2]) + rate // 4
    return np.concatenate(parts)[: int(seconds * rate)]


# -- real-time factor -----------------------------------------------------------------------------

def bench_rtf(args) -> dict:
    from fastcsm.listen.asr import SphinxTranscriber, WhisperTranscriber
    from fastcsm.testing import write_tiny_whisper

    audio = speech(args.seconds)
    seconds = len(audio) / 16_000
    engines = {"pocketsphinx": SphinxTranscriber()}
    for shape in [s for s in args.whisper_shapes.split(",") if s]:
        path = write_tiny_whisper(tempfile.mkdtemp(prefix="fastcsm-bench-whisper-"), shape=shape)
        engines[f"faster-whisper {shape} (random weights, int8)"] = WhisperTranscriber(
            str(path), "cpu", threads=args.threads, max_new_tokens=max(1, round(args.tokens_per_s * seconds)))
    out = {}
    for name, engine in engines.items():
        engine.transcribe(audio[:16_000])  # warm-up
        times = []
        for _ in range(args.repeat):
            t = time.perf_counter()
            engine.transcribe(audio)
            times.append(time.perf_counter() - t)
        out[name] = {"audio_s": round(seconds, 2), "best_s": round(min(times), 3),
                     "rtf_best": round(min(times) / seconds, 3),
                     "rtf_median": round(statistics.median(times) / seconds, 3)}
        log(f"rtf {name}: {out[name]}")
    return out


# -- end of speech to turn ------------------------------------------------------------------------

def bench_turn(args) -> dict:
    import torch

    from fastcsm.codec.codec import Codec
    from fastcsm.codec.mimi import mimi_preset
    from fastcsm.listen.asr import SphinxTranscriber
    from fastcsm.listen.listener import Listener, SpeechStopped
    from fastcsm.listen.vad import SileroVad
    from fastcsm.testing import random_mimi

    torch.set_num_threads(1)  # a server's listener runs beside the engine, on one thread
    rate, chunk = 48_000, 48_000 // 50  # 20 ms
    codec = Codec(random_mimi(mimi_preset("mimi")), 32)
    vad, asr = SileroVad(), SphinxTranscriber()
    runs = []
    for sentence in SENTENCES:
        said = espeak(sentence, rate)
        audio = np.concatenate([np.zeros(rate // 2, np.float32), said, np.zeros(rate, np.float32)])
        speech_end_ms = (rate // 2 + np.flatnonzero(np.abs(said) > 0.01)[-1]) / rate * 1000
        pcm = (audio * 32767).astype("<i2").tobytes()
        listener = Listener(vad, rate, codec=codec, transcriber=asr, max_ahead_s=None)
        costs, stopped = [], None
        for i in range(0, len(pcm), 2 * chunk):
            t = time.perf_counter()
            events = listener.feed(pcm[i: i + 2 * chunk])
            cost = (time.perf_counter() - t) * 1000
            costs.append(cost)
            stop_events = [e for e in events if isinstance(e, SpeechStopped)]
            if stop_events and stopped is None:
                stopped, decide_ms = stop_events[0], cost
        if stopped is None:
            log(f"turn: no turn heard in {sentence!r}")
            continue
        turn = listener.transcribe(stopped.heard)
        runs.append({"vad_lag_ms": stopped.heard_ms - speech_end_ms, "decide_chunk_ms": decide_ms,
                     "tail_encode_ms": turn.timings["tail_encode"], "tail_frames": stopped.heard.tail_frames,
                     "transcribe_ms": turn.timings["transcribe"], "chunk_ms_mean": statistics.mean(costs),
                     "chunk_ms_p99": percentile(costs, 99), "turn_s": len(turn.heard.audio) / 24_000,
                     "text": turn.text})
    med = {k: round(statistics.median(r[k] for r in runs), 2) for k in runs[0] if k != "text"}
    med["to_turn_encoded_ms"] = round(med["vad_lag_ms"] + med["decide_chunk_ms"], 1)
    med["to_user_turn_ms"] = round(med["to_turn_encoded_ms"] + med["transcribe_ms"], 1)
    med["chunk_budget_share"] = round(med["chunk_ms_mean"] / 20, 3)
    med["heard"] = [r["text"] for r in runs]
    log(f"turn: {med}")
    return med


# -- speaking streams beside transcription --------------------------------------------------------

def bench_lateness(args) -> dict:
    import httpx

    from fastcsm.server.urls import free_port, wait_ready
    from fastcsm.testing import write_hf_checkpoint

    ckpt = tempfile.mkdtemp(prefix="fastcsm-bench-")
    write_hf_checkpoint(ckpt, seed=0)
    port = free_port()
    cmd = [sys.executable, "-m", "fastcsm", "serve", "--model", ckpt, "--device", "cpu", "--port", str(port),
           "--threads", "1", "--slots", str(max(4, args.streams)), "--asr-model", args.asr_model,
           "--voices-dir", tempfile.mkdtemp(), "--log-level", "warning"]
    log_path = Path(tempfile.mkdtemp(prefix="fastcsm-bench-listen-")) / "server.log"
    with open(log_path, "w") as server_log:  # a file: a pipe nobody reads would fill and block the server
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=server_log)
    url = f"http://127.0.0.1:{port}"
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, speech(args.seconds), 16_000, format="WAV", subtype="PCM_16")
    wav = buf.getvalue()

    async def level(with_asr: bool) -> dict:
        async with httpx.AsyncClient(base_url=url, timeout=600) as http:
            done = asyncio.Event()
            transcribed = []

            async def transcribe_loop():
                while not done.is_set():
                    t = time.perf_counter()
                    r = await http.post("/v1/audio/transcriptions", data={"model": "whisper-1"},
                                        files={"file": ("a.wav", wav, "audio/wav")})
                    r.raise_for_status()
                    transcribed.append(time.perf_counter() - t)

            side = asyncio.create_task(transcribe_loop()) if with_asr else None
            results = await asyncio.gather(*(one_stream(http, i, args.speak_seconds, 0.08)
                                             for i in range(args.streams)))
            done.set()
            if side is not None:
                await side
        late = [x for r in results for x in r["late"]]
        return {"chunks": len(late), "late_chunks": sum(x > 0 for x in late),
                "lateness_ms_p50": round(1000 * percentile(late, 50), 1),
                "lateness_ms_p99": round(1000 * percentile(late, 99), 1),
                "lateness_ms_max": round(1000 * max(late), 1), "transcriptions": len(transcribed)}

    log(f"server log: {log_path}")
    try:
        wait_ready(url, 300, proc)
        asyncio.run(level(False))  # warm-up
        out = {"alone": asyncio.run(level(False)), "with_transcription": asyncio.run(level(True))}
    finally:
        stop(proc)
    log(f"lateness ({args.streams} streams, {args.asr_model}): {out}")
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", choices=("rtf", "turn", "lateness"), help="one measurement only")
    p.add_argument("--seconds", type=float, default=10.0, help="audio transcribed per call")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--whisper-shapes", default="tiny,base", help="random-weight Whisper sizes to time")
    p.add_argument("--tokens-per-s", type=float, default=3.5, help="tokens Whisper decodes per second of audio")
    p.add_argument("--threads", type=int, default=2, help="CPU threads of CTranslate2")
    p.add_argument("--streams", type=int, default=4, help="speaking streams in the lateness test")
    p.add_argument("--speak-seconds", type=float, default=6.0, help="audio per speaking stream")
    p.add_argument("--asr-model", default="pocketsphinx", help="the server's recogniser in the lateness test")
    args = p.parse_args(argv)
    import os

    result = {"load_average": os.getloadavg()[0], "cpus": os.cpu_count()}
    for name, fn in (("rtf", bench_rtf), ("turn", bench_turn), ("lateness", bench_lateness)):
        if args.only in (None, name):
            result[name] = fn(args)
    result["load_average_after"] = os.getloadavg()[0]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
