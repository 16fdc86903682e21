"""When each written word is spoken: an estimate from a piece's audio, and captions (SRT, WebVTT).

CSM gives no alignment, so the times are estimated from what a piece is known to hold: its
written words, the spoken form of each (`normalize.Word`) and its PCM.

1. Speech span: the audio is cut in 10 ms windows; windows quieter than `SILENCE_DB` below the
   loudest are silence, and the span runs from the first loud window to the last.
2. Pauses: runs of silence of at least `MIN_PAUSE_S` inside the span.
3. Weights: each word gets the number of syllables of its spoken form (vowel groups, at least
   one a token), and a word that ends a clause or a sentence is followed by a pause of weight
   `CLAUSE_PAUSE` or `SENTENCE_PAUSE`.
4. Anchors: from left to right, each boundary between two words moves into the pause nearest to
   where the weights put it (within `SNAP_S`), and the words between two anchors share their
   stretch of audio in proportion to their weights.

The result is one `WordTime` per written word, in order, monotonic and inside the audio.
`benchmarks/bench_timestamps.py` measures the error against speech whose word times are known.
Nothing here knows of models or prompts.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

WINDOW_S = 0.010
SILENCE_DB = 30.0  # quieter than the loudest window by this much is silence
MIN_PAUSE_S = 0.05
SNAP_S = 0.35  # a boundary moves into a pause at most this far away
CLAUSE_PAUSE = 1.0  # in syllables
SENTENCE_PAUSE = 2.0
_VOWELS = re.compile(r"[aeiouyäöüéèêáàíóúæøå]+", re.IGNORECASE)
_TOKEN = re.compile(r"\w+")


@dataclass(frozen=True)
class WordTime:
    """A written word (as the text had it) and its span in the audio, in seconds."""

    text: str
    start: float
    end: float


def syllables(spoken: str) -> int:
    """A cheap count: vowel groups of each token (at least one each: "SQL", "7")."""
    return sum(max(1, len(_VOWELS.findall(t))) for t in _TOKEN.findall(spoken)) or 1


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
    weights = np.array([syllables(w.spoken) for w in words], dtype=np.float64)
    gaps = np.array([_pause_after(w.text) for w in words[:-1]] + [0.0])
    times = _place(weights, gaps, span, pauses)
    return [WordTime(w.text, round(float(offset_s + s), 4), round(float(offset_s + e), 4))
            for w, (s, e) in zip(words, times, strict=True)]


def _place(weights: np.ndarray, gaps: np.ndarray, span: tuple[float, float],
           pauses: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Spans for words of `weights` (each followed by a pause of weight `gaps`) in `span`, with
    boundaries snapped into `pauses` where one is near."""
    n = len(weights)
    # anchors: (index of the first word after the anchor, time its stretch starts, time the last stretch ends)
    anchors = [(0, span[0], None)]
    for pause_start, pause_end in pauses:
        i0, t0, _ = anchors[-1]
        if i0 >= n:
            break
        cum = np.cumsum(weights[i0:] + gaps[i0:])
        rate = (span[1] - t0) / cum[-1]
        ends = t0 + (cum - gaps[i0:]) * rate  # where each word would end
        centre = (pause_start + pause_end) / 2
        k = int(np.argmin(np.abs(ends[:-1] - centre))) if len(ends) > 1 else None
        if k is not None and abs(ends[k] - centre) <= SNAP_S and ends[k] - rate * weights[i0 + k] < pause_start:
            anchors[-1] = (i0, t0, pause_start)
            anchors.append((i0 + k + 1, pause_end, None))
    out: list[tuple[float, float]] = []
    for j, (i0, t0, t1) in enumerate(anchors):
        i1 = anchors[j + 1][0] if j + 1 < len(anchors) else n
        t1 = span[1] if t1 is None else t1
        w, g = weights[i0:i1], gaps[i0:i1].copy()
        g[-1] = 0.0  # the stretch's last word ends at the anchor
        cum = np.concatenate([[0.0], np.cumsum(w + g)])
        rate = (t1 - t0) / cum[-1]
        out += [(t0 + cum[k] * rate, t0 + (cum[k] + w[k]) * rate) for k in range(len(w))]
    return out


# -- captions -------------------------------------------------------------------------------------

MAX_CUE_WORDS = 8
MAX_CUE_CHARS = 42  # one line of a subtitle


def cues(words: Sequence[WordTime]) -> list[tuple[float, float, str]]:
    """Words grouped into caption cues: a cue ends after a sentence, or before it grows past
    MAX_CUE_WORDS words or MAX_CUE_CHARS characters."""
    out, group = [], []
    for w in words:
        if group and (len(group) >= MAX_CUE_WORDS or len(" ".join(x.text for x in [*group, w])) > MAX_CUE_CHARS):
            out.append(group)
            group = []
        group.append(w)
        if _pause_after(w.text) == SENTENCE_PAUSE:
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
