"""Saying the text right end to end: the lexicon, word times and captions, and the `normalize` /
`lexicon` options through the library, the server (HTTP and WebSocket) and the command line."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from fastcsm.generator import Generator
from fastcsm.model.prompt import text_rows
from fastcsm.server.settings import Settings
from fastcsm.speech.lexicon import Lexicon, LexiconError
from fastcsm.speech.normalize import normalize
from fastcsm.speech.speech import SpeakOptions
from fastcsm.speech.timestamps import WordTime, srt, vtt, word_times

sys.path.insert(0, str(Path(__file__).parent))
from server_harness import LiveServer  # noqa: E402
from websockets.sync.client import connect  # noqa: E402

RATE = 24_000


# -- the lexicon -----------------------------------------------------------------------------------

def test_lexicon_respells_whole_words_with_its_case_rules():
    lex = Lexicon({"Nguyen": "Win", "SQL": "sequel", "gif": "jif", "nguyen": "nuh-gwen"})
    assert lex.apply("Nguyen and NGUYEN wrote SQL, sql and MySQL; GIF or gif.") == \
        "Win and nuh-gwen wrote sequel, sql and MySQL; jif or jif."


def test_lexicon_words_with_symbols_match_whole_and_before_shorter_ones():
    lex = Lexicon({"C++": "see plus plus", "C": "see", "AT&T": "A T and T", "e.g": "E G"})
    assert lex.apply("C++, C and AT&T (e.g. C#)") == "see plus plus, see and A T and T (E G. see#)"


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=6), st.text(max_size=40))
def test_any_lexicon_is_refused_clearly_or_applies_without_error(entries, text):
    try:
        lex = Lexicon(entries)
    except LexiconError:
        return
    assert isinstance(normalize(text, lexicon=lex).text, str)


def test_lexicon_applies_after_normalisation():
    lex = Lexicon({"dollars": "bucks", "SQL": "sequel"})
    spoken = normalize("SQL costs $5.", lexicon=lex)
    assert spoken.text == "sequel costs five bucks."
    assert [w.text for w in spoken.words] == ["SQL", "costs", "$5."]


def test_lexicon_files_tsv_and_json(tmp_path):
    tsv = tmp_path / "words.tsv"
    tsv.write_text("# names\nNguyen\tWin\n\nSQL sequel\n", encoding="utf-8")
    assert Lexicon.from_file(tsv).entries == {"Nguyen": "Win", "SQL": "sequel"}
    js = tmp_path / "words.json"
    js.write_text(json.dumps({"Nguyen": "Win"}), encoding="utf-8")
    assert Lexicon.from_file(js).entries == {"Nguyen": "Win"}


@pytest.mark.parametrize("name, text, message", [
    ("a.tsv", "Nguyen\n", r"a.tsv:1: 'Nguyen' has no respelling"),
    ("a.tsv", "SQL\tsequel\nSQL\tesquel\n", r"a.tsv:2: 'SQL' is listed twice"),
    ("a.json", "[1, 2]", "must be an object"),
    ("a.json", "{oops", "not valid JSON"),
    ("a.json", '{"two words": "x"}', "is not a word"),
    ("a.json", '{"SQL": 5}', "both strings"),
])
def test_bad_lexicon_files_say_what_and_where(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    with pytest.raises(LexiconError, match=message):
        Lexicon.from_file(path)
    with pytest.raises(ValueError, match=r"lexicon must be a readable lexicon file .*\(--lexicon, FASTCSM_LEXICON\)"):
        Settings(lexicon=str(path))


def test_a_missing_lexicon_file_is_a_clear_error(tmp_path):
    with pytest.raises(LexiconError, match="cannot read the lexicon"):
        Lexicon.from_file(tmp_path / "nope.tsv")


def test_a_request_lexicon_is_bounded_and_wins_over_the_servers():
    base = Lexicon({"SQL": "sequel"})
    assert base.updated({"SQL": "S Q L"}).apply("SQL") == "S Q L"
    with pytest.raises(LexiconError, match="at most 256"):
        base.updated({f"w{i}": "x" for i in range(257)})


# -- word times and captions ---------------------------------------------------------------------

def check_times(times: list[WordTime], words: list[str], duration_s: float) -> None:
    """One time per written word, in order, monotonic, inside the audio."""
    assert [t.text for t in times] == words
    edges = [x for t in times for x in (t.start, t.end)]
    assert edges == sorted(edges)
    assert all(t.start <= t.end for t in times)
    assert 0 <= edges[0] and edges[-1] <= duration_s + 1e-6


@pytest.mark.parametrize("audio", [np.zeros(0), np.zeros(RATE), np.random.default_rng(0).normal(size=RATE)])
def test_word_times_are_monotonic_inside_the_audio_one_per_word(audio):
    spoken = normalize("At 10:30, set it to 40–60 °C. Then wait — quietly!")
    times = word_times(spoken.words, audio, RATE, offset_s=2.0)
    check_times(times, [w.text for w in spoken.words], 2.0 + len(audio) / RATE)
    assert times[0].start >= 2.0


def test_word_times_leave_out_the_silence_around_speech():
    tone = np.sin(np.arange(RATE) * 0.1).astype(np.float32)
    audio = np.concatenate([np.zeros(RATE // 2), tone, np.zeros(RATE // 2)])
    times = word_times(normalize("one two").words, audio, RATE)
    assert times[0].start == pytest.approx(0.5, abs=0.011) and times[-1].end == pytest.approx(1.5, abs=0.011)


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng")
def test_word_times_of_espeak_speech_are_near_the_truth(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "benchmarks"))
    import bench_timestamps

    errors = bench_timestamps.measure(bench_timestamps.LINES[:3])
    assert errors["fastcsm"] < 150  # ms; the benchmark measures about 60 over its six lines
    assert errors["fastcsm"] < errors["uniform"]


def test_captions_srt_and_vtt():
    words = [WordTime("Hello,", 0.0, 0.4), WordTime("world.", 0.5, 1.0), WordTime("A<b", 1.5, 3661.25),
             WordTime("Dr.", 3661.25, 3661.5), WordTime("No.", 3661.5, 3662.0)]
    assert srt(words) == ("1\n00:00:00,000 --> 00:00:01,000\nHello, world.\n\n"
                          "2\n00:00:01,500 --> 01:01:02,000\nA<b Dr. No.\n\n")
    assert vtt(words) == ("WEBVTT\n\n00:00:00.000 --> 00:00:01.000\nHello, world.\n\n"
                          "00:00:01.500 --> 01:01:02.000\nA&lt;b Dr. No.\n\n")


# -- the library ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gen(tiny_csm_dir):
    return Generator.from_pretrained(tiny_csm_dir, device="cpu")


def test_speak_reads_the_normalised_text_and_times_every_written_word(gen):
    text = "It costs $3.50 at 10:30pm. Then set it to 40–60 °C, please."
    speech = gen.speak(text, 0, options=SpeakOptions(max_audio_length_ms=480, max_piece_chars=40), seed=3)
    assert len(speech.pieces) == 2
    assert speech.pieces[0].spoken == "It costs three dollars and fifty cents at ten thirty p m."
    check_times(speech.words, text.split()[:9] + ["40–60 °C,", "please."], speech.duration_s)
    assert speech.pieces[1].words[0].start >= speech.pieces[0].frames * 0.08  # the second piece's audio


def test_normalize_false_speaks_the_text_as_given(gen):
    options = SpeakOptions(max_audio_length_ms=160, normalize=False, lexicon=Lexicon({"costs": "x"}))
    speech = gen.speak("It costs $5.", 0, options=options, seed=1)
    assert speech.pieces[0].spoken == "It costs $5."
    assert [w.text for w in speech.words] == ["It", "costs", "$5."]


def test_options_refuse_bad_values():
    with pytest.raises(TypeError, match="normalize must be True or False"):
        SpeakOptions(normalize="no")
    with pytest.raises(ValueError, match="language must be one of"):
        SpeakOptions(language="xx")
    with pytest.raises(TypeError, match="lexicon must be"):
        SpeakOptions(lexicon={"a": "b"})


# -- the server ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(tmp_path_factory):
    lexicon = tmp_path_factory.mktemp("lexicon") / "words.tsv"
    lexicon.write_text("SQL\tsequel\n", encoding="utf-8")
    with LiveServer(slots=2, max_audio_length_ms=2000, lexicon=str(lexicon)) as s:
        yield s


def speech_pcm(server, text: str, **extra) -> httpx.Response:
    body = {"input": text, "voice": "0", "response_format": "pcm", "seed": 7, "max_audio_length_ms": 240, **extra}
    return httpx.post(server.url + "/v1/audio/speech", json=body, timeout=60)


def test_http_speech_normalises_respells_or_speaks_as_given(server):
    said = speech_pcm(server, "five dollars and sequel", normalize=False)
    assert said.status_code == 200
    assert speech_pcm(server, "$5 and SQL").content == said.content  # normalised, the server's lexicon
    assert speech_pcm(server, "$5 and SQL", normalize=False).content != said.content
    win = speech_pcm(server, "Win", normalize=False).content
    assert speech_pcm(server, "Nguyen", lexicon={"Nguyen": "Win"}).content == win


@pytest.mark.parametrize("lexicon", [{"two words": "x"}, {f"w{i}": "x" for i in range(257)}, {"a": ""}, ["a"]])
def test_http_speech_refuses_a_bad_lexicon(server, lexicon):
    r = speech_pcm(server, "hello", lexicon=lexicon)
    assert r.status_code == 400 and "lexicon" in r.text


def test_websocket_speak_normalises_unless_told_not_to(server):
    def prompt_rows(**speak) -> int:
        with connect(server.url.replace("http", "ws") + "/v1/conversations", open_timeout=10) as ws:
            assert json.loads(ws.recv(timeout=30))["type"] == "ready"
            ws.send(json.dumps({"type": "speak", "voice": "0", "max_audio_length_ms": 80, **speak}))
            while True:
                msg = ws.recv(timeout=30)
                if isinstance(msg, str) and json.loads(msg)["type"] == "started":
                    return json.loads(msg)["prompt_rows"]

    rows = lambda text: len(f"[0]{text}".encode()) + 2  # noqa: E731 (byte tokenizer: begin + bytes + end)
    assert prompt_rows(text="$5 SQL") == rows("five dollars sequel")
    assert prompt_rows(text="$5 SQL", normalize=False) == rows("$5 SQL")
    assert prompt_rows(text="Nguyen", lexicon={"Nguyen": "Win"}) == rows("Win")


# -- the command line ------------------------------------------------------------------------------

def test_speak_writes_captions_and_takes_a_lexicon(tmp_path, tiny_csm_dir, capsys):
    from fastcsm.cli import main

    lexicon = tmp_path / "words.tsv"
    lexicon.write_text("Nguyen\tWin\n", encoding="utf-8")
    base = ["speak", "Dr. Nguyen paid $5.", "-o", str(tmp_path / "a.wav"), "--model", str(tiny_csm_dir),
            "--device", "cpu", "--seed", "1", "--max-ms", "240", "-q", "--voices-dir", str(tmp_path / "v")]
    assert main([*base, "--captions", str(tmp_path / "a.vtt"), "--lexicon", str(lexicon)]) == 0
    vtt_text = (tmp_path / "a.vtt").read_text()
    assert vtt_text.startswith("WEBVTT\n\n00:00:00.") and vtt_text.endswith("Dr. Nguyen paid $5.\n\n")
    assert main([*base, "--captions", str(tmp_path / "a.srt"), "--no-normalize"]) == 0
    assert (tmp_path / "a.srt").read_text().startswith("1\n00:00:00,")
    capsys.readouterr()
    bad = tmp_path / "bad.tsv"
    bad.write_text("lonely\n", encoding="utf-8")
    assert main([*base, "--lexicon", str(bad)]) != 0
    assert "bad.tsv:1: 'lonely' has no respelling" in capsys.readouterr().err
    assert main([*base, "--captions", str(tmp_path / "a.txt")]) != 0
    assert "give a file ending in .srt or .vtt" in capsys.readouterr().err
    assert main([*base, "--language", "xx"]) != 0
    assert "--language: language must be one of num2words' codes" in capsys.readouterr().err


def test_the_text_rows_are_those_of_the_spoken_form(gen):
    from fastcsm.speech.planner import piece_text

    piece = piece_text("$5", 0, gen.tokenizer, gen.cfg, SpeakOptions())
    assert piece.text == "$5" and piece.spoken.text == "five dollars"
    assert piece.line.tokens.equal(text_rows(gen.tokenizer, 0, "five dollars", gen.cfg).tokens)


def test_long_text_is_never_cut_inside_a_range():
    from fastcsm.speech.text import split_text

    pieces = split_text("Set the oven to 40–60 °C and wait for a very long time until everything is done", 40)
    assert any("40–60 °C" in p for p in pieces)
    assert split_text("One clause—and another one that is long enough to be cut here", 20)[0] == "One clause—"
