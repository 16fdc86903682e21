"""When each written word is spoken: an estimate from a piece's audio, and captions (SRT, WebVTT).

CSM gives no alignment, so the times are estimated from what a piece is known to hold: its
written words, the spoken form of each (`normalize.Word`) and its PCM.

1. Speech span: the audio is cut in 10 ms windows; windows quieter than `SILENCE_DB` below the
   loudest are silence, and the span runs from the first loud window to the last.
2. Weights: each word weighs the letters and digits of its spoken form plus `WORD_WEIGHT` (the
   time between words), and a word that ends a clause or a sentence is followed by a pause of
   weight `CLAUSE_PAUSE` or `SENTENCE_PAUSE`.
3. Anchors: speakers pause at punctuation, so each such pause moves, left to right, into the
   longest silence of at least `MIN_PAUSE_S` within `SNAP_S` of where the weights put it; the
   words between two anchors share their stretch of audio in proportion to their weights.

The result is one `WordTime` per written word, in order, monotonic and inside the audio.
A piece cut off mid-way (an interrupted line) has no whole audio to share out: `heard` places
its words from the start of its speech at a speaking rate (the line's own so far, else
`SECONDS_PER_WEIGHT`) and keeps those whose start lies in the audio that was sent.
`benchmarks/bench_timestamps.py` measures the error against speech whose word times are known
(and picked the weights above).
Nothing here knows of models or prompts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

WINDOW_S = 0.010
SILENCE_DB = 30.0  # quieter than the loudest window by this much is silence
MIN_PAUSE_S = 0.1
SNAP_S = 0.6  # a pause at punctuation moves into a silence at most this far away
WORD_WEIGHT = 2.0  # in characters
CLAUSE_PAUSE = 1.0
SENTENCE_PAUSE = 2.0
SECONDS_PER_WEIGHT = 0.057  # ~150 words a minute at ~5 letters a word


@dataclass(frozen=True)
class WordTime:
    """A written word (as the text had it) and its span in the audio, in seconds."""

    text: str
    start: float
    end: float


def weight(spoken: str) -> float:
    """How long a word takes to say, in characters: its letters and digits, and the step to the next."""
    return sum(c.isalnum() for c in spoken) + WORD_WEIGHT


def _pause_after(text: str) -> float:
    end = text.rstrip("\"'”’)]")
    if end.endswith((".", "!", "?", "…")):
        return SENTENCE_PAUSE
    return CLAUSE_PAUSE if end.endswith((",", ";", ":", "—", "–")) else 0.0


def _loud(pcm: np.ndarray, sample_rate: int) -> np.ndarray:
    """One flag per 10 ms window: louder than the silence threshold."""
    n = max(1, round(WINDOW_S * sample_rate))
    windows = len(pcm) // n
    if windows == 0:
        return np.zeros(0, dtype=bool)
    rms = np.sqrt(np.mean(pcm[: windows * n].reshape(windows, n).astype(np.float64) ** 2, axis=1))
    peak = rms.max()
    return rms > max(peak * 10 ** (-SILENCE_DB / 20), 1e-6) if peak > 0 else np.zeros(windows, dtype=bool)


def _pauses(loud: np.ndarray, first: int, last: int) -> list[tuple[float, float]]:
    """Silent runs of at least MIN_PAUSE_S between windows `first` and `last` (in seconds)."""
    out, start = [], None
    for i in range(first, last + 1):
        if not loud[i] and start is None:
            start = i
        elif loud[i] and start is not None:
            if (i - start) * WINDOW_S >= MIN_PAUSE_S:
                out.append((start * WINDOW_S, i * WINDOW_S))
            start = None
    return out


def word_times(words: Sequence, pcm, sample_rate: int, offset_s: float = 0.0) -> list[WordTime]:
    """The times of `words` (`normalize.Word`s: `.text` and `.spoken`) in `pcm` [samples], a
    piece's audio that starts `offset_s` into the line (see the module's docstring)."""
    if not words:
        return []
    pcm = np.asarray(pcm, dtype=np.float32).reshape(-1)
    duration = len(pcm) / sample_rate
    loud = _loud(pcm, sample_rate)
    if loud.any():
        first, last = int(np.argmax(loud)), len(loud) - 1 - int(np.argmax(loud[::-1]))
        span = (first * WINDOW_S, min(duration, (last + 1) * WINDOW_S))
        pauses = _pauses(loud, first, last)
    else:
        span, pauses = (0.0, duration), []
    weights = np.array([weight(w.spoken) for w in words], dtype=np.float64)
    gaps = np.array([_pause_after(w.spoken) for w in words[:-1]] + [0.0])  # "Dr." is said "Doctor"
    times = _place(weights, gaps, span, pauses)
    return [WordTime(w.text, round(float(offset_s + s), 4), round(float(offset_s + e), 4))
            for w, (s, e) in zip(words, times, strict=True)]


def heard(words: Sequence, pcm, sample_rate: int, seconds_per_weight: float = SECONDS_PER_WEIGHT) -> int:
    """How many of a cut-off piece's `words` were begun in `pcm` [samples], the part of its audio
    that was sent: the words are placed from the first loud window at `seconds_per_weight`."""
    pcm = np.asarray(pcm, dtype=np.float32).reshape(-1)
    loud = _loud(pcm, sample_rate)
    if not loud.any():
        return 0
    t = int(np.argmax(loud)) * WINDOW_S
    duration = len(pcm) / sample_rate
    for i, w in enumerate(words):
        if t >= duration:
            return i
        t += (weight(w.spoken) + _pause_after(w.spoken)) * seconds_per_weight
    return len(words)


def rate(words: Sequence[WordTime], spoken: Sequence) -> float | None:
    """Seconds per unit of weight in timed `words` (their spoken forms `spoken`), None if none."""
    total = sum(weight(w.spoken) for w in spoken)
    return (words[-1].end - words[0].start) / total if words and total else None


def _place(weights: np.ndarray, gaps: np.ndarray, span: tuple[float, float],
           pauses: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Spans for words of `weights` (each followed by a pause of weight `gaps`) in `span`, the
    pauses at punctuation moved into the longest of the `pauses` (silences) near them."""
    n = len(weights)
    cum = np.concatenate([[0.0], np.cumsum(weights + gaps)])
    rate = (span[1] - span[0]) / cum[-1]
    anchors = []  # (last word before the anchor, silence start, silence end)
    free_from = span[0]
    for k in np.flatnonzero(gaps[:-1] > 0):
        centre = span[0] + (cum[k] + weights[k] + gaps[k] / 2) * rate
        near = [p for p in pauses if p[0] >= free_from and abs((p[0] + p[1]) / 2 - centre) <= SNAP_S]
        if near:
            start, end = max(near, key=lambda p: p[1] - p[0])
            anchors.append((int(k), start, end))
            free_from = end
    out: list[tuple[float, float]] = []
    first, t0 = 0, span[0]
    for last, t1, next_t0 in [*anchors, (n - 1, span[1], span[1])]:
        w, g = weights[first:last + 1], gaps[first:last + 1].copy()
        g[-1] = 0.0  # the stretch's last word ends at the anchor
        c = np.concatenate([[0.0], np.cumsum(w + g)])
        r = (t1 - t0) / c[-1]
        out += [(t0 + c[j] * r, t0 + (c[j] + w[j]) * r) for j in range(len(w))]
        first, t0 = last + 1, next_t0
    return out


# -- captions -------------------------------------------------------------------------------------

MAX_CUE_WORDS = 8
MAX_CUE_CHARS = 42  # one line of a subtitle


def cues(words: Sequence[WordTime]) -> list[tuple[float, float, str]]:
    """Words grouped into caption cues: a cue ends after a sentence (a full stop followed by a
    pause: not "Dr."), or before it grows past MAX_CUE_WORDS words or MAX_CUE_CHARS characters."""
    out, group = [], []
    for i, w in enumerate(words):
        if group and (len(group) >= MAX_CUE_WORDS or len(" ".join(x.text for x in [*group, w])) > MAX_CUE_CHARS):
            out.append(group)
            group = []
        group.append(w)
        if _pause_after(w.text) == SENTENCE_PAUSE and (i + 1 == len(words) or words[i + 1].start > w.end):
            out.append(group)
            group = []
    if group:
        out.append(group)
    return [(g[0].start, g[-1].end, " ".join(x.text for x in g)) for g in out]


def _stamp(t: float, sep: str) -> str:
    ms = max(0, round(t * 1000))
    return f"{ms // 3_600_000:02d}:{ms // 60_000 % 60:02d}:{ms // 1000 % 60:02d}{sep}{ms % 1000:03d}"


def srt(words: Sequence[WordTime]) -> str:
    return "".join(f"{i}\n{_stamp(s, ',')} --> {_stamp(e, ',')}\n{text}\n\n"
                   for i, (s, e, text) in enumerate(cues(words), 1))


def vtt(words: Sequence[WordTime]) -> str:
    def escaped(text: str) -> str:  # WebVTT cue text is markup: & and < are escaped
        return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")

    return "WEBVTT\n\n" + "".join(f"{_stamp(s, '.')} --> {_stamp(e, '.')}\n{escaped(text)}\n\n"
                                    for s, e, text in cues(words))


CAPTION_FORMATS = {".srt": srt, ".vtt": vtt}
