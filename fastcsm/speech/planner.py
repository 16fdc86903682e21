"""The speech planner: the one place that turns text into the engine requests that speak it.

`Generator.speak` / `generate` / `stream`, `POST /v1/audio/speech` and WebSocket conversations
all plan through here, so the same text, voice, context, options and seed give the same pieces,
bounds, prompts and requests on every path:

- **pieces**: whole text (the library, HTTP) is cut by `split`: sentences packed into pieces of
  at most `SpeakOptions.max_piece_chars` characters, text that fits left exactly as given. Text
  that arrives in fragments (a WebSocket line with `more: true`) is cut by `streamed_pieces`:
  every sentence, and a long sentence after a clause, in pieces that stay the same whatever is
  appended later (`streamed_line` works them out fragment by fragment, from the last complete
  piece on). These are two rules on purpose: packing needs the whole text (a packed piece
  may still grow until its text is complete, which would hold back the first audio of a live
  line), and a live line wants its first sentence spoken as soon as it is complete.
- **frame bound** (`frame_bound`): the requested `max_audio_length_ms` (a server asks for its
  limit when a request gives none, and refuses one above it), floored to whole frames, lowered by
  the length guard of the piece's text (`SpeakOptions.guard_ms`, rounded up to whole frames).
- **spoken text** (`piece_text`): each piece as written becomes what the model reads, normalised
  and respelled (`SpeakOptions.spoken`, normalize.py), with a map back to its written words.
- **prompt** (`plan_piece`): pinned voices, then the context, then every earlier piece of the
  line with the audio generated for it, then the piece's own text; `context.fit` drops the
  oldest context (then the oldest earlier pieces) until the prompt and its frames fit the window.
  The `Request` carries everything before the piece as `prefix_rows` (its KV is worth keeping)
  and chains the audio as it is told (`keep_audio`, `audio_after`).

Which piece comes next, what was spoken before it and whose audio it continues is the line
driver's (line.py), the loop every way of speaking runs over these functions. Nothing here
touches the engine or the codec: the functions are pure over prompts and options.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..bounds import MAX_AUDIO_LENGTH_MS
from ..engine.engine import Request
from ..engine.sampling import SamplingParams
from ..model.config import CsmConfig
from ..model.context import Trim, check_line_fits, fit
from ..model.prompt import Prompt, TextTokenizer, audio_rows, concat, text_rows
from .normalize import Spoken
from .speech import SpeakOptions
from .text import LinePieces, speech_pieces, split_text


def split(text: str, options: SpeakOptions) -> list[str]:
    """The pieces of a whole text (see the module docstring)."""
    return [text] if options.max_piece_chars is None else split_text(text, options.max_piece_chars)


def streamed_pieces(text: str, final: bool) -> list[str]:
    """The pieces of a line whose text may still grow (`final=False`): only those that are
    certainly complete, and always a prefix of the pieces of the whole line."""
    return speech_pieces(text, final=final)


def streamed_line() -> LinePieces:
    """`streamed_pieces` of a line kept up to date as its fragments arrive (`add(fragment, final)`),
    each fragment costing the same whatever the length of the line before it."""
    return LinePieces()


def requested_frames(ms, frame_ms: int, limit_ms: float | None = None) -> int:
    """The requested bound `ms` in whole frames (rounded down). A bound above `limit_ms` (a
    server's limit, or the model's window) is an error, as is one shorter than a frame."""
    MAX_AUDIO_LENGTH_MS.check(ms)
    if limit_ms is not None and ms > limit_ms:
        raise ValueError(f"max_audio_length_ms={ms:g} is above the limit of {limit_ms:g} ms")
    if ms < frame_ms:
        raise ValueError(f"max_audio_length_ms={ms:g} is shorter than one {frame_ms} ms frame")
    return int(ms // frame_ms)


def frame_bound(text: str, options: SpeakOptions, frame_ms: int, limit_ms: float | None = None) -> int:
    """The frame bound of one piece: the requested bound lowered by the piece's length guard."""
    frames = requested_frames(options.max_audio_length_ms, frame_ms, limit_ms)
    guard = options.guard_ms(text)
    return frames if guard is None else min(frames, math.ceil(guard / frame_ms))


def spoken_rows(line: Prompt, codes, cfg: CsmConfig) -> Prompt:
    """A piece as later pieces see it: its text rows, then its audio (codes [frames, K], or a
    list of frames [K]) with the end frame."""
    return concat([line, audio_rows(_stacked(codes), cfg)])


def _stacked(codes) -> torch.Tensor:
    return torch.stack(list(codes)) if isinstance(codes, (list, tuple)) else codes


@dataclass
class PieceText:
    text: str  # as written
    line: Prompt  # the rows of its spoken form under the speaker
    max_frames: int
    spoken: Spoken  # what the model reads (normalised and respelled, unless options say not), word by word


def piece_text(text: str, speaker: int, tokenizer: TextTokenizer, cfg: CsmConfig, options: SpeakOptions,
               limit_ms: float | None = None) -> PieceText:
    """One piece's text rows and frame bound. This is where written text becomes what the model
    reads (`SpeakOptions.spoken`): the rows and the length guard are those of the spoken form."""
    spoken = options.spoken(text)
    return PieceText(text, text_rows(tokenizer, speaker, spoken.text, cfg),
                     frame_bound(spoken.text, options, cfg.frame_ms, limit_ms), spoken)


@dataclass
class PlannedPiece:
    """The request that speaks one piece, and what fitting its prompt did."""

    request: Request
    text: PieceText  # the piece's text, its rows (the prompt's tail) and its frame bound
    trim: Trim
    dropped_context: list[int]  # indices into the context given to `plan_piece`, oldest first
    dropped_pieces: list[int]  # indices into `spoken`: earlier pieces no longer in the prompt

    @property
    def line(self) -> Prompt:
        return self.text.line


def plan_piece(cfg: CsmConfig, pinned: list[Prompt], context: Sequence[Prompt],
               spoken: Sequence[tuple[Prompt, Sequence]], piece: PieceText, params: SamplingParams, seed: int,
               options: SpeakOptions, keep_audio: bool = False, audio_after: Request | None = None,
               checked: bool = False) -> PlannedPiece:
    """The request for `piece` after `pinned`, `context` and the pieces of the same line already
    `spoken` ((text rows, its codes) each, oldest first). Raises `context.ContextTooLong` when the
    piece cannot fit even with all of them dropped (`checked`: the caller has made sure it can)."""
    carried = [i for i, (_, codes) in enumerate(spoken) if options.carry_pieces and len(codes)]
    history = [*context, *(spoken_rows(spoken[i][0], spoken[i][1], cfg) for i in carried)]
    line, max_frames = piece.line, piece.max_frames
    prompt, trim = fit(pinned, history, line, max_frames, cfg, options.older_audio, options.keep_full_audio, checked)
    request = Request(prompt, max_frames, params, seed, prefix_rows=len(prompt) - len(line),
                      keep_audio=keep_audio, audio_after=audio_after)
    n = len(context)
    return PlannedPiece(request, piece, trim, [j for j in trim.dropped if j < n],
                        [carried[j - n] for j in trim.dropped if j >= n])


def whole_pieces(text: str, speaker: int, pinned: list[Prompt], tokenizer: TextTokenizer, cfg: CsmConfig,
                 options: SpeakOptions, limit_ms: float | None = None) -> list[PieceText]:
    """The pieces of a whole text, each bounded and checked to fit the window beside the pinned
    rows alone (the context may be dropped later, the pinned rows never), so that a text that
    cannot be spoken is refused before any of it is. Raises ValueError (or `ContextTooLong`)."""
    pieces = [piece_text(piece, speaker, tokenizer, cfg, options, limit_ms) for piece in split(text, options)]
    for p in pieces:
        check_line_fits(pinned, p.line, p.max_frames, cfg)
    return pieces
