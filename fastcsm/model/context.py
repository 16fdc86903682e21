"""Fitting a conversation into CSM's context window.

The backbone sees at most `max_seq_len` (2048) rows: every context segment's rows, the line to
speak, and one row per frame it generates. When they do not fit, the oldest context segments
are dropped whole (a segment cut in half would leave text without its audio or audio without its
EOS frame). Pinned segments (a voice prompt) and the line itself are never dropped; if they
alone leave no room for the requested audio, that is an error the caller must fix.

An experimental mode (`older_audio="codebook0"`, off by default) keeps only codebook 0 — the
semantic code — of the audio of older context segments, masking the 31 acoustic codebooks.
It does not shorten the prompt (a frame is one row whatever its mask), so it never replaces
dropping; it exists to study how much acoustic detail of distant turns the model needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .config import CsmConfig
from .prompt import Prompt, concat

OLDER_AUDIO_MODES = ("full", "codebook0")


class ContextTooLong(ValueError):
    """Even with every droppable segment gone, the line and its audio do not fit the window."""


@dataclass
class Trim:
    """What fitting did to a context: indices are positions in the droppable context list."""

    dropped: list[int] = field(default_factory=list)  # oldest first
    reduced: list[int] = field(default_factory=list)  # audio kept as codebook 0 only
    dropped_rows: int = 0
    prompt_rows: int = 0  # rows of the prompt that was built
    frames: int = 0  # audio frames the prompt leaves room for (what was requested)
    window: int = 0

    def __bool__(self) -> bool:
        return bool(self.dropped or self.reduced)

    def describe(self) -> str:
        if not self.dropped:
            return "context kept whole"
        return (
            f"dropped {len(self.dropped)} oldest context segment(s) {self.dropped} ({self.dropped_rows} rows) "
            f"so that the prompt ({self.prompt_rows} rows) and {self.frames} frames of audio fit the "
            f"{self.window}-row window"
        )


def audio_row_mask(p: Prompt, cfg: CsmConfig) -> torch.Tensor:
    """[T] bool: rows that carry audio codes."""
    return p.mask[:, : cfg.num_codebooks].any(dim=1)


def codebook0_only(p: Prompt, cfg: CsmConfig) -> Prompt:
    """The same rows with codebooks 1..K-1 masked out of every audio row."""
    mask = p.mask.clone()
    mask[audio_row_mask(p, cfg), 1 : cfg.num_codebooks] = False
    return Prompt(p.tokens, mask)


def check_fits(rows: int, frames: int, window: int, frame_ms: int, what: str = "the prompt",
               fix: str = "shorten the context or the text") -> None:
    """The one window check: raise `ContextTooLong` unless `rows` prompt rows plus one row per
    generated frame fit a `window` of rows. `what` names the rows, `fix` says what to change."""
    if rows + frames <= window:
        return
    room_ms = max(0, window - rows) * frame_ms
    raise ContextTooLong(
        f"{what} and {frames} frames ({frames * frame_ms} ms) of audio need {rows + frames} rows, "
        f"more than the {window}-row context window: "
        + (f"allow at most {room_ms} ms of audio, or " if room_ms >= frame_ms else "")
        + fix
    )


def check_line_fits(pinned: list[Prompt], line: Prompt, frames: int, cfg: CsmConfig) -> None:
    """Raise `ContextTooLong` unless pinned rows + the line + `frames` fit the window."""
    fixed = sum(len(p) for p in pinned) + len(line)
    check_fits(
        fixed, frames, cfg.max_seq_len, cfg.frame_ms,
        f"the line to speak ({len(line)} rows of text"
        + (f", plus {fixed - len(line)} rows of pinned voice prompt" if pinned else "")
        + ") with all other context dropped",
        "shorten the text (or split it into pieces)" + (", or use a shorter voice sample" if pinned else ""),
    )


def fit(
    pinned: list[Prompt],
    context: list[Prompt],
    line: Prompt,
    frames: int,
    cfg: CsmConfig,
    older_audio: str = "full",
    keep_full_audio: int = 2,
    checked: bool = False,
) -> tuple[Prompt, Trim]:
    """Build the prompt `pinned + context + line`, dropping the oldest `context` segments until
    it and `frames` generated rows fit `cfg.max_seq_len`.

    `older_audio="codebook0"` (experimental) keeps only codebook 0 of the audio of every kept
    context segment except the newest `keep_full_audio`. Raises `ContextTooLong` if pinned +
    line + frames alone do not fit (`checked`: the caller has already checked that).
    """
    if older_audio not in OLDER_AUDIO_MODES:
        raise ValueError(f"older_audio must be one of {OLDER_AUDIO_MODES}, got {older_audio!r}")
    if not checked:
        check_line_fits(pinned, line, frames, cfg)
    window = cfg.max_seq_len
    fixed = sum(len(p) for p in pinned) + len(line)
    rows = [len(p) for p in context]
    total = fixed + frames + sum(rows)
    start = 0
    while total > window:  # drop oldest first
        total -= rows[start]
        start += 1
    kept = list(context[start:])
    trim = Trim(dropped=list(range(start)), dropped_rows=sum(rows[:start]), frames=frames, window=window)
    if older_audio == "codebook0":
        for i in range(max(0, len(kept) - keep_full_audio)):
            if audio_row_mask(kept[i], cfg).any():
                kept[i] = codebook0_only(kept[i], cfg)
                trim.reduced.append(start + i)
    prompt = concat([*pinned, *kept, line])
    trim.prompt_rows = len(prompt)
    return prompt, trim
