"""How far the estimated word times (fastcsm.speech.timestamps) are from the truth, and what saying the
text right costs before the first frame.

Truth: every word of a line is spoken alone by espeak-ng, trimmed to its sound, and the words are
joined with short gaps inside a clause and longer ones after commas and full stops (as a speaker
pauses), so each word's start and end in the line are known exactly. The estimate sees only the
line's audio and its words, as it does after CSM speaks a piece.

Compared in the same run: `uniform` (the audio split evenly over the words, no trimming) and
`proportional` (speech span and syllable weights, no snapping to pauses) against `fastcsm`
(the full estimate).

Cost: `normalize` runs once per piece before its prompt is built, so its time is added to the
time to first audio; `word_times` runs when a piece ends, on its audio. Both are timed alone,
and the time to first audio of `Generator.stream` is timed with normalisation on and off on a
tiny random checkpoint (CPU), whose first frame is fast enough for the difference to show.

    python benchmarks/bench_timestamps.py            # JSON on the last line
"""

from __future__ import annotations

import io
import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastcsm.speech import timestamps  # noqa: E402
from fastcsm.speech.normalize import normalize  # noqa: E402

RATE = 24_000
LINES = [
    "The quick brown fox jumps over the lazy dog.",
    "Call me tomorrow at 10:30, and bring $3.50 for the bus.",
    "In 1984, the temperature reached 40–60 °C in some places, which nobody expected.",
    "Doctor Smith said the results look promising, but we need another week of tests.",
    "Visit example.com or e-mail jane.doe@example.com if anything goes wrong.",
    "Prices rose 12% last year; analysts expect a smaller rise, perhaps 3.5%, next year.",
]
FIRST_PIECES = LINES + ["Hello there, how are you today?", "Okay.", "It costs $1,250,000 on 2024-03-15."]


def say_alone(text: str) -> np.ndarray:
    """espeak-ng's audio of `text` at 24 kHz, trimmed to where it sounds."""
    import soundfile as sf
    import soxr

    wav = subprocess.run(["espeak-ng", "-v", "en-us", "-s", "165", "--stdout", text], capture_output=True,
                         check=True).stdout
    x, rate = sf.read(io.BytesIO(wav), dtype="float32")
    x = soxr.resample(x, rate, RATE)
    loud = np.flatnonzero(np.abs(x) > 0.02)
    return x[loud[0]:loud[-1] + 1] if len(loud) else x[:0]


def known_line(line: str, seed: int = 0):
    """(audio, words, truth): the line's words spoken one by one with pauses between them, and each
    word's (start, end) in seconds."""
    rng = random.Random(seed)
    words = normalize(line).words
    parts, truth, t = [np.zeros(int(0.2 * RATE), np.float32)], [], 0.2
    for w in words:
        audio = say_alone(w.spoken)
        truth.append((t, t + len(audio) / RATE))
        end = w.text.rstrip("\"')")
        gap = 0.45 if end.endswith((".", "!", "?")) else 0.25 if end.endswith((",", ";", ":")) else \
            rng.uniform(0.0, 0.06)
        parts += [audio, np.zeros(int(gap * RATE), np.float32)]
        t += (len(audio) + int(gap * RATE)) / RATE
    return np.concatenate(parts), words, truth


def boundary_error(estimate, truth) -> float:
    """Mean absolute error of the starts and ends, seconds."""
    return float(np.mean([abs(e[0] - t[0]) / 2 + abs(e[1] - t[1]) / 2 for e, t in zip(estimate, truth, strict=True)]))


def uniform(words, audio):
    d = len(audio) / RATE / len(words)
    return [(i * d, (i + 1) * d) for i in range(len(words))]


def proportional(words, audio):
    snap = timestamps.SNAP_S
    timestamps.SNAP_S = -1.0  # no pause is near enough
    try:
        return [(w.start, w.end) for w in timestamps.word_times(words, audio, RATE)]
    finally:
        timestamps.SNAP_S = snap


def estimated(words, audio):
    return [(w.start, w.end) for w in timestamps.word_times(words, audio, RATE)]


def measure(lines=LINES) -> dict:
    """Mean boundary error (ms) of each method over `lines`."""
    methods = {"uniform": uniform, "proportional": proportional, "fastcsm": estimated}
    errors = {name: [] for name in methods}
    for i, line in enumerate(lines):
        audio, words, truth = known_line(line, seed=i)
        for name, method in methods.items():
            errors[name].append(boundary_error(method(words, audio), truth))
    return {name: round(1000 * float(np.mean(e)), 1) for name, e in errors.items()}


def cost() -> dict:
    """What normalising a first piece adds before its prompt, and what timing a piece costs."""
    reps = 200
    t0 = time.perf_counter()
    for _ in range(reps):
        for text in FIRST_PIECES:
            normalize(text)
    normalize_ms = (time.perf_counter() - t0) * 1000 / (reps * len(FIRST_PIECES))
    audio, words, _ = known_line(LINES[2])
    t0 = time.perf_counter()
    for _ in range(reps):
        timestamps.word_times(words, audio, RATE)
    timing_ms = (time.perf_counter() - t0) * 1000 / reps
    return {"normalize_ms_per_piece": round(normalize_ms, 3), "word_times_ms_per_piece": round(timing_ms, 3),
            "piece_audio_s": round(len(audio) / RATE, 2)}


def first_audio(runs: int = 15) -> dict:
    """Median time to the first chunk of `Generator.stream` (ms), normalisation on and off."""
    import tempfile

    import torch

    from fastcsm.generator import Generator
    from fastcsm.speech.speech import SpeakOptions
    from fastcsm.testing import write_hf_checkpoint

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as root:
        write_hf_checkpoint(root, seed=0)
        gen = Generator.from_pretrained(root, device="cpu")
    text = FIRST_PIECES[-1]
    out = {}
    for on in (True, False, True, False):  # interleaved: drift in a shared machine's load hits both
        options = SpeakOptions(max_audio_length_ms=160, normalize=on)
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            with gen.stream(text, 0, seed=1, options=options) as stream:
                next(stream)
            times.append((time.perf_counter() - t0) * 1000)
        out.setdefault("on" if on else "off", []).extend(times)
    return {f"first_audio_ms_normalize_{k}": round(float(np.median(v)), 2) for k, v in out.items()}


def main() -> None:
    if shutil.which("espeak-ng") is None:
        sys.exit("bench_timestamps needs espeak-ng (apt-get install espeak-ng)")
    errors = measure()
    costs = cost() | first_audio()
    print(f"mean word boundary error over {len(LINES)} lines: " +
          ", ".join(f"{k} {v:.0f} ms" for k, v in errors.items()))
    print(f"normalize: {costs['normalize_ms_per_piece']:.3f} ms per piece, added to the time to first audio "
          f"(one 80 ms frame is the floor it is measured against); word_times: "
          f"{costs['word_times_ms_per_piece']:.2f} ms for {costs['piece_audio_s']} s of audio")
    print(f"time to first audio (tiny model, CPU, median): normalize on {costs['first_audio_ms_normalize_on']:.2f} ms, "
          f"off {costs['first_audio_ms_normalize_off']:.2f} ms")
    print(json.dumps({"boundary_error_ms": errors, **costs}))


if __name__ == "__main__":
    main()
