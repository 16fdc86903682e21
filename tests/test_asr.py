"""Speech recognition: pocketsphinx hears espeak-ng's speech offline; faster-whisper's own code
path runs on a tiny random Whisper converted by CTranslate2 (noise for text, real plumbing)."""

from __future__ import annotations

import functools
import tempfile

import numpy as np
import pytest
from listen_audio import SENTENCES, needs_espeak, overlap, silence, speech_bounds, spoken

from fastcsm.listen.asr import AsrError, SphinxTranscriber, load_transcriber

pytest.importorskip("pocketsphinx")


@functools.cache
def sphinx() -> SphinxTranscriber:
    return load_transcriber("pocketsphinx")


@functools.cache
def tiny_whisper_dir() -> str:
    pytest.importorskip("faster_whisper")
    from fastcsm.testing import write_tiny_whisper

    return str(write_tiny_whisper(tempfile.mkdtemp(prefix="fastcsm-whisper-")))


@needs_espeak
@pytest.mark.parametrize("sentence", SENTENCES)
def test_pocketsphinx_hears_espeak(sentence):
    t = sphinx().transcribe(spoken(sentence))
    assert overlap(t.text, sentence) >= 0.75, t.text
    assert t.language == "en"
    assert [w.text for w in t.words] == t.text.split()
    # Word timings lie inside the audio, in order, each word taking time.
    ends = [0.0] + [w.end for w in t.words]
    assert all(0 <= w.start < w.end <= t.duration for w in t.words)
    assert all(a <= w.start + 1e-6 for a, w in zip(ends, t.words, strict=False))


@needs_espeak
def test_pocketsphinx_word_timings_follow_the_speech():
    a, b = SENTENCES[2], SENTENCES[3]  # "what time is it", a second of silence, "thank you very much"
    first, gap = np.concatenate([silence(0.5), spoken(a)]), silence(1.0)
    t = sphinx().transcribe(np.concatenate([first, gap, spoken(b), silence(0.3)]))
    heard = {w.text: w for w in t.words}
    assert heard["what"].start == pytest.approx(speech_bounds(first)[0], abs=0.15)
    second = len(first) / 16_000 + 1.0 + speech_bounds(spoken(b))[0]
    assert heard["thank"].start == pytest.approx(second, abs=0.15)


def test_no_audio_is_no_text():
    t = sphinx().transcribe(silence(0.0))
    assert t.text == "" and t.segments == () and t.duration == 0.0


def test_bad_audio_and_language_are_refused():
    with pytest.raises(AsrError, match="mono"):
        sphinx().transcribe(np.zeros((2, 100), np.float32))
    with pytest.raises(AsrError, match="NaN"):
        sphinx().transcribe(np.full(100, np.nan, np.float32))
    with pytest.raises(AsrError, match="English only"):
        sphinx().transcribe(silence(0.1), language="fr")


def test_faster_whisper_runs_a_converted_tiny_model():
    whisper = load_transcriber(tiny_whisper_dir(), device="cpu")
    assert whisper.name.startswith("faster-whisper:") and not whisper.multilingual
    audio = np.random.default_rng(0).normal(0, 0.1, 16_000 * 2).astype(np.float32)
    t = whisper.transcribe(audio, language="en", prompt="hello")
    assert t.language == "en" and t.duration == 2.0
    # Noise for text, but segments and words are there, timed inside the audio and in order.
    assert t.segments
    for s in t.segments:
        assert 0 <= s.start <= s.end <= t.duration
        assert all(0 <= w.start <= w.end <= t.duration for w in s.words)
    with pytest.raises(AsrError, match="English-only"):
        whisper.transcribe(audio, language="fr")


def test_missing_models_are_named(tmp_path):
    pytest.importorskip("faster_whisper")
    with pytest.raises(AsrError, match="no-such-whisper.*hub cache"):
        load_transcriber("someone/no-such-whisper", device="cpu")
    with pytest.raises(AsrError, match="without model.bin"):
        load_transcriber(str(tmp_path), device="cpu")
    with pytest.raises(AsrError, match="cpu or cuda"):
        load_transcriber(tiny_whisper_dir(), device="mps")
    with pytest.raises(AsrError, match="empty"):
        load_transcriber(" ")


def test_a_killed_server_leaves_no_recogniser_behind():
    """pocketsphinx runs in child processes (whole decodes, live ones): when their parent dies
    without closing them (kill -9, an interpreter that exits first), they go too instead of
    waiting for work forever."""
    import os
    import signal
    import subprocess
    import sys
    import time

    code = ("import os, sys\nfrom fastcsm.listen.asr import SphinxTranscriber\nt = SphinxTranscriber()\n"
            "live = t.live('40,3,-1')\n"
            "print(t._pool.submit(os.getpid).result(), t._live_pool.submit(os.getpid).result(), flush=True)\n"
            "sys.stdin.read()\n")
    parent = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        children = [int(pid) for pid in parent.stdout.readline().split()]
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    assert len(set(children)) == 2  # a whole decode and a live one never wait for each other
    deadline = time.monotonic() + 10
    while children and time.monotonic() < deadline:
        for child in list(children):
            try:
                os.kill(child, 0)
            except ProcessLookupError:
                children.remove(child)
        time.sleep(0.1)
    for child in children:
        os.kill(child, signal.SIGKILL)
    assert not children, "a recogniser's child process outlived its killed parent"


@needs_espeak
def test_a_live_transcription_is_fed_in_pieces_and_starts_over_when_asked():
    """Decoding as the audio comes (`live`) gives the same words however the audio is cut into
    pieces, and `restart` starts the search over (a turn that went on after a pause)."""
    t = sphinx()
    first = t.transcribe(np.concatenate([silence(0.2), spoken(SENTENCES[2]), silence(0.2)]))
    assert first.adapted and t.live(None) is None
    audio = np.concatenate([silence(0.2), spoken(SENTENCES[3]), silence(0.2)])
    texts = []
    for piece in (len(audio), 1600, 4001):  # (fewer pieces than MAX_BACKLOG: fed at once, they queue)
        live = t.live(first.adapted)
        try:
            for i in range(0, len(audio), piece):
                live.feed(audio[i: i + piece])
            heard = live.finish().result(timeout=30)
            assert not live.failed  # (else `finish` decoded it whole)
        finally:
            live.close()
        assert heard.duration == round(len(audio) / 16_000, 3) and heard.adapted
        assert all(0 <= w.start < w.end <= heard.duration for w in heard.words)
        texts.append(heard.text)
    assert texts[0] and texts == [texts[0]] * 3
    live = t.live(first.adapted)
    try:
        live.feed(audio[: len(audio) // 2])
        half = live.finish().result(timeout=30)
        live.restart(audio[: len(audio) // 2])
        live.feed(audio[len(audio) // 2:])
        assert live.finish().result(timeout=30).text == texts[0] and half.duration < heard.duration
    finally:
        live.close()


@needs_espeak
def test_a_live_transcription_given_up_is_decoded_whole(monkeypatch):
    """A live transcription whose calls pile up (a busy recogniser) is given up; its `finish`
    decodes the audio fed whole, as `transcribe` does. At most `MAX_LIVE` are open at once."""
    import fastcsm.listen.asr as asr

    t = sphinx()
    adapted = t.transcribe(spoken(SENTENCES[2])).adapted
    audio = np.concatenate([silence(0.2), spoken(SENTENCES[0]), silence(0.2)])
    monkeypatch.setattr(asr, "MAX_BACKLOG", 0)
    live = t.live(adapted)
    try:
        live.feed(audio)
        assert live.failed
        heard = live.finish().result(timeout=30)
    finally:
        live.close()
    whole = t.transcribe(audio)
    assert heard.text == whole.text and heard.adapted
    monkeypatch.setattr(asr, "MAX_LIVE", 2)
    opened = [t.live(adapted), t.live(adapted)]
    assert all(opened) and t.live(adapted) is None
    opened[0].close()
    again = t.live(adapted)
    assert again is not None
    for live in (opened[1], again):
        live.close()
