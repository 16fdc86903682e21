"""A real uvicorn server on loopback for the server tests: a free port, a thread, a tiny model."""

from __future__ import annotations

import functools
import tempfile
import threading
from pathlib import Path

import httpx
import uvicorn

from fastcsm.server.app import create_app
from fastcsm.server.limits import uvicorn_config
from fastcsm.server.settings import Settings
from fastcsm.server.urls import free_port, wait_ready


@functools.cache
def tiny_checkpoint() -> Path:
    """A tiny random transformers-format CSM (with its tiny Mimi), written once per test run."""
    from fastcsm.testing import write_hf_checkpoint

    root = Path(tempfile.mkdtemp(prefix="fastcsm-server-ckpt-"))
    write_hf_checkpoint(root, seed=0)
    return root


class LiveServer:
    """`create_app(settings, runner=runner)` served by uvicorn in a background thread."""

    def __init__(self, log_level: str = "warning", runner=None, **settings):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        settings.setdefault("model", str(tiny_checkpoint()))
        self.settings = Settings(device="cpu", host="127.0.0.1", port=self.port, **settings)
        self.app = create_app(self.settings, runner=runner)
        # The served settings (head and body deadlines, connection cap) as `fastcsm serve` uses them.
        config = uvicorn_config(self.app, self.settings, log_level=log_level, ws="websockets",
                                timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name=f"uvicorn-{self.port}", daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        wait_ready(self.url, 120)  # a loaded machine loads slowly
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)

    @property
    def service(self):
        return self.app.state.service

    def metrics(self) -> dict[str, float]:
        """The plain (non-histogram) series of /metrics."""
        text = httpx.get(self.url + "/metrics", timeout=5).text
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#") and "{" not in line:
                name, value = line.split()
                out[name] = float(value)
        return out


def spoken_whole(server: LiveServer, text: str, **speak) -> bytes:
    """The PCM of `text` spoken in one `speak` on a fresh conversation WebSocket."""
    import json

    from websockets.sync.client import connect

    with connect(server.url.replace("http", "ws") + "/v1/conversations", open_timeout=10) as ws:
        ws.recv(timeout=10)
        ws.send(json.dumps({"type": "speak", "text": text, **speak}))
        audio = []
        while True:
            msg = ws.recv(timeout=60)
            if isinstance(msg, bytes):
                audio.append(msg)
            elif json.loads(msg)["type"] in ("done", "error"):
                return b"".join(audio)


def recorded_turns(monkeypatch) -> tuple[list, list]:
    """What the servers' conversations are sent and add: each `AddTurn` message, and each turn that
    joins a conversation as (speaker, its transcript when the server made it, its rows)."""
    from fastcsm.server.conversation import Conversation

    turns, added = [], []
    add_turn, append_turn = Conversation.add_turn, Conversation.append_turn

    async def recording_add_turn(self, m):
        turns.append(m)
        return await add_turn(self, m)

    async def recording_append_turn(self, turn, speaker, text=None):
        added.append((speaker, text, len(turn)))
        return await append_turn(self, turn, speaker, text)

    monkeypatch.setattr(Conversation, "add_turn", recording_add_turn)
    monkeypatch.setattr(Conversation, "append_turn", recording_append_turn)
    return turns, added
