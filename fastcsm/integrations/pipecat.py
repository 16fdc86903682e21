"""Pipecat: `FastCSMTTSService`, a WebSocket TTS service over fastcsm's `/v1/conversations`.

    from fastcsm.integrations.pipecat import FastCSMTTSService
    tts = FastCSMTTSService(url="ws://127.0.0.1:8000", voice="0")      # in a Pipeline, after the LLM

One socket stays open for the whole session, and with it the conversation (and its KV cache)
on the server. Each turn of the bot is one utterance: its first text aggregate opens it with
`speak` (`more: true`), the next ones follow with `append_text`, and the end of the LLM's reply
completes it (`append_text` with `more: false`), so the server starts speaking after the first
sentence and carries the audio on from piece to piece. Audio comes back as `TTSAudioRawFrame`s
of 24 kHz mono 16-bit PCM, one per 80 ms frame, as they are generated. On an interruption the
service sends `interrupt` and keeps the socket: the spoken part of the line (cut where it
stopped) stays in the conversation. The user's turns go in with `add_turn`, so the bot's next
line answers them, in the user's own voice: the service keeps the user's audio of each turn (the
`InputAudioRawFrame`s from just before `UserStartedSpeakingFrame` to `UserStoppedSpeakingFrame`)
and sends it with the turn's transcript (the `TranscriptionFrame`s that reach the service, or
`add_user_turn(text)`). A turn whose transcript never reaches the service (Pipecat's user
aggregator keeps them) goes in as audio alone before the bot's next line, and the server's
speech recognition (`--asr-model`) transcribes it.
The server's `word` events become Pipecat's word timestamps (`add_word_timestamps`, as its
Cartesia and ElevenLabs services do): each written word goes downstream as a `TTSTextFrame` whose
`pts` is its start in the line's audio, so the assistant's context keeps the words played.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator

try:
    from pipecat.frames.frames import (
        ErrorFrame,
        Frame,
        InputAudioRawFrame,
        StartFrame,
        TranscriptionFrame,
        TTSAudioRawFrame,
        TTSStoppedFrame,
        UserStartedSpeakingFrame,
        UserStoppedSpeakingFrame,
    )
    from pipecat.processors.frame_processor import FrameDirection
    from pipecat.services.settings import TTSSettings
    from pipecat.services.tts_service import WebsocketTTSService
except ImportError as e:  # pragma: no cover - the extra is missing
    raise ImportError(f"fastcsm.integrations.pipecat needs Pipecat ({e.name} is missing): "
                      "pip install \"fastcsm[pipecat]\"") from e

from ..server.urls import conversation_url  # noqa: E402
from .hearing import UserAudio, user_turn  # noqa: E402

SAMPLE_RATE = 24_000


class FastCSMTTSService(WebsocketTTSService):
    """Speaks the bot's turns with a `fastcsm serve` over its conversation WebSocket.

    url: the server (`http://`, `https://`, `ws://` or `wss://`, with or without the path).
    voice: a registered voice, one of OpenAI's names, or a speaker id such as "0".
    api_key: the server's key, if it has one.
    user_speaker: the speaker id the user's turns go in under (default 1; the bot is its voice's).
    user_audio: send the user's audio of each turn with it (default), so the bot hears the user.
    seed, temperature, topk, max_audio_length_ms: as in a `speak` message (per piece of a line).
    """

    def __init__(self, *, url: str = "ws://127.0.0.1:8000", voice: str = "0", api_key: str | None = None,
                 user_speaker: int = 1, user_audio: bool = True, seed: int | None = None,
                 temperature: float | None = None, topk: int | None = None,
                 max_audio_length_ms: float | None = None, **kwargs):
        kwargs.setdefault("settings", TTSSettings(model="csm", voice=voice, language=None))
        super().__init__(sample_rate=SAMPLE_RATE, push_start_frame=True, push_stop_frames=True,
                         push_text_frames=False, **kwargs)
        self._url = conversation_url(url)
        self._voice = voice
        self._api_key = api_key
        self._user_speaker = user_speaker
        self._speak_options = {k: v for k, v in {"seed": seed, "temperature": temperature, "topk": topk,
                                                 "max_audio_length_ms": max_audio_length_ms}.items()
                               if v is not None}
        self._receive_task = None
        self._open: str | None = None  # the context whose line is open on the server (more text may follow)
        self._playing: str | None = None  # the context whose audio is arriving (until its done)
        self._idle = asyncio.Event()  # no utterance in flight on the server
        self._idle.set()
        self._last_text = ""
        self._hearing = UserAudio() if user_audio else None

    def can_generate_metrics(self) -> bool:
        return True

    # -- connection -----------------------------------------------------------------------------

    async def start(self, frame: StartFrame):
        await super().start(frame)
        await self._connect()

    async def _connect(self):
        await super()._connect()
        await self._connect_websocket()
        if self._websocket and not self._receive_task:
            self._receive_task = self.create_task(self._receive_task_handler(self._report_error))

    async def _disconnect(self):
        await super()._disconnect()
        if self._receive_task:
            await self.cancel_task(self._receive_task)
            self._receive_task = None
        await self._disconnect_websocket()

    async def _connect_websocket(self):
        try:
            if self._websocket and self._websocket.state.name == "OPEN":
                return
            headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else None
            self._websocket = await self._websocket_connect(self._url, additional_headers=headers)
            ready = json.loads(await self._websocket.recv())
            if ready.get("type") != "ready":
                raise ConnectionError(f"fastcsm did not say ready: {ready}")
            self._open = self._playing = None
            self._idle.set()
            await self._call_event_handler("on_connected")
        except Exception as e:
            self._websocket = None
            await self.push_error(error_msg=f"fastcsm: cannot connect to {self._url}: {e}", exception=e)
            await self._call_event_handler("on_connection_error", f"{e}")

    async def _disconnect_websocket(self):
        try:
            await self.stop_all_metrics()
            if self._websocket:
                await self._websocket.close()
        finally:
            self._websocket = None
            self._open = self._playing = None
            self._idle.set()
            await self._call_event_handler("on_disconnected")

    def _get_websocket(self):
        if self._websocket:
            return self._websocket
        raise Exception("fastcsm: the WebSocket is not connected")

    async def _send(self, message: dict) -> None:
        await self._get_websocket().send(json.dumps(message))

    # -- the conversation -----------------------------------------------------------------------

    async def add_user_turn(self, text: str, speaker: int | None = None) -> None:
        """The user's words join the conversation (with the audio of their turn, when the service
        heard it), so the bot's next line follows them."""
        if not text.strip():
            return
        if self._hearing is not None and self._hearing.speaking:  # the turn's audio is not complete yet
            self._hearing.texts.append(text)
            return
        await self._send_user_turn(text, speaker)

    async def _send_user_turn(self, text: str | None, speaker: int | None = None) -> None:
        """An `add_turn` of the user's text and the audio heard since the last one (either may be
        missing, not both: audio alone is transcribed by the server)."""
        message = user_turn(self._user_speaker if speaker is None else speaker, text, self._hearing)
        if self._websocket and message is not None:
            await self._send(message)

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        hearing = self._hearing
        if isinstance(frame, InputAudioRawFrame):
            if hearing is not None:
                hearing.add(frame.audio, frame.sample_rate, frame.num_channels)
        elif isinstance(frame, UserStartedSpeakingFrame):
            if hearing is not None:
                hearing.start()
        elif isinstance(frame, UserStoppedSpeakingFrame):
            if hearing is not None and hearing.speaking:
                hearing.stop()
                if hearing.texts:  # its transcript came while the user spoke
                    await self._send_user_turn(" ".join(hearing.texts))
        elif isinstance(frame, TranscriptionFrame):
            await self.add_user_turn(frame.text)
        await super().process_frame(frame, direction)

    async def run_tts(self, text: str, context_id: str) -> AsyncGenerator[Frame | None, None]:
        """The next aggregate of the bot's turn: opens the line, or continues it."""
        try:
            if not self._websocket:
                await self._connect()
            if self._open == context_id:
                joiner = "" if not self._last_text or self._last_text[-1].isspace() or text[:1].isspace() else " "
                await self._send({"type": "append_text", "text": joiner + text, "more": True})
            else:
                # One line in flight per conversation: the line before (completed) finishes first.
                await asyncio.wait_for(self._idle.wait(), 600)
                if self._hearing is not None and self._hearing.heard:  # a turn heard, its text not seen here
                    await self._send_user_turn(None)
                self._idle.clear()
                self._open = self._playing = context_id
                await self._send({"type": "speak", "text": text, "voice": self._voice, "id": context_id,
                                  "more": True, "timestamps": True, **self._speak_options})
            self._last_text = text
            await self.start_tts_usage_metrics(text)
            yield None  # the audio comes through the receive task
        except Exception as e:
            yield ErrorFrame(error=f"fastcsm: {e}")

    async def flush_audio(self, context_id: str | None = None):
        """The end of the bot's turn: the line is complete."""
        context_id = context_id or self._open
        if context_id is None or context_id != self._open or not self._websocket:
            return
        self._open = None
        await self._send({"type": "append_text", "text": "", "more": False})

    async def _handle_interruption(self, frame, direction: FrameDirection):
        """Barge-in: stop the line on the server, keep the socket and the conversation."""
        await super()._handle_interruption(frame, direction)
        if self._websocket and self._playing is not None:
            self._open = None
            try:
                await self._send({"type": "interrupt"})
            except Exception:
                pass
        await self.stop_all_metrics()

    async def _end_line(self, ctx: str | None) -> None:
        if ctx is not None and self.audio_context_available(ctx):
            await self.append_to_audio_context(ctx, TTSStoppedFrame(context_id=ctx))
            await self.remove_audio_context(ctx)
        if self._open == ctx:
            self._open = None
        if self._playing not in (None, ctx):
            return  # a late end of an earlier line (its error came first): the line playing now goes on
        self._playing = None
        self._idle.set()
        await self.stop_all_metrics()

    async def _receive_messages(self):
        async for message in self._get_websocket():
            ctx = self._playing
            if isinstance(message, bytes):
                if ctx is not None and self.audio_context_available(ctx):
                    await self.stop_ttfb_metrics()
                    await self.append_to_audio_context(ctx, TTSAudioRawFrame(message, SAMPLE_RATE, 1, context_id=ctx))
                continue
            event = json.loads(message)
            kind = event.get("type")
            if kind == "word":  # as Pipecat's word-timestamp services do: its TTSTextFrame, at its time
                if ctx is not None and event.get("id") == ctx:
                    await self.add_word_timestamps([(event["word"], event["start"])], ctx)
            elif kind == "done":
                await self._end_line(event.get("id") or ctx)
            elif kind == "error":
                await self.push_error(error_msg=f"fastcsm: {event.get('message')}")
                if ctx is not None and event.get("id") == ctx and event.get("code") != "internal":
                    await self._end_line(ctx)  # its speak was refused: no done follows


