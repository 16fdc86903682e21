"""One live conversation over a WebSocket: turns in, spoken lines out, barge-in.

The conversation itself (pinned voices, turns, each line spoken here with the audio generated
for it, what fitting drops and unpins) is a `speech.conversation.ConversationState`, which knows
nothing of sockets; this adapter parses messages, runs each piece of a line (`speech.line.Line`)
on the scheduler, sends its audio, and turns the state's events into the protocol's. A line is
spoken with `prefix_rows` = everything before it, so the engine keeps that prefix's KV and the
next line reuses it and prefills only what was added since. When the window would overflow,
the oldest turns are dropped for good (`context_dropped`), the new prefix no longer matches,
and what remains is prefilled again once.

One utterance at a time (a `speak` while one is in flight is an `error` event, code `busy`):
its frames are pumped to the socket by a task. `interrupt`, `reset`, `configure` and a closed
socket end it whatever its state (queued, prefilling or running): the stream is cancelled (the
engine slot or queue place is freed before the next frame step), the task is cancelled (no
frame of the utterance is sent after its `done`), and the `done` is sent even when the task had
not started yet. The `done` counts the rows of every piece submitted, from each piece's own End
(which the scheduler sends every stream, a cancelled one's within a step), so it waits for the
End of a piece cut off mid-prefill or mid-line.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
from pydantic import TypeAdapter, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.websockets import WebSocket, WebSocketDisconnect

from ..audio import resample
from ..listen.asr import SAMPLE_RATE as ASR_RATE, AsrBusy, AsrError
from ..listen.listener import Heard, Listener, ListenError, SpeechPaused, SpeechStarted
from ..model.prompt import Prompt, Segment, segment_rows
from ..speech.conversation import ContextDropped, ConversationState, Saying, VoiceUnpinned
from ..speech.line import Line
from ..speech.voices import is_speaker_id
from . import protocol as P
from .assistant_line import AssistantLine
from .audio_out import to_int16
from .limits import Pace, invalid_fields, json_values, max_message_values
from .scheduler import End
from .service import ApiError, Service
from .words import LineWords, word_events

log = logging.getLogger("fastcsm")
_CLIENT = TypeAdapter(P.ClientMessage)


@dataclass(frozen=True)
class Pause:
    """The turn's last pause, transcribed in case it ends the turn (`transcribe_early`): decoded
    whole, and live when the turn was transcribed as it was spoken (`transcribe_live`)."""

    event: SpeechPaused
    whole: Future | None  # of its Transcript, on the recogniser's thread
    live: Future | None  # of its live Transcript
    partial: asyncio.Task  # sends the soonest text as `user_transcript_partial`

    def transcript(self) -> Future:
        """The turn's transcript when this pause has ended it: the whole decode if it is already
        done (it hears better), else the live one, ready since soon after the pause."""
        whole = self.whole
        if self.live is None or (whole is not None and whole.done() and not whole.cancelled()
                                 and whole.exception() is None):
            return whole
        return self.live

    def cancel(self) -> None:
        for future in (self.whole, self.live):
            if future is not None:
                future.cancel()  # (not once it has begun: its text still comes as a partial transcript)


@dataclass
class Utterance:
    """The line in flight: its driver (the text so far, the pieces spoken and the one in flight),
    the streams submitted, the task pumping its frames."""

    id: str | None
    index: int
    said: Saying  # the line's driver, its voice and the rows to pin once it is heard
    fragments: int = 0  # append_text messages taken
    t0: float | None = None  # when the message that completed its first piece arrived
    task: asyncio.Task | None = None
    stream: object = None  # the stream of the piece being generated
    streams: list = field(default_factory=list)  # one per piece started: its request, and the End `done` sums
    error: str | None = None  # why it stopped, when it did not end normally
    stop: str = "interrupted"  # the `done` reason when it is stopped from outside
    wake: asyncio.Event = field(default_factory=asyncio.Event)  # set when text arrives
    finished: bool = False  # its `done` is decided (sent, or the socket is gone)
    words: LineWords = field(default_factory=lambda: LineWords(P.SAMPLE_RATE))  # word times, words heard
    timestamps: bool = False  # `word` events asked for

    @property
    def line(self) -> Line:
        return self.said.line

    @property
    def more(self) -> bool:
        """More text may follow (append_text)."""
        return not self.line.final

    @property
    def frames(self) -> int:
        return self.line.frames

    @property
    def speaker(self) -> int:
        return self.line.speaker


class Conversation:
    def __init__(self, ws: WebSocket, service: Service):
        self.ws = ws
        self.service = service
        self.config = P.Configure()
        self.state = ConversationState(service.cfg)  # turns, pinned voices
        self.utterances = 0
        self.current: Utterance | None = None
        self.assistant: AssistantLine | None = None  # assistant mode: answers the user's turns
        self._send_lock = asyncio.Lock()
        self.max_values = max_message_values(service.settings)
        self.pace = Pace(service.settings.max_messages_per_s)
        self.listener: Listener | None = None  # the user's microphone stream, once configured
        self.hearing: list[asyncio.Task] = []  # turns heard, being transcribed and added, in order
        self.paused: Pause | None = None

    # -- sending --------------------------------------------------------------------------------

    async def send(self, event) -> None:
        async with self._send_lock:
            await self.ws.send_text(event.model_dump_json())

    async def send_audio(self, pcm: np.ndarray) -> None:
        data = pcm.astype("<f4").tobytes() if self.config.audio_format == "pcm_f32le" else \
            to_int16(pcm)
        async with self._send_lock:
            await self.ws.send_bytes(data)

    async def error(self, message: str, code: str = "bad_request", id: str | None = None) -> None:
        await self.send(P.ErrorEvent(message=message, code=code, id=id))

    # -- the session ----------------------------------------------------------------------------

    async def run(self) -> None:
        await self.send(P.ReadyEvent(audio_format=self.config.audio_format,
                                     max_rows=self.service.cfg.max_seq_len))
        try:
            while True:
                msg = await self.ws.receive()
                if msg["type"] == "websocket.disconnect":
                    break
                if msg.get("text") is None:  # binary: the user's microphone audio
                    await self.dispatch(self.hear, msg.get("bytes") or b"")
                    continue
                text = msg["text"]
                if json_values(text) > self.max_values:  # bounds the cost of parsing it
                    await self.error(f"the message holds too many JSON values (at most {self.max_values}): send "
                                     "one command per message")
                    continue
                try:  # a large message (audio) is parsed off the event loop
                    command = _CLIENT.validate_json(text) if len(text) < 65536 else \
                        await run_in_threadpool(_CLIENT.validate_json, text)
                except ValidationError as e:
                    await self.error(_describe(e))
                    continue
                await self.dispatch(self.handle, command)
                # A socket's messages may be queued already (a flood): each waits its turn behind
                # the other sockets and streams, and past `max_messages_per_s` waits unread.
                await self.pace.wait()
        except WebSocketDisconnect:
            pass
        finally:
            if self.assistant is not None:
                await self.assistant.stop()
            self.stop_listening()
            await self.stop_pump()

    async def dispatch(self, handler, message) -> None:
        """`handler(message)`; its failure is an `error` event and the session goes on."""
        id = getattr(message, "id", None)
        try:
            await handler(message)
        except ApiError as e:
            await self.error(e.message, P.error_code(e.status), id)
        except (WebSocketDisconnect, asyncio.CancelledError):
            raise
        except Exception:  # a bug: say so, keep the session
            log.exception("conversation message %s failed", getattr(message, "type", "audio"))
            await self.error("internal error; the server log has the details", "internal", id)

    async def handle(self, command) -> None:
        if isinstance(command, P.Interrupt):
            if self.assistant is not None:
                await self.assistant.stop(command.heard_ms)
            await self.stop_pump()
        elif isinstance(command, P.Reset):
            if self.assistant is not None:
                await self.assistant.reset()
            await self.stop_pump()
            self.state.reset()
            self.stop_listening()  # a turn being heard or transcribed belonged to the conversation forgotten
            self.listener = self.new_listener(self.config)
        elif isinstance(command, P.Configure):
            if self.assistant is not None:
                await self.assistant.stop()
            await self.stop_pump()
            pinned = [await self.pin(name) for name in command.voices]
            self.assistant = AssistantLine(self, command) if command.assistant else None
            listener = self.new_listener(command)
            self.stop_listening()
            self.config, self.listener = command, listener
            self.state.configure(list(zip(command.voices, pinned, strict=True)))
            await self.send(P.ConfiguredEvent(voices=self.state.pinned_voices, audio_format=command.audio_format,
                                              pinned_rows=sum(map(len, self.state.pinned)),
                                              input_audio=command.input_audio))
        elif isinstance(command, P.AddTurn):
            await self.add_turn(command)
            if self.assistant is not None and command.speaker == self.assistant.user_speaker:
                await self.on_user_turn(command.text)
        elif isinstance(command, P.Speak):
            await self.speak(command)
        elif isinstance(command, P.AppendText):
            await self.append_text(command)

    async def pin(self, name: str) -> Prompt:
        voice = self.service.lookup(name)
        if isinstance(voice, int):
            raise ApiError(400, f"voice {name!r} is speaker id {voice} without a recording: there is nothing to pin; "
                                "speak with it directly", param="voices")
        return self.service.voice_rows(voice)

    async def add_turn(self, m: P.AddTurn) -> None:
        svc = self.service
        svc.need_ready()
        text = svc.check_input(m.text, "text") if m.text is not None else None
        if text is None:
            if m.audio is None:
                raise ApiError(400, "add_turn needs text, audio, or both (audio alone is transcribed)", param="text")
            svc.need_asr("text")  # before any decoding: without a recogniser the text is required

        def rows():
            nonlocal text
            audio = svc.audio_b64(m.audio, "audio") if m.audio is not None else None
            if text is None:
                text = svc.transcribe(resample(audio.numpy(), P.SAMPLE_RATE, ASR_RATE), param="audio").text
                if not text:
                    raise ApiError(400, "no speech was recognised in the turn's audio: send its text", param="text")
            return self.turn_rows(Segment(m.speaker, text, audio=audio))

        turn = await run_in_threadpool(rows)
        await self.append_turn(turn, m.speaker, text=None if m.text is not None else text)

    def turn_rows(self, segment: Segment) -> Prompt:
        """A turn's rows (its audio encoded, unless it brings its codes): call off the event loop."""
        gen = self.service.generator
        try:
            return segment_rows(segment, gen.tokenizer, gen.cfg, gen.codec.encode_waveform)
        except ValueError as e:
            raise ApiError(400, str(e)) from None

    async def append_turn(self, turn: Prompt, speaker: int, text: str | None = None) -> None:
        """Another party's turn joins the conversation (`text`: its transcript, when it was made here)."""
        index = self.state.add_turn(turn)
        await self.send(P.TurnAdded(index=index, speaker=speaker, rows=len(turn), conversation_rows=self.state.rows(),
                                    text=text))
        self.state.forget_unfittable()  # turns that can never fit the window again are not kept in memory
        await self.send_events()

    async def send_events(self) -> None:
        """What the conversation's state did (voices unpinned, turns dropped), as events."""
        for e in self.state.take_events():
            await self.send(_EVENTS[type(e)](**vars(e)))

    # -- listening ------------------------------------------------------------------------------

    def new_listener(self, config: P.Configure) -> Listener | None:
        """The microphone stream `config.input_audio` declares (None: the client sends no audio). It
        keeps what the recogniser adapted to in the one before: the microphone and voice are the same."""
        audio = config.input_audio
        if audio is None:
            return None
        listener = self.service.listener(audio.sample_rate, audio.language)
        if self.listener is not None:
            listener.adapted = self.listener.adapted
        return listener

    async def hear(self, pcm: bytes) -> None:
        """A binary message: the next chunk of the user's microphone audio. The listener runs off
        the event loop, one chunk at a time (the socket is not read meanwhile, so a client that
        sends faster than it is heard waits, holding nothing here)."""
        listener = self.listener
        if listener is None:
            raise ApiError(400, "binary messages are the user's microphone audio: first send a configure with "
                                '"input_audio": {"sample_rate": 16000} (16-bit mono little-endian PCM at that rate)',
                           param="input_audio")
        try:
            events = await run_in_threadpool(listener.feed, pcm)
        except ListenError as e:
            raise ApiError(400, str(e), param="input_audio") from None
        for e in events:
            if listener is not self.listener:  # reset or configured meanwhile
                return
            if isinstance(e, SpeechStarted):
                await self.send(P.UserSpeechStarted(at_ms=e.at_ms))
                if self.config.barge_in:
                    await self.handle(P.Interrupt())  # exactly as `interrupt` (an assistant's reply too)
            elif isinstance(e, SpeechPaused):
                self.transcribe_pause(listener, e)
            else:
                await self.send(P.UserSpeechStopped(at_ms=e.at_ms, cut=e.heard.cut))
                await self.transcribe_turn(listener, e.heard)

    async def transcribe_turn(self, listener: Listener, heard: Heard) -> None:
        """Transcribe a heard turn on the recogniser's thread, then add it: a task per turn, each
        after the one before (turns join in the order they were spoken), at most
        `MAX_HEARD_TURNS` waiting per socket."""
        self.hearing = [t for t in self.hearing if not t.done()]
        if len(self.hearing) >= MAX_HEARD_TURNS:
            raise ApiError(503, f"{len(self.hearing)} of the user's turns are still being transcribed; this one "
                                "was dropped")
        paused, self.paused, made = self.paused, None, None
        if paused is not None and paused.event.ends(heard):  # transcribed at the pause that ended it
            future, made = paused.transcript(), functools.partial(listener.transcribe, heard)
        elif heard.live is not None:  # transcribed as it was spoken
            self.drop_pause(paused)
            future, made = heard.live, functools.partial(listener.transcribe, heard)
        else:
            self.drop_pause(paused)
            try:
                future = self.service.asr.submit(listener.transcribe, heard)
            except AsrBusy as e:
                raise ApiError(503, f"{e}; the user's turn was dropped") from None
        before = self.hearing[-1] if self.hearing else None
        self.hearing.append(asyncio.create_task(self.user_turn(future, before, made)))

    def transcribe_pause(self, listener: Listener, pause: SpeechPaused) -> None:
        """Transcribe the turn as it is at a pause, in case the pause ends it (`transcribe_early`);
        its text is sent as `user_transcript_partial` if it comes before the turn stops."""
        if not self.service.settings.transcribe_early:
            return
        self.drop_pause(self.paused)
        self.paused = None
        try:
            whole = self.service.asr.transcribe(pause.audio_16k, listener.language)
        except AsrBusy:  # the turn is transcribed once it stops (or live), as without early transcripts
            whole = None
        soonest = pause.live or whole
        if soonest is not None:
            self.paused = Pause(pause, whole, pause.live, asyncio.create_task(self.partial_transcript(pause, soonest)))

    @staticmethod
    def drop_pause(paused: Pause | None) -> None:
        if paused is not None:
            paused.cancel()

    async def partial_transcript(self, pause: SpeechPaused, future) -> None:
        try:
            text = (await asyncio.wrap_future(future)).text.strip()
            newest = self.paused is not None and self.paused.event is pause  # the turn's pause, going on
            if text and newest:
                if self.assistant is not None and self.service.settings.preemptive_reply:
                    await self.assistant.preempt(text)  # (before the event: a client that has it knows the ask is out)
                await self.send(P.UserTranscriptPartial(text=text))
        except Exception:  # the turn's own transcription says what failed; a closed socket hears nothing
            pass

    async def user_turn(self, future, before: asyncio.Task | None, made=None) -> None:
        try:
            if before is not None:
                await asyncio.wait([before])
            turn = await asyncio.wrap_future(future)
            if made is not None:  # the transcript of the pause that ended the turn
                turn = made(turn)
            text, heard, speaker = turn.text.strip(), turn.heard, self.config.user_speaker
            if text:  # the codes encoded as the user spoke: the same rows as an add_turn with this audio
                rows = await run_in_threadpool(self.turn_rows, Segment(speaker, text, codes=heard.codes))
                await self.append_turn(rows, speaker, text=text)
            frames = 0 if heard.codes is None else len(heard.codes)
            await self.send(P.UserTurn(text=text, speaker=speaker, audio_ms=round(heard.end_ms - heard.start_ms, 3),
                                       frames=frames, cut=heard.cut, added=bool(text)))
            if text:
                await self.on_user_turn(text)
            elif self.assistant is not None:
                await self.assistant.drop_asked()  # a reply asked at a pause of a turn with no words
        except asyncio.CancelledError:
            future.cancel()
            raise
        except ApiError as e:
            await self.error(f"the user's turn was not added: {e.message}", P.error_code(e.status))
        except AsrError as e:
            await self.error(f"the user's turn could not be transcribed: {e}")
        except WebSocketDisconnect:
            pass
        except Exception:
            log.exception("a heard turn failed")
            await self.error("internal error; the server log has the details", "internal")

    async def on_user_turn(self, text: str) -> None:
        """The user's turn `text` was just added to the conversation: in assistant mode, answer it
        (a reply in flight is stopped first, as barge-in)."""
        if self.assistant is not None:
            await self.assistant.answer(text)

    def stop_listening(self) -> None:
        """Drop the turns being transcribed (a reset, a new configure, the socket closing)."""
        for task in self.hearing:
            task.cancel()
        self.hearing = []
        self.drop_pause(self.paused)
        self.paused = None

    async def speak(self, m: P.Speak) -> None:
        svc = self.service
        svc.need_ready()
        if self.current is not None and not self.current.finished:
            raise ApiError(409, "a line is being spoken: wait for its done event, or interrupt it first")
        now = time.perf_counter()
        text = m.text if m.more else svc.check_input(m.text, "text")
        self.check_length(len(text))
        voice, pin = None, None
        if m.voice is not None and not is_speaker_id(m.voice):
            # A voice not pinned yet joins the head of the conversation once the line is heard (the
            # next prefill is whole); a name of the voice map that stands for a bare speaker id has
            # nothing to pin.
            found = svc.lookup(m.voice)
            if not isinstance(found, int):
                voice = m.voice
                if voice not in self.state.pins:
                    pin = svc.voice_rows(found)
        speaker, _ = svc.resolve_speaker(m.voice, m.speaker)
        c = self.config
        # A bound above the server's limit is refused now, not per piece.
        options = svc.options(m.max_audio_length_ms if m.max_audio_length_ms is not None else c.max_audio_length_ms,
                              c.temperature if m.temperature is None else m.temperature,
                              c.topk if m.topk is None else m.topk, m.normalize, m.lexicon)
        said = self.state.say(text, speaker, svc.generator.tokenizer, options, m.seed, voice=voice, pin=pin,
                              final=not m.more, limit_ms=svc.settings.max_audio_length_ms,
                              check=lambda t: svc.check_input(t, "text"))
        u = Utterance(m.id, self.utterances, said, timestamps=m.timestamps)
        self.mark(u, now)
        first = None
        if u.line.texts:
            first = await self.plan_piece(u)  # a line that cannot be spoken is an error here, not a `done`
        elif not u.more:
            raise ApiError(400, "text has no words to speak", param="text")
        # From here on the utterance is `current` before anything awaits, so an interrupt or a
        # closed socket always finds it, whatever state it is in.
        self.current = u
        self.utterances += 1
        if first is not None:
            try:
                await self.start_piece(u, first)
            except ApiError:  # refused (a full queue): the error event answers the speak, no line is left open
                self.current, u.finished = None, True
                self.utterances -= 1
                raise
        if self.current is u and not u.finished:
            u.task = asyncio.create_task(self.play(u))

    async def append_text(self, m: P.AppendText) -> None:
        u = self.current
        if u is None or u.finished or not u.more:
            raise ApiError(400, "append_text continues a line begun with speak and more: true, and no such line is "
                                "open (it was completed, interrupted, or never begun)", param="text")
        limit = self.service.settings.max_line_fragments
        if u.fragments >= limit:  # the line ends: a client that floods fragments gets nothing more from it
            message = (f"the line has had {limit} append_text messages, the most this server takes for one line, "
                       "so it was ended; send longer fragments, or complete lines sooner")
            await self.error(message, id=u.id)
            await self.stop_pump("error", message)
            return
        self.check_length(u.line.length + len(m.text))
        u.fragments += 1
        u.line.append(m.text, final=not m.more)
        if m.text or not m.more:  # (an empty fragment brings nothing: it keeps no line alive)
            self.mark(u, time.perf_counter())
            u.wake.set()

    def check_length(self, chars: int) -> None:
        limit = self.service.settings.max_line_chars
        if chars > limit:
            raise ApiError(400, f"the line has {chars} characters; this server speaks at most {limit} in one "
                                "line: complete it (more: false) and go on in the next", param="text")

    @staticmethod
    def mark(u: Utterance, now: float) -> None:
        """First audio is timed from the message that completed the line's first piece."""
        if u.t0 is None and u.line.texts:
            u.t0 = now

    async def plan_piece(self, u: Utterance):
        """The line's next piece (None: none now), as `ConversationState.next_piece` plans it;
        the voices it unpinned and the turns it dropped are said."""
        try:
            planned = self.state.next_piece(u.said)
        except ValueError as e:  # ContextTooLong too
            raise ApiError(400, str(e), param="text") from None
        finally:
            await self.send_events()
        if planned is not None:
            u.words.start(planned.text.spoken.words)
        return planned

    async def start_piece(self, u: Utterance, planned) -> None:
        u.stream = self.service.submit(planned.request, follow_on=bool(u.streams))
        u.streams.append(u.stream)
        if len(u.streams) == 1:
            bound = planned.request.max_frames
            await self.send(P.Started(id=u.id, utterance=u.index, speaker=u.speaker,
                                      prompt_rows=len(planned.request.prompt), first_piece_max_frames=bound,
                                      max_frames=bound))

    async def play(self, u: Utterance) -> None:
        """Speak the line piece by piece as its text arrives, sending frames as they come; always
        ends with its `done`."""
        reason = "error"
        try:
            while True:
                if u.line.in_flight is not None:
                    end = await self.pump(u)
                    reason = P.done_reason(end.reason)
                    if not end.reason.complete:
                        break
                if not await self.text_for(u):
                    reason = "deadline"
                    break
                if (planned := await self.plan_piece(u)) is None:  # the line is complete
                    if not u.line.pieces:
                        await self.error("the line has no words to speak", "bad_request", u.id)
                    break
                await self.start_piece(u, planned)
        except asyncio.CancelledError:
            reason = u.stop
            if u.stream is not None:
                u.stream.cancel()
        except ApiError as e:  # a later piece cannot be spoken (too long for the window, say)
            u.error = e.message
            await self.error(e.message, P.error_code(e.status), u.id)
            reason = "error"
        except Exception:  # the socket went away mid-send
            if u.stream is not None:
                u.stream.cancel()
            reason = "error"
        await self.finish(u, reason)

    async def pump(self, u: Utterance) -> End:
        """Send the frames of the piece in flight as they come; its End (an error is said)."""
        index = len(u.line.pieces) - 1
        while not isinstance(item := await u.stream.next(), End):
            u.line.add(item.codes)
            if u.line.pieces[index].frames == 1 and self.assistant is not None:
                await self.assistant.piece_audio(u, index)
            if item.pcm is not None:  # once handed to the socket, sent whole and counted
                await asyncio.shield(self.send_audio(item.pcm))  # (an interrupt may come mid-drain)
                u.words.audio(item.pcm)
            if u.frames == 1:
                await self.send(P.FirstAudio(id=u.id, utterance=u.index, ms=(time.perf_counter() - u.t0) * 1000))
        u.line.end(item.reason)
        if item.reason.complete:  # the piece's audio is whole: its words are timed
            timed = u.words.done()
            for event in word_events(u.id, u.index, timed) if u.timestamps else ():
                await self.send(event)
        elif item.reason in ("error", "deadline"):
            u.error = item.message or "generation failed"
            if item.reason == "error":
                await self.error(u.error, "internal", u.id)
        return item

    async def text_for(self, u: Utterance) -> bool:
        """Wait while the line needs more text; False when none came in `line_idle_timeout_s`
        (an error event says so)."""
        idle = self.service.settings.line_idle_timeout_s
        while u.line.waiting:
            u.wake.clear()
            try:
                await asyncio.wait_for(u.wake.wait(), idle)
            except TimeoutError:
                u.error = (f"no text came for this line in {idle:g} s, so it was ended (the server's "
                           "line_idle_timeout_s); complete a streamed line with an append_text of more: false")
                await self.error(u.error, "timeout", u.id)
                return False
        return True

    async def finish(self, u: Utterance, reason: str) -> None:
        """Remember the line (cut where it stopped) and send its `done`, once, counting the rows
        of every piece submitted (interrupted or not) once each."""
        if u.finished:
            return
        u.finished = True
        self.remember(u)
        ends = [await stream.wait_end() for stream in u.streams]  # at once, but for a piece just cancelled
        try:
            await self.send(P.Done(id=u.id, utterance=u.index, reason=reason, frames=u.frames,
                                   audio_ms=u.frames * self.service.cfg.frame_ms,
                                   prefill_rows=sum(e.prefill_rows for e in ends),
                                   reused_rows=sum(e.reused_rows for e in ends), pieces=len(u.streams),
                                   error=u.error if reason in ("error", "deadline") else None,
                                   text=" ".join(u.words.heard_text)))
        except Exception:
            pass

    def remember(self, u: Utterance) -> None:
        """The line joins the conversation (`ConversationState.remember`): of a piece cut off, only
        the words whose audio was begun in what was sent."""
        self.state.remember(u.said, u.words.cut() if u.words.in_flight else None)

    async def stop_pump(self, reason: str = "interrupted", error: str | None = None) -> None:
        """End the utterance in flight (waiting for text, queued, prefilling or running) and send its
        `done`, with `reason` (and `error`, the message of the error event sent before it)."""
        u, self.current = self.current, None
        if u is None or u.finished:
            return
        u.stop, u.error = reason, error or u.error
        if u.stream is not None:
            u.stream.cancel()  # its slot (or queue place) is freed before the next frame step
        if u.task is not None and not u.task.done():
            u.task.cancel()
            try:
                await u.task
            except asyncio.CancelledError:
                pass
        # A task cancelled before its first step never ran its body: its `done` is sent here.
        await self.finish(u, reason)


_EVENTS = {VoiceUnpinned: P.VoiceUnpinned, ContextDropped: P.ContextDropped}
MAX_HEARD_TURNS = 4  # a socket's turns waiting for their transcript (each at most max_turn_s of audio)
_COMMANDS = ("configure", "add_turn", "speak", "append_text", "interrupt", "reset")


def _describe(e: ValidationError) -> str:
    errors = e.errors(include_url=False)
    for err in errors:
        if err.get("type") == "json_invalid":
            return f"the message is not valid JSON ({err.get('msg')}); send one JSON object per text message"
        if err.get("type") == "union_tag_invalid":
            tag = json.dumps(err["input"].get("type")) if isinstance(err.get("input"), dict) else "?"
            return f'unknown message type {tag}: the types are {", ".join(_COMMANDS)}'
        if err.get("type") == "union_tag_not_found":
            return f'the message needs a "type": one of {", ".join(_COMMANDS)}'
    return "invalid message: " + invalid_fields(errors, skip=_COMMANDS, limit=3)[0]
