"""The assistant's side of one exchange: a user's transcript in, speakable pieces out.

`Assistant.turn(transcript)` adds the user's turn to the history, asks the model at once, and
returns a `Turn`. Iterating it gives the reply in the pieces a streamed line is spoken in
(`text.speech_pieces`: every sentence, a long sentence after a clause), each as soon as it is
complete, after the `Speakable` filter: the text to give the line (`append_text`), a piece at a
time. Fed to a line, they are cut into the same pieces again (`" ".join(pieces)` splits into
`pieces`), so the speaker can report what was heard of each piece by its index.

Asked early: `Assistant.ask(transcript)` asks the model before the user's turn is known to have
ended (at a pause), leaving the history as it is; `Assistant.turn(transcript, asked=that)` then
adds the turn and answers with the reply already on its way when it was asked with exactly the
messages the turn now gives (the same words after the same history), or asks anew.

Barge-in: `await turn.cancel()` (from any task) closes the model's stream; iteration ends.
Then `turn.finish(heard)` keeps in the history what was heard (`history.heard_text`: whole
pieces played, and the words of the cut piece its frames cover); `finish()` without it keeps
every piece. A model fault ends iteration with the `LLMError`, after the pieces completed
before it; `finish` still keeps what was heard of those.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Sequence

from ..speech.text import speech_pieces
from .history import HeardPiece, History
from .llm import LanguageModel, LLMError, Reply
from .speakable import Speakable

DEFAULT_MAX_REPLY_CHARS = 1000  # about a minute of speech
_ENDS = re.compile(r"[.!?…。！？,;:—–\-\n]")  # the marks `speech_pieces` may end a piece after


class PieceCutter:
    """The pieces of a reply whose filtered text (`speakable.text`) grows: `update` gives those
    that the new text completed."""

    def __init__(self, speakable: Speakable):
        self.speakable = speakable
        self.pieces: list[str] = []
        self._looked = 0  # how much of the text was cut last time

    def update(self, clean: str, final: bool) -> list[str]:
        """The pieces completed by `clean`, the filter's latest output (`final`: the reply ended)."""
        if not clean and not final:
            return []
        text = self.speakable.text
        # A piece ends at a mark (sentence, clause, paragraph), complete once what follows it came:
        # text with no mark since the last look completes none, and the whole reply need not be cut.
        if not final and not _ENDS.search(text, max(0, self._looked - 2)):
            return []
        self._looked = len(text)
        if not final and self.speakable.spaced:
            text += " "  # the filter holds a space back: a sentence before it is complete
        new = speech_pieces(text, final=final)[len(self.pieces):]
        self.pieces.extend(new)
        return new


class Turn:
    """One reply as it streams: `async for piece in turn` (see the module docstring).

    `reason` says why the reply ended: "stop" (the model finished), "length" (the reply bound or
    the model's token limit cut it), "interrupted" (`cancel`), "error" (`error` holds the fault);
    None while it runs. `first_token_at` and `first_piece_at` are `time.perf_counter()` stamps."""

    def __init__(self, reply: Reply, history: History, max_chars: int | None, messages: list[dict] | None = None):
        self.reply = reply
        self.history = history
        self.messages = messages  # what the model was asked
        self.speakable = Speakable(max_chars)
        self.cutter = PieceCutter(self.speakable)
        self.reason: str | None = None
        self.error: LLMError | None = None
        self.started_at = reply.started_at
        self.first_piece_at: float | None = None
        self._ready: list[str] = []
        self._finished = False

    @property
    def first_token_at(self) -> float | None:
        return self.reply.first_token_at

    @property
    def pieces(self) -> list[str]:
        """Every piece handed out (or ready to be), in order."""
        return self.cutter.pieces

    @property
    def text(self) -> str:
        """The spoken text of the reply so far (the pieces handed out)."""
        return " ".join(self.pieces)

    def __aiter__(self):
        return self

    async def __anext__(self) -> str:
        while not self._ready:
            if self.reason is not None:
                raise StopAsyncIteration
            try:
                delta = await self.reply.__anext__()
            except StopAsyncIteration:
                self._complete(self.speakable.finish(), final=True)
                self.reason = "interrupted" if self.reply.cancelled else \
                    "length" if self.reply.finish_reason == "length" else "stop"
                continue
            except LLMError as e:
                self.reason, self.error = "error", e
                raise
            except asyncio.CancelledError:  # the task speaking the reply was cancelled: so is the reply
                self.reason = self.reason or "interrupted"
                raise
            self._complete(self.speakable.feed(delta), final=False)
            if self.speakable.full:  # the reply bound is reached: the model's tokens are not wanted
                await self.reply.cancel()
                self._complete("", final=True)
                self.reason = "length"
        return self._ready.pop(0)

    def _complete(self, clean: str, final: bool) -> None:
        new = self.cutter.update(clean, final)
        if new and self.first_piece_at is None:
            self.first_piece_at = time.perf_counter()
        self._ready.extend(new)

    async def cancel(self) -> None:
        """Barge-in: stop the model's reply now; pieces not yet handed out are dropped."""
        self._ready.clear()
        if self.reason is None:
            self.reason = "interrupted"
        await self.reply.cancel()

    def finish(self, heard: Sequence[HeardPiece] | None = None) -> str:
        """Keep the reply in the history: `heard` (what the client got of each piece spoken, in
        order), or when None every piece handed out, whole. Returns the text kept; once only."""
        if self._finished:
            raise RuntimeError("this turn's reply is already in the history")
        self._finished = True
        if heard is None:
            heard = [HeardPiece(p, 1, 1) for p in self.pieces]
        return self.history.assistant_heard(heard)


class Assistant:
    """Answers a conversation's user turns with a language model (see the module docstring)."""

    def __init__(self, model: LanguageModel, history: History | None = None,
                 max_reply_chars: int | None = DEFAULT_MAX_REPLY_CHARS):
        self.model = model
        self.history = history if history is not None else History(model.config.system_prompt)
        self.max_reply_chars = max_reply_chars
        Speakable(max_reply_chars)  # refuses a bad bound here, not at the first turn

    def turn(self, transcript: str, asked: Turn | None = None) -> Turn:
        """Answer `transcript`: the user's turn joins the history and the model is asked now
        (the request is on its way when this returns; call it inside a running event loop), or
        `asked` is the answer when it was asked with the same messages (see the module docstring;
        otherwise the caller cancels it)."""
        _check(transcript)
        asyncio.get_running_loop()
        self.history.user(transcript)
        messages = self.history.messages()
        if asked is not None and asked.messages == messages and asked.reason is None:
            return asked
        return Turn(self.model.reply(messages), self.history, self.max_reply_chars, messages)

    def ask(self, transcript: str) -> Turn:
        """Ask the model about `transcript` now, as `turn` would, but leave the history as it is:
        the user may not have finished. Pass the result to `turn` if they have; cancel it if not."""
        _check(transcript)
        asyncio.get_running_loop()
        after = History(self.history.system_prompt, self.history.max_chars)
        after.turns = [dict(t) for t in self.history.turns]
        after.user(transcript)
        messages = after.messages()
        return Turn(self.model.reply(messages), self.history, self.max_reply_chars, messages)


def _check(transcript: str) -> None:
    if not isinstance(transcript, str) or not transcript.strip():
        raise ValueError("a user turn needs the words the user said (the transcript is empty)")
