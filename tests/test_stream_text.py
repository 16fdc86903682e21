"""Text that streams in on the conversation WebSocket (`speak` with `more: true`, `append_text`):
spoken piece by piece as it arrives, equal to the whole line spoken at once."""

from __future__ import annotations

import json
import random
import time

import pytest

pytest.importorskip("websockets")
from server_harness import LiveServer  # noqa: E402
from websockets.sync.client import connect  # noqa: E402

from fastcsm.speech.text import speech_pieces  # noqa: E402

LINE = "Hello there. How are you today? I am fine, thanks for asking, and I hope that you are well too."


@pytest.fixture(scope="module")
def server():
    with LiveServer(slots=4, max_audio_length_ms=8000) as s:
        yield s


@pytest.fixture
def spoken(monkeypatch):
    """The codes of every piece each finished utterance remembered, in order."""
    from fastcsm.server.conversation import Conversation

    out = []
    real = Conversation.remember

    def remember(self, u):
        out.append([[c.tolist() for c in codes] for _, codes in u.line.spoken])
        return real(self, u)

    monkeypatch.setattr(Conversation, "remember", remember)
    return out


def ws(server):
    w = connect(server.url.replace("http", "ws") + "/v1/conversations", open_timeout=10)
    assert json.loads(w.recv(timeout=10))["type"] == "ready"
    return w


def collect(w, until="done") -> tuple[list[dict], list[bytes]]:
    events, audio = [], []
    while True:
        msg = w.recv(timeout=60)
        if isinstance(msg, bytes):
            audio.append(msg)
            continue
        events.append(json.loads(msg))
        if events[-1]["type"] in (until, "error"):
            return events, audio


def fragments(text: str, size: int = 4) -> list[str]:
    """A simulated LLM: about one token (4 characters) at a time."""
    return [text[i:i + size] for i in range(0, len(text), size)]


# -- splitting ------------------------------------------------------------------------------------

def test_pieces_of_fragments_are_a_prefix_of_the_whole_lines_pieces():
    rng = random.Random(0)
    lines = [LINE, "Well, this is a very long clause that goes on and on, and then another one follows, and a short, "
                   "one.", 'He said "stop." Then left.\n\nA new paragraph, with a clause long enough to be cut, yes.',
             "Dr. Smith lives at No. 5 — the house with the red door — since 2001!", "Hi", "One.Two. Three"]
    for line in lines:
        whole = speech_pieces(line)
        assert whole and all(whole)
        for _ in range(100):
            cuts = sorted(rng.sample(range(1, len(line)), min(len(line) - 1, rng.randint(1, 25)))) + [len(line)]
            before = []
            for cut in cuts:
                now = speech_pieces(line[:cut], final=cut == len(line))
                assert now[:len(before)] == before, (line[:cut], now, before)
                before = now
            assert before == whole
    assert speech_pieces(LINE) == ["Hello there.", "How are you today?",
                                   "I am fine, thanks for asking, and I hope that you are well too."]
    assert speech_pieces("Hello there. How", final=False) == ["Hello there."]
    assert speech_pieces("Hello there.", final=False) == []  # "there.5" may follow
    assert speech_pieces("Hello there. ", final=False) == ["Hello there."]


def test_a_line_split_fragment_by_fragment_is_the_line_split_at_once():
    from fastcsm.speech.planner import streamed_line

    rng = random.Random(1)
    words = ["a", "word", " ", "  ", "\n", "\n\n", ".", "!", "?", ",", ";", " - ", "—", '"', ")", "Mr.", " Dr. ", "J.",
             "\t", "x" * 45]
    for _ in range(300):
        text = "".join(rng.choice(words) for _ in range(rng.randint(1, 60)))
        line, pos = streamed_line(), 0
        while pos < len(text):
            size = rng.choice([0, 1, 2, 5, 13])
            line.add(text[pos:pos + size], final=False)
            pos += size
            assert line.pieces == speech_pieces(text[:pos], final=False), text[:pos]
        assert line.add("", final=True) == speech_pieces(text)
        with pytest.raises(ValueError):
            line.add("more", final=True)


@pytest.mark.parametrize("fragment", ["", " ", "b", "a. ", "x, y — z "], ids=repr)
def test_a_fragment_costs_the_same_whatever_the_length_of_the_line_before_it(fragment):
    """The flood that froze the server: a 4 KB line (initials: one sentence that never ends), then
    fragment after fragment. Each is split from the last complete piece on, so the characters the
    splitter examines per fragment do not grow with the line."""
    from fastcsm.speech.planner import streamed_line

    def examined_per_fragment(head: str) -> float:
        line = streamed_line()
        line.add(head, final=False)
        before = line.examined
        for _ in range(200):
            line.add(fragment, final=False)
        return (line.examined - before) / 200

    short, long = examined_per_fragment("a. "), examined_per_fragment("a. " * 1360)
    assert long == short <= 20 * max(1, len(fragment))
    assert examined_per_fragment("Well. " * 680) == examined_per_fragment("Well. ")  # complete sentences


# -- the WebSocket --------------------------------------------------------------------------------

@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"seed": 11}], ids=["greedy", "seeded"])
def test_streamed_line_equals_the_whole_line(server, spoken, sampling):
    speak = {"type": "speak", "voice": "0", "max_audio_length_ms": 240, **sampling}
    with ws(server) as w:
        w.send(json.dumps({**speak, "text": LINE}))
        whole_events, whole_audio = collect(w)
    with ws(server) as w:
        parts = fragments(LINE)
        w.send(json.dumps({**speak, "text": parts[0], "more": True}))
        for part in parts[1:]:
            w.send(json.dumps({"type": "append_text", "text": part, "more": True}))
        w.send(json.dumps({"type": "append_text", "text": "", "more": False}))
        events, audio = collect(w)
    done, whole_done = events[-1], whole_events[-1]
    assert done["type"] == whole_done["type"] == "done" and done["reason"] == "max_length"
    assert done["pieces"] == whole_done["pieces"] == 3 and done["frames"] == 9
    assert [e["type"] for e in events] == ["started", "first_audio", "done"]
    assert len(audio) == 9 and b"".join(audio) == b"".join(whole_audio)
    assert spoken[-1] == spoken[-2] and len(spoken[-1]) == 3  # the codes of every piece


def test_speaking_starts_before_the_line_is_complete(server):
    with ws(server) as w:
        t_speak = time.perf_counter()
        w.send(json.dumps({"type": "speak", "voice": "0", "text": "Hello", "more": True, "max_audio_length_ms": 240}))
        time.sleep(0.3)
        t_complete = time.perf_counter()
        w.send(json.dumps({"type": "append_text", "text": " there. How", "more": True}))
        events, audio = collect(w, until="first_audio")
        t_first = time.perf_counter()
        # The first piece plays while the rest of the line is still unwritten.
        assert [e["type"] for e in events] == ["started", "first_audio"]
        # Timed from the fragment that completed the first piece (the server runs in this process).
        ms = events[-1]["ms"]
        assert 0 < ms <= (t_first - t_complete) * 1000 < (t_first - t_speak) * 1000
        w.send(json.dumps({"type": "append_text", "text": " are you?", "more": False}))
        events, rest = collect(w)
        assert events[-1]["type"] == "done" and events[-1]["pieces"] == 2
        assert len(audio) + len(rest) == 6


def test_interrupt_at_any_point_of_a_streamed_line(server):
    with ws(server) as w:
        # Before the first piece is complete: nothing was generated.
        w.send(json.dumps({"type": "speak", "voice": "0", "text": "Hel", "more": True}))
        w.send(json.dumps({"type": "interrupt"}))
        events, audio = collect(w)
        assert events[-1]["reason"] == "interrupted" and events[-1]["frames"] == 0 and events[-1]["pieces"] == 0
        assert not audio
        # Appending to it now is an error event; the session goes on.
        w.send(json.dumps({"type": "append_text", "text": "lo.", "more": False}))
        e = collect(w)[0][-1]
        assert e["type"] == "error" and "append_text" in e["message"]
        # Between pieces, waiting for the LLM: the first piece was spoken whole.
        w.send(json.dumps({"type": "speak", "voice": "0", "text": "Hi there. ", "more": True,
                           "max_audio_length_ms": 240}))
        audio = []
        while len(audio) < 3:
            msg = w.recv(timeout=60)
            if isinstance(msg, bytes):
                audio.append(msg)
        # A second speak while the line is open is refused; the line goes on.
        w.send(json.dumps({"type": "speak", "voice": "0", "text": "Other."}))
        e = collect(w)[0][-1]
        assert e["type"] == "error" and e["code"] == "busy"
        w.send(json.dumps({"type": "interrupt"}))
        events, more_audio = collect(w)
        assert events[-1]["reason"] == "interrupted" and events[-1]["frames"] == 3 and events[-1]["pieces"] == 1
        assert not more_audio
        # Mid-piece: cut within a frame or two, and the conversation still speaks afterwards.
        w.send(json.dumps({"type": "speak", "voice": "0", "text": "A long one,", "more": True,
                           "max_audio_length_ms": 8000}))
        w.send(json.dumps({"type": "append_text", "text": " it goes on. And", "more": True}))
        while not isinstance(w.recv(timeout=60), bytes):
            pass
        w.send(json.dumps({"type": "interrupt"}))
        events, _ = collect(w)
        assert events[-1]["reason"] == "interrupted" and events[-1]["pieces"] == 1
        w.send(json.dumps({"type": "speak", "voice": "0", "text": "Next.", "max_audio_length_ms": 160}))
        events, audio = collect(w)
        assert events[-1]["type"] == "done" and events[-1]["reason"] == "max_length" and len(audio) == 2


def test_streamed_line_errors(server):
    with ws(server) as w:
        w.send(json.dumps({"type": "append_text", "text": "hello", "more": False}))
        assert collect(w)[0][-1]["type"] == "error"
        # A line completed without words ends with an error and its done.
        w.send(json.dumps({"type": "speak", "voice": "0", "text": " ", "more": True}))
        w.send(json.dumps({"type": "append_text", "text": "  ", "more": False}))
        error = collect(w)[0][-1]
        assert error["type"] == "error" and "no words" in error["message"]
        done = collect(w)[0][-1]
        assert done["type"] == "done" and done["reason"] == "error" and done["pieces"] == 0
        too_long_fragment_is_refused(w, "x" * 5000, "at most 4096")


def too_long_fragment_is_refused(w, fragment: str, says: str) -> None:
    """Too long a line: the fragment is refused, the line stays open and can be completed."""
    w.send(json.dumps({"type": "speak", "voice": "0", "text": "Short.", "more": True, "max_audio_length_ms": 160}))
    w.send(json.dumps({"type": "append_text", "text": fragment, "more": True}))
    events, _ = collect(w)
    assert events[-1]["type"] == "error" and says in events[-1]["message"]
    w.send(json.dumps({"type": "append_text", "text": "", "more": False}))
    events, audio = collect(w)
    assert events[-1]["type"] == "done" and events[-1]["pieces"] == 1 and len(audio) == 2


# -- bounds of a streamed line --------------------------------------------------------------------

@pytest.fixture(scope="module")
def strict():
    """Short bounds: a line idle for half a second ends; 20 fragments and 200 characters a line."""
    with LiveServer(slots=2, max_audio_length_ms=8000, line_idle_timeout_s=0.5, max_line_fragments=20,
                    max_line_chars=200) as s:
        yield s


def test_a_streamed_line_whose_text_stops_coming_is_ended(strict):
    with ws(strict) as w:
        # Its first piece never completes (a client that went quiet): the line ends on its own.
        w.send(json.dumps({"type": "speak", "voice": "0", "text": "Hi", "more": True, "id": "a"}))
        events, audio = collect(w)
        assert events[-1]["type"] == "error" and events[-1]["code"] == "timeout" and events[-1]["id"] == "a"
        assert "line_idle_timeout_s" in events[-1]["message"]
        done = collect(w)[0][-1]
        assert done["type"] == "done" and done["reason"] == "deadline" and done["pieces"] == 0
        assert done["error"] == events[-1]["message"] and not audio
        # What was complete is spoken first; empty fragments keep no line alive.
        w.send(json.dumps({"type": "speak", "voice": "0", "text": "Hello there. And", "more": True,
                           "max_audio_length_ms": 160}))
        for _ in range(3):
            w.send(json.dumps({"type": "append_text", "text": "", "more": True}))
        events, audio = collect(w)
        assert [e["type"] for e in events] == ["started", "first_audio", "error"] and len(audio) == 2
        done = collect(w)[0][-1]
        assert done["reason"] == "deadline" and done["pieces"] == 1 and done["frames"] == 2
        # Nothing of it is left: the slot is free, the line closed, and the session speaks on.
        deadline = time.monotonic() + 10
        while strict.service.scheduler.active or strict.service.scheduler.queued:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        w.send(json.dumps({"type": "append_text", "text": " more.", "more": False}))
        assert collect(w)[0][-1]["type"] == "error"
        w.send(json.dumps({"type": "speak", "voice": "0", "text": "Next.", "max_audio_length_ms": 160}))
        events, audio = collect(w)
        assert events[-1]["reason"] == "max_length" and len(audio) == 2


def test_a_streamed_line_takes_a_bounded_number_of_fragments_and_characters(strict):
    with ws(strict) as w:
        w.send(json.dumps({"type": "speak", "voice": "0", "text": "Hi", "more": True, "id": "f"}))
        for _ in range(20):
            w.send(json.dumps({"type": "append_text", "text": "", "more": True}))
        w.send(json.dumps({"type": "append_text", "text": " there.", "more": False}))  # the 21st
        events, audio = collect(w)
        assert events[-1]["type"] == "error" and events[-1]["code"] == "bad_request" and events[-1]["id"] == "f"
        assert "20 append_text messages" in events[-1]["message"]
        done = collect(w)[0][-1]
        assert done["type"] == "done" and done["reason"] == "error" and done["error"] == events[-1]["message"]
        too_long_fragment_is_refused(w, " a" * 100, "at most 200")  # max_line_chars
