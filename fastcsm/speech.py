"""What speaking produces: options, per-piece records, the finished `Speech`, and `AudioStream`.

`Generator.speak` / `generate` / `stream` (in generator.py) split the text into pieces, fit each
piece's prompt into the window, generate its frames and decode them. This module holds the
plain records they return and the iterator that turns frames into PCM chunks:

    frames ──> [first frame] ──decode──> chunk 1 (80 ms, as early as possible)
           ──> [chunk_frames frames] ──decode──> chunk 2, 3, ...
           ──> end of a piece: whatever is pending is decoded at once (no audio waits on a prefill)

All chunks go through one `DecodeStream`, so the audio continues across chunks and pieces
exactly as a whole-sequence decode of the same codes would.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from .context import OLDER_AUDIO_MODES, Trim

log = logging.getLogger("fastcsm")


@dataclass(frozen=True)
class SpeakOptions:
    """How a line is split, fitted and bounded. The defaults suit csm-1b."""

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
    # Experimental: keep only codebook 0 of older context audio ("codebook0"); see context.py.
    older_audio: str = "full"
    keep_full_audio: int = 2  # newest context segments that keep all codebooks in that mode

    def __post_init__(self):
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
    ended: bool = False  # the model emitted its end frame (else the bound stopped it)


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


class AudioStream:
    """An iterator of 24 kHz PCM chunks (fp32 [samples], CPU) as a line is generated.

    The first chunk is the first frame alone; later chunks hold `chunk_frames` frames, and each
    piece's last frames are flushed when it ends (with a `watermarker`, each piece comes as one
    watermarked chunk when it ends). `pieces` fills in as pieces start; `frames` counts the frames
    decoded so far. `close()` (or leaving a `with` block, or breaking out of a loop
    and dropping the stream) stops generation and frees the engine slot and the decoder slot.
    """

    def __init__(self, frames: Iterator, decoder, chunk_frames: int, sample_rate: int, pieces: list[Piece],
                 num_pieces: int, watermarker=None):
        if isinstance(chunk_frames, bool) or not isinstance(chunk_frames, int) or chunk_frames < 1:
            raise ValueError(f"chunk_frames must be a positive integer, got {chunk_frames!r}")
        self.sample_rate = sample_rate
        self.chunk_frames = chunk_frames
        self.pieces = pieces
        self.num_pieces = num_pieces
        self.frames = 0
        self._frames = frames
        self._decoder = decoder
        self._watermarker = watermarker
        self._chunks = self._run()

    def _run(self) -> Iterator[torch.Tensor]:
        pending: list[torch.Tensor] = []
        piece: list[torch.Tensor] = []  # with a watermark: the piece's audio, marked when it ends
        try:
            for frame in itertools.chain(self._frames, [None]):  # a last None flushes what is left
                if frame is not None:
                    pending.append(frame)
                if pending and (frame is None or self.frames == 0 or len(pending) >= self.chunk_frames):
                    chunk = self._decode(pending)
                    pending = []
                    if self._watermarker is None:
                        yield chunk
                    else:
                        piece.append(chunk)
                if frame is None and piece:
                    yield self._watermarker.apply(torch.cat(piece), self.sample_rate)
                    piece = []
        finally:
            self.close()

    def _decode(self, frames: list[torch.Tensor]) -> torch.Tensor:
        codes = torch.cat(frames)
        self.frames += codes.shape[0]
        return self._decoder.decode(codes)

    def __iter__(self) -> AudioStream:
        return self

    def __next__(self) -> torch.Tensor:
        return next(self._chunks)

    def close(self) -> None:
        """Stop generating and free everything (safe to call more than once)."""
        self._frames.close()
        self._decoder.close()
        if self._chunks.gi_running is False:
            self._chunks.close()

    @property
    def closed(self) -> bool:
        return self._decoder.closed

    def __enter__(self) -> AudioStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
