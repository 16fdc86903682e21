"""A stand-in language model for tests and benchmarks: an OpenAI-compatible chat server.

`StandInLLM` serves `POST /v1/chat/completions` (streamed as server-sent events over chunked
HTTP/1.1, exactly as OpenAI's API streams, or as one JSON body) and `GET /v1/models`, from its
own thread and event loop, on a loopback port. It answers with scripted replies, cut into tokens
(a word and the whitespace after it), at `tokens_per_s` after `first_token_s`, and can play the
faults a real model server has (`Scripted.status`, `hang`, `stop_after`, `stall_after`). It counts the
connections open at any moment, so a test can prove that a cancelled reply closed its own.

It is a stand-in for the model only: whatever talks to it (the `openai` SDK, fastcsm's client)
is the real thing, over a real socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Scripted:
    """One reply the stand-in gives, and how it gives it."""

    text: str = "Hello there. How can I help you today?"
    status: int | None = None  # answer this HTTP error status (with an OpenAI-style error body) instead
    hang: bool = False  # accept the request, send the headers, then never send a token
    stop_after: int | None = None  # drop the connection after this many tokens (no finish, no [DONE])
    stall_after: int | None = None  # after this many tokens, go silent with the connection open
    first_token_s: float | None = None  # this reply's first-token delay (default: the server's)


def tokens(text: str) -> list[str]:
    """The stand-in's tokens: each word with the whitespace after it (leading whitespace alone)."""
    return re.findall(r"\s+|\S+\s*", text) if text[:1].isspace() else re.findall(r"\S+\s*", text)


class StandInLLM:
    """An OpenAI-compatible chat server on 127.0.0.1 with scripted replies (see the module docstring).

    `replies` are given in turn (the last one repeats), or `replies` is a function of the request's
    messages. `requests` records every chat request's JSON body. Use as a context manager, or
    `start()` / `stop()`.
    """

    def __init__(self, replies: list[str | Scripted] | Callable[[list[dict]], str | Scripted] = (),
                 tokens_per_s: float = 50.0, first_token_s: float = 0.0, model: str = "stand-in"):
        if tokens_per_s <= 0 or first_token_s < 0:
            raise ValueError("tokens_per_s must be > 0 and first_token_s >= 0")
        self.replies = replies if callable(replies) else list(replies) or [Scripted()]
        self.tokens_per_s = tokens_per_s
        self.first_token_s = first_token_s
        self.model = model
        self.requests: list[dict] = []
        self._count = itertools.count()
        self._open = 0
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self.port = 0

    # -- life -------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The base URL an OpenAI client takes (`.../v1`)."""
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def open_connections(self) -> int:
        with self._lock:
            return self._open

    def start(self) -> StandInLLM:
        started = threading.Event()

        def run():
            self._loop = asyncio.new_event_loop()
            self._server = self._loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", 0))
            self.port = self._server.sockets[0].getsockname()[1]
            started.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="stand-in-llm", daemon=True)
        self._thread.start()
        started.wait()
        return self

    def stop(self) -> None:
        if self._loop is None:
            return

        async def shut():
            self._server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(shut(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop = None

    def __enter__(self) -> StandInLLM:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def wait_connections(self, n: int, timeout_s: float = 5.0) -> int:
        """Wait until `n` connections are open (or `timeout_s` passes); the count then."""
        deadline = time.monotonic() + timeout_s
        while self.open_connections != n and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.open_connections

    # -- HTTP -------------------------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with self._lock:
            self._open += 1
        try:
            while await self._one_request(reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            with self._lock:
                self._open -= 1
            writer.close()

    async def _one_request(self, reader, writer) -> bool:
        """Answer one request; whether the connection stays open for another."""
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.strip():
            return False
        lines = head.decode("latin-1").split("\r\n")
        method, path, _ = lines[0].split(" ", 2)
        headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:] if x)}
        body = await reader.readexactly(int(headers.get("content-length", 0)))
        if method == "GET" and path.rstrip("/") == "/v1/models":
            self._json(writer, 200, {"object": "list", "data": [
                {"id": self.model, "object": "model", "created": 0, "owned_by": "fastcsm"}]})
        elif method == "POST" and path == "/v1/chat/completions":
            try:
                request = json.loads(body)
                messages = request["messages"]
            except (ValueError, KeyError, TypeError):
                self._json(writer, 400, _error("the body must be JSON with messages", "invalid_request_error"))
            else:
                self.requests.append(request)
                return await self._chat(request, self._reply(messages), reader, writer)
        else:
            self._json(writer, 404, _error(f"no route {method} {path}", "not_found"))
        await writer.drain()
        return headers.get("connection", "").lower() != "close"

    def _reply(self, messages: list[dict]) -> Scripted:
        if callable(self.replies):
            reply = self.replies(messages)
        else:
            reply = self.replies[min(next(self._count), len(self.replies) - 1)]
        return reply if isinstance(reply, Scripted) else Scripted(reply)

    async def _chat(self, request: dict, reply: Scripted, reader, writer) -> bool:
        if reply.status is not None:
            self._json(writer, reply.status, _error(f"scripted failure {reply.status}", "server_error"))
            await writer.drain()
            return True
        rid = f"chatcmpl-{len(self.requests)}"
        model = request.get("model", self.model)
        parts = tokens(reply.text)
        first = self.first_token_s if reply.first_token_s is None else reply.first_token_s
        if not request.get("stream"):
            await asyncio.sleep(first + len(parts) / self.tokens_per_s)
            self._json(writer, 200, {
                "id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": reply.text},
                             "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 0, "completion_tokens": len(parts), "total_tokens": len(parts)}})
            await writer.drain()
            return True
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
                     b"transfer-encoding: chunked\r\n\r\n")

        def event(delta: dict, finish: str | None = None) -> None:
            chunk = {"id": rid, "object": "chat.completion.chunk", "created": 0, "model": model,
                     "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            _chunk(writer, f"data: {json.dumps(chunk)}\n\n".encode())

        event({"role": "assistant", "content": ""})
        await writer.drain()
        if reply.hang:
            await reader.read()  # until the client gives up and closes
            return False
        gone = asyncio.ensure_future(reader.read(1))  # EOF (or a byte) when the client closes early
        try:
            start = time.monotonic() + first
            for i, part in enumerate(parts):
                if reply.stop_after is not None and i >= reply.stop_after:
                    writer.transport.abort()  # mid-reply: no finish, no [DONE], no last chunk
                    return False
                if reply.stall_after is not None and i >= reply.stall_after:
                    await gone  # silent until the client gives up
                    return False
                delay = start + i / self.tokens_per_s - time.monotonic()
                if delay > 0:
                    await asyncio.wait([gone], timeout=delay)
                if gone.done():
                    return False
                event({"content": part})
                await writer.drain()
            event({}, "stop")
            _chunk(writer, b"data: [DONE]\n\n")
            _chunk(writer, b"")
            await writer.drain()
        finally:
            gone.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await gone  # before the next request's read: one reader at a time
        return True

    @staticmethod
    def _json(writer, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found"}.get(status, "Error")
        writer.write(f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
                     f"content-length: {len(data)}\r\n\r\n".encode() + data)


def _chunk(writer, data: bytes) -> None:
    writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")


def _error(message: str, kind: str) -> dict:
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}
