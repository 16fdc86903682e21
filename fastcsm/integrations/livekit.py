"""LiveKit Agents: `TTS`, a streaming `tts.TTS` over fastcsm's `/v1/conversations` WebSocket.

    from fastcsm.integrations.livekit import TTS
    session = AgentSession(stt=..., llm=..., tts=TTS(base_url="http://127.0.0.1:8000", voice="0"))

`stream()` takes the LLM's reply token by token: the first token of a segment opens a line with
`speak` (`more: true`), the next ones follow with `append_text`, and `flush()` (or the end of the
input) completes it, so the server starts speaking after the first sentence and carries the
audio on from piece to piece. Audio comes back as 24 kHz mono 16-bit PCM, 80 ms per message, as
it is generated. One WebSocket per `TTS` object serves its streams one after the other, so the
conversation (and its KV cache) on the server goes on from one agent turn to the next; a stream
closed early (an interruption) sends `interrupt`, and the line, cut where it stopped, stays in the
conversation. `add_user_turn(text)` puts the user's words in, so the next line answers them.

The TTS hears the user too, so CSM answers in a voice that fits theirs: `listen(session)` follows
the `AgentSession`'s `user_state_changed` (speaking / listening) and final `user_input_transcribed`
events, and the agent's `stt_node` lends it the microphone's frames on their way to the STT:

    class Assistant(Agent):
        async def stt_node(self, audio, model_settings):
            async for event in Agent.default.stt_node(self, tts.hear(audio), model_settings):
                yield event

The audio of each user turn (from half a second before the user starts speaking until they stop)
goes in with its transcript in an `add_turn` before the next line (or with `add_user_turn`); a
turn heard without a transcript goes in alone, for the server's `--asr-model` to transcribe.
`synthesize(text)` speaks one whole line the same way. The TTS has an aligned transcript
(`aligned_transcript=True`): each written word of the server's `word` events is pushed as a
`TimedString` ("word ", start and end in seconds into the segment's audio), which LiveKit uses
to show the transcript in step with the audio and to keep, on an interruption, the words played.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterable, AsyncIterator

try:
    from livekit import rtc
    from livekit.agents import DEFAULT_API_CONNECT_OPTIONS, APIConnectionError, APIConnectOptions, APIError, tts, utils
    from livekit.agents.types import TimedString
except ImportError as e:  # pragma: no cover - the extra is missing
    raise ImportError(f"fastcsm.integrations.livekit needs LiveKit Agents ({e.name} is missing): "
                      "pip install \"fastcsm[livekit]\"") from e

import websockets

from ..server.urls import conversation_url
from .hearing import UserAudio, user_turn

SAMPLE_RATE = 24_000


class TTS(tts.TTS):
    """fastcsm's streaming TTS for LiveKit Agents.

    base_url: the server (`http(s)://` or `ws(s)://`, with or without `/v1/conversations`).
    voice: a registered voice, one of OpenAI's names, or a speaker id such as "0".
    api_key: the server's key, if it has one.
    user_speaker: the speaker id the user's turns go in under (default 1).
    seed, temperature, topk, max_audio_length_ms: as in a `speak` message (per piece of a line).
    """

    def __init__(self, *, base_url: str = "http://127.0.0.1:8000", voice: str = "0", api_key: str | None = None,
                 user_speaker: int = 1, seed: int | None = None, temperature: float | None = None,
                 topk: int | None = None, max_audio_length_ms: float | None = None):
        super().__init__(capabilities=tts.TTSCapabilities(streaming=True, aligned_transcript=True),
                         sample_rate=SAMPLE_RATE, num_channels=1)
        self._url = conversation_url(base_url)
        self._voice = voice
        self._api_key = api_key
        self._speak = {k: v for k, v in {"seed": seed, "temperature": temperature, "topk": topk,
                                         "max_audio_length_ms": max_audio_length_ms}.items() if v is not None}
        self._ws = None
        self._lock = asyncio.Lock()  # one line at a time on the conversation
        self._user_speaker = user_speaker
        self._hearing = UserAudio()

    @property
    def model(self) -> str:
        return "csm"

    @property
    def provider(self) -> str:
        return "fastcsm"

    async def _connection(self):
        if self._ws is None or self._ws.state.name != "OPEN":
            headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else None
            try:
                self._ws = await websockets.connect(self._url, additional_headers=headers, max_size=None)
                ready = json.loads(await self._ws.recv())
            except (OSError, websockets.WebSocketException) as e:
                self._ws = None
                raise APIConnectionError(f"fastcsm: cannot connect to {self._url}: {e}") from e
            if ready.get("type") != "ready":
                raise APIConnectionError(f"fastcsm: the server did not say ready: {ready}")
        return self._ws

    async def add_user_turn(self, text: str, speaker: int | None = None) -> None:
        """The user's words join the conversation (with the audio of their turn, when it was
        heard), so the next line follows them."""
        async with self._lock:
            await self._add_turn(user_turn(self._user_speaker if speaker is None else speaker, text, self._hearing))

    async def _add_turn(self, message: dict | None) -> None:
        if message is None:
            return
        ws = await self._connection()
        await ws.send(json.dumps(message))
        while True:  # its answer: turn_added (or an error)
            msg = await ws.recv()
            if isinstance(msg, str):
                event = json.loads(msg)
                if event["type"] == "error":
                    raise APIError(f"fastcsm: {event['message']}", retryable=False)
                if event["type"] == "turn_added":
                    return

    async def _add_heard_turn(self) -> None:
        """The user's turn heard since the last line, before the next one (none while they speak)."""
        h = self._hearing
        if not h.speaking and (h.heard or h.texts):
            await self._add_turn(user_turn(self._user_speaker, " ".join(h.texts) or None, h))

    # -- hearing the user -----------------------------------------------------------------------

    def listen(self, session) -> None:
        """Follow `session` (an `AgentSession`): when the user speaks, and what they said."""
        session.on("user_state_changed", self._on_user_state)
        session.on("user_input_transcribed", self._on_transcribed)

    async def hear(self, audio: AsyncIterable[rtc.AudioFrame]) -> AsyncIterator[rtc.AudioFrame]:
        """`audio` (the microphone's frames, as an agent's `stt_node` gets them), passed on unchanged
        and kept for the user's turns."""
        async for frame in audio:
            self._hearing.add(bytes(memoryview(frame.data).cast("B")), frame.sample_rate, frame.num_channels)
            yield frame

    def _on_user_state(self, event) -> None:
        if event.new_state == "speaking":
            self._hearing.start()
        elif event.old_state == "speaking":
            self._hearing.stop()

    def _on_transcribed(self, event) -> None:
        if event.is_final and event.transcript.strip():
            self._hearing.texts.append(event.transcript.strip())

    def synthesize(self, text: str, *, conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS):
        return self._synthesize_with_stream(text, conn_options=conn_options)

    def stream(self, *, conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS) -> SynthesizeStream:
        return SynthesizeStream(tts=self, conn_options=conn_options)

    async def aclose(self) -> None:
        if self._ws is not None:
            await self._ws.close()
            self._ws = None


class SynthesizeStream(tts.SynthesizeStream):
    def __init__(self, *, tts: TTS, conn_options: APIConnectOptions):
        super().__init__(tts=tts, conn_options=conn_options)
        self._tts: TTS = tts

    async def _run(self, output_emitter: tts.AudioEmitter) -> None:
        request_id = utils.shortuuid()
        output_emitter.initialize(request_id=request_id, sample_rate=SAMPLE_RATE, num_channels=1,
                                  mime_type="audio/pcm", stream=True)
        async with self._tts._lock:
            await self._tts._add_heard_turn()
            ws = await self._tts._connection()
            done: asyncio.Queue = asyncio.Queue()
            reader = asyncio.create_task(self._read(ws, output_emitter, done))
            line_open = False

            async def complete() -> None:
                nonlocal line_open
                await ws.send(json.dumps({"type": "append_text", "text": "", "more": False}))
                await self._wait(done, reader)
                output_emitter.end_segment()
                line_open = False

            try:
                async for data in self._input_ch:
                    if isinstance(data, self._FlushSentinel):
                        if line_open:
                            await complete()
                        continue
                    if not line_open:
                        output_emitter.start_segment(segment_id=utils.shortuuid())
                        self._mark_started()
                        await ws.send(json.dumps({"type": "speak", "text": data, "voice": self._tts._voice,
                                                  "id": request_id, "more": True, "timestamps": True,
                                                  **self._tts._speak}))
                        line_open = True
                    else:
                        await ws.send(json.dumps({"type": "append_text", "text": data, "more": True}))
                if line_open:
                    await complete()
            except asyncio.CancelledError:
                if line_open:  # interrupted: stop the line, wait for its done so the next line may start
                    with contextlib.suppress(Exception):
                        await ws.send(json.dumps({"type": "interrupt"}))
                        await asyncio.wait_for(self._wait(done, reader), 5)
                raise
            except websockets.WebSocketException as e:
                raise APIConnectionError(f"fastcsm: {e}") from e
            finally:
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await reader

    @staticmethod
    async def _wait(done: asyncio.Queue, reader: asyncio.Task) -> dict:
        getter = asyncio.ensure_future(done.get())
        finished, _ = await asyncio.wait({getter, reader}, return_when=asyncio.FIRST_COMPLETED)
        if getter not in finished:
            getter.cancel()
            reader.result()  # raises what ended the reader
            raise APIConnectionError("fastcsm: the connection closed during a line")
        event = getter.result()
        if event["type"] == "error":
            raise APIError(f"fastcsm: {event['message']}", retryable=False)
        return event

    @staticmethod
    async def _read(ws, output_emitter: tts.AudioEmitter, done: asyncio.Queue) -> None:
        async for msg in ws:
            if isinstance(msg, bytes):
                output_emitter.push(msg)
                continue
            event = json.loads(msg)
            if event["type"] == "word":  # words joined by spaces, as LiveKit's Cartesia alignment gives them
                output_emitter.push_timed_transcript(TimedString(f"{event['word']} ", start_time=event["start"],
                                                                 end_time=event["end"]))
            elif event["type"] == "done":
                await done.put(event)
            elif event["type"] == "error":
                await done.put(event)  # a refused speak or fragment: the line cannot go on

