"""Speech recognition: a `Transcriber` turns 16 kHz mono audio into a `Transcript`.

Two engines sit behind the one interface:
- faster-whisper (CTranslate2's Whisper), the default and the quality path: `asr_model` is a
  model name (`small`, `large-v3`, `Systran/faster-whisper-small`, any CTranslate2 Whisper repo on
  the hub), loaded offline from the hub cache like fastcsm's checkpoints, or a local directory
  holding a converted model (`model.bin`). It runs int8 on the CPU and float16 on CUDA, as the
  server's model does, and gives segment and word timings.
- pocketsphinx (`asr_model="pocketsphinx"`), whose wheel bundles an English model: it works
  with no download at all (tests, air-gapped machines), with word timings, at far lower accuracy.

Both are in `pip install "fastcsm[asr]"`; a missing package or model is an `AsrError` naming it.
A transcriber may be called from several threads: each engine serialises or pools what it must.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import threading
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

SAMPLE_RATE = 16_000  # what both engines hear
POCKETSPHINX = "pocketsphinx"
INSTALL = 'pip install "fastcsm[asr]"'


class AsrError(RuntimeError):
    """Speech recognition that cannot run: a missing package or model, or audio it cannot take."""


class UnknownLanguage(AsrError):
    """A language the model does not know."""


@dataclass(frozen=True)
class Word:
    text: str
    start: float  # seconds from the start of the audio
    end: float
    probability: float | None = None


@dataclass(frozen=True)
class Segment:
    text: str
    start: float
    end: float
    words: tuple[Word, ...] = ()


@dataclass(frozen=True)
class Transcript:
    text: str
    language: str
    duration: float  # seconds of audio heard
    segments: tuple[Segment, ...]
    # What the recogniser adapted to in this audio, for a live transcription of the same voice to
    # start from (pocketsphinx: the cepstral mean of a whole-recording decode); None: nothing.
    adapted: str | None = None

    @property
    def words(self) -> list[Word]:
        return [w for s in self.segments for w in s.words]


class Transcriber(Protocol):
    name: str  # the engine and model, e.g. "faster-whisper:small"

    def transcribe(self, audio: np.ndarray, language: str | None = None, prompt: str | None = None) -> Transcript:
        """audio: float32 [samples] at `SAMPLE_RATE` in [-1, 1]."""
        ...


def _nothing(language: str | None) -> Transcript:
    return Transcript("", language or "en", 0.0, ())


def check_audio(audio) -> np.ndarray:
    """16 kHz mono float32 [samples], finite: what every engine is given."""
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim != 1:
        raise AsrError(f"transcription takes mono audio [samples], got shape {list(audio.shape)}")
    if not np.isfinite(audio).all():
        raise AsrError("the audio to transcribe holds NaN or Inf samples")
    return audio


def _clamp(t: float, duration: float) -> float:
    return round(min(max(float(t), 0.0), duration), 3)


class WhisperTranscriber:
    """faster-whisper: greedy decoding, no built-in VAD (fastcsm's listener cuts turns itself),
    word timings from the cross-attention alignment. Timings are kept inside the audio."""

    def __init__(self, model: str, device: str | None = None, compute_type: str | None = None, threads: int = 0,
                 max_new_tokens: int | None = None):
        self.max_new_tokens = max_new_tokens  # tokens decoded per 30 s window at most (None: Whisper's 448)
        try:
            from faster_whisper import WhisperModel
        except ImportError:
            raise AsrError(f"asr_model {model!r} needs faster-whisper, which is not installed: {INSTALL}") from None
        kind, index = _device(device)
        compute_type = compute_type or ("float16" if kind == "cuda" else "int8")
        path = Path(model).expanduser()
        if path.is_dir() and not (path / "model.bin").is_file():
            raise AsrError(f"asr_model {model!r} is a directory without model.bin: give a CTranslate2 Whisper model "
                           "(ct2-transformers-converter --model openai/whisper-small --output_dir DIR "
                           "--copy_files tokenizer.json preprocessor_config.json)")
        try:
            self.model = WhisperModel(str(path) if path.is_dir() else model, device=kind, device_index=index,
                                      compute_type=compute_type, cpu_threads=threads, local_files_only=True)
        except ValueError as e:  # an unknown size name
            raise AsrError(f"asr_model {model!r}: {e}") from None
        except Exception as e:
            if type(e).__name__ in ("LocalEntryNotFoundError", "RepositoryNotFoundError", "HFValidationError") or \
                    isinstance(e, OSError):
                raise AsrError(f"asr_model {model!r} is not a local CTranslate2 Whisper directory nor in the hub "
                               f"cache (fastcsm loads it offline): download it once, e.g. `hf download "
                               f"Systran/faster-whisper-small`, or give a directory ({type(e).__name__})") from None
            raise
        self.name = f"faster-whisper:{path.name if path.is_dir() else model}"
        self.multilingual = self.model.model.is_multilingual

    def transcribe(self, audio: np.ndarray, language: str | None = None, prompt: str | None = None) -> Transcript:
        audio = check_audio(audio)
        duration = len(audio) / SAMPLE_RATE
        if language is not None and not self.multilingual and language != "en":
            raise UnknownLanguage(f"{self.name} is an English-only model; language {language!r} needs a "
                                  "multilingual one")
        if language is not None and language not in self.model.supported_languages:
            raise UnknownLanguage(f"language {language!r} is not one Whisper knows (ISO 639-1 codes such as en, "
                                  "fr, de)")
        if not len(audio):
            return _nothing(language)
        segments, info = self.model.transcribe(audio, language=language, initial_prompt=prompt or None,
                                               beam_size=1, temperature=0.0, word_timestamps=True,
                                               condition_on_previous_text=False, vad_filter=False,
                                               max_new_tokens=self.max_new_tokens)
        out = []
        for s in segments:
            words = tuple(Word(w.word.strip(), _clamp(w.start, duration), _clamp(w.end, duration),
                               round(float(w.probability), 4)) for w in (s.words or ()))
            out.append(Segment(s.text.strip(), _clamp(s.start, duration), _clamp(s.end, duration), words))
        text = " ".join(s.text for s in out if s.text)
        return Transcript(text, info.language, round(duration, 3), tuple(out))


class SphinxTranscriber:
    """pocketsphinx with the US English model its wheel bundles. Its decoder holds the GIL for
    the whole utterance (a server's event loop and engine thread would stall meanwhile), so it
    runs in a child process of its own, one recording at a time; live transcriptions (`live`)
    have a second process, so that a whole decode and a live one never wait for each other.
    Fillers (`<s>`, `<sil>`, `[NOISE]`) are dropped and `word(2)` read as `word`."""

    name = f"{POCKETSPHINX}:en-us"

    def __init__(self):
        if importlib.util.find_spec("pocketsphinx") is None:
            raise AsrError(f"asr_model {POCKETSPHINX!r} needs pocketsphinx, which is not installed: {INSTALL}")
        self._pool = _sphinx_pool(_sphinx_start)
        self.frames_per_second = self._pool.submit(_sphinx_frame_rate).result()
        self._lock = threading.Lock()
        self._live_lock = threading.Lock()  # (not `_lock`, held through a whole decode)
        self._live_open = self._live_ids = 0
        self._live_pool = None  # live decoders' process, started with the first (see `SphinxLive`)

    def transcribe(self, audio: np.ndarray, language: str | None = None, prompt: str | None = None) -> Transcript:
        audio = check_audio(audio)
        if language not in (None, "en"):
            raise UnknownLanguage(f"{self.name} knows English only; language {language!r} needs a Whisper model")
        duration = len(audio) / SAMPLE_RATE
        if not len(audio):
            return _nothing(language)
        with self._lock:
            seg, cmn = self._pool.submit(_sphinx_decode, _pcm(audio)).result()
        return self._transcript(seg, duration, cmn)

    def _transcript(self, seg: list[tuple[str, int, int]], duration: float, adapted: str | None) -> Transcript:
        fps = self.frames_per_second
        words = tuple(Word(w.split("(")[0], _clamp(a / fps, duration), _clamp((b + 1) / fps, duration))
                      for w, a, b in seg if not (w.startswith(("<", "[")) or w.endswith("]")))
        text = " ".join(w.text for w in words)
        segments = (Segment(text, words[0].start, words[-1].end, words),) if words else ()
        return Transcript(text, "en", round(duration, 3), segments, adapted)

    def live(self, adapted: str | None) -> SphinxLive | None:
        """A transcription fed as the audio comes (see `SphinxLive`), starting from `adapted` (a
        `Transcript.adapted` of the same voice); None without one, or while `MAX_LIVE` are open."""
        if not adapted:
            return None
        with self._live_lock:
            if self._live_open >= MAX_LIVE:
                return None
            if self._live_pool is None:
                self._live_pool = _sphinx_pool(_sphinx_watch)
            self._live_open += 1
            self._live_ids += 1
            return SphinxLive(self, self._live_ids, adapted)

    def _live_closed(self) -> None:
        with self._live_lock:
            self._live_open -= 1

    def close(self) -> None:
        for pool in (self._pool, self._live_pool):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)


def _sphinx_pool(initializer):
    """A child process of its own (pocketsphinx holds the GIL while it decodes)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=initializer)
    atexit.register(pool.shutdown)  # before the interpreter tears down what the pool's cleanup uses
    return pool


MAX_LIVE = 4  # live pocketsphinx transcriptions open at once (each holds a decoder of ~90 MB)
MAX_BACKLOG = 50  # pieces of audio a live transcription may have waiting before it gives up


class SphinxLive:
    """One turn transcribed while it is spoken: pocketsphinx decodes each piece as it is fed, so
    that when the turn ends only the end of the search (~0.1 s) is left, against ~0.2 s for every
    second of audio decoded whole. A live decoder cannot take the whole recording's cepstral mean
    (it has not heard it yet), so it starts from an earlier turn's of the same voice (`adapted`)
    and moves it toward this turn's as it goes (its `Transcript.adapted`, for the turn after); a
    stream's first turn is decoded whole. Over 31 espeak-ng turns after the first it heard 18
    exactly right, as many as whole decodes did, and 82% of the words against their 86%
    (`benchmarks/bench_hearing.py`).

    `feed(audio)` adds 16 kHz audio; `finish()` is a `Future` of the `Transcript` of everything fed;
    `restart(audio)` starts over with `audio` (the turn went on after a `finish`); `close()`. Calls
    are queued to the live decoders' process in order and never wait. `failed` says the
    transcription was given up (an error, or more than `MAX_BACKLOG` pieces waiting); a `finish`
    then decodes what was fed whole instead (kept for that: at most a turn, ~1 MB for 30 s)."""

    def __init__(self, owner: SphinxTranscriber, sid: int, adapted: str):
        self.owner, self.sid, self.adapted = owner, sid, adapted
        self.pieces: list[bytes] = []  # 16-bit PCM fed since the start
        self.samples = 0
        self.failed = False
        self.closed = False
        self._waiting = 0  # calls queued and not done
        self._count = threading.Lock()
        self._submit(_live_start, sid, adapted, b"")

    def _submit(self, fn, *args) -> Future | None:
        if self.failed or self.closed:
            return None
        with self._count:
            if self._waiting >= MAX_BACKLOG:
                self.failed = True
                return None
            self._waiting += 1
        try:
            future = self.owner._live_pool.submit(fn, *args)
        except Exception:  # the pool is shut down or broken
            self.failed = True
            return None
        future.add_done_callback(self._done)
        return future

    def _done(self, future: Future) -> None:
        with self._count:
            self._waiting -= 1
        if future.cancelled() or future.exception() is not None:
            self.failed = True

    def feed(self, audio: np.ndarray) -> None:
        if len(audio):
            pcm = _pcm(audio)
            self.pieces.append(pcm)
            self.samples += len(audio)
            self._submit(_live_feed, self.sid, pcm)

    def restart(self, audio: np.ndarray) -> None:
        pcm = _pcm(audio)
        self.pieces, self.samples = [pcm], len(audio)
        self._submit(_live_start, self.sid, self.adapted, pcm)

    def finish(self) -> Future:
        out: Future = Future()
        duration, pcm = self.samples / SAMPLE_RATE, b"".join(self.pieces)
        live = self._submit(_live_finish, self.sid)

        def make(result: tuple) -> Transcript:  # (words, cepstral mean), live or whole
            return self.owner._transcript(result[0], duration, result[1])

        def done(f: Future | None) -> None:
            if f is None or f.cancelled() or f.exception() is not None or self.failed:
                try:  # decoded whole: the live search missed a piece, or gave up
                    whole = self.owner._pool.submit(_sphinx_decode, pcm)
                except Exception as e:
                    return _set(out, exception=AsrError(f"speech recognition failed ({type(e).__name__}: {e})"))
                whole.add_done_callback(lambda w: _set(out, w, make))
            else:
                _set(out, f, make)

        if live is None:
            done(None)
        else:
            live.add_done_callback(done)
        return out

    def close(self) -> None:
        if not self.closed:
            try:
                self.owner._live_pool.submit(_live_close, self.sid)
            except Exception:
                pass
            self.closed = True
            self.owner._live_closed()


_decoder = None  # the child process's pocketsphinx decoder


def _sphinx_start() -> None:
    global _decoder
    from pocketsphinx import Decoder

    _sphinx_watch()
    _decoder = Decoder(samprate=SAMPLE_RATE, loglevel="FATAL")


def _sphinx_watch() -> None:
    threading.Thread(target=_exit_with_parent, daemon=True).start()


def _exit_with_parent() -> None:
    """End the child process once its parent is gone: a server that is killed, or one whose
    interpreter exits before the pool's shutdown reaches the child, must not leave it behind
    (it holds its queue's pipe open itself, so it would wait for work forever). The parent's
    sentinel is readable once the parent has exited."""
    import multiprocessing.connection

    multiprocessing.connection.wait([multiprocessing.parent_process().sentinel])
    os._exit(0)


def _sphinx_frame_rate() -> int:
    return int(_decoder.config["frate"])


def _set(out: Future, f: Future | None = None, make=None, exception: BaseException | None = None) -> None:
    """Settle `out` from the recogniser's future `f` (its result through `make`), or with `exception`;
    nothing if `out` was cancelled meanwhile."""
    try:
        if f is not None and (f.cancelled() or f.exception() is not None):
            why = "cancelled" if f.cancelled() else f"{type(f.exception()).__name__}: {f.exception()}"
            exception = AsrError(f"speech recognition failed ({why})")
        if exception is not None:
            out.set_exception(exception)
        else:
            out.set_result(make(f.result()))
    except InvalidStateError:
        pass


def _sphinx_decode(pcm: bytes) -> tuple[list[tuple[str, int, int]], str]:
    """(word, first frame, last frame) of 16-bit 16 kHz PCM, and the recording's cepstral mean, in
    the child process."""
    _decoder.start_utt()
    _decoder.process_raw(pcm, full_utt=True)
    _decoder.end_utt()
    return _words(_decoder), _decoder.get_cmn()


def _words(decoder) -> list[tuple[str, int, int]]:
    return [(s.word, s.start_frame, s.end_frame) for s in decoder.seg()]


_live: dict[int, object] = {}  # the child's live decoders by transcription, and spare ones
_spare: list = []
_in_utt: dict[int, bool] = {}  # a live decoder is in an utterance


def _live_start(sid: int, cmn: str, pcm: bytes) -> None:
    from pocketsphinx import Decoder

    decoder = _live.get(sid)
    if decoder is None:
        decoder = _live[sid] = _spare.pop() if _spare else Decoder(samprate=SAMPLE_RATE, loglevel="FATAL")
    elif _in_utt.get(sid):
        decoder.end_utt()
    decoder.set_cmn(cmn)
    decoder.start_utt()
    _in_utt[sid] = True
    if pcm:
        decoder.process_raw(pcm)


def _live_feed(sid: int, pcm: bytes) -> None:
    _live[sid].process_raw(pcm)


def _live_finish(sid: int) -> tuple[list[tuple[str, int, int]], str]:
    """The words, and the cepstral mean moved toward this audio's (what the next turn starts from)."""
    decoder = _live[sid]
    decoder.end_utt()
    _in_utt[sid] = False
    return _words(decoder), decoder.get_cmn()


def _live_close(sid: int) -> None:
    decoder = _live.pop(sid, None)
    if decoder is not None:
        if _in_utt.pop(sid, False):
            decoder.end_utt()
        _spare.append(decoder)


def _pcm(audio: np.ndarray) -> bytes:
    return (np.clip(audio, -1.0, 1.0) * 32767).astype("<i2").tobytes()


def _device(device: str | None) -> tuple[str, int]:
    """("cuda" | "cpu", index) from fastcsm's device setting (default: cuda if available)."""
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    kind, _, index = device.partition(":")
    if kind not in ("cpu", "cuda") or (index and not index.isdigit()):
        raise AsrError(f"speech recognition runs on cpu or cuda[:N], not {device!r}")
    return kind, int(index or 0)


def load_transcriber(model: str, device: str | None = None, compute_type: str | None = None,
                     threads: int = 0) -> Transcriber:
    """The transcriber `model` names: "pocketsphinx", else a faster-whisper model (hub name or
    directory) on `device` (compute type: int8 on the CPU, float16 on CUDA unless given)."""
    if not isinstance(model, str) or not model.strip():
        raise AsrError("asr_model is empty: give a faster-whisper model (e.g. small) or pocketsphinx")
    if model.strip() == POCKETSPHINX:
        return SphinxTranscriber()
    return WhisperTranscriber(os.path.expanduser(model.strip()) if model.startswith("~") else model.strip(),
                              device, compute_type, threads)


class AsrBusy(AsrError):
    """The recogniser's queue is full: try again shortly."""


class AsrPool:
    """A transcriber behind one worker thread and a bounded queue: recognition never runs on an
    event loop, one recording at a time (the engine uses its own threads within it), and at most
    `max_waiting` more wait; beyond that `submit` raises `AsrBusy` at once."""

    def __init__(self, transcriber: Transcriber, max_waiting: int = 16):
        self.transcriber = transcriber
        self.name = transcriber.name
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="fastcsm-asr")
        self._slots = threading.BoundedSemaphore(max_waiting + 1)

    def submit(self, fn, *args, **kwargs) -> Future:
        """Run `fn(*args, **kwargs)` on the recognition thread (e.g. a listener's `transcribe`)."""
        if not self._slots.acquire(blocking=False):
            raise AsrBusy("speech recognition is busy (its queue is full); retry shortly")
        try:
            future = self._pool.submit(fn, *args, **kwargs)
        except BaseException:
            self._slots.release()
            raise
        future.add_done_callback(lambda _: self._slots.release())
        return future

    def transcribe(self, audio: np.ndarray, language: str | None = None, prompt: str | None = None) -> Future:
        """A `Future` of the `Transcript` of `audio` (16 kHz mono float32)."""
        return self.submit(self.transcriber.transcribe, audio, language=language, prompt=prompt)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        close = getattr(self.transcriber, "close", None)
        if close is not None:
            close()
