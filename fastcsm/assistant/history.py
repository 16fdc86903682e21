"""The conversation as the language model sees it: a system prompt, then user and assistant turns.

An assistant turn holds what the user heard, not what the model wrote: its spoken text (see
`speakable`), and when the user cut in, only `heard_text` of its pieces. The estimate of how much
of the interrupted piece was heard comes from frames, since a piece's words are not aligned with
its audio:

    words heard = floor(frames the client received / frames of the piece * words of the piece)

A piece whose generation was cut too (its length in frames unknown) is measured against the
frames per word of the reply's fully played pieces, or without any against `FRAMES_PER_WORD`
(150 words a minute in 80 ms frames). Pieces after the interrupted one were not heard at all.
The cut is marked with a dash, so the model sees that it was interrupted ("The capital is —").

Turns are kept alternating, as some chat templates require: a turn that follows one of the same
role (a user who spoke twice while no reply was heard) is joined to it. An assistant turn of which
nothing was heard is not kept. The oldest exchanges go once the turns pass `max_chars` (the last
one stays whatever its length).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

FRAMES_PER_WORD = 5.0  # 150 words a minute is 0.4 s a word: five 80 ms frames
CUT = "—"


@dataclass(frozen=True)
class HeardPiece:
    """One spoken piece of a reply, as far as the client got it."""

    text: str
    frames_sent: int  # frames of its audio the client received
    frames: int | None  # the frames it has in all; None when its generation was cut before its end

    @property
    def complete(self) -> bool:
        return self.frames is not None and self.frames_sent >= self.frames


def heard_text(pieces: Sequence[HeardPiece], frames_per_word: float = FRAMES_PER_WORD) -> tuple[str, bool]:
    """The text of `pieces` the user heard, and whether it was cut (see the module docstring)."""
    heard: list[str] = []
    played_frames = played_words = 0
    for piece in pieces:
        words = piece.text.split()
        if piece.complete:
            heard.extend(words)
            played_frames += piece.frames
            played_words += len(words)
            continue
        if piece.frames:
            n = math.floor(piece.frames_sent / piece.frames * len(words))
        else:
            rate = played_frames / played_words if played_words else frames_per_word
            n = math.floor(piece.frames_sent / rate)
        heard.extend(words[:max(0, min(n, len(words)))])
        return " ".join(heard), True
    return " ".join(heard), False


class History:
    """The turns of one conversation, for the model (see the module docstring)."""

    def __init__(self, system_prompt: str = "", max_chars: int = 32_000):
        if max_chars < 1:
            raise ValueError(f"max_chars must be at least 1, got {max_chars!r}")
        self.system_prompt = system_prompt
        self.max_chars = max_chars
        self.turns: list[dict] = []

    def user(self, text: str) -> None:
        self._add("user", text)

    def assistant(self, text: str) -> None:
        self._add("assistant", text)

    def assistant_heard(self, pieces: Sequence[HeardPiece]) -> str:
        """Keep of a reply only what was heard (`heard_text`); the text kept."""
        text, cut = heard_text(pieces)
        if cut:
            text = f"{text} {CUT}" if text else ""
        self.assistant(text)
        return text

    def messages(self) -> list[dict]:
        """OpenAI chat messages: the system prompt (if any), then the turns (copies)."""
        head = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return head + [dict(t) for t in self.turns]

    def clear(self) -> None:
        self.turns.clear()

    def _add(self, role: str, text: str) -> None:
        text = " ".join(text.split())
        if not text:
            return
        if self.turns and self.turns[-1]["role"] == role:
            self.turns[-1]["content"] += " " + text
        else:
            self.turns.append({"role": role, "content": text})
        while len(self.turns) > 2 and sum(len(t["content"]) for t in self.turns) > self.max_chars:
            del self.turns[0]  # the oldest exchange, the user's turn and the reply: the last one stays
            if self.turns[0]["role"] == "assistant":
                del self.turns[0]
