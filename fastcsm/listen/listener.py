"""The listener: 16-bit mono PCM chunks in, the user's turns out.

A `Listener` serves one stream of microphone audio at a rate the client declares. `feed(pcm)`
resamples each chunk (to 16 kHz for the detector and the recogniser, to Mimi's 24 kHz for the
codec), runs voice activity, and while the user speaks encodes the turn with Mimi's streaming
encoder frame by frame, so that when the speech stops nothing is left to encode but, at most, the
last frame. It returns events:

- `SpeechStarted` when a turn begins (its start backdated to just before the speech);
- `SpeechPaused` when the speech pauses in a turn (its padding of silence has passed), carrying
  the turn's 16 kHz audio so far: exactly the audio of the turn if this silence ends it;
- `SpeechStopped` when it ends (after `end_silence_ms` of silence, at the cap, or at the end of
  the stream), carrying the `Heard` turn: its 24 kHz audio, its Mimi codes, its 16 kHz audio.

`transcribe(heard)` then makes the `UserTurn` (text, transcript and the same audio and codes).
It is a separate call so that a server can run it in its recognition pool while `feed` goes on
with the next audio; `listen` does both, in order, for tools and tests.

Transcribing early: a pause is where a turn may end, and `end_silence_ms` later (500 ms by
default) it has, or the user has gone on. A caller that transcribes a pause's audio at once
(`SpeechPaused.audio_16k`) has the transcript ready, or under way, when the turn stops: when the
stop's turn is the paused one (`SpeechPaused.ends(heard)`), `transcribe(heard, early=that
transcript)` takes it instead of hearing the audio again; the text is the same, since the
audio is. A pause the user speaks past costs one transcription that is not used (its text is
still the turn so far: a partial transcript).

Transcribing live (`live=True`): a recogniser that can decode as the audio comes (pocketsphinx:
`live`) is fed the turn while it is spoken, up to the detector's `turn_end` (audio before it is in
the turn however it ends), so a pause or a stop leaves only the end of the search. Its transcript
is then `SpeechPaused.live` or `Heard.live`, a `Future`, instead of a transcription to start. A
live decoder starts from what the recogniser adapted to in this stream's last turn
(`Transcript.adapted`, kept in `adapted`), so the stream's first turn is decoded whole. Which
transcript a turn takes is the caller's choice: a server decodes the pause's audio whole as well
and takes that one if it is done when the turn ends (it hears a little better).

Memory is bounded: a chunk holds at most `MAX_CHUNK_S` of audio, a turn at most `max_turn_s`
(it is cut there, and says so), and between turns only the short pre-roll is kept. A listener
knows nothing of sockets; its errors (`ListenError`) say what the client sent wrong.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
import soxr
import torch

from .asr import SAMPLE_RATE as ASR_RATE, Transcriber, Transcript
from .vad import WINDOW, SileroVad, Started, Stopped, TurnConfig, TurnDetector

MIN_RATE, MAX_RATE = 8_000, 48_000  # what a microphone stream may declare
MAX_CHUNK_S = 5.0  # audio in one chunk; a client sends far smaller ones (20-100 ms)
ENCODE_CHUNK_FRAMES = 4  # Mimi frames encoded per step while the user speaks
MIMI_RATE = 24_000
_LIVE_PIECE = ASR_RATE // 10  # 16 kHz samples fed to a live transcription at a time, at least


class ListenError(ValueError):
    """Audio a listener cannot take: the message says what was wrong and what to send."""


@dataclass(frozen=True)
class SpeechStarted:
    at_ms: float  # where the turn starts in the stream
    heard_ms: float  # audio received when it was decided


@dataclass(frozen=True)
class Heard:
    """A finished turn, before transcription."""

    audio: torch.Tensor  # [samples] float32 at 24 kHz, a whole number of Mimi frames when the stream went on
    codes: torch.Tensor | None  # [frames, K] int64 (None without a codec)
    audio_16k: np.ndarray  # [samples] float32, what the recogniser hears
    start_ms: float
    end_ms: float
    reason: str  # "silence", "max_length" (cut at the cap) or "end" (the stream ended)
    tail_frames: int = 0  # frames left to encode when the turn stopped (the rest were encoded as they came)
    timings: dict[str, float] = field(default_factory=dict)  # ms: tail_encode
    live: Future | None = None  # of its Transcript, decoded as it was spoken (see the module's docstring)

    @property
    def cut(self) -> bool:
        return self.reason == "max_length"


@dataclass(frozen=True)
class SpeechPaused:
    start_ms: float  # the turn's start
    end_ms: float  # where it ends if this pause ends it
    heard_ms: float  # audio received when the pause was seen
    audio_16k: np.ndarray  # [samples] float32: the turn's audio from start to end, what the recogniser hears
    live: Future | None = None  # of the Transcript of that audio, decoded as it was spoken

    def ends(self, heard: Heard) -> bool:
        """`heard` is the turn as it was at this pause (the pause ended it, with the same audio)."""
        return heard.start_ms == self.start_ms and heard.end_ms == self.end_ms


@dataclass(frozen=True)
class SpeechStopped:
    at_ms: float  # where the turn ends in the stream
    heard_ms: float  # audio received when it was decided (at_ms + the end-of-turn silence, about)
    heard: Heard


@dataclass(frozen=True)
class UserTurn:
    text: str
    transcript: Transcript | None
    heard: Heard
    timings: dict[str, float]  # ms: tail_encode, transcribe (0 when transcribed early)
    early: bool = False  # the transcript was made before the turn stopped (at its pause, or live)


Event = SpeechStarted | SpeechPaused | SpeechStopped


class Listener:
    """One microphone stream. `codec` (a `fastcsm.codec.codec.Codec`) encodes turns as they arrive;
    `transcriber` makes their text; `max_ahead_s` refuses audio that arrives faster than real
    time by more than that (None: recorded audio, fed as fast as it reads)."""

    def __init__(self, vad: SileroVad, rate: int, codec=None, transcriber: Transcriber | None = None,
                 config: TurnConfig | None = None, language: str | None = None, max_ahead_s: float | None = 2.0,
                 clock: Callable[[], float] = time.monotonic, live: bool = False):
        if isinstance(rate, bool) or not isinstance(rate, int) or not MIN_RATE <= rate <= MAX_RATE:
            raise ListenError(f"sample_rate must be an integer from {MIN_RATE} to {MAX_RATE} Hz, got {rate!r}")
        self.rate, self.codec, self.transcriber, self.language = rate, codec, transcriber, language
        self.detector = TurnDetector(vad, config)
        self.config = self.detector.config
        self.max_ahead_s, self.clock, self._t0 = max_ahead_s, clock, None
        self._to16 = soxr.ResampleStream(rate, ASR_RATE, 1, dtype="float32") if rate != ASR_RATE else None
        self._to24 = soxr.ResampleStream(rate, MIMI_RATE, 1, dtype="float32") if rate != MIMI_RATE else None
        self.received = 0  # input samples
        c = self.config
        # Kept between turns: what a turn's start may reach back to (padding, the speech run that
        # starts it, a window of slack), in 16 kHz samples.
        self._lookback = c.samples(c.pad_ms + c.min_speech_ms) + 2 * WINDOW
        self._a16 = _Buffer()
        self._a24 = _Buffer()
        self._start: int | None = None  # the turn in progress, in 16 kHz samples
        self._encoder = None
        if codec is not None:
            from ..codec.mimi import MimiStreamingEncoder

            if codec.sample_rate != MIMI_RATE:
                raise ListenError(f"the codec runs at {codec.sample_rate} Hz; the listener feeds it {MIMI_RATE}")
            self._encoder = MimiStreamingEncoder(codec.mimi, 1, ENCODE_CHUNK_FRAMES, codec.num_codebooks)
        self._codes: list[torch.Tensor] = []  # [n, K] pieces of the turn in progress
        self._encoded = 0  # 24 kHz samples of the turn encoded so far
        self._paused_at: int | None = None  # the turn's end at its last `SpeechPaused`
        # Live transcription (see the module's docstring): the turn's, what it was fed up to (16 kHz),
        # where it was finished and its transcript (None while it goes on), and what it starts from
        # (`adapted`: a new listener of the same microphone may be given the old one's).
        self.live = live
        self._live = None
        self._pushed = 0
        self._live_end: int | None = None
        self._live_text: Future | None = None
        self.adapted: str | None = None

    @property
    def in_turn(self) -> bool:
        return self._start is not None

    # -- audio in ---------------------------------------------------------------------------------

    def feed(self, pcm: bytes) -> list[Event]:
        """One chunk of little-endian 16-bit mono PCM at the declared rate."""
        if not isinstance(pcm, (bytes, bytearray, memoryview)):
            raise ListenError(f"audio chunks are bytes of 16-bit PCM, got {type(pcm).__name__}")
        if len(pcm) % 2:
            raise ListenError(f"an audio chunk of {len(pcm)} bytes is not whole 16-bit samples (an odd byte count); "
                              "send little-endian 16-bit mono PCM")
        samples = len(pcm) // 2
        if samples > MAX_CHUNK_S * self.rate:
            raise ListenError(f"an audio chunk of {samples / self.rate:.1f} s is longer than the {MAX_CHUNK_S:g} s "
                              "allowed: send the microphone's audio as it comes, in chunks of 20-100 ms")
        self._check_pace(samples)
        self.received += samples
        x = np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0
        return self._take(*self._resampled(x, last=False))

    def finish(self) -> list[Event]:
        """The stream ended: a turn in progress stops where the audio does."""
        events = self._take(*self._resampled(np.zeros(0, np.float32), last=True))
        for stop in self.detector.finish():
            events.append(self._stopped(stop))
        return events

    def _check_pace(self, samples: int) -> None:
        if self.max_ahead_s is None:
            return
        now = self.clock()
        if self._t0 is None:
            self._t0 = now
        ahead = (self.received + samples) / self.rate - (now - self._t0)
        if ahead > self.max_ahead_s:
            raise ListenError(f"audio arrives faster than real time ({ahead:.1f} s ahead of the clock, at most "
                              f"{self.max_ahead_s:g} s): stream the microphone as it records")

    def _resampled(self, x: np.ndarray, last: bool) -> tuple[np.ndarray, np.ndarray]:
        a16 = self._to16.resample_chunk(x, last=last) if self._to16 else x
        a24 = self._to24.resample_chunk(x, last=last) if self._to24 else x
        return np.clip(a16, -1, 1), np.clip(a24, -1, 1)

    def _take(self, a16: np.ndarray, a24: np.ndarray) -> list[Event]:
        self._a16.append(a16)
        self._a24.append(a24)
        events: list[Event] = []
        for e in self.detector.feed(a16):
            if isinstance(e, Started):
                events.append(self._started(e))
            else:
                events.append(self._stopped(e))
        if self._start is not None:
            self._encode(self._a24.end)
            end = self.detector.turn_end
            self._feed_live(end)
            if self.detector.paused and end != self._paused_at:
                self._paused_at = end
                events.append(SpeechPaused(_ms(self._start), _ms(end), _ms(self.detector.fed),
                                           self._a16.get(self._start, end).copy(), self._finish_live(end)))
        else:  # between turns: keep only what the next turn may reach back to
            keep = max(0, self.detector.fed - self._lookback)
            self._a16.drop_before(keep)
            self._a24.drop_before(_to24(keep))
        return events

    # -- turns ------------------------------------------------------------------------------------

    def _started(self, e: Started) -> SpeechStarted:
        self._start, self._codes, self._encoded, self._paused_at = e.at, [], 0, None
        if self._encoder is not None:
            self._encoder.reset()
        self._close_live()
        live = getattr(self.transcriber, "live", None) if self.live else None
        if live is not None and self.language in (None, "en"):
            self._live = live(self.adapted)
        self._pushed, self._live_end, self._live_text = e.at, None, None
        return SpeechStarted(_ms(e.at), _ms(e.now))

    def _stopped(self, e: Stopped) -> SpeechStopped:
        start24, end24 = _to24(self._start), _to24(e.at)
        frame = self.codec.frame_size if self.codec is not None else 1
        frames = -(-(end24 - start24) // frame)
        end24 = min(start24 + frames * frame, self._a24.end)  # whole frames, while the audio reaches
        before = self._encoded // frame if self._encoder is not None else frames
        t = time.perf_counter()
        self._encode(end24, last=True)
        tail_ms = (time.perf_counter() - t) * 1000
        codes = torch.cat(self._codes)[:frames] if self._codes else None
        live = self._finish_live(e.at)
        self._close_live()
        heard = Heard(audio=torch.from_numpy(self._a24.get(start24, end24).copy()), codes=codes,
                      audio_16k=self._a16.get(self._start, e.at).copy(), start_ms=_ms(self._start),
                      end_ms=_ms(e.at), reason=e.reason, tail_frames=max(0, frames - before),
                      timings={"tail_encode": round(tail_ms, 3)}, live=live)
        self._start, self._codes, self._encoded = None, [], 0
        return SpeechStopped(_ms(e.at), _ms(e.now), heard)

    # -- live transcription -----------------------------------------------------------------------

    def _feed_live(self, until: int, force: bool = False) -> None:
        """Feed the live transcription the turn's audio up to `until` (16 kHz), in pieces of at
        least `_LIVE_PIECE` samples unless `force`; after a finish the turn went on: start it over."""
        live = self._live
        if live is None:
            return
        if live.failed or until < self._pushed:  # decoded whole instead
            self._close_live()
            return
        if self._live_end is not None:
            if until > self._live_end and (force or until - self._live_end >= _LIVE_PIECE):
                live.restart(self._a16.get(self._start, until))
                self._pushed, self._live_end, self._live_text = until, None, None
        elif until > self._pushed and (force or until - self._pushed >= _LIVE_PIECE):
            live.feed(self._a16.get(self._pushed, until))
            self._pushed = until

    def _finish_live(self, end: int) -> Future | None:
        """The live transcript of the turn's audio up to `end`; None without one."""
        self._feed_live(end, force=True)
        if self._live is None or self._live.failed:
            return None
        if self._live_end != end:
            self._live_end, self._live_text = end, self._live.finish()
        return self._live_text

    def _close_live(self) -> None:
        if self._live is not None:
            self._live.close()
            self._live = None

    def _encode(self, until24: int, last: bool = False) -> None:
        """Encode the turn's audio up to `until24` (whole frames, and the partial last one if `last`)."""
        if self._encoder is None:
            return
        frame, start24 = self.codec.frame_size, _to24(self._start)
        while True:
            begin = start24 + self._encoded
            n = min(until24 - begin, ENCODE_CHUNK_FRAMES * frame)
            if not last:
                n -= n % frame
            if n <= 0:
                return
            wav = torch.from_numpy(self._a24.get(begin, begin + n).copy())
            with torch.inference_mode():
                codes = self._encoder.step(wav.to(self.codec.device, self.codec.mimi.dtype)[None, None])
            self._codes.append(codes[0].T.cpu())  # [n, K]
            self._encoded += n

    # -- text -------------------------------------------------------------------------------------

    def transcribe(self, heard: Heard, early: Transcript | None = None) -> UserTurn:
        """The turn's text (empty without a transcriber); `early`: the transcript of the pause that
        ended it (see the module's docstring), taken as it is."""
        if self.transcriber is None:
            return UserTurn("", None, heard, dict(heard.timings))
        if early is not None:
            self._adapt(early)
            return UserTurn(early.text, early, heard, {**heard.timings, "transcribe": 0.0}, early=True)
        t = time.perf_counter()
        transcript = self.hear(heard.audio_16k, heard.live)
        self._adapt(transcript)
        timings = {**heard.timings, "transcribe": round((time.perf_counter() - t) * 1000, 3)}
        return UserTurn(transcript.text, transcript, heard, timings)

    def hear(self, audio_16k: np.ndarray, live: Future | None = None) -> Transcript:
        """The transcript of a turn's (or a pause's) audio: its live one when there is one."""
        if live is not None:
            return live.result()
        return self.transcriber.transcribe(audio_16k, language=self.language)

    def _adapt(self, transcript: Transcript) -> None:
        if transcript.adapted is not None:
            self.adapted = transcript.adapted


def listen(listener: Listener, chunks: Iterable[bytes], early: bool = False) -> list[Event | UserTurn]:
    """Every event of `chunks` (then the end of the stream), each stop followed by its `UserTurn`;
    with `early`, each pause is transcribed as it comes and a turn its pause ended takes that text."""
    out: list = []
    paused: tuple[SpeechPaused, Transcript] | None = None
    for events in [*(listener.feed(c) for c in chunks), listener.finish()]:
        for e in events:
            out.append(e)
            if isinstance(e, SpeechPaused) and early and listener.transcriber is not None:
                paused = e, listener.hear(e.audio_16k, e.live)
            elif isinstance(e, SpeechStopped):
                text = paused[1] if paused is not None and paused[0].ends(e.heard) else None
                out.append(listener.transcribe(e.heard, early=text))
                paused = None
    return out


class _Buffer:
    """A stream's recent samples: `get(a, b)` by absolute position, `drop_before(a)` to bound it.
    Storage grows by doubling and is reused after drops, so appending is amortised O(chunk)."""

    def __init__(self):
        self.store = np.zeros(1 << 14, np.float32)
        self.lo = self.hi = 0  # the live samples are store[lo:hi]
        self.base = 0  # absolute position of store[lo]

    @property
    def end(self) -> int:
        return self.base + self.hi - self.lo

    def append(self, x: np.ndarray) -> None:
        n = len(x)
        if self.hi + n > len(self.store):
            live = self.hi - self.lo
            store = self.store if live + n <= len(self.store) // 2 else np.zeros(2 * (live + n), np.float32)
            store[:live] = self.store[self.lo: self.hi]
            self.store, self.lo, self.hi = store, 0, live
        self.store[self.hi: self.hi + n] = x
        self.hi += n

    def get(self, a: int, b: int) -> np.ndarray:
        a, b = max(a, self.base), min(b, self.end)
        return self.store[self.lo + a - self.base: self.lo + max(a, b) - self.base]

    def drop_before(self, a: int) -> None:
        cut = min(max(0, a - self.base), self.hi - self.lo)
        self.lo += cut
        self.base += cut


def _to24(i16: int) -> int:
    return i16 * MIMI_RATE // ASR_RATE


def _ms(i16: int) -> float:
    return round(i16 * 1000 / ASR_RATE, 3)
