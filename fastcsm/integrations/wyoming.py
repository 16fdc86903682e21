"""Home Assistant's Wyoming protocol: `fastcsm wyoming --uri tcp://127.0.0.1:10200`.

A Wyoming TTS service in front of a `fastcsm serve` (`--server URL`), or of one started in this
process (`--model ...`, loopback only). `describe` lists the voices (the registered ones and
the names of the voice map, OpenAI's by default); `synthesize` and streaming
`synthesize-start` / `-chunk` / `-stop` answer with `audio-start` (24000 Hz, 16-bit, mono),
one `audio-chunk` per 80 ms frame as it is made, and `audio-stop` (then `synthesize-stopped`
for a streamed request). Streamed text goes to the server as it comes (`speak` with `more: true`,
then `append_text`), so the first sentence plays while Home Assistant's LLM is still writing.

Each request is a conversation of its own on the server's `/v1/conversations` WebSocket, and a
Wyoming connection holds at most one at a time: a new `synthesize-start` ends the line before it,
and a line is closed whatever ends it (its stop, a bad event, a server error, the client leaving).
Events are read with this module's own limits (`WyomingLimits`), not the `wyoming` package's
reader, which reads any length an event announces and waits forever: a bounded event size, an
event whole within seconds of its first byte, an idle timeout and a cap on connections. An event
whose fields are wrong gets an `error` event; one that breaks a limit gets an `error` event and
its connection is closed. No other connection notices either.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
from dataclasses import dataclass
from urllib.parse import urlsplit

try:
    from wyoming.audio import AudioChunk, AudioStart, AudioStop
    from wyoming.error import Error
    from wyoming.event import Event, async_write_event
    from wyoming.info import Attribution, Describe, Info, TtsProgram, TtsVoice
    from wyoming.tts import Synthesize, SynthesizeChunk, SynthesizeStart, SynthesizeStop, SynthesizeStopped
except ImportError as e:  # pragma: no cover - the extra is missing
    raise ImportError(f"fastcsm.integrations.wyoming needs the wyoming package ({e.name} is missing): "
                      "pip install \"fastcsm[wyoming]\"") from e

import httpx
import websockets

from ..errors import CliError
from ..server.settings import Table, add_arguments, setting, settings_from_args
from ..server.urls import conversation_url, free_port, wait_ready

log = logging.getLogger("fastcsm")
RATE, WIDTH, CHANNELS = 24_000, 2, 1
READY_TIMEOUT_S = 30.0  # a working server says `ready` as soon as a conversation opens
LIMITS = "Wyoming limits"


@dataclass
class WyomingLimits(Table):
    """What a Wyoming client may send, and how many may be connected: `fastcsm wyoming`'s flags and
    `FASTCSM_WYOMING_*` variables, checked as `fastcsm serve`'s settings are."""

    wyoming_max_event_bytes: int = setting(64 << 10, "largest event a client may send: its JSON line, data and "
                                                     "payload (a TTS request takes a few KB)", LIMITS, metavar="N",
                                           at_least=1024, flag="--max-event-bytes", shown="64 KiB")
    wyoming_event_timeout_s: float = setting(10.0, "an event must arrive whole within S seconds of its first byte, "
                                                   "else the connection is closed", LIMITS, metavar="S",
                                             at_least=0.1, flag="--event-timeout-s")
    wyoming_idle_timeout_s: float = setting(60.0, "a connection that sends no event, or takes no audio, for S "
                                                  "seconds is closed", LIMITS, metavar="S", at_least=0.1,
                                            flag="--idle-timeout-s")
    wyoming_max_clients: int = setting(64, "open Wyoming connections; more are refused with an error event",
                                       LIMITS, metavar="N", at_least=1, flag="--max-clients")


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
        """A new conversation on the server (`ServerError` when it takes none)."""
        try:
            ws = await websockets.connect(self.url, additional_headers=self.headers, max_size=None)
        except (OSError, TimeoutError, websockets.WebSocketException) as e:
            raise ServerError(f"the fastcsm server at {self.http} took no conversation ({e})") from e
        try:
            ready = json.loads(await asyncio.wait_for(ws.recv(), READY_TIMEOUT_S))
            if ready.get("type") != "ready":
                raise ServerError(f"the fastcsm server at {self.http} did not say ready: {ready}")
        except BaseException as e:
            await ws.close()
            if isinstance(e, (TimeoutError, websockets.WebSocketException, ValueError)):
                raise ServerError(f"the fastcsm server at {self.http} did not say ready ({e})") from e
            raise
        return ws


class ServerError(Exception):
    """The fastcsm server refused or dropped a line: the Wyoming client hears why, and may go on."""


class BadEvent(Exception):
    """A well-framed event whose fields are wrong (say, a number as its text): answered with an
    `error` event; the connection goes on."""


class EventRefused(Exception):
    """An event that breaks the limits or the framing: answered with an `error` event, and the
    connection is closed (what follows it cannot be read as events)."""


async def read_event(reader: asyncio.StreamReader, limits: WyomingLimits) -> Event | None:
    """The next event within `limits`, or None once the client has closed the connection.

    The `wyoming` package's reader reads whatever length an event announces and waits forever;
    this one refuses an event larger than `wyoming_max_event_bytes` (its JSON line, data and
    payload together) before reading its data, and one that does not arrive whole within
    `wyoming_event_timeout_s` of its first byte (`EventRefused`). The reader's own buffer limit
    (set by `serve`) bounds the JSON line as it arrives."""
    cap = limits.wyoming_max_event_bytes
    try:
        async with asyncio.timeout(limits.wyoming_idle_timeout_s):
            first = await reader.read(1)
    except TimeoutError:
        raise EventRefused(f"no event came for {limits.wyoming_idle_timeout_s:g} s") from None
    if not first:
        return None
    try:
        async with asyncio.timeout(limits.wyoming_event_timeout_s):
            line = first if first == b"\n" else first + await reader.readuntil(b"\n")
            header, data_length, payload_length = _header(line)
            if len(line) + data_length + payload_length > cap:
                raise EventRefused(f"a {header['type']} event of {len(line) + data_length + payload_length} bytes: "
                                   f"at most {cap} are accepted (a TTS request takes a few KB and no payload)")
            data = header.get("data") or {}
            if data_length:
                try:
                    more = json.loads(await reader.readexactly(data_length))
                except ValueError:
                    more = None
                if not isinstance(more, dict):
                    raise EventRefused(f"the data of a {header['type']} event is not a JSON object")
                data = {**data, **more}
            payload = await reader.readexactly(payload_length) if payload_length else None
    except TimeoutError:
        raise EventRefused(f"an event did not arrive whole within {limits.wyoming_event_timeout_s:g} s "
                           "of its first byte") from None
    except asyncio.LimitOverrunError:
        raise EventRefused(f"an event's JSON line is longer than {cap} bytes") from None
    except asyncio.IncompleteReadError:
        return None  # the client left mid-event
    return Event(type=header["type"], data=data, payload=payload)


def _header(line: bytes) -> tuple[dict, int, int]:
    """An event's JSON line: the object, and the lengths of the data and payload it announces."""
    try:
        header = json.loads(line)
    except ValueError:
        header = None
    if not isinstance(header, dict) or not isinstance(header.get("type"), str):
        raise EventRefused('an event must start with a line of JSON, an object with a "type"')
    if not isinstance(header.get("data") or {}, dict):
        raise EventRefused(f'the "data" of a {header["type"]} event must be a JSON object')
    lengths = []
    for key in ("data_length", "payload_length"):
        value = header.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise EventRefused(f'"{key}" must be a byte count, got {json.dumps(value)[:40]}')
        lengths.append(value or 0)
    return header, *lengths


def _text(event: Event) -> str:
    text = event.data.get("text")
    if not isinstance(text, str):
        raise BadEvent(f'a {event.type} event needs "text", a string; got {json.dumps(text)[:40]}')
    return text


def _voice(event: Event) -> str | None:
    """The voice a synthesize event names (None: the service's default)."""
    voice = event.data.get("voice")
    if voice is None:
        return None
    name = voice.get("name") if isinstance(voice, dict) else voice
    if name is not None and not isinstance(name, str):
        raise BadEvent(f'the "voice" of a {event.type} event must be an object such as {{"name": "alloy"}}; '
                       f"got {json.dumps(voice)[:40]}")
    return name or None


class Line:
    """One line spoken through the server: its WebSocket, and the task that writes its audio to
    the Wyoming client as it arrives."""

    def __init__(self, handler: Handler, ws, voice: str):
        self.handler, self.ws, self.voice = handler, ws, voice
        self.opened = False
        self.done = asyncio.get_running_loop().create_future()
        self.reader = asyncio.create_task(self.read())

    async def send(self, text: str, more: bool) -> None:
        try:
            if not self.opened:
                if not more and not text.strip():  # nothing to speak
                    if not self.done.done():
                        self.done.set_result(None)
                    return
                self.opened = True
                await self.ws.send(json.dumps({"type": "speak", "text": text, "voice": self.voice, "more": more}))
            else:
                await self.ws.send(json.dumps({"type": "append_text", "text": text, "more": more}))
        except websockets.ConnectionClosed as e:
            raise ServerError(f"the fastcsm server ended the line ({e})") from e

    async def read(self) -> None:
        try:
            async for msg in self.ws:
                if isinstance(msg, bytes):
                    await self.handler.write(AudioChunk(rate=RATE, width=WIDTH, channels=CHANNELS,
                                                        audio=msg).event())
                    continue
                event = json.loads(msg)
                if event["type"] == "error":
                    log.warning("fastcsm wyoming: %s", event["message"])
                    await self.handler.error(event["message"], event.get("code"))
                    if event.get("code") != "internal":  # an internal error comes before the line's done
                        break
                elif event["type"] == "done":
                    break
        except (websockets.ConnectionClosed, ConnectionError):
            pass  # the server or the client left; whoever waits for the line learns it from `done`
        finally:
            if not self.done.done():
                self.done.set_result(None)

    async def close(self) -> None:
        """End the line whatever its state: the server hears the WebSocket close and stops it."""
        self.reader.cancel()
        await asyncio.gather(self.reader, return_exceptions=True)
        await self.ws.close()


class Handler:
    """One Wyoming connection: its events read within `limits` and answered in order. It holds at
    most one line on the server (`line`), and closes it whatever ends it: the request's end, a new
    `synthesize-start`, a bad event, an error, the client leaving."""

    def __init__(self, backend: Backend, info: Info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 limits: WyomingLimits):
        self.backend, self.info, self.limits = backend, info, limits
        self.reader, self.writer = reader, writer
        self.line: Line | None = None
        self.streaming = False  # `line` is a streamed request's, from its synthesize-start to its -stop

    async def run(self) -> None:
        try:
            while True:
                try:
                    event = await read_event(self.reader, self.limits)
                except EventRefused as e:
                    log.info("fastcsm wyoming: closing a connection: %s", e)
                    await self.error(str(e), "event_refused")
                    return
                if event is None:
                    return
                await self.handle_event(event)
        except ConnectionError:
            pass  # the client left (or took no data for the idle timeout): nobody to answer
        except Exception:
            log.exception("fastcsm wyoming: a connection failed")
            await self.error("internal error; the service's log has the details", "internal")
        finally:
            await self.close_line(answer=False)
            self.writer.close()

    async def handle_event(self, event: Event) -> None:
        try:
            if Describe.is_type(event.type):
                await self.write(self.info.event())
            elif Synthesize.is_type(event.type):
                text, voice = _text(event), _voice(event)
                if not self.streaming:  # a client that streams sends the whole text too: ignore it then
                    await self.open(voice, streaming=False)
                    await self.line.send(text, more=False)
                    await self.finish_line()
            elif SynthesizeStart.is_type(event.type):
                voice = _voice(event)
                await self.close_line()  # one line at a time: a new request ends the one before
                await self.open(voice, streaming=True)
            elif SynthesizeChunk.is_type(event.type):
                text = _text(event)
                if self.streaming:
                    await self.line.send(text, more=True)
            elif SynthesizeStop.is_type(event.type):
                if self.streaming:
                    await self.line.send("", more=False)
                    await self.finish_line()
                await self.write(SynthesizeStopped().event())
        except BadEvent as e:
            await self.close_line()
            await self.error(str(e), "bad_request")
        except ServerError as e:
            log.warning("fastcsm wyoming: %s", e)
            await self.close_line()
            await self.error(str(e), "server_error")

    async def open(self, voice: str | None, streaming: bool) -> None:
        self.line = Line(self, await self.backend.connect(), voice or self.backend.voice)
        self.streaming = streaming
        await self.write(AudioStart(rate=RATE, width=WIDTH, channels=CHANNELS).event())

    async def finish_line(self) -> None:
        await self.line.done
        await self.close_line()

    async def close_line(self, answer: bool = True) -> None:
        """Close the line, if one is open, and (`answer`) end its audio for the client."""
        line, self.line, self.streaming = self.line, None, False
        if line is None:
            return
        await line.close()
        if answer:
            await self.write(AudioStop().event())

    async def write(self, event: Event) -> None:
        """Send `event`; a client that does not take it within the idle timeout is gone
        (`ConnectionError`, as for one that left)."""
        try:
            async with asyncio.timeout(self.limits.wyoming_idle_timeout_s):
                await async_write_event(event, self.writer)
        except TimeoutError:
            self.writer.transport.abort()
            raise ConnectionAbortedError(f"the client took no data for {self.limits.wyoming_idle_timeout_s:g} s") \
                from None

    async def error(self, text: str, code: str | None = None) -> None:
        """Tell the client what went wrong, if it still listens."""
        try:
            await self.write(Error(text=text, code=code).event())
        except ConnectionError:
            pass

async def describe(backend: Backend) -> Info:
    from ..version import __version__

    attribution = Attribution(name="Sesame CSM via fastcsm", url="https://github.com/SesameAILabs/csm")
    voices = [TtsVoice(name=name, attribution=attribution, installed=True, description=None, version=None,
                       languages=["en"]) for name in await backend.voices()]
    program = TtsProgram(name="fastcsm", attribution=attribution, installed=True, version=__version__,
                         description="Sesame's CSM speech model, streamed by fastcsm", voices=voices,
                         supports_synthesize_streaming=True)
    return Info(tts=[program])


async def listen(uri: str, connected, limit: int) -> asyncio.AbstractServer:
    """Listen at a Wyoming URI (`tcp://HOST:PORT` or `unix://PATH`), with `limit` as each
    connection's read buffer limit."""
    host, port, path = parse_uri(uri)
    if path is not None:
        return await asyncio.start_unix_server(connected, path=path, limit=limit)
    return await asyncio.start_server(connected, host=host, port=port, limit=limit)


def parse_uri(uri: str) -> tuple[str | None, int | None, str | None]:
    """(host, port, None) for `tcp://HOST:PORT`, (None, None, path) for `unix://PATH`."""
    parts = urlsplit(uri)
    try:
        port = parts.port
    except ValueError:
        port = None
    if parts.scheme == "tcp" and parts.hostname and port is not None:
        return parts.hostname, port, None
    if parts.scheme == "unix" and parts.path:
        return None, None, parts.path
    raise ValueError(f"--uri {uri!r}: give tcp://HOST:PORT (e.g. tcp://127.0.0.1:10200) or unix://PATH")


async def serve(uri: str, backend: Backend, started: asyncio.Event | None = None,
                limits: WyomingLimits | None = None) -> None:
    """Answer Wyoming clients at `uri` until cancelled; `started` is set once it listens."""
    limits = limits or WyomingLimits()
    info = await describe(backend)
    clients: set[asyncio.Task] = set()

    async def connected(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handler = Handler(backend, info, reader, writer, limits)
        if len(clients) >= limits.wyoming_max_clients:
            log.warning("fastcsm wyoming: refusing a connection: %d are open", len(clients))
            await handler.error(f"the service is busy: {len(clients)} connections are open, the most it takes; "
                                "try again later", "busy")
            writer.close()
            return
        task = asyncio.current_task()
        clients.add(task)
        try:
            await handler.run()
        except asyncio.CancelledError:
            pass  # the service is stopping (asyncio 3.11 would report the cancelled connection as an error)
        finally:
            clients.discard(task)

    server = await listen(uri, connected, limits.wyoming_max_event_bytes)
    try:
        if started is not None:
            started.set()
        log.info("fastcsm wyoming: listening at %s, speaking through %s", uri, backend.http)
        print(f"fastcsm wyoming: listening at {uri}", flush=True)
        await asyncio.Event().wait()
    finally:
        server.close()
        for task in clients:
            task.cancel()
        await asyncio.gather(*clients, return_exceptions=True)

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
    add_arguments(p, table=WyomingLimits)
    p.set_defaults(func=run_wyoming)


def run_wyoming(args) -> int:
    try:
        limits = settings_from_args(args, WyomingLimits)
        parse_uri(args.uri)
    except ValueError as e:
        raise CliError(str(e)) from e
    if args.server:
        key = args.api_key or next(iter(os.environ.get("FASTCSM_API_KEYS", "").split(",")), "").strip() or None
        return _run(args.uri, Backend(args.server, args.voice, key), limits)
    # The model in this process: a fastcsm server on a free loopback port, this service in front. It is
    # `fastcsm serve` with the same table and uvicorn settings (head deadline, keep-alive, connection
    # cap), and a key of its own, so that nothing else on this machine can use its port.
    import threading

    import uvicorn

    from ..server.app import create_app
    from ..server.cli import load_generator_for
    from ..server.limits import uvicorn_config

    key = secrets.token_urlsafe(32)
    try:
        settings = settings_from_args(args, host="127.0.0.1", port=free_port(), api_keys=[key])
    except ValueError as e:
        raise CliError(str(e)) from e
    generator = load_generator_for(settings)
    # log_level: its access log would list every loopback WebSocket, one per Wyoming request.
    server = uvicorn.Server(uvicorn_config(create_app(settings, generator=generator), settings, log_level="warning"))
    thread = threading.Thread(target=server.run, name="fastcsm-server", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{settings.port}"
    wait_ready(url, 600)
    print(f"fastcsm wyoming: the model is served at {url} (loopback only; /v1 takes a key of its own)", flush=True)
    try:
        return _run(args.uri, Backend(url, args.voice, key), limits)
    finally:
        server.should_exit = True
        thread.join(10)


def _run(uri: str, backend: Backend, limits: WyomingLimits) -> int:
    try:
        asyncio.run(serve(uri, backend, limits=limits))
    except KeyboardInterrupt:
        pass
    return 0
