"""Home Assistant's Wyoming protocol: `fastcsm wyoming --uri tcp://127.0.0.1:10200`.

A Wyoming TTS service in front of a `fastcsm serve` (`--server URL`), or of one started in this
process (`--model ...`, loopback only). `describe` lists the voices (the registered ones and
the names of the voice map, OpenAI's by default); `synthesize` and streaming
`synthesize-start` / `-chunk` / `-stop` answer with `audio-start` (24000 Hz, 16-bit, mono),
one `audio-chunk` per 80 ms frame as it is made, and `audio-stop` (then `synthesize-stopped`
for a streamed request). Streamed text goes to the server as it comes (`speak` with `more: true`,
then `append_text`), so the first sentence plays while Home Assistant's LLM is still writing.
Each request is a conversation of its own on the server's `/v1/conversations` WebSocket.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os

try:
    from wyoming.audio import AudioChunk, AudioStart, AudioStop
    from wyoming.event import Event
    from wyoming.info import Attribution, Describe, Info, TtsProgram, TtsVoice
    from wyoming.server import AsyncEventHandler, AsyncServer
    from wyoming.tts import Synthesize, SynthesizeChunk, SynthesizeStart, SynthesizeStop, SynthesizeStopped
except ImportError as e:  # pragma: no cover - the extra is missing
    raise ImportError(f"fastcsm.integrations.wyoming needs the wyoming package ({e.name} is missing): "
                      "pip install \"fastcsm[wyoming]\"") from e

import httpx
import websockets

from ..errors import CliError
from ..server.settings import add_arguments, settings_from_args
from ..server.urls import conversation_url, free_port, wait_ready

log = logging.getLogger("fastcsm")
RATE, WIDTH, CHANNELS = 24_000, 2, 1


class Backend:
    """The fastcsm server the handlers speak through."""

    def __init__(self, server: str, voice: str = "0", api_key: str | None = None):
        self.http = server.rstrip("/")
        if self.http.startswith("ws"):
            self.http = "http" + self.http[2:]
        self.url = conversation_url(server)
        self.voice = voice
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else None

    async def voices(self) -> list[str]:
        async with httpx.AsyncClient(timeout=30) as client:
            r = await client.get(self.http + "/v1/voices", headers=self.headers)
            r.raise_for_status()
            body = r.json()
        names = [v["name"] for v in body.get("data", [])]
        return names + [a["name"] for a in body.get("aliases", []) if a["name"] not in names]

    async def connect(self):
        ws = await websockets.connect(self.url, additional_headers=self.headers, max_size=None)
        ready = json.loads(await ws.recv())
        if ready.get("type") != "ready":
            raise ConnectionError(f"fastcsm did not say ready: {ready}")
        return ws


class Line:
    """One line spoken through the server, its audio written to Wyoming as it arrives."""

    def __init__(self, handler: Handler, ws, voice: str):
        self.handler, self.ws, self.voice = handler, ws, voice
        self.opened = False
        self.reader = asyncio.create_task(self.read())
        self.done = asyncio.get_running_loop().create_future()

    async def send(self, text: str, more: bool) -> None:
        if not self.opened:
            if not more and not text.strip():
                self.done.set_result(None)
                return
            self.opened = True
            await self.ws.send(json.dumps({"type": "speak", "text": text, "voice": self.voice, "more": more}))
        else:
            await self.ws.send(json.dumps({"type": "append_text", "text": text, "more": more}))

    async def read(self) -> None:
        try:
            async for msg in self.ws:
                if isinstance(msg, bytes):
                    await self.handler.write_event(AudioChunk(rate=RATE, width=WIDTH, channels=CHANNELS,
                                                              audio=msg).event())
                    continue
                event = json.loads(msg)
                if event["type"] == "error":
                    log.warning("fastcsm wyoming: %s", event["message"])
                    if not self.done.done() and event.get("code") != "internal":
                        self.done.set_result(event)
                elif event["type"] == "done" and not self.done.done():
                    self.done.set_result(event)
        finally:
            if not self.done.done():
                self.done.set_result(None)

    async def finish(self) -> None:
        await self.done
        self.reader.cancel()
        await self.ws.close()


class Handler(AsyncEventHandler):
    def __init__(self, backend: Backend, info: Info, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.backend, self.info = backend, info
        self.streaming: Line | None = None

    async def handle_event(self, event: Event) -> bool:
        if Describe.is_type(event.type):
            await self.write_event(self.info.event())
        elif Synthesize.is_type(event.type):
            if self.streaming is None:  # a client that streams sends the whole text too: ignore it then
                synth = Synthesize.from_event(event)
                line = await self.start(synth.voice)
                await line.send(synth.text, more=False)
                await self.stop(line)
        elif SynthesizeStart.is_type(event.type):
            self.streaming = await self.start(SynthesizeStart.from_event(event).voice)
        elif SynthesizeChunk.is_type(event.type) and self.streaming is not None:
            await self.streaming.send(SynthesizeChunk.from_event(event).text, more=True)
        elif SynthesizeStop.is_type(event.type) and self.streaming is not None:
            line, self.streaming = self.streaming, None
            await line.send("", more=False)
            await self.stop(line)
            await self.write_event(SynthesizeStopped().event())
        return True

    async def start(self, voice) -> Line:
        name = voice.name if voice is not None and voice.name else self.backend.voice
        await self.write_event(AudioStart(rate=RATE, width=WIDTH, channels=CHANNELS).event())
        return Line(self, await self.backend.connect(), name)

    async def stop(self, line: Line) -> None:
        await line.finish()
        await self.write_event(AudioStop().event())


async def describe(backend: Backend) -> Info:
    from .. import __version__

    attribution = Attribution(name="Sesame CSM via fastcsm", url="https://github.com/SesameAILabs/csm")
    voices = [TtsVoice(name=name, attribution=attribution, installed=True, description=None, version=None,
                       languages=["en"]) for name in await backend.voices()]
    program = TtsProgram(name="fastcsm", attribution=attribution, installed=True, version=__version__,
                         description="Sesame's CSM speech model, streamed by fastcsm", voices=voices,
                         supports_synthesize_streaming=True)
    return Info(tts=[program])


async def serve(uri: str, backend: Backend, started: asyncio.Event | None = None) -> None:
    """Answer Wyoming clients at `uri` until cancelled; `started` is set once it listens."""
    info = await describe(backend)
    server = AsyncServer.from_uri(uri)

    def factory(reader, writer):
        return Handler(backend, info, reader, writer)

    await server.start(factory)
    try:
        if started is not None:
            started.set()
        log.info("fastcsm wyoming: listening at %s, speaking through %s", uri, backend.http)
        print(f"fastcsm wyoming: listening at {uri}", flush=True)
        await asyncio.Event().wait()
    finally:
        await server.stop()


# -- `fastcsm wyoming` ----------------------------------------------------------------------------

def add_wyoming(sub) -> None:
    import argparse

    p = sub.add_parser("wyoming", help="a Wyoming TTS service for Home Assistant",
                       description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n  fastcsm wyoming --uri tcp://0.0.0.0:10200 --server http://127.0.0.1:8000\n"
                              "  fastcsm wyoming --uri tcp://127.0.0.1:10200 --model ~/models/csm-1b --voice alloy")
    p.add_argument("--uri", default="tcp://127.0.0.1:10200", help="where to listen (default: %(default)s)")
    p.add_argument("--server", metavar="URL", help="a running fastcsm serve (default: load the model in this process)")
    p.add_argument("--api-key", metavar="KEY", help="the server's API key, if it has one (default: the first of "
                                                    "FASTCSM_API_KEYS, as the server reads it) [FASTCSM_API_KEYS]")
    p.add_argument("--voice", default="0", help="the voice when a request names none (default: %(default)s)")
    # Without --server: fastcsm serve's own settings (flags and FASTCSM_* variables) for the model in this process.
    add_arguments(p, groups=("model", "voices", "OpenAI compatibility"))
    p.set_defaults(func=run_wyoming)


def run_wyoming(args) -> int:
    if args.server:
        key = args.api_key or next(iter(os.environ.get("FASTCSM_API_KEYS", "").split(",")), "").strip() or None
        return _run(args.uri, Backend(args.server, args.voice, key))
    # The model in this process: a fastcsm server on a free loopback port, this service in front.
    import threading

    import uvicorn

    from ..server.app import create_app
    from ..server.cli import load_generator_for

    try:
        settings = settings_from_args(args, host="127.0.0.1", port=free_port(), api_keys=[])
    except ValueError as e:
        raise CliError(str(e)) from e
    generator = load_generator_for(settings)
    server = uvicorn.Server(uvicorn.Config(create_app(settings, generator=generator), host="127.0.0.1",
                                           port=settings.port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="fastcsm-server", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{settings.port}"
    wait_ready(url, 600)
    try:
        return _run(args.uri, Backend(url, args.voice))
    finally:
        server.should_exit = True
        thread.join(10)


def _run(uri: str, backend: Backend) -> int:
    try:
        asyncio.run(serve(uri, backend))
    except KeyboardInterrupt:
        pass
    return 0
