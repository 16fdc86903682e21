"""The line driver: one spoken line, piece after piece, the loop every way of speaking runs.

    line = Line(text, speaker, pinned, context, tokenizer, cfg, options, seed)
    while (planned := line.next()) is not None:         # the next piece's Request
        for frame in run(planned.request):              # an engine, a scheduler: the caller's
            line.add(frame.codes)
        line.end(reason)                                # why the piece ended

`Generator.speak` / `stream`, `POST /v1/audio/speech` and a WebSocket conversation's lines are
each a short adapter over this loop; the line is the one place that knows

- **which piece is next**: a whole text is cut and checked up front (`planner.whole_pieces`:
  a text that cannot be spoken is refused before any of it is); a streamed one (`streamed=True`)
  grows by `append(fragment, final)` and is cut as it arrives (`planner.streamed_line`), so
  `next()` may have nothing to give yet (`waiting`) before the line is over (`done`);
- **what was spoken**: `spoken` holds (text rows, codes) of every piece that ended, in order,
  and each piece is planned after them (`planner.plan_piece`) with its seed (`seed + index`);
- **how the audio runs on**: a piece continues the codec state of the piece before it
  (`audio_after`), and keeps its own while another piece may follow (`keep_audio`);
- **what no longer fits**: what fitting drops is reported per piece (`PlannedPiece`, and the
  `Piece` records); a line that outlives its pieces' prompts (a conversation's, whose turns are
  dropped for good) sets `forget_dropped`, and earlier pieces once dropped stay dropped;
- **why it stopped**: a piece that ends without completing (cancelled, deadline, error) ends
  the line.

It knows nothing of engines, sockets, threads or time: it is pure, synchronous bookkeeping over
prompts, and the caller submits each request to whatever runs it and feeds the codes back.
`pinned` and `context` are attributes the caller may change between pieces (a conversation adds
turns, unpins voices and drops turns for good while a line is spoken).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence

from ..bounds import SEED
from ..engine.engine import EndReason, Request
from ..model.config import CsmConfig
from ..model.prompt import Prompt, TextTokenizer
from .planner import PieceText, PlannedPiece, piece_text, plan_piece, streamed_line, whole_pieces
from .speech import Piece, SpeakOptions


class Line:
    """One line to speak: its pieces, handed out one at a time, and what was spoken of them."""

    def __init__(self, text: str, speaker: int, pinned: Sequence[Prompt], context: Sequence[Prompt],
                 tokenizer: TextTokenizer, cfg: CsmConfig, options: SpeakOptions, seed: int | None = None, *,
                 streamed: bool = False, final: bool = True, limit_ms: float | None = None,
                 check: Callable[[str], str] | None = None, forget_dropped: bool = False):
        """`text` as `speaker` after the `pinned` rows (never dropped) and the `context` rows
        (oldest first, dropped oldest first when the window is short). A whole text (the default)
        is cut into packed pieces and checked at once: ValueError (or `ContextTooLong`) for one
        that cannot be spoken. `streamed`: the text is cut at every sentence as it arrives, and
        more of it may follow unless `final`; `check` passes each of its pieces (a server's input
        rules) before it is planned. `seed` None draws one; piece i uses seed + i. `limit_ms`:
        the largest bound a piece may ask (a server's)."""
        self.speaker, self.tokenizer, self.cfg, self.options = speaker, tokenizer, cfg, options
        self.pinned, self.context = list(pinned), list(context)
        self.seed = secrets.randbits(62) if seed is None else SEED.check(seed)
        self.forget_dropped = forget_dropped
        self.spoken: list[tuple[Prompt, list]] = []  # (text rows, codes) of the pieces that ended, oldest first
        self.pieces: list[Piece] = []  # one record per piece handed out, in order
        self.in_flight: PlannedPiece | None = None  # handed out by `next`, not ended yet
        self.frames = 0  # frames fed back, all pieces
        self.stopped: EndReason | None = None  # why a piece ended without completing: the line is over
        self._limit_ms, self._check = limit_ms, check
        self._after: Request | None = None  # the request of the piece before: the next one's audio continues it
        self._codes: list = []  # of the piece in flight
        self._forgotten = 0  # earlier pieces dropped for good (`forget_dropped`)
        if streamed:
            self._streamed = streamed_line()
            self._streamed.add(text, final)
            self._texts: list[PieceText] = []  # prepared as they are planned
            self._checked_rows = -1  # each is checked when it is planned
        else:
            if not final:
                raise ValueError("a whole text is final: use streamed=True for text that is still arriving")
            self._streamed = None
            self._length = len(text)
            self._texts = whole_pieces(text, speaker, self.pinned, tokenizer, cfg, options, limit_ms)
            self._checked_rows = _rows(self.pinned)  # each fits beside pinned rows up to this many

    # -- the text -------------------------------------------------------------------------------

    @property
    def texts(self) -> list[str]:
        """The written text of every piece known so far (a whole text's: all of them)."""
        return self._streamed.pieces if self._streamed is not None else [t.text for t in self._texts]

    @property
    def final(self) -> bool:
        """No more text can come."""
        return self._streamed is None or self._streamed.final

    @property
    def length(self) -> int:
        """Characters of text taken."""
        return self._streamed.length if self._streamed is not None else self._length

    @property
    def text_rows(self) -> int:
        """Rows of the text of the pieces prepared so far (a whole text's: all of them)."""
        return sum(len(t.line) for t in self._texts)

    def append(self, fragment: str, final: bool) -> None:
        """More text of a streamed line; `final`: the line is complete."""
        if self._streamed is None:
            raise ValueError("a whole text cannot grow: use streamed=True for text that arrives in fragments")
        self._streamed.add(fragment, final)

    # -- the pieces -----------------------------------------------------------------------------

    @property
    def done(self) -> bool:
        """Nothing more will be handed out: a piece stopped the line, or every piece of its
        complete text has ended."""
        return self.stopped is not None or (self.in_flight is None and self.final
                                            and len(self.pieces) >= len(self.texts))

    @property
    def waiting(self) -> bool:
        """The line goes on, but its text so far has no piece left to speak: more must come."""
        return not self.done and self.in_flight is None and len(self.pieces) >= len(self.texts)

    def next(self) -> PlannedPiece | None:
        """The next piece to submit, planned after the pieces spoken so far; None when there is
        none now (`waiting`) or will be none (`done`). Raises ValueError (`ContextTooLong`: it
        cannot fit the window beside the pinned rows) and leaves the line as it was, so a caller
        may change `pinned` and ask again."""
        if self.in_flight is not None:
            raise RuntimeError("the piece in flight has not ended: feed back its end (Line.end) first")
        index = len(self.pieces)
        if self.stopped is not None or index >= len(self.texts):
            return None
        text = self._prepare(index)
        planned = plan_piece(self.cfg, self.pinned, self.context, self.spoken, text, self.options.sampling,
                             self.seed + index, self.options, keep_audio=not self.final or index + 1 < len(self.texts),
                             audio_after=self._after, checked=_rows(self.pinned) <= self._checked_rows)
        dropped_pieces = [self._forgotten + i for i in planned.dropped_pieces]
        if self.forget_dropped and planned.dropped_pieces:
            forgotten = max(planned.dropped_pieces) + 1
            del self.spoken[:forgotten]
            self._forgotten += forgotten
        self.pieces.append(Piece(index, text.text, text.max_frames, len(planned.request.prompt), planned.trim,
                                 planned.dropped_context, dropped_pieces, planned.request.seed,
                                 spoken=text.spoken.text))
        self.in_flight, self._after, self._codes = planned, planned.request, []
        return planned

    def add(self, codes) -> None:
        """A frame of the piece in flight: its codes [K]."""
        if self.in_flight is None:
            raise RuntimeError("no piece is in flight: take one from Line.next first")
        self._codes.append(codes)
        self.pieces[-1].frames += 1
        self.frames += 1

    def end(self, reason: EndReason | str) -> None:
        """The piece in flight ended (`reason`); it joins `spoken` with the codes fed back, and
        a piece that did not complete (cancelled, deadline, error) ends the line."""
        if self.in_flight is None:
            raise RuntimeError("no piece is in flight: take one from Line.next first")
        reason = EndReason(reason)
        self.spoken.append((self.in_flight.line, self._codes))
        self.pieces[-1].reason = reason
        self.in_flight, self._codes = None, []
        if not reason.complete:
            self.stopped = reason

    def _prepare(self, index: int) -> PieceText:
        if index < len(self._texts):
            return self._texts[index]
        text = self.texts[index]
        if self._check is not None:
            text = self._check(text)
        prepared = piece_text(text, self.speaker, self.tokenizer, self.cfg, self.options, self._limit_ms)
        self._texts.append(prepared)  # (it is checked against the window as it is planned)
        return prepared


def _rows(prompts: Sequence[Prompt]) -> int:
    return sum(len(p) for p in prompts)
