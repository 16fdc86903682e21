"""Speech for the listening tests: sentences spoken by espeak-ng (a Debian package), and silences."""

from __future__ import annotations

import functools
import shutil
import subprocess
import tempfile

import numpy as np
import pytest
import soundfile as sf

from fastcsm.audio import resample

# Sentences pocketsphinx hears right from this voice and speed (checked: most others it does not).
SENTENCES = ("the weather is nice today", "i would like a cup of coffee", "what time is it", "thank you very much")
VOICE, SPEED = "en-us+f2", "150"

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")


@functools.cache
def _spoken(text: str, rate: int) -> np.ndarray:
    with tempfile.NamedTemporaryFile(suffix=".wav") as f:
        subprocess.run(["espeak-ng", "-v", VOICE, "-s", SPEED, "-w", f.name, text], check=True)
        wav, sr = sf.read(f.name, dtype="float32")
    wav = resample(wav, sr, rate)
    wav.setflags(write=False)
    return wav


def spoken(text: str, rate: int = 16_000) -> np.ndarray:
    """`text` spoken by espeak-ng, mono float32 at `rate`, with espeak-ng's own short quiet at each end
    (pocketsphinx hears the sentences right with it, not always without it)."""
    return _spoken(text, rate)


def speech_bounds(wav: np.ndarray, rate: int = 16_000) -> tuple[float, float]:
    """Where the sound in `wav` starts and stops, in seconds."""
    loud = np.flatnonzero(np.abs(wav) > 0.01)
    return loud[0] / rate, (loud[-1] + 1) / rate


def silence(seconds: float, rate: int = 16_000) -> np.ndarray:
    return np.zeros(int(round(seconds * rate)), dtype=np.float32)


def pcm16(wav: np.ndarray) -> bytes:
    return (np.clip(wav, -1, 1) * 32767).astype("<i2").tobytes()


def words(text: str) -> list[str]:
    return [w.strip(".,?!'\"").lower() for w in text.split() if w.strip(".,?!'\"")]


def overlap(heard: str, said: str) -> float:
    """The share of `said`'s words that `heard` holds (order-free, each counted once)."""
    left = words(heard)
    hit = 0
    for w in words(said):
        if w in left:
            left.remove(w)
            hit += 1
    return hit / max(1, len(words(said)))
