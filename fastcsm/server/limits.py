"""What stands between the network and the routes: Host and Origin checks, body limits and
deadlines, API keys kept out of logs, and the uvicorn settings against slow clients.

- `Guard` (ASGI middleware, outermost): requests and WebSocket handshakes whose Host is none
  of the server's names (`HostNames`) are refused before anything else (400; 403 for a
  handshake), which is what stops DNS rebinding; per-route body limits (the speech,
  voice-upload and transcription routes take up to `max_body_bytes`, every other route `SMALL_BODY_BYTES`)
  enforced by Content-Length and, for chunked bodies, as the bytes arrive (413 either way); the
  whole body must arrive within `body_timeout_s` (else 408 and the connection closes);
  state-changing requests and WebSocket handshakes whose `Origin` is present and not allowed get
  403 (allowed: the server's own page, by one of its names, loopback pages, and
  `--cors-origin`); `?api_key=` is taken out of the query string before anything logs it.
  Refused requests (a 4xx other than 408, 409 and 429; a refused handshake) are answered at
  `max_refusals_per_s` per client address after a burst (`Refusals`): the rest wait, unanswered,
  so that one client's flood of bad requests, each cheap, cannot keep the engine's thread from
  the GIL; a client that is refused nothing is never slowed.
- `uvicorn_config`: h11 with a deadline for a request's head (`header_timeout_s`), the keep-alive
  timeout and the connection cap (`max_connections`).
- `RedactKeys`: a logging filter that masks every configured key in any record, as a last line.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import time
from collections import OrderedDict
from urllib.parse import parse_qsl, urlencode, urlsplit

from fastapi.responses import JSONResponse

from . import protocol as P
from .settings import Settings, ip_address, is_loopback

SMALL_BODY_BYTES = 64 * 1024  # routes without audio in their body
LARGE_BODY_ROUTES = {("POST", "/v1/audio/speech"), ("POST", "/v1/voices"),
                     ("POST", "/v1/audio/voices"), ("POST", "/v1/audio/transcriptions")}
SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}
API_KEY_SCOPE = "fastcsm.api_key"  # where the WebSocket's ?api_key= goes once out of the query string
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
          405: "invalid_request_error", 408: "request_timeout", 409: "conflict_error", 413: "request_too_large",
          422: "invalid_request_error", 503: "server_busy"}


def error_response(status: int, message: str, type: str | None = None, param: str | None = None,
                   retry_after: int | None = None, close: bool = False) -> JSONResponse:
    body = P.ErrorResponse(error=P.ErrorBody(message=message, type=type or _TYPES.get(status, "server_error"),
                                             param=param))
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else {}
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    if close:  # the rest of the request is not read: the connection cannot carry another
        headers["Connection"] = "close"
    return JSONResponse(body.model_dump(), status_code=status, headers=headers or None)


def invalid_fields(errors: list[dict], skip=(), hints: dict[str, str] | None = None,
                   limit: int = 4) -> tuple[str, str | None]:
    """Pydantic's validation errors as one line, `where: what; ...` (at most `limit`), and the
    first field at fault. `loc` parts in `skip` (the body, a union's tag) are left out; `hints`
    adds a sentence to errors of the named field."""
    parts, param = [], None
    for e in errors[:limit]:
        loc = [str(x) for x in e.get("loc", ()) if x not in skip]
        where = ".".join(loc)
        param = param or where or None
        msg = e.get("msg", "invalid")
        if e.get("type") == "extra_forbidden":
            msg = "unknown field (see /docs for the accepted fields)"
        elif e.get("type") == "value_error":  # a check of the library's: its own words, unprefixed
            msg = str(e.get("ctx", {}).get("error", msg))
        elif loc and hints and loc[-1] in hints:
            msg = f"{msg}; {hints[loc[-1]]}"
        parts.append(f"{where}: {msg}" if where else msg)
    return "; ".join(parts) or "invalid", param


class HostNames:
    """The names this server answers to, against DNS rebinding: a page at http://evil.example
    whose name the attacker re-points at this address is the server's own page by Origin, but
    its requests still carry `Host: evil.example`. Allowed: loopback names, IP addresses (DNS
    cannot rebind those: a page at an IP's origin is that host's own page), the `--host` name,
    this machine's name, and `--allowed-hosts` (`*.example.com` for subdomains, `*` for any).
    A request without Host (HTTP/1.0, which no browser sends) is allowed."""

    def __init__(self, settings: Settings):
        names = [settings.host, socket.gethostname(), *settings.allowed_hosts]
        self.any = "*" in names
        self.names = {_bare(n) for n in names if not n.startswith("*")}
        self.suffixes = tuple(_bare(n)[1:] for n in names if n.startswith("*."))

    def allows(self, host: str | None) -> bool:
        if self.any or host is None:
            return True
        name = hostname(host)
        if name is None:
            return False
        return (name in self.names or name.endswith(self.suffixes) or is_loopback(name)
                or ip_address(name) is not None)


def _bare(name: str) -> str:
    return name.lower().rstrip(".")


_HOST_HEADER = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[^\s:@/\\?#\[\]]+)(:[0-9]{0,5})?")


def hostname(host: str) -> str | None:
    """The name in a Host header (`name`, `name:port`, `[v6]:port`), lowercase, without a final
    dot; None if it is no host (nothing, or more than a host and a port)."""
    match = _HOST_HEADER.fullmatch(host)
    return _bare(match[1].strip("[]")) if match else None


def origin_allowed(origin: str, host: str | None, allowed: list[str]) -> bool:
    """The server's own page (same host and port), any loopback page, or a --cors-origin. (The
    Host itself is checked first, by `HostNames`: alone, Origin == Host is what a rebound name
    passes.)"""
    if origin in allowed or "*" in allowed:
        return True
    try:
        parts = urlsplit(origin)
        hostname = parts.hostname
    except ValueError:
        return False
    if parts.scheme not in ("http", "https") or not hostname:
        return False
    return is_loopback(hostname) or (host is not None and parts.netloc.lower() == host.lower())


def json_values(data: bytes | str) -> int:
    """An upper bound on the values in a JSON document (its commas and opening brackets), found
    at memchr speed: what bounds the cost of parsing it (long strings are cheap to parse)."""
    if isinstance(data, str):
        return data.count(",") + data.count("[") + data.count("{")
    return data.count(b",") + data.count(b"[") + data.count(b"{")


def max_speech_values(settings: Settings) -> int:
    """Values a speech request may hold: its fields, the context turns' fields, and commas in
    any of its texts."""
    turns = settings.max_context_turns
    return 256 + 16 * turns + (turns + 2) * settings.max_input_chars


def max_message_values(settings: Settings) -> int:
    """Values one WebSocket message may hold: a command's fields and commas in its text."""
    return 256 + settings.max_input_chars


class _Refused(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class Guard:
    """ASGI middleware; see the module docstring."""

    def __init__(self, app, settings: Settings):
        self.app = app
        self.limit = settings.max_body_bytes
        self.small = min(SMALL_BODY_BYTES, settings.max_body_bytes)
        self.body_timeout_s = settings.body_timeout_s
        self.origins = list(settings.cors_origins)
        self.hosts = HostNames(settings)
        self.refusals = Refusals(settings.max_refusals_per_s)

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        send = self.refusals.paced(scope, send)
        _take_key_from_query(scope)
        headers = dict(scope.get("headers") or [])
        host = headers[b"host"].decode("latin-1") if b"host" in headers else None
        if not self.hosts.allows(host):
            message = (f"this server does not answer to the name {hostname(host) or host!r} (the Host header); "
                       "if that is its name, start it with --allowed-hosts for it")
            return await _refuse(scope, receive, send, 400, message)
        origin = headers.get(b"origin")
        state_changing = scope["type"] == "websocket" or scope["method"] not in SAFE_METHODS
        if origin is not None and state_changing and not origin_allowed(origin.decode("latin-1"), host, self.origins):
            message = (f"requests from the page at {origin.decode('latin-1')!r} are not allowed; "
                       "start the server with --cors-origin for it")
            return await _refuse(scope, receive, send, 403, message)
        if scope["type"] == "websocket":
            return await self.app(scope, receive, send)
        await self._http(scope, receive, send, headers)

    async def _http(self, scope, receive, send, headers):
        limit = self.limit if (scope["method"], scope["path"]) in LARGE_BODY_ROUTES else self.small
        too_big = f"the request body is larger than this route's limit of {limit} bytes"
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await error_response(413, too_big, close=True)(scope, receive, send)
        loop = asyncio.get_running_loop()
        seen, deadline, complete = 0, None, False
        refused: _Refused | None = None
        started = False

        async def guarded_receive():
            nonlocal seen, deadline, complete, refused
            if complete or refused is not None:
                return await receive()  # after the body: waiting for a disconnect is no read
            if deadline is None:
                deadline = loop.time() + self.body_timeout_s
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                refused = _Refused(408, f"the request body did not arrive within {self.body_timeout_s:g} s")
                raise refused from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                complete = not message.get("more_body", False)
                if seen > limit:
                    refused = _Refused(413, too_big)
                    raise refused
            return message

        async def guarded_send(message):
            nonlocal started
            if refused is not None and not started:
                return  # the app's own answer to the exception (say, a 400 from form parsing) is replaced
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, guarded_receive, guarded_send)
        except _Refused:
            pass
        if refused is not None and not started:
            await error_response(refused.status, refused.message, close=True)(scope, receive, send)


REFUSED = frozenset(range(400, 500)) - {408, 409, 429}  # (timeouts, conflicts and "slow down" are no abuse)


class Refusals:
    """Per client address, a token bucket for refused requests: `rate` a second after a burst of
    `burst_for(rate)`. A refusal past it waits for its answer until a token is free (waits queue
    up, so a client's refusals are answered at `rate` however many connections it opens); nothing
    else is ever delayed. At most `max_clients` addresses are remembered, the longest unseen dropped."""

    def __init__(self, rate: float, clock=time.monotonic, sleep=asyncio.sleep, max_clients: int = 4096):
        self.rate, self.burst = rate, burst_for(rate)
        self.clock, self.sleep, self.max_clients = clock, sleep, max_clients
        self.buckets: OrderedDict[str, TokenBucket] = OrderedDict()  # by address, the longest unseen first

    async def wait(self, client: str) -> None:
        now = self.clock()
        bucket = self.buckets.pop(client, None) or TokenBucket(self.rate, self.burst, now)
        self.buckets[client] = bucket
        if len(self.buckets) > self.max_clients:
            self.buckets.popitem(last=False)
        if (delay := bucket.take(now)) > 0:
            await self.sleep(delay)

    def paced(self, scope, send):
        """`send`, holding back the answer of a refused request (or handshake) as `wait` says."""
        client = (scope.get("client") or ("?",))[0]
        accepted = False  # a WebSocket closed after its handshake was not refused

        async def paced_send(message):
            nonlocal accepted
            kind = message["type"]
            accepted = accepted or kind == "websocket.accept"
            if (kind == "http.response.start" and message["status"] in REFUSED) or \
                    (kind == "websocket.close" and not accepted) or kind == "websocket.http.response.start":
                await self.wait(client)
            await send(message)

        return paced_send


async def _refuse(scope, receive, send, status: int, message: str) -> None:
    if scope["type"] == "websocket":  # closing before accepting: the handshake gets 403
        return await send({"type": "websocket.close", "code": 1008})
    return await error_response(status, message, close=True)(scope, receive, send)


def _take_key_from_query(scope) -> None:
    """Move `api_key` out of the query string (uvicorn logs the query string)."""
    query = scope.get("query_string") or b""
    if b"api_key" not in query:
        return
    pairs = parse_qsl(query.decode("latin-1"), keep_blank_values=True)
    keys = [v for k, v in pairs if k == "api_key"]
    if keys:
        scope[API_KEY_SCOPE] = keys[-1]
    scope["query_string"] = urlencode([(k, v) for k, v in pairs if k != "api_key"]).encode("latin-1")


class RedactKeys(logging.Filter):
    """Masks the API keys in every record it sees (message and arguments)."""

    def __init__(self, keys: list[str]):
        super().__init__()
        self.keys = sorted({k for k in keys if k}, key=len, reverse=True)

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.keys:
            return True
        try:
            text = record.getMessage()
        except Exception:
            return True
        if any(k in text for k in self.keys):
            # Argument by argument first: formatters such as uvicorn's access log unpack them.
            if isinstance(record.args, tuple):
                record.args = tuple(self.redact(a) if isinstance(a, str) else a for a in record.args)
            record.msg = self.redact(record.msg) if isinstance(record.msg, str) else record.msg
            try:
                text = record.getMessage()
            except Exception:
                pass
            if any(k in text for k in self.keys):
                record.msg, record.args = self.redact(text), None
        return True

    def redact(self, text: str) -> str:
        for k in self.keys:
            text = text.replace(k, "***")
        return text


def install_redaction(keys: list[str]) -> None:
    """Put `RedactKeys` on the loggers a server writes to (uvicorn's and fastcsm's)."""
    if not keys:
        return
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "fastcsm"):
        logger = logging.getLogger(name)
        for f in list(logger.filters):
            if isinstance(f, RedactKeys):
                keys = [*keys, *f.keys]
                logger.removeFilter(f)
        logger.addFilter(RedactKeys(keys))


def timed_h11(header_timeout_s: float):
    """uvicorn's h11 protocol, closing a connection whose request head (request line and
    headers) has not fully arrived `header_timeout_s` after its first byte or its opening."""
    from h11 import IDLE
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class TimedH11Protocol(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm()

        def _arm(self):
            if self._head_timer is None:
                self._head_timer = self.loop.call_later(header_timeout_s, self._head_timeout)

        def _disarm(self):
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def data_received(self, data: bytes) -> None:
            if self.conn.their_state is IDLE and (self.cycle is None or self.cycle.response_complete):
                self._arm()  # a (next) request's head is arriving
            super().data_received(data)
            if self.conn.their_state is not IDLE:
                self._disarm()

        def connection_lost(self, exc):
            self._disarm()
            super().connection_lost(exc)

        def _head_timeout(self):
            self._head_timer = None
            if self.conn.their_state is IDLE and not self.transport.is_closing():
                self.logger.info("closing a connection whose request head did not arrive within %g s",
                                 header_timeout_s)
                self.transport.close()

    return TimedH11Protocol


def uvicorn_config(app, settings: Settings, **overrides):
    import uvicorn

    options = dict(host=settings.host, port=settings.port, log_level=settings.log_level,
                   http=timed_h11(settings.header_timeout_s), timeout_keep_alive=settings.keep_alive_s,
                   limit_concurrency=settings.max_connections, timeout_graceful_shutdown=5,
                   ws_max_size=settings.max_body_bytes)
    options.update(overrides)
    return uvicorn.Config(app, **options)


def burst_for(rate: float) -> float:
    """The burst a pace of `rate` a second allows: a fifth of a second's, at least one."""
    return max(1.0, rate / 5)


class TokenBucket:
    """`rate` tokens a second, at most `burst` held. `take(now)` spends one and says how long to
    wait for it: 0 while the bucket holds one; past that the token is spent before it is there, so
    the waits of callers that come together queue up instead of all ending at once."""

    def __init__(self, rate: float, burst: float, now: float):
        self.rate, self.burst = rate, burst
        self.tokens, self.last = burst, now

    def take(self, now: float) -> float:
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate) - 1
        self.last = now
        return max(0.0, -self.tokens / self.rate)


class Pace:
    """A token bucket for one client's messages: `rate` a second, `burst` (default `burst_for(rate)`)
    at once. `wait()` returns at once while the bucket holds a token, else sleeps until it does.
    Handling a cheap message takes the GIL from the engine's thread as surely as an expensive one,
    so a socket sending thousands of tiny messages must wait between them, not merely yield
    (`clock` and `sleep` are injected by tests)."""

    def __init__(self, rate: float, burst: float | None = None, clock=time.monotonic, sleep=asyncio.sleep):
        burst = burst_for(rate) if burst is None else burst
        self.bucket, self.clock, self.sleep = TokenBucket(rate, burst, clock()), clock, sleep

    async def wait(self) -> None:
        await self.sleep(self.bucket.take(self.clock()))  # (0: a turn for every other task, even within the burst)
