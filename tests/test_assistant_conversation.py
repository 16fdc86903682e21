"""Assistant mode end to end: a loopback `fastcsm serve` (tiny checkpoint) answering the user's
turns with the stand-in language model over real HTTP, through the real `openai` SDK: text and
audio of the reply, barge-in that keeps what was heard, and model faults the conversation survives."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
from listen_audio import needs_espeak, overlap, pcm16, silence, spoken
from server_harness import LiveServer

from fastcsm.assistant.history import CUT
from fastcsm.testing_llm import Scripted, StandInLLM

pytest.importorskip("openai")
connect = pytest.importorskip("websockets.sync.client").connect

FRAMES = 3  # frames of each piece (the tiny model never ends a piece early)
PIECE_MS = 80 * FRAMES
LONG = "One two three four five. " * 12  # twelve pieces, slowly written: a reply to cut in


def _script(messages: list[dict]) -> Scripted:
    """The stand-in's reply, picked by the user's last words (a turn after one that was not answered
    joins it in the history)."""
    said = messages[-1]["content"]
    if said.endswith("error status."):
        return Scripted(status=500)
    if said.endswith("hang."):
        return Scripted(hang=True)
    if said.endswith("break off."):
        return Scripted("First part here. Second part here. Third part is never sent.", stop_after=6)
    if said.endswith("short."):
        return Scripted("Okay then.")
    if said.endswith("long."):
        return Scripted(LONG)
    return Scripted("**Hello** there. How can I help you today? 🎉")


@pytest.fixture(scope="module")
def llm():
    with StandInLLM(_script, tokens_per_s=40) as server:
        yield server


@pytest.fixture(scope="module")
def server(llm):
    with LiveServer(llm_url=llm.url, llm_model="stand-in", llm_timeout_s=2.0, system_prompt="Be brief.") as s:
        yield s


class Client:
    """A conversation socket that collects events and counts audio frames."""

    def __init__(self, server: LiveServer):
        self.ws = connect(server.url.replace("http", "ws") + "/v1/conversations", open_timeout=10).__enter__()
        assert json.loads(self.ws.recv(timeout=10))["type"] == "ready"
        self.events: list[dict] = []
        self.frames = 0

    def send(self, **msg) -> None:
        self.ws.send(json.dumps(msg))

    def until(self, kind: str, timeout: float = 60, **match) -> dict:
        """Read until an event of type `kind` (with the fields `match`); every event is kept."""
        deadline = time.monotonic() + timeout
        while True:
            msg = self.ws.recv(timeout=max(0.1, deadline - time.monotonic()))
            if isinstance(msg, bytes):
                self.frames += 1
                continue
            event = json.loads(msg)
            self.events.append(event)
            if event["type"] == kind and all(event.get(k) == v for k, v in match.items()):
                return event

    def of(self, kind: str) -> list[dict]:
        return [e for e in self.events if e["type"] == kind]

    def configure(self, **extra) -> dict:
        extra = {"user_speaker": 0, "assistant_speaker": 1, **extra}  # the user 0, the replies 1
        self.send(type="configure", assistant=True, max_audio_length_ms=PIECE_MS, **extra)
        return self.until("configured", timeout=10)

    def close(self) -> None:
        self.ws.close()


def _user_messages(llm: StandInLLM, n: int) -> list[dict]:
    return llm.requests[n]["messages"]


def test_a_user_turn_is_answered_in_text_and_audio(server, llm):
    c = Client(server)
    c.configure(user_speaker=0, assistant_speaker=1)
    first = len(llm.requests)
    c.send(type="add_turn", speaker=0, text="Hi, who are you?")
    reply = c.until("assistant_reply")
    pieces = c.of("assistant_text")
    assert [p["text"] for p in pieces] == ["Hello there.", "How can I help you today?"]  # spoken, filtered
    assert [p["piece"] for p in pieces] == [0, 1]
    done = c.of("done")[0]
    assert done["reason"] == "max_length" and done["pieces"] == 2 and done["frames"] == 2 * FRAMES
    assert c.frames == 2 * FRAMES
    assert c.of("started")[0]["speaker"] == 1
    assert reply["reason"] == "stop" and reply["text"] == "Hello there. How can I help you today?"
    assert reply["utterance"] == done["utterance"] == pieces[0]["utterance"]
    assert 0 < reply["first_token_ms"] <= reply["first_piece_ms"] <= reply["first_audio_ms"]
    kinds = [e["type"] for e in c.events]
    assert kinds.index("assistant_text") < kinds.index("first_audio") < kinds.index("done") < \
        kinds.index("assistant_reply")
    assert _user_messages(llm, first) == [{"role": "system", "content": "Be brief."},
                                          {"role": "user", "content": "Hi, who are you?"}]
    # A turn of another speaker joins the conversation unanswered; the user's next turn sees the reply.
    c.send(type="add_turn", speaker=2, text="Someone else speaks.")
    assert c.until("turn_added")["index"] == 2  # the user's turn, the reply, this one
    c.send(type="add_turn", speaker=0, text="Tell me more.")
    c.until("assistant_reply")
    assert _user_messages(llm, first + 1)[2:] == [
        {"role": "assistant", "content": "Hello there. How can I help you today?"},
        {"role": "user", "content": "Tell me more."}]
    assert len(llm.requests) == first + 2
    c.close()


def _interrupted(c: Client, llm: StandInLLM, cut) -> dict:
    """Start a long reply, let its first piece play, `cut` it; the `assistant_reply`."""
    c.send(type="add_turn", speaker=0, text="Say something long.")
    c.until("assistant_text", piece=1)  # the first piece played whole, the second one begun
    cut()
    reply = c.until("assistant_reply", reason="interrupted")
    assert c.of("done")[-1]["reason"] == "interrupted"
    return reply


def test_interrupt_cancels_the_model_and_keeps_what_was_heard(server, llm):
    c = Client(server)
    c.configure()
    first = len(llm.requests)
    # The client played the first piece (3 frames) and nothing more: its words, and the cut.
    reply = _interrupted(c, llm, lambda: c.send(type="interrupt", heard_ms=PIECE_MS))
    assert llm.wait_connections(0) == 0  # the model's stream was closed, not left open
    assert reply["text"] == f"One two three four five. {CUT}"
    assert llm.requests[first]["stream"] is True
    c.send(type="add_turn", speaker=0, text="Hi again.")
    assert c.until("assistant_reply")["reason"] == "stop"
    assert _user_messages(llm, first + 1)[-2:] == [{"role": "assistant", "content": reply["text"]},
                                                   {"role": "user", "content": "Hi again."}]
    # Nothing played: the reply is not in the history at all.
    reply = _interrupted(c, llm, lambda: c.send(type="interrupt", heard_ms=0))
    assert reply["text"] == ""
    c.send(type="add_turn", speaker=0, text="Hello?")
    c.until("assistant_reply")
    assert _user_messages(llm, first + 3)[-2:] == [
        {"role": "assistant", "content": "Hello there. How can I help you today?"},
        {"role": "user", "content": "Say something long. Hello?"}]  # the user's two turns, as one
    c.close()


def test_interrupt_without_heard_ms_keeps_the_words_whose_audio_was_sent(server, llm):
    c = Client(server)
    c.configure()
    reply = _interrupted(c, llm, lambda: c.send(type="interrupt"))
    assert llm.wait_connections(0) == 0
    # The line's `done.text`: the written words whose audio was sent (word times), then the cut.
    heard = c.of("done")[-1]["text"]
    assert heard.startswith("One two three four five.") and reply["text"] == f"{heard} {CUT}"
    c.close()


def test_a_new_user_turn_mid_reply_is_barge_in(server, llm):
    c = Client(server)
    c.configure()
    first = len(llm.requests)
    reply = _interrupted(c, llm, lambda: c.send(type="add_turn", speaker=0, text="Stop, be short."))
    assert reply["text"].startswith("One two three four five.") and reply["text"].endswith(CUT)
    assert c.until("assistant_reply")["reason"] == "stop"  # the new turn is answered
    assert llm.wait_connections(1) == 1  # its connection, pooled: the cut reply's was closed
    # CSM's context has the cut reply where it was heard, before the new turn: the answer (one
    # piece) reuses the cached rows of the first turn and of the reply's first piece, not the first turn's alone.
    done = c.of("done")[-1]
    assert done["pieces"] == 1 and done["reused_rows"] > c.of("started")[0]["prompt_rows"]
    messages = _user_messages(llm, first + 1)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[2]["content"] == reply["text"] and messages[3]["content"] == "Stop, be short."
    c.close()


@pytest.mark.parametrize("said, code", [("Give me an error status.", "llm_error"),
                                        ("Please hang.", "llm_timeout"),
                                        ("Talk and break off.", "llm_stopped")])
def test_a_model_fault_is_an_error_and_the_next_turn_works(server, llm, said, code):
    c = Client(server)
    c.configure()
    c.send(type="add_turn", speaker=0, text=said)
    error = c.until("error")
    assert error["code"] == code and "language model" in error["message"]
    reply = c.until("assistant_reply")
    assert reply["reason"] == "error"
    if code == "llm_stopped":  # the pieces complete before the break are spoken, and kept
        assert [p["text"] for p in c.of("assistant_text")] == ["First part here.", "Second part here."]
        assert reply["text"] == "First part here. Second part here."
    else:
        assert reply["text"] == "" and reply["utterance"] is None and not c.of("started")
    c.send(type="add_turn", speaker=0, text="Hello?")
    assert c.until("assistant_reply")["reason"] == "stop"
    assert llm.wait_connections(1) <= 1  # nothing left open but the pooled connection
    c.close()


def test_interrupt_before_the_first_piece_closes_the_request_and_reset_forgets(server, llm):
    c = Client(server)
    c.configure()
    pooled, asked = llm.open_connections, len(llm.requests)
    c.send(type="add_turn", speaker=0, text="Please hang.")
    while len(llm.requests) == asked:  # until the model has the request
        time.sleep(0.01)
    c.send(type="interrupt")
    reply = c.until("assistant_reply")
    assert reply == {**reply, "reason": "interrupted", "text": "", "utterance": None, "first_token_ms": None}
    assert not c.of("error") and not c.of("started")
    deadline = time.monotonic() + 5
    while llm.open_connections > pooled and time.monotonic() < deadline:
        time.sleep(0.01)
    assert llm.open_connections <= pooled  # the waiting request's connection was closed
    c.send(type="reset")
    c.send(type="add_turn", speaker=0, text="Hello after the reset.")
    assert c.until("assistant_reply")["reason"] == "stop"
    assert llm.requests[-1]["messages"][1:] == [{"role": "user", "content": "Hello after the reset."}]
    c.close()


def test_a_slow_model_does_not_hold_up_another_conversation(server, llm):
    waiting, other = Client(server), Client(server)
    waiting.configure()
    waiting.send(type="add_turn", speaker=0, text="Please hang.")
    other.send(type="speak", text="Meanwhile, I speak.", speaker=0, max_audio_length_ms=PIECE_MS)
    assert other.until("done")["reason"] == "max_length"
    assert not waiting.of("error")  # (its events are read only now: the model is still silent)
    assert waiting.until("error")["code"] == "llm_timeout"
    waiting.close()
    other.close()


def test_assistant_mode_needs_a_language_model_and_known_voice(server):
    c = Client(server)
    c.send(type="configure", assistant=True, assistant_voice="nobody")
    assert c.until("error", timeout=10)["code"] in ("not_found", "bad_request")
    c.close()
    with LiveServer() as plain:
        c = Client(plain)
        c.send(type="configure", assistant=True)
        error = c.until("error", timeout=10)
        assert error["code"] == "bad_request" and "--llm-url" in error["message"]
        c.send(type="add_turn", speaker=0, text="Hi.")
        assert c.until("turn_added", timeout=10)["index"] == 0 and not c.of("started")  # not answered
        c.close()


def test_an_unreachable_model_is_an_error_and_the_conversation_goes_on():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with LiveServer(llm_url=f"http://127.0.0.1:{port}/v1", llm_model="m") as srv:
        c = Client(srv)
        c.configure()
        for _ in range(2):
            c.send(type="add_turn", speaker=0, text="Anyone there?")
            error = c.until("error")
            assert error["code"] == "llm_unreachable" and f"127.0.0.1:{port}" in error["message"]
            assert c.until("assistant_reply")["reason"] == "error"
        c.send(type="speak", text="Still here.", speaker=1, max_audio_length_ms=PIECE_MS)
        assert c.until("done")["reason"] == "max_length"
        c.close()


@pytest.mark.slow
def test_fastcsm_serve_with_a_language_model_answers_in_text_and_audio(llm, tmp_path):
    """The command line itself: `fastcsm serve --llm-url --llm-model --system-prompt @FILE`."""
    from fastcsm.server.urls import free_port, wait_ready
    from fastcsm.testing import write_hf_checkpoint

    write_hf_checkpoint(tmp_path / "ckpt")
    (tmp_path / "prompt.txt").write_text("You are a voice. Be brief.\n")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTCSM_")}
    with open(tmp_path / "server.log", "w+b") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fastcsm", "serve", "--model", str(tmp_path / "ckpt"), "--device", "cpu",
             "--host", "127.0.0.1", "--port", str(port), "--voices-dir", str(tmp_path / "voices"),
             "--llm-url", llm.url, "--llm-model", "stand-in", "--system-prompt", f"@{tmp_path}/prompt.txt"],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_ready(url, 120, proc)
            c = Client(SimpleNamespace(url=url))
            c.configure()
            first = len(llm.requests)
            c.send(type="add_turn", speaker=0, text="Hello, are you there?")
            reply = c.until("assistant_reply")
            assert reply["reason"] == "stop" and reply["text"] == "Hello there. How can I help you today?"
            assert [p["text"] for p in c.of("assistant_text")] == ["Hello there.", "How can I help you today?"]
            assert c.of("done")[0]["reason"] == "max_length" and c.frames == 2 * FRAMES
            assert llm.requests[first]["messages"][0] == {"role": "system", "content": "You are a voice. Be brief."}
            c.close()
        except Exception:
            log.seek(0)
            print(log.read().decode(errors="replace")[-4000:])
            raise
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


@needs_espeak
def test_a_reply_asked_at_the_users_pause_answers_the_turn_the_pause_ends():
    """`preemptive_reply`: the model is asked as soon as the pause's transcript is ready. The turn
    that pause ends is answered by that request alone; when the user goes on, that request is
    closed and the whole turn is asked."""
    pytest.importorskip("pocketsphinx")
    rate, chunk = 16_000, 640

    def stream(c: Client, wav) -> None:  # a little ahead of real time: 1.5 s at the end, within the server's 2 s
        data = pcm16(wav)
        for i in range(0, len(data), 2 * chunk):
            c.ws.send(data[i: i + 2 * chunk])
            time.sleep(0.8 * chunk / rate)

    def last_words(request: dict) -> str:
        return request["messages"][-1]["content"]

    first, second, quiet = spoken("what time is it"), spoken("thank you very much"), silence
    with StandInLLM([Scripted("It is noon.")] * 8, tokens_per_s=200) as llm, \
            LiveServer(asr_model="pocketsphinx", llm_url=llm.url, llm_model="stand-in", preemptive_reply=True,
                       turn_silence_ms=1000) as server:
        c = Client(server)
        c.send(type="configure", assistant=True, input_audio={"sample_rate": rate}, max_audio_length_ms=PIECE_MS)
        assert c.until("configured")["input_audio"]["sample_rate"] == rate
        # A sentence and a pause shorter than the 1 s that ends a turn: with no more audio the turn
        # stays open, so the pause's transcript comes as a partial one, and the model is asked.
        stream(c, np.concatenate([quiet(0.3), first, quiet(0.3)]))
        partial = c.until("user_transcript_partial")["text"]
        stream(c, quiet(0.9))
        turn = c.until("user_turn")
        reply = c.until("assistant_reply")
        assert turn["added"] and turn["text"] == partial and reply["reason"] == "stop", (turn, reply)
        assert [last_words(r) for r in llm.requests] == [partial]  # the turn took the reply asked at its pause
        # The user goes on past a pause: the request of that pause is closed, the whole turn asked.
        stream(c, np.concatenate([quiet(0.3), first, quiet(0.3)]))
        went_on = c.until("user_transcript_partial")["text"]
        stream(c, np.concatenate([second, quiet(1.1)]))
        turn = c.until("user_turn")
        assert c.until("assistant_reply")["reason"] == "stop"
        assert overlap(went_on, "what time is it") >= 0.75, went_on
        assert len(turn["text"].split()) > len(went_on.split()), (went_on, turn)
        assert [last_words(r) for r in llm.requests[1:]] == [went_on, turn["text"]]
        c.close()
