"""Word times out of the server: the speech route's `timestamps` (SSE events, the JSON variant),
the conversation's `word` events, and the words an interrupted line keeps."""

from __future__ import annotations

import base64
import json

import httpx
import numpy as np
import pytest

pytest.importorskip("websockets")
from server_harness import LiveServer  # noqa: E402
from websockets.sync.client import connect  # noqa: E402

from fastcsm.model.prompt import text_rows  # noqa: E402
from fastcsm.speech.normalize import Word, normalize  # noqa: E402
from fastcsm.speech.timestamps import SECONDS_PER_WEIGHT, heard, weight  # noqa: E402

SR = 24_000
LINE = "Meet me at 10:30pm, Dr. Nguyen. The 40–60 °C range is fine."
WRITTEN = [w.text for w in normalize(LINE).words]  # "40–60 °C" is one word


@pytest.fixture(scope="module")
def server():
    with LiveServer(slots=2, max_audio_length_ms=8000) as s:
        yield s


def check(times: list[tuple[str, float, float]], words: list[str], duration_s: float, tol: float = 1e-3) -> None:
    assert [w for w, _, _ in times] == words
    ends = 0.0
    for _, start, end in times:
        assert ends - 1e-3 <= start <= end <= duration_s + tol
        ends = end


def test_heard_counts_the_words_begun_in_the_audio_sent():
    words = [Word(t, 0, 0, t) for t in ("one", "two", "three")]  # weights 5, 5, 7
    pcm = np.zeros(SR, np.float32)
    pcm[int(0.2 * SR):] = 0.5  # speech from 0.2 s
    step = weight("one") * SECONDS_PER_WEIGHT
    assert heard(words, pcm[: int(0.15 * SR)], SR) == 0  # silence only
    assert heard(words, pcm[: int((0.2 + step / 2) * SR)], SR) == 1
    assert heard(words, pcm[: int((0.2 + step * 1.5) * SR)], SR) == 2
    assert heard(words, pcm, SR) == 3


def test_a_cut_piece_is_placed_at_the_lines_own_rate():
    from fastcsm.server.words import LineWords

    loud = np.full(SR, 0.5, np.float32)  # one second of speech, no pauses
    line = LineWords(SR)
    first = normalize("one two three four five six").words  # weight 6 * 2 + 22 = 34
    line.start(first)
    line.audio(loud)
    timed = line.done()
    assert [w.text for w in timed] == ["one", "two", "three", "four", "five", "six"] and timed[-1].end == 1.0
    rate = 1.0 / 34  # seconds per unit of weight: half the default speed of speech
    assert not line.in_flight
    line.start(normalize("seven eight nine").words)  # weights 7, 7, 6
    line.audio(loud[: int(7.5 * rate * SR)])
    assert [w.text for w in line.cut()] == ["seven", "eight"]  # at the default rate: "seven" alone
    assert line.heard_text == [w.text for w in first] + ["seven", "eight"] and not line.in_flight


def sse(server, **extra) -> list[dict]:
    body = {"input": LINE, "voice": "0", "response_format": "pcm", "stream_format": "sse", "seed": 1, **extra}
    with httpx.stream("POST", server.url + "/v1/audio/speech", json=body, timeout=120) as r:
        assert r.status_code == 200, r.read()
        return [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]


def test_sse_word_events_follow_their_audio(server):
    events = sse(server, timestamps=True)
    assert [e["type"] for e in sse(server)].count("speech.audio.word") == 0  # only when asked for
    audio_bytes, times = 0, []
    for e in events:
        if e["type"] == "speech.audio.delta":
            audio_bytes += len(base64.b64decode(e["audio"]))
        elif e["type"] == "speech.audio.word":
            assert e["start"] <= audio_bytes / 2 / SR + 1e-3  # its audio was sent before it
            times.append((e["word"], e["start"], e["end"]))
    check(times, WRITTEN, audio_bytes / 2 / SR)
    done = events[-1]
    assert done["type"] == "speech.audio.done"
    assert [(t["word"], t["start_time"], t["end_time"]) for t in done["timestamps"]] == times


def test_json_variant_through_the_openai_package(server):
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="none")
    response = client.audio.speech.create(model="tts-1", voice="alloy", input=LINE, response_format="pcm",
                                          speed=2.0, extra_body={"stream_format": "json", "seed": 1})
    body = json.loads(response.content)
    assert body["audio_format"] == "pcm" and body["sample_rate"] == SR
    duration = len(base64.b64decode(body["audio"])) / 2 / SR
    times = [(t["word"], t["start_time"], t["end_time"]) for t in body["timestamps"]]
    check(times, WRITTEN, duration, tol=0.05)  # atempo's output length is not exact
    assert body["timestamps"][-1]["end_time"] > duration / 2  # times follow the 2x time-scaled audio
    # SSE through the same client: the raw events carry the words
    events = [json.loads(line[6:]) for line in client.audio.speech.create(
        model="tts-1", voice="alloy", input=LINE, response_format="pcm", stream_format="sse",
        extra_body={"timestamps": True, "seed": 1}).text.splitlines() if line.startswith("data: ")]
    assert [e["word"] for e in events if e["type"] == "speech.audio.word"] == WRITTEN


def test_timestamps_need_an_event_or_json_format(server):
    r = httpx.post(server.url + "/v1/audio/speech", json={"input": "Hi.", "voice": "0", "timestamps": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "timestamps"


def ws(server):
    w = connect(server.url.replace("http", "ws") + "/v1/conversations", open_timeout=10)
    assert json.loads(w.recv(timeout=10))["type"] == "ready"
    w.send(json.dumps({"type": "configure", "audio_format": "pcm_f32le"}))
    assert json.loads(w.recv(timeout=10))["type"] == "configured"
    return w


def until_done(w, received: list) -> dict:
    while True:
        msg = w.recv(timeout=120)
        received.append(msg if isinstance(msg, bytes) else json.loads(msg))
        if isinstance(msg, str) and received[-1]["type"] in ("done", "error"):
            return received[-1]


def test_conversation_word_events_come_after_their_audio(server):
    with ws(server) as w:
        w.send(json.dumps({"type": "speak", "text": LINE, "speaker": 0, "seed": 2, "timestamps": True}))
        got: list = []
        done = until_done(w, got)
    assert done["reason"] in ("end", "max_length") and done["text"] == " ".join(WRITTEN)
    samples, times = 0, []
    for m in got:
        if isinstance(m, bytes):
            samples += len(m) // 4
        elif m["type"] == "word":
            assert m["start"] <= samples / SR + 1e-3 and m["utterance"] == 0
            times.append((m["word"], m["start"], m["end"]))
    check(times, WRITTEN, samples / SR)


def test_an_interrupted_line_keeps_the_words_whose_audio_was_sent(server, monkeypatch):
    from fastcsm.server.conversation import Conversation

    turns = []
    real = Conversation.remember

    def remember(self, u):
        real(self, u)
        turns.append(self.state.turns[-1] if self.state.turns else None)

    monkeypatch.setattr(Conversation, "remember", remember)
    line = ("We walked along the quiet river for hours and talked about everything that had happened "
            "since the summer we first met in the small town by the sea")
    with ws(server) as w:
        w.send(json.dumps({"type": "speak", "text": line, "speaker": 0, "seed": 3}))
        got: list = []
        while sum(isinstance(m, bytes) for m in got) < 12:
            m = w.recv(timeout=120)
            got.append(m if isinstance(m, bytes) else json.loads(m))
        w.send(json.dumps({"type": "interrupt"}))
        done = until_done(w, got)
    assert done["reason"] == "interrupted"
    pcm = np.frombuffer(b"".join(m for m in got if isinstance(m, bytes)), "<f4")
    words = normalize(line).words
    n = heard(words, pcm, SR)  # the first piece: placed at the default rate
    assert 0 < n < len(words)
    assert done["text"] == " ".join(w.text for w in words[:n])
    assert not any(isinstance(m, dict) and m["type"] == "word" for m in got)  # the piece never ended
    service = server.service
    rows = text_rows(service.generator.tokenizer, 0, " ".join(w.spoken for w in words[:n]), service.cfg)
    turn = turns[-1]
    assert len(turn) == len(rows) + done["frames"] + 1  # the heard words, then every frame sent and the end frame
    assert (turn.tokens[: len(rows)] == rows.tokens).all()
