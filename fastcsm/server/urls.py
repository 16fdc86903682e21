"""Where a client finds a server's conversation WebSocket, given the server's address."""

from __future__ import annotations


def conversation_url(url: str) -> str:
    """`http(s)://host:port` (or `ws(s)://`, with or without the path) -> `ws(s)://host:port/v1/conversations`."""
    url = url.rstrip("/")
    for http, ws in (("http://", "ws://"), ("https://", "wss://")):
        if url.startswith(http):
            url = ws + url[len(http):]
    if not url.startswith(("ws://", "wss://")):
        url = "ws://" + url
    return url if url.endswith("/v1/conversations") else url + "/v1/conversations"
