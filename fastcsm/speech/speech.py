"""What speaking produces: options, per-piece records, the finished `Speech`, and `AudioStream`.

`Generator.speak` / `generate` / `stream` (in generator.py) plan the pieces of a text through
`planner.py` and generate them on the engine, which decodes every frame to PCM inside its step.
This module holds the options they take, the plain records they return and the iterator that
gathers the engine's PCM into chunks:

    frames' PCM ──> [first frame] ──> chunk 1 (80 ms, as early as possible)
                ──> [chunk_frames frames] ──> chunk 2, 3, ...
                ──> end of a piece: whatever is pending goes out at once (no audio waits on a prefill)

Each piece's audio continues the codec state of the piece before (the engine's `keep_audio` /
`audio_after`), so the chunks of a line are one seamless stream, as the server sends it.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from ..bounds import MAX_AUDIO_LENGTH_MS, TEMPERATURE, TOPK, TOPP
from ..engine.engine import EndReason
from ..engine.sampling import SamplingParams
from ..model.context import OLDER_AUDIO_MODES, Trim
from .lexicon import Lexicon
from .normalize import DEFAULT_LANGUAGE, NORMALIZE_BY_DEFAULT, Spoken, check_language, normalize, verbatim
from .timestamps import WordTime

log = logging.getLogger("fastcsm")


@dataclass(frozen=True)
class SpeakOptions:
    """How a line is sampled, bounded, split and fitted. The numbers' defaults and limits are
    bounds.py's (Sesame's reference: `generate`'s 90 s, its temperature and top-k) and suit csm-1b.

    `Generator.speak` and `stream` take one of these; the server builds one from each request.
    """

    # The bound of each generated piece; the length guard below lowers it to what the piece's
    # text can plausibly take.
    max_audio_length_ms: float = MAX_AUDIO_LENGTH_MS.default
    temperature: float = TEMPERATURE.default  # 0 is greedy
    topk: int = TOPK.default  # 0 switches top-k off
    topp: float = TOPP.default  # 1.0 switches nucleus sampling off
    # Text longer than this is split at sentence, then clause boundaries; None: never split.
    max_piece_chars: int | None = 200
    # Length guard: a piece may run to guard_base_ms + guard_ms_per_char * len(piece) (and never
    # beyond max_audio_length_ms). Speech runs at 60-100 ms a character; the margin is wide so a
    # real utterance always ends first, while a generation that never emits the end frame stops.
    # None switches the guard off (max_audio_length_ms alone bounds a piece).
    guard_ms_per_char: float | None = 150.0
    guard_base_ms: float = 3000.0
    # Pieces after the first see the audio generated for the earlier ones as context.
    carry_pieces: bool = True
    # Experimental: keep only codebook 0 of older context audio ("codebook0"); see model/context.py.
    older_audio: str = "full"
    keep_full_audio: int = 2  # newest context segments that keep all codebooks in that mode
    # Written forms (numbers, dates, money, units, URLs, ...) become spoken ones before the text is
    # tokenised (normalize.py), in num2words' `language`; False speaks the text exactly as given.
    normalize: bool = NORMALIZE_BY_DEFAULT
    language: str = DEFAULT_LANGUAGE
    # Whole-word respellings applied after normalisation (lexicon.py); not with normalize=False.
    lexicon: Lexicon | None = None

    def __post_init__(self):
        MAX_AUDIO_LENGTH_MS.check(self.max_audio_length_ms)
        SamplingParams(self.temperature, self.topk, self.topp)  # checks them
        m = self.max_piece_chars
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
            raise ValueError(f"max_piece_chars must be a positive integer or None, got {m!r}")
        g = self.guard_ms_per_char
        if g is not None and not (isinstance(g, (int, float)) and g > 0 and math.isfinite(g)):
            raise ValueError(f"guard_ms_per_char must be a positive number or None, got {g!r}")
        if not (isinstance(self.guard_base_ms, (int, float)) and 0 <= self.guard_base_ms < math.inf):
            raise ValueError(f"guard_base_ms must be a number >= 0, got {self.guard_base_ms!r}")
        if self.older_audio not in OLDER_AUDIO_MODES:
            raise ValueError(f"older_audio must be one of {OLDER_AUDIO_MODES}, got {self.older_audio!r}")
        if not isinstance(self.normalize, bool):
            raise TypeError(f"normalize must be True or False, got {self.normalize!r}")
        check_language(self.language)
        if self.lexicon is not None and not isinstance(self.lexicon, Lexicon):
            raise TypeError(f"lexicon must be a fastcsm Lexicon or None, got {type(self.lexicon).__name__}")

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(self.temperature, self.topk, self.topp)

    def spoken(self, text: str) -> Spoken:
        """`text` as it is to be said, with its words mapped back (normalised or as given)."""
        return normalize(text, self.language, self.lexicon) if self.normalize else verbatim(text)

    def guard_ms(self, text: str) -> float | None:
        if self.guard_ms_per_char is None:
            return None
        return self.guard_base_ms + self.guard_ms_per_char * len(text)


@dataclass
class Piece:
    """One generation: a piece of the text, what its prompt held, and how it ended."""

    index: int
    text: str
    max_frames: int  # the bound for this piece (requested length and length guard)
    prompt_rows: int
    trim: Trim
    dropped_context: list[int]  # indices into the caller's context, oldest first
    dropped_pieces: list[int]  # earlier pieces no longer in the prompt
    seed: int | None
    frames: int = 0
    reason: EndReason | None = None  # why it ended: its end frame or its bound (None while it runs)
    spoken: str = ""  # the text as the model read it (normalised, respelled)
    words: list[WordTime] = field(default_factory=list)  # each written word's time in the line's audio

    @property
    def ended(self) -> bool:
        """The model emitted its end frame (else the bound stopped it)."""
        return self.reason is EndReason.END_OF_SPEECH


@dataclass
class Speech:
    """A spoken line: the waveform, its codes, and one record per generated piece."""

    audio: torch.Tensor  # [samples] fp32, CPU
    codes: torch.Tensor  # [frames, K] int64, CPU
    sample_rate: int
    pieces: list[Piece] = field(default_factory=list)

    @property
    def duration_s(self) -> float:
        return self.audio.numel() / self.sample_rate

    @property
    def dropped_context(self) -> list[int]:
        return sorted({i for p in self.pieces for i in p.dropped_context})

    @property
    def words(self) -> list[WordTime]:
        """Start and end of each written word in `audio`, in order (see timestamps.py)."""
        return [w for p in self.pieces for w in p.words]


class AudioStream:
    """An iterator of 24 kHz PCM chunks (fp32 [samples], CPU) as a line is generated.

    `frames` yields each generated frame's PCM [frame_size], and None at the end of every piece.
    The first chunk is the first frame alone; later chunks hold `chunk_frames` frames, and each
    piece's last frames are flushed when it ends (with a `watermarker`, each piece comes as one
    watermarked chunk when it ends). `pieces` fills in as pieces start; `frames` counts the frames
    received so far. `close()` (or leaving a `with` block, or breaking out of a loop and dropping
    the stream) stops generation and frees the engine slot.
    """

    def __init__(self, frames: Iterator, chunk_frames: int, sample_rate: int, pieces: list[Piece],
                 num_pieces: int, watermarker=None):
        if isinstance(chunk_frames, bool) or not isinstance(chunk_frames, int) or chunk_frames < 1:
            raise ValueError(f"chunk_frames must be a positive integer, got {chunk_frames!r}")
        self.sample_rate = sample_rate
        self.chunk_frames = chunk_frames
        self.pieces = pieces
        self.num_pieces = num_pieces
        self.frames = 0
        self.closed = False
        self._source = frames
        self._watermarker = watermarker
        self._chunks = self._run()

    def _run(self) -> Iterator[torch.Tensor]:
        pending: list[torch.Tensor] = []
        piece: list[torch.Tensor] = []  # with a watermark: the piece's audio, marked when it ends
        try:
            for pcm in itertools.chain(self._source, [None]):  # a last None flushes what is left
                first = self.frames == 0
                if pcm is not None:
                    pending.append(pcm)
                    self.frames += 1
                if pending and (pcm is None or first or len(pending) >= self.chunk_frames):
                    chunk, pending = torch.cat(pending), []
                    if self._watermarker is None:
                        yield chunk
                    else:
                        piece.append(chunk)
                if pcm is None and piece:
                    yield self._watermarker.apply(torch.cat(piece), self.sample_rate)
                    piece = []
        finally:
            self.close()

    def __iter__(self) -> AudioStream:
        return self

    @property
    def words(self) -> list[WordTime]:
        """The word times of the pieces finished so far (see `Speech.words`)."""
        return [w for p in self.pieces for w in p.words]

    def __next__(self) -> torch.Tensor:
        return next(self._chunks)

    def close(self) -> None:
        """Stop generating and free everything (safe to call more than once)."""
        self.closed = True
        self._source.close()
        if self._chunks.gi_running is False:
            self._chunks.close()

    def __enter__(self) -> AudioStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
