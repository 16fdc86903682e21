"""A conversation as prompt rows: pinned voices, turns, and the lines spoken into it.

`ConversationState` is what a live conversation knows apart from its socket: the voices pinned at
its head (their rows never dropped), every turn so far (the other party's text and audio, and
each line spoken here with the audio generated for it), and how a new line joins it:

- `say` makes the line (a streamed `Line` whose text may still arrive), in a registered voice
  that is pinned once the line is heard;
- `next_piece` plans the line's next piece after the turns and the pinned voices; when the
  pinned voices leave it no room, the oldest of them (never the line's own) is unpinned, and the
  turns dropped to make room are dropped for good (the next prefill is whole once, then the
  prefix matches again);
- `remember` makes the line a turn: every piece spoken, and of a piece cut off only the words
  heard (given by the caller, who knows what audio went out) with the frames sent;
- `add_turn` and `forget_unfittable` take the other party's turns, and forget those that can
  never fit the window again.

What happens that a client should hear of comes out as events (`VoiceUnpinned`, `ContextDropped`,
named and shaped as the WebSocket's), collected until `take_events`. Nothing here knows of sockets,
engines, tasks or time: the WebSocket adapter (server/conversation.py) runs the requests, sends
the audio and the events.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..engine.engine import EndReason
from ..model.config import CsmConfig
from ..model.context import ContextTooLong
from ..model.prompt import Prompt, TextTokenizer, concat, text_rows
from .line import Line
from .planner import PlannedPiece, spoken_rows
from .speech import SpeakOptions


@dataclass
class VoiceUnpinned:
    """A pinned voice left the head of the conversation to make room for a line."""

    voice: str
    rows: int
    pinned_rows: int  # the rows still pinned


@dataclass
class ContextDropped:
    """The oldest turns were dropped for good to make room."""

    dropped_turns: int
    dropped_rows: int
    remaining_rows: int  # the conversation's rows now


@dataclass
class Saying:
    """A line being spoken into the conversation."""

    line: Line
    voice: str | None = None  # the registered voice it speaks in, kept pinned once heard
    pin: Prompt | None = None  # that voice's rows while it is not pinned yet


class ConversationState:
    def __init__(self, cfg: CsmConfig):
        self.cfg = cfg
        self.pins: dict[str, Prompt] = {}  # voice name -> its rows, at the head of the conversation, oldest first
        self.turns: list[Prompt] = []
        self._configured: list[tuple[str, Prompt]] = []  # the voices `reset` pins again
        self._events: list = []

    @property
    def pinned(self) -> list[Prompt]:
        return list(self.pins.values())

    @property
    def pinned_voices(self) -> list[str]:
        return list(self.pins)

    def rows(self) -> int:
        return sum(map(len, self.pinned)) + sum(map(len, self.turns))

    def take_events(self) -> list:
        """What happened since the last call (`VoiceUnpinned`, `ContextDropped`), in order."""
        events, self._events = self._events, []
        return events

    # -- the conversation -----------------------------------------------------------------------

    def configure(self, voices: Sequence[tuple[str, Prompt]]) -> None:
        """A new conversation, with these voices (name, rows) pinned."""
        self._configured = list(voices)
        self.reset()

    def reset(self) -> None:
        """The conversation forgotten: no turns, and the configured voices pinned again (those
        pinned by speaking go with the conversation)."""
        self.pins = dict(self._configured)
        self.turns = []

    def add_turn(self, turn: Prompt) -> int:
        """Another party's turn joins the conversation; its index."""
        self.turns.append(turn)
        return len(self.turns) - 1

    def forget_unfittable(self) -> None:
        """Forget the oldest turns that can never fit the window again (the newest always stays)."""
        dropped, dropped_rows = 0, 0
        while len(self.turns) > 1 and self.rows() - len(self.turns[0]) >= self.cfg.max_seq_len:
            dropped_rows += len(self.turns.pop(0))
            dropped += 1
        if dropped:
            self._events.append(ContextDropped(dropped, dropped_rows, self.rows()))

    # -- a line ---------------------------------------------------------------------------------

    def say(self, text: str, speaker: int, tokenizer: TextTokenizer, options: SpeakOptions, seed: int | None = None, *,
            voice: str | None = None, pin: Prompt | None = None, final: bool = True, limit_ms: float | None = None,
            check: Callable[[str], str] | None = None) -> Saying:
        """A line (its text so far; more may follow unless `final`) in the registered `voice`, if
        any; `pin`: that voice's rows when it is not pinned yet, to join the head of the
        conversation once the line is heard. `check` passes each piece's text (a server's rules)."""
        line = Line(text, speaker, [], [], tokenizer, self.cfg, options, seed, streamed=True, final=final,
                    limit_ms=limit_ms, check=check, forget_dropped=True)
        return Saying(line, voice, None if voice in self.pins else pin)

    def next_piece(self, said: Saying) -> PlannedPiece | None:
        """The line's next piece (None: none now) after the conversation; raises `ContextTooLong`
        when it cannot fit even with every other voice unpinned (ValueError for text that cannot
        be spoken)."""
        line = said.line
        while True:
            line.pinned, line.context = self.pinned + ([said.pin] if said.pin is not None else []), self.turns
            try:
                planned = line.next()
                break
            except ContextTooLong:
                if not self._unpin_oldest(keep=said.voice):
                    raise
        if planned is not None and planned.trim.dropped:  # for good: the oldest turns (then the line's oldest pieces)
            self.turns = self.turns[len(planned.dropped_context):]
            self._events.append(ContextDropped(len(planned.trim.dropped), planned.trim.dropped_rows, self.rows()))
        return planned

    def _unpin_oldest(self, keep: str | None) -> bool:
        name = next((name for name in self.pins if name != keep), None)
        if name is None:
            return False
        rows = self.pins.pop(name)
        self._events.append(VoiceUnpinned(name, len(rows), sum(map(len, self.pins.values()))))
        return True

    def remember(self, said: Saying, heard: Sequence | None = None) -> None:
        """The line joins the conversation as one turn: the pieces spoken (or begun), with the
        audio generated for them; `heard`: the piece it stopped in was cut off, and these of its
        words (`normalize.Word`s) were heard, so its turn holds their spoken text (none heard:
        the piece is left out). The line's voice is pinned if any of it was heard."""
        line = said.line
        if line.in_flight is not None:  # cut off (or never begun): the codes it got are what was spoken
            line.end(EndReason.CANCELLED)
        if said.pin is not None and line.frames and said.voice not in self.pins:
            self.pins[said.voice] = said.pin
        pieces = list(line.spoken)
        if heard is not None and pieces:
            text = " ".join(w.spoken for w in heard)
            pieces[-1:] = [(text_rows(line.tokenizer, line.speaker, text, self.cfg), pieces[-1][1])] if heard else []
        rows = [spoken_rows(rows, codes, self.cfg) if codes else rows for rows, codes in pieces]
        if rows:
            self.turns.append(concat(rows))
