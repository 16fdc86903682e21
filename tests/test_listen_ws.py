"""Listening over the conversation WebSocket, on loopback servers with pocketsphinx and Silero:
the user's microphone audio streams in as binary messages, espeak-ng speaks it, and the turns
heard join the conversation with their audio and transcript."""

from __future__ import annotations

import base64
import io
import json
import time
from contextlib import contextmanager

import numpy as np
import pytest
import soundfile as sf
from listen_audio import needs_espeak, overlap, pcm16, silence, spoken
from server_harness import LiveServer
from websockets.sync.client import connect

pytestmark = needs_espeak
RATE = 16_000
CHUNK_S = 0.04


@pytest.fixture(scope="module")
def server():
    with LiveServer(slots=4, asr_model="pocketsphinx", max_audio_length_ms=8000) as s:
        yield s


@contextmanager
def ws_connect(server):
    with connect(server.url.replace("http", "ws") + "/v1/conversations", open_timeout=10, max_size=None) as ws:
        assert json.loads(ws.recv(timeout=10))["type"] == "ready"
        yield ws


def configure(ws, **fields) -> dict:
    ws.send(json.dumps({"type": "configure", "input_audio": {"sample_rate": RATE}, **fields}))
    return next_event(ws)


def next_event(ws, timeout: float = 30) -> dict:
    while True:
        msg = ws.recv(timeout=timeout)
        if isinstance(msg, str):
            return json.loads(msg)


def until(ws, kind: str, timeout: float = 30) -> list[dict]:
    """The events up to the first of type `kind` (binary messages skipped)."""
    events = [next_event(ws, timeout)]
    while events[-1]["type"] != kind:
        events.append(next_event(ws, timeout))
    return events


def stream(ws, wav: np.ndarray, rate: int = RATE, pace: float = 0.6) -> None:
    """`wav` as 40 ms chunks, each followed by `pace` of its length asleep (ahead of real time, within
    the server's 2 s)."""
    step = int(CHUNK_S * rate)
    for i in range(0, len(wav), step):
        ws.send(pcm16(wav[i: i + step]))
        time.sleep(CHUNK_S * pace)


def said(text: str, rate: int = RATE) -> np.ndarray:
    return np.concatenate([silence(0.3, rate), spoken(text, rate), silence(0.9, rate)])


def test_a_spoken_turn_joins_the_conversation_with_its_audio_and_text(server):
    with ws_connect(server) as ws:
        assert configure(ws)["input_audio"] == {"sample_rate": RATE, "language": None}
        stream(ws, said("what time is it"))
        events = until(ws, "user_turn")
        # The turn's one pause (the one that ended it) was transcribed early: its text, when it came
        # before the stop, is the turn's.
        partials = [e for e in events if e["type"] == "user_transcript_partial"]
        events = [e for e in events if e["type"] != "user_transcript_partial"]
        kinds = [e["type"] for e in events]
        assert kinds == ["user_speech_started", "user_speech_stopped", "turn_added", "user_turn"], kinds
        added, turn = events[2], events[3]
        assert all(p["text"] == turn["text"] for p in partials), (partials, turn)
        assert overlap(turn["text"], "what time is it") >= 0.75, turn
        assert added["text"] == turn["text"] and added["speaker"] == turn["speaker"] == 1
        assert turn["added"] and not turn["cut"] and not events[1]["cut"]
        assert turn["frames"] == pytest.approx(turn["audio_ms"] / 80, abs=1) and turn["frames"] > 8
        # The turn's rows (its text, its frames and their end) are in the next line's prompt.
        ws.send(json.dumps({"type": "speak", "text": "It is noon.", "voice": "0", "max_audio_length_ms": 160}))
        with_turn = until(ws, "started")[-1]["prompt_rows"]
        until(ws, "done")
    with ws_connect(server) as ws:
        ws.send(json.dumps({"type": "speak", "text": "It is noon.", "voice": "0", "max_audio_length_ms": 160}))
        alone = until(ws, "started")[-1]["prompt_rows"]
    assert with_turn == alone + added["rows"]
    assert added["rows"] >= turn["frames"] + 1


def test_other_rates_are_resampled(server):
    with ws_connect(server) as ws:
        ws.send(json.dumps({"type": "configure", "input_audio": {"sample_rate": 48_000}, "user_speaker": 3}))
        assert next_event(ws)["type"] == "configured"
        stream(ws, said("thank you very much", 48_000), 48_000)
        turn = until(ws, "user_turn")[-1]
        assert overlap(turn["text"], "thank you very much") >= 0.75 and turn["speaker"] == 3, turn


def test_a_pause_the_user_speaks_past_comes_as_a_partial_transcript(server):
    first, second = spoken("what time is it"), spoken("thank you very much")
    with ws_connect(server) as ws:
        configure(ws)
        # The first sentence, espeak-ng's quiet after it (a pause, too short to end the turn), and
        # the start of the second: the turn is open, so the pause's transcript is a partial one.
        stream(ws, np.concatenate([silence(0.3), first, second[:RATE // 2]]))
        events = until(ws, "user_transcript_partial")
        assert [e["type"] for e in events] == ["user_speech_started", "user_transcript_partial"], events
        assert overlap(events[-1]["text"], "what time is it") >= 0.75, events
        stream(ws, np.concatenate([second[RATE // 2:], silence(0.9)]))
        events = until(ws, "user_turn")
        kinds = [e["type"] for e in events if e["type"] != "user_transcript_partial"]
        assert kinds == ["user_speech_stopped", "turn_added", "user_turn"], kinds
        assert overlap(events[-1]["text"], "what time is it thank you very much") >= 0.75, events[-1]


def test_the_user_speaking_interrupts_the_line_unless_barge_in_is_off(server):
    with ws_connect(server) as ws:
        configure(ws)
        # A streamed line left open: it is in flight until its text is complete.
        ws.send(json.dumps({"type": "speak", "text": "Well, let me think", "voice": "0", "more": True}))
        stream(ws, said("what time is it"))
        events = until(ws, "user_turn")
        kinds = [e["type"] for e in events]
        done = next(e for e in events if e["type"] == "done")
        assert done["reason"] == "interrupted"
        assert kinds.index("user_speech_started") < kinds.index("done"), kinds
    with ws_connect(server) as ws:
        configure(ws, barge_in=False)
        ws.send(json.dumps({"type": "speak", "text": "Well, let me think", "voice": "0", "more": True,
                            "max_audio_length_ms": 160}))
        stream(ws, said("what time is it"))
        events = until(ws, "user_turn")
        assert "done" not in [e["type"] for e in events], events
        ws.send(json.dumps({"type": "append_text", "text": ".", "more": False}))
        assert until(ws, "done")[-1]["reason"] != "interrupted"


def test_add_turn_with_audio_alone_is_transcribed(server):
    buf = io.BytesIO()
    sf.write(buf, spoken("thank you very much"), RATE, format="WAV")
    with ws_connect(server) as ws:
        ws.send(json.dumps({"type": "add_turn", "speaker": 1, "audio": base64.b64encode(buf.getvalue()).decode()}))
        added = next_event(ws)
        assert added["type"] == "turn_added" and overlap(added["text"], "thank you very much") >= 0.75, added
        ws.send(json.dumps({"type": "add_turn", "speaker": 1}))
        assert "text, audio, or both" in next_event(ws)["message"]
        ws.send(json.dumps({"type": "add_turn", "speaker": 1, "text": "typed", "audio": None}))
        added = next_event(ws)
        assert added["type"] == "turn_added" and added["text"] is None


def test_bad_input_audio_gets_errors_and_disturbs_nothing(server):
    with ws_connect(server) as ws, ws_connect(server) as other:
        other.send(json.dumps({"type": "speak", "text": "I am still here.", "voice": "0", "more": True}))
        ws.send(pcm16(silence(0.04)))
        error = next_event(ws)
        assert error["type"] == "error" and "input_audio" in error["message"] and "configure" in error["message"]
        ws.send(json.dumps({"type": "configure", "input_audio": {"sample_rate": 4000}}))
        error = next_event(ws)
        assert error["type"] == "error" and "sample_rate" in error["message"]
        ws.send(json.dumps({"type": "configure", "input_audio": {"sample_rate": True}}))
        assert next_event(ws)["type"] == "error"
        configure(ws)
        ws.send(b"\x00" * 641)
        error = next_event(ws)
        assert error["type"] == "error" and "odd byte count" in error["message"]
        ws.send(pcm16(silence(5.5)))
        assert "longer than" in next_event(ws)["message"]
        for _ in range(40):  # 4 s of audio at once: faster than real time
            ws.send(pcm16(silence(0.1)))
        error = next_event(ws)
        assert error["type"] == "error" and "faster than real time" in error["message"]
        # The socket goes on: a new configure, and speech at the pace of a microphone, are heard.
        configure(ws)
        stream(ws, said("what time is it"))
        turn = [e for e in until(ws, "user_turn") if e["type"] != "error"][-1]
        assert overlap(turn["text"], "what time is it") >= 0.75
        # The other socket's line was never disturbed.
        other.send(json.dumps({"type": "append_text", "text": "", "more": False}))
        assert until(other, "done")[-1]["reason"] in ("end", "max_length")


def test_a_turn_over_the_cap_is_cut_and_says_so():
    with LiveServer(slots=1, asr_model="pocketsphinx", max_turn_s=1.0) as server, ws_connect(server) as ws:
        configure(ws)
        stream(ws, said("i would like a cup of coffee"))
        events = until(ws, "user_turn")
        stopped = next(e for e in events if e["type"] == "user_speech_stopped")
        assert stopped["cut"] and events[-1]["cut"]
        assert events[-1]["audio_ms"] == pytest.approx(1000, abs=40)


def test_listening_needs_speech_recognition():
    with LiveServer(slots=1) as server, ws_connect(server) as ws:
        ws.send(json.dumps({"type": "configure", "input_audio": {"sample_rate": RATE}}))
        error = next_event(ws)
        assert error["type"] == "error" and "no speech recognition" in error["message"]
        ws.send(pcm16(silence(0.04)))
        assert "configure" in next_event(ws)["message"]
        ws.send(json.dumps({"type": "add_turn", "speaker": 1, "audio": "AAAA"}))
        assert "no speech recognition" in next_event(ws)["message"]


def test_a_paused_turn_takes_the_whole_decode_when_it_is_ready_else_the_live_one():
    """With live transcription a pause is decoded both ways; the turn it ends takes the whole
    decode if it is done (it hears better), else the live one, ready soon after the pause."""
    from concurrent.futures import Future

    from fastcsm.server.conversation import Pause

    def futures(whole_state: str | None) -> tuple[Future | None, Future]:
        whole = None if whole_state is None else Future()
        if whole_state == "done":
            whole.set_result("whole")
        elif whole_state == "failed":
            whole.set_exception(RuntimeError("the recogniser broke"))
        elif whole_state == "cancelled":
            whole.cancel()
        live = Future()
        return whole, live

    for state, taken in [("done", "whole"), ("running", "live"), ("failed", "live"), ("cancelled", "live"),
                         (None, "live")]:
        whole, live = futures(state)
        pause = Pause(None, whole, live, None)
        assert pause.transcript() is (whole if taken == "whole" else live), state
    whole = Future()
    assert Pause(None, whole, None, None).transcript() is whole  # (no live transcription)
    pause = Pause(None, *futures("running"), None)
    pause.cancel()
    assert pause.whole.cancelled() and pause.live.cancelled()


def test_with_live_transcription_later_turns_are_decoded_as_spoken():
    """`transcribe_live`: the stream's first turn is decoded whole, later ones as they are spoken,
    starting from what the recogniser adapted to, which a `reset` keeps (same microphone, same voice)."""
    with LiveServer(slots=1, asr_model="pocketsphinx", transcribe_live=True) as server, ws_connect(server) as ws:
        sphinx, opened = server.service.asr.transcriber, []
        live = sphinx.live
        sphinx.live = lambda adapted: opened.append(adapted) or live(adapted)
        configure(ws)
        texts = []
        for _ in range(2):
            stream(ws, said("what time is it"))
            texts.append(until(ws, "user_turn")[-1]["text"])
            ws.send(json.dumps({"type": "reset"}))  # (answered by no event)
        assert all(overlap(text, "what time is it") >= 0.75 for text in texts), texts
        assert opened[0] is None and opened[1], opened
