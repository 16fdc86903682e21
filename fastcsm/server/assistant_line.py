"""A conversation's assistant: each user turn answered by the language model, spoken as one line.

`AssistantLine.answer(transcript)` asks the model (`assistant.Assistant`, the history in text)
and starts a task that speaks the reply through the conversation's own streamed line: the first
piece, as soon as the model completed it, is a `speak` with `more: true`, each later piece an
`append_text`, and the end of the reply the `append_text` of `more: false`. The line machinery
(planning, the engine, frames, `done`, the CSM context) is the conversation's; this module only
feeds it text and, as each piece's audio starts, tells the client its words (`assistant_text`).

Asked early (`preempt`, with `preemptive_reply`): when a spoken turn's transcript is ready at the
user's pause, before the silence has ended the turn, the model is asked at once; `answer` then
speaks that reply if the turn ended there (the same words after the same history), and closes
it otherwise, as it does when the user goes on (the next pause, `stop`, `reset`).

Barge-in (`stop`): the model's stream is closed, the line is stopped as `interrupt` stops any,
and the history keeps the written words the client got: those whose audio was sent, as the
line's `done.text` counts them from word times, or those of the first `heard_ms` when the client
says how much it played. A model fault is an `error` event; the pieces complete before it are
spoken, and the next turn is answered as usual. Every wait is on the event loop: a slow model
holds up its own reply, never another conversation's audio.

Nothing here knows of engines or sockets beyond the conversation's methods and events.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..assistant import Assistant, HeardPiece, LLMError, LLMStatusError, LLMStopped, LLMTimeout, LLMUnreachable, Turn
from . import protocol as P
from .service import ApiError

if TYPE_CHECKING:
    from .conversation import Conversation, Utterance

log = logging.getLogger("fastcsm")


def llm_error_code(e: LLMError) -> str:
    """The `error` event's code for a model fault."""
    return {LLMUnreachable: "llm_unreachable", LLMStatusError: "llm_error", LLMTimeout: "llm_timeout",
            LLMStopped: "llm_stopped"}.get(type(e), "llm_error")


@dataclass
class Answer:
    """One reply in flight: the model's turn, the line speaking it, the task feeding the line."""

    turn: Turn
    asked_at: float  # perf_counter of the user turn
    task: asyncio.Task | None = None
    line: Utterance | None = None
    stopped: bool = False  # barge-in: the task stops feeding, the line is stopped
    cut: bool = False  # ... before the model finished, or before the line was spoken whole
    heard_ms: float | None = None  # how much the client says it played, at barge-in
    first_audio_at: float | None = None

    def since_asked(self, at: float | None) -> float | None:
        """Milliseconds from the user turn to the perf_counter stamp `at` (None: not reached)."""
        return None if at is None else (at - self.asked_at) * 1000


class AssistantLine:
    """The assistant of one conversation (see the module docstring)."""

    def __init__(self, conv: Conversation, config: P.Configure):
        service = conv.service
        self.conv = conv
        self.assistant = Assistant(service.language_model(), max_reply_chars=service.settings.max_reply_chars)
        self.voice = config.assistant_voice
        self.speaker = None if config.assistant_voice is not None else config.assistant_speaker
        service.resolve_speaker(self.voice, self.speaker)  # an unknown voice is refused at `configure`
        self.user_speaker = config.user_speaker
        self.current: Answer | None = None
        self.asked: Turn | None = None  # a reply asked for at the user's pause (`preempt`)

    async def answer(self, transcript: str) -> None:
        """Answer the user's turn (just added to the conversation): a reply in flight is stopped
        first, and its spoken rows go before the user's turn, where they were heard."""
        conv = self.conv
        asked, self.asked = self.asked, None
        if self.current is not None:
            turns = conv.state.turns
            n = len(turns)
            await self.stop()
            if n and len(turns) == n + 1:
                turns[-2], turns[-1] = turns[-1], turns[-2]
        turn = self.assistant.turn(transcript, asked)
        if asked is not None and asked is not turn:
            await asked.cancel()
        a = Answer(turn, time.perf_counter())
        a.task = asyncio.create_task(self._speak(a))
        self.current = a

    async def preempt(self, transcript: str) -> None:
        """The user paused and `transcript` is their turn so far: ask the model now (see the module
        docstring). Not while a reply is in flight: answering the turn stops it, which changes the
        history the model would have been asked with."""
        await self.drop_asked()
        if self.current is None and transcript.strip():
            self.asked = self.assistant.ask(transcript)

    async def drop_asked(self) -> None:
        asked, self.asked = self.asked, None
        if asked is not None:
            await asked.cancel()

    async def stop(self, heard_ms: float | None = None) -> None:
        """Barge-in: close the model's stream, stop the line, keep what was heard; returns once
        the history has it (and `assistant_reply` was sent)."""
        await self.drop_asked()
        a, self.current = self.current, None
        if a is None:
            return
        a.stopped, a.heard_ms = True, heard_ms
        a.cut = a.turn.reason is None or a.line is None or not a.line.finished
        await a.turn.cancel()
        if a.line is not None and self.conv.current is a.line:
            await self.conv.stop_pump()
        await asyncio.wait([a.task])

    async def reset(self) -> None:
        await self.stop()
        self.assistant.history.clear()

    async def piece_audio(self, u: Utterance, index: int) -> None:
        """The first frame of piece `index` of line `u` is about to be sent: say its words."""
        a = self.current
        if a is None or a.line is not u:
            return
        if a.first_audio_at is None:
            a.first_audio_at = time.perf_counter()
        await self.conv.send(P.AssistantText(utterance=u.index, piece=index, text=u.line.texts[index]))

    # -- the task -------------------------------------------------------------------------------

    async def _speak(self, a: Answer) -> None:
        """Feed the reply's pieces to a streamed line, then keep in the history what was heard."""
        conv = self.conv
        try:
            try:
                async for piece in a.turn:
                    if a.stopped:
                        break
                    if a.line is None:
                        await conv.speak(P.Speak(text=piece + " ", more=True, voice=self.voice, speaker=self.speaker))
                        a.line = conv.current
                    elif conv.current is a.line:
                        await conv.append_text(P.AppendText(text=piece + " ", more=True))
                    if a.stopped or conv.current is not a.line:
                        break  # stopped meanwhile, or the line ended under the reply (an error event said why)
            except LLMError as e:
                await conv.error(str(e), llm_error_code(e))
            except ApiError as e:  # the line refused its first piece (a full queue, a line of the client's)
                await a.turn.cancel()
                await conv.error(e.message, P.error_code(e.status))
            line = a.line
            if line is not None and conv.current is line:
                if a.stopped:
                    await conv.stop_pump()
                elif line.more:
                    await conv.append_text(P.AppendText(text="", more=False))
            if line is not None and line.task is not None:
                await asyncio.wait([line.task])  # until its `done`
            kept = a.turn.finish(self._heard(a))
            reason = "interrupted" if a.cut else a.turn.reason or "stop"
            await conv.send(P.AssistantReply(
                utterance=line.index if line is not None else None, reason=reason, text=kept,
                first_token_ms=a.since_asked(a.turn.first_token_at),
                first_piece_ms=a.since_asked(a.turn.first_piece_at), first_audio_ms=a.since_asked(a.first_audio_at)))
        except Exception:  # the socket went away mid-send, or a bug: the reply ends, the conversation decides
            if not a.turn.reply.cancelled:
                await a.turn.cancel()
            log.debug("assistant reply ended early", exc_info=True)
        finally:
            if self.current is a:
                self.current = None

    def _heard(self, a: Answer) -> list[HeardPiece]:
        """What the client heard of the line, as the history takes it: the written words whose audio
        was sent (the line's `done.text`: every word of a whole piece, of a cut piece those begun in
        the audio sent, by their times), or, given `heard_ms`, those begun in that much audio (of a
        cut piece, in proportion to its audio played); marked cut when the reply went on past them."""
        u = a.line
        marker = [HeardPiece("", 0, None)]  # `heard_text` ends a reply here, cut
        if u is None:
            return marker if a.cut else []
        sent = u.words.heard_text
        n = len(sent)
        if a.heard_ms is not None:
            played_s, timed = a.heard_ms / 1000, u.words.words
            n = sum(1 for w in timed if w.start < played_s)
            timed_s = u.words.offset / u.words.sample_rate  # the audio of the whole pieces
            sent_s = u.frames * self.conv.service.cfg.frame_ms / 1000
            if n == len(timed) and sent_s > timed_s:  # into the cut piece
                n += math.floor((len(sent) - n) * min(1.0, max(0.0, played_s - timed_s) / (sent_s - timed_s)))
        heard = [HeardPiece(" ".join(sent[:n]), 1, 1)] if n else []
        return heard + marker if a.cut or n < len(sent) else heard
