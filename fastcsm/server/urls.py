"""A fastcsm server's addresses from outside: its conversation WebSocket, a free local port to
serve on, and waiting until it is ready (in-process servers, benchmarks, tests)."""

from __future__ import annotations

import socket
import subprocess
import time


def conversation_url(url: str) -> str:
    """`http(s)://host:port` (or `ws(s)://`, with or without the path) -> `ws(s)://host:port/v1/conversations`."""
    url = url.rstrip("/")
    for http, ws in (("http://", "ws://"), ("https://", "wss://")):
        if url.startswith(http):
            url = ws + url[len(http):]
    if not url.startswith(("ws://", "wss://")):
        url = "ws://" + url
    return url if url.endswith("/v1/conversations") else url + "/v1/conversations"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on `host` that nothing listens on right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_ready(url: str, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    """Poll `GET url/readyz` until it answers 200. A server process `proc` that exits first is an
    error that carries the end of its stderr (when it was piped)."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            err = proc.stderr.read()[-3000:] if proc.stderr else ""
            raise RuntimeError(f"the server at {url} exited with {proc.returncode}" + (f":\n{err}" if err else ""))
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not become ready in {timeout_s:g} s")
