"""Voice activity: where the user's speech starts and stops in streamed audio.

`SileroVad` is Silero's detector, the ONNX model the `silero-vad` package ships, run by
onnxruntime. The package itself is never imported (importing it sets torch's thread count for the
whole process); its model file is found beside it. One loaded model serves every stream: a
stream's recurrent state is its own `VadState`.

`TurnDetector` turns the detector's speech probability for each 32 ms window into turns: a turn
starts after `min_speech_ms` of speech, stops after `end_silence_ms` of silence, and is cut at
`max_turn_s`. Its events are sample positions in the 16 kHz stream it is fed, so it is tested on
recorded audio, with no clock.

Where the speech ends: Silero's probability stays high for 90-140 ms after the sound stops, and
a turn's silence counted from there would keep the user waiting that much longer than the
`end_silence_ms` they were promised. So the end of a turn's speech is the end of its last loud
window (its peak within `LOUD_DB` of the turn's loudest), moved back from Silero's end by at most
`max_trim_ms`. Where the background is loud (noise within `LOUD_DB` of the speech) every window
is loud and Silero's end stands; where Silero goes on hearing speech, the turn goes on.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SAMPLE_RATE = 16_000
WINDOW = 512  # samples Silero scores at a time at 16 kHz (32 ms)
CONTEXT = 64  # samples of the previous window the model sees before each one
MODEL_FILE = "silero_vad.onnx"
INSTALL = 'pip install "fastcsm[asr]"'
END_SILENCE_MS = (100, 10_000)  # the silence that ends a turn may be set within these
MAX_TURN_S = (1.0, 600.0)  # and a turn's cap within these
LOUD_DB = 35.0  # a window whose peak is within this of the turn's loudest sample is sound


class VadError(RuntimeError):
    """The detector cannot run (a missing package or model file)."""


def silero_model_path() -> Path:
    """The ONNX model inside the installed `silero-vad` package, found without importing it."""
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        raise VadError(f"voice activity detection needs the silero-vad package, which is not installed: {INSTALL}")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / MODEL_FILE
    if not path.is_file():
        raise VadError(f"the silero-vad package has no {MODEL_FILE} at {path}: reinstall it ({INSTALL})")
    return path


@dataclass
class VadState:
    """One stream's detector state: the model's recurrent state and the last samples it saw."""

    h: np.ndarray  # [2, 1, 128] float32
    context: np.ndarray  # [CONTEXT] float32

    @staticmethod
    def new() -> VadState:
        return VadState(np.zeros((2, 1, 128), np.float32), np.zeros(CONTEXT, np.float32))


class SileroVad:
    """Silero VAD on the CPU with one thread (a window takes well under a millisecond); its
    `InferenceSession` may be shared by threads, each stream bringing its own `VadState`."""

    def __init__(self, path: str | Path | None = None):
        try:
            import onnxruntime
        except ImportError:
            raise VadError(f"voice activity detection needs onnxruntime, which is not installed: {INSTALL}") from None
        opts = onnxruntime.SessionOptions()
        opts.inter_op_num_threads = opts.intra_op_num_threads = 1
        self.session = onnxruntime.InferenceSession(str(path or silero_model_path()), sess_options=opts,
                                                    providers=["CPUExecutionProvider"])
        self._sr = np.array(SAMPLE_RATE, dtype=np.int64)

    def probability(self, window: np.ndarray, state: VadState) -> float:
        """The chance that `window` (float32 [WINDOW] at 16 kHz) is speech; advances `state`."""
        x = np.concatenate([state.context, window])[None]  # [1, CONTEXT + WINDOW]
        out, state.h = self.session.run(None, {"input": x, "state": state.h, "sr": self._sr})
        state.context = window[-CONTEXT:].copy()
        return float(out[0, 0])


@dataclass(frozen=True)
class TurnConfig:
    """How speech is cut into turns."""

    end_silence_ms: int = 500  # silence that ends a turn
    max_turn_s: float = 30.0  # a longer turn is cut there (the speech after it starts the next turn)
    min_speech_ms: int = 96  # speech shorter than this (a click, a cough) starts no turn
    pad_ms: int = 160  # audio kept before the first and after the last speech window
    threshold: float = 0.5  # speech probability that starts speech; it continues down to threshold - 0.15
    max_trim_ms: int = 128  # how far the end of speech may move back from Silero's to the last loud window

    def __post_init__(self):
        if not END_SILENCE_MS[0] <= self.end_silence_ms <= END_SILENCE_MS[1]:
            raise ValueError(f"end_silence_ms must be between {END_SILENCE_MS[0]} and {END_SILENCE_MS[1]}, "
                             f"got {self.end_silence_ms!r}")
        if not MAX_TURN_S[0] <= self.max_turn_s <= MAX_TURN_S[1]:
            raise ValueError(f"max_turn_s must be between {MAX_TURN_S[0]:g} and {MAX_TURN_S[1]:g}, "
                             f"got {self.max_turn_s!r}")
        if not 0 <= self.min_speech_ms <= 1000 or not 0 <= self.pad_ms <= 1000 or not 0 <= self.max_trim_ms <= 1000:
            raise ValueError("min_speech_ms, pad_ms and max_trim_ms must be between 0 and 1000")
        if not 0.2 <= self.threshold <= 0.95:
            raise ValueError(f"threshold must be between 0.2 and 0.95, got {self.threshold!r}")

    def samples(self, ms: float) -> int:
        return int(round(ms * SAMPLE_RATE / 1000))


@dataclass(frozen=True)
class Started:
    at: int  # the turn's first sample (its pre-roll included)
    now: int  # samples fed when it was decided


@dataclass(frozen=True)
class Stopped:
    at: int  # the turn's end (the last speech, plus its padding)
    now: int  # samples fed when it was decided
    reason: str  # "silence", "max_length" (cut at the cap) or "end" (the stream ended)


class TurnDetector:
    """Speech turns in one 16 kHz stream: `feed` samples, get `Started` / `Stopped` events."""

    def __init__(self, vad: SileroVad, config: TurnConfig | None = None):
        self.vad, self.config = vad, config or TurnConfig()
        c = self.config
        self._min_speech, self._end_silence = c.samples(c.min_speech_ms), c.samples(c.end_silence_ms)
        self._pad, self._max_turn = c.samples(c.pad_ms), c.samples(c.max_turn_s * 1000)
        # Trimmed by less than the silence that ends a turn: while Silero hears speech, none ends.
        self._max_trim = min(c.samples(c.max_trim_ms), self._end_silence - WINDOW)
        self._loud_ratio = 10 ** (-LOUD_DB / 20)
        self.state = VadState.new()
        self._pending = np.zeros(0, np.float32)  # < WINDOW samples not yet scored
        self.fed = 0  # samples scored so far
        self.start: int | None = None  # the turn in progress
        self._speech_from: int | None = None  # first window of the speech run before a turn starts
        self._last_speech = 0  # end of the last speech window
        self._last_loud = 0  # end of the last loud window of the turn (or of the speech run starting one)
        self._peak = 0.0  # the loudest sample of the turn (or of the speech run starting one)
        self._floor = 0  # a turn never starts before the end of the previous one

    @property
    def in_turn(self) -> bool:
        return self.start is not None

    @property
    def speech_end(self) -> int:
        """Where the turn's speech ended, if it has: its last loud window, or as near to it as
        `max_trim_ms` lets Silero's end move back (see the module's docstring)."""
        return min(self._last_speech, max(self._last_loud, self._last_speech - self._max_trim))

    @property
    def turn_end(self) -> int:
        """Where the turn in progress would end if the speech stopped now: its speech and padding."""
        return min(self.fed, self.speech_end + self._pad)

    @property
    def paused(self) -> bool:
        """A turn is in progress and its speech has paused past the padding: the turn's audio up to
        `turn_end` is what it will be if this silence ends it."""
        return self.start is not None and self.fed - self.speech_end >= self._pad

    def feed(self, samples: np.ndarray) -> list[Started | Stopped]:
        x = np.concatenate([self._pending, np.asarray(samples, np.float32)])
        whole = len(x) - len(x) % WINDOW
        self._pending = x[whole:].copy()
        events = []
        for i in range(0, whole, WINDOW):
            events.extend(self._window(x[i: i + WINDOW]))
        return events

    def finish(self) -> list[Stopped]:
        """The stream ended: a turn in progress stops where the audio does."""
        if self.start is None:
            return []
        return [self._stop(self.turn_end, "end")]

    def _window(self, window: np.ndarray) -> list[Started | Stopped]:
        c = self.config
        p = self.vad.probability(window, self.state)
        begin, self.fed = self.fed, self.fed + WINDOW
        peak = float(np.abs(window).max())
        if self.start is None:
            if p < c.threshold:
                self._speech_from = None
                return []
            if self._speech_from is None:
                self._speech_from, self._peak = begin, 0.0
            self._peak = max(self._peak, peak)
            if self.fed - self._speech_from < max(self._min_speech, WINDOW):
                return []
            self.start = max(self._floor, self._speech_from - self._pad)
            self._last_speech = self._last_loud = self.fed
            self._speech_from = None
            return [Started(self.start, self.fed)]
        self._peak = max(self._peak, peak)
        if peak >= self._loud_ratio * self._peak:
            self._last_loud = self.fed
        if p >= c.threshold - 0.15:
            self._last_speech = self.fed
        if self.fed + WINDOW - self.start > self._max_turn:  # the next window would pass the cap
            return self._cut()
        if self.fed - self.speech_end >= self._end_silence:
            return [self._stop(self.speech_end + self._pad, "silence")]
        return []

    def _cut(self) -> list[Stopped]:
        """A turn at the cap stops there; if the speech goes on, the next turn starts at once."""
        speaking = self._last_speech == self.fed
        events = [self._stop(self.fed, "max_length")]
        if speaking:
            self.start, self._last_speech, self._last_loud = self.fed, self.fed, self.fed
            events.append(Started(self.fed, self.fed))
        return events

    def _stop(self, at: int, reason: str) -> Stopped:
        at = min(at, self.fed)
        self.start, self._floor = None, at
        return Stopped(at, self.fed, reason)
