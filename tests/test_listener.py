"""The listener, without a socket: PCM chunks at a declared rate in; speech-started, speech-stopped
and turn events out, each turn's Mimi codes streamed as it was spoken and its text recognised."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from listen_audio import SENTENCES, needs_espeak, overlap, pcm16, silence, speech_bounds, spoken

from fastcsm.codec.codec import Codec
from fastcsm.listen.listener import (
    Listener,
    ListenError,
    SpeechPaused,
    SpeechStarted,
    SpeechStopped,
    UserTurn,
    listen,
)
from fastcsm.listen.vad import SileroVad, TurnConfig
from fastcsm.testing import random_mimi

pytest.importorskip("onnxruntime")
pytest.importorskip("pocketsphinx")


@functools.cache
def vad() -> SileroVad:
    return SileroVad()


@functools.cache
def codec() -> Codec:
    return Codec(random_mimi(seed=0), num_codebooks=8)


@functools.cache
def sphinx():
    from fastcsm.listen.asr import load_transcriber

    return load_transcriber("pocketsphinx")


def chunks(audio: np.ndarray, rate: int, ms: int = 20) -> list[bytes]:
    data, step = pcm16(audio), 2 * rate * ms // 1000
    return [data[i: i + step] for i in range(0, len(data), step)]


def two_sentences(rate: int) -> tuple[np.ndarray, list[tuple[float, float]]]:
    parts, spans, t = [], [], 0.0
    for sentence in SENTENCES[:2]:
        speech = spoken(sentence, rate)
        a, b = speech_bounds(speech, rate)
        t += 1.0
        spans.append((t + a, t + b))
        t += len(speech) / rate
        parts += [silence(1.0, rate), speech]
    return np.concatenate([*parts, silence(1.0, rate)]), spans


def make(rate: int, **kw) -> Listener:
    kw.setdefault("max_ahead_s", None)
    return Listener(vad(), rate, codec=kw.pop("codec", codec()), transcriber=kw.pop("transcriber", sphinx()), **kw)


@needs_espeak
@pytest.mark.parametrize("rate", [48_000, 16_000, 8_000])
def test_turns_carry_text_audio_and_streamed_codes(rate):
    audio, spans = two_sentences(rate)
    events = listen(make(rate), chunks(audio, rate))
    assert [type(e) for e in events] == [SpeechStarted, SpeechPaused, SpeechStopped, UserTurn] * 2
    turns = [e for e in events if isinstance(e, UserTurn)]
    frame = codec().frame_size
    for turn, sentence, (a, b) in zip(turns, SENTENCES, spans, strict=False):
        if rate >= 16_000:  # 8 kHz telephone audio has nothing above 4 kHz: pocketsphinx's model misses it
            assert overlap(turn.text, sentence) >= 0.75, turn.text
        heard = turn.heard
        assert heard.reason == "silence" and not heard.cut
        assert heard.start_ms / 1000 <= a and heard.end_ms / 1000 >= b
        assert heard.end_ms / 1000 - b < 0.5
        # The audio is whole Mimi frames, and the codes streamed while it came in are the codes
        # of encoding it whole.
        assert len(heard.audio) % frame == 0 and heard.codes.shape == (len(heard.audio) // frame, 8)
        torch.testing.assert_close(heard.codes, codec().encode_waveform(heard.audio), rtol=0, atol=0)
        assert set(turn.timings) == {"tail_encode", "transcribe"}


@needs_espeak
def test_only_the_tail_is_left_to_encode_at_the_stop():
    """By the time the silence has ended a turn, its frames are all encoded; a stream that ends
    mid-word leaves at most the frames of its last chunk."""
    audio, _ = two_sentences(16_000)
    stops = [e for e in listen(make(16_000, transcriber=None), chunks(audio, 16_000)) if isinstance(e, SpeechStopped)]
    assert len(stops) == 2 and all(s.heard.tail_frames == 0 for s in stops)
    cut_short = np.concatenate([silence(0.5), spoken(SENTENCES[0])])
    stops = [e for e in listen(make(16_000, transcriber=None), chunks(cut_short, 16_000))
             if isinstance(e, SpeechStopped)]
    assert stops[0].heard.reason == "end" and stops[0].heard.tail_frames <= 1


@needs_espeak
def test_an_over_long_turn_is_cut_and_says_so():
    rate = 16_000
    speech = np.concatenate([silence(0.5, rate), spoken(SENTENCES[1], rate), spoken(SENTENCES[0], rate),
                             silence(1.0, rate)])
    events = listen(make(rate, transcriber=None, config=TurnConfig(max_turn_s=1.0)), chunks(speech, rate))
    stops = [e for e in events if isinstance(e, SpeechStopped)]
    assert any(s.heard.cut for s in stops)
    frame = codec().frame_size
    for s in stops:
        assert s.heard.end_ms - s.heard.start_ms <= 1000
        assert len(s.heard.audio) <= 24_000 + frame


def test_silence_and_noise_make_no_events():
    rate = 24_000
    quiet = np.concatenate([silence(2.0, rate), np.random.default_rng(0).normal(0, 0.03, 2 * rate)])
    assert listen(make(rate), chunks(quiet.astype(np.float32), rate)) == []


def test_memory_between_turns_stays_bounded():
    rate = 48_000
    listener = make(rate)
    piece = pcm16(np.random.default_rng(1).normal(0, 0.02, rate // 10).astype(np.float32))
    for _ in range(300):  # 30 s
        assert listener.feed(piece) == []
    lookback_s = 0.7  # padding, the speech that starts a turn, a window, one chunk
    assert listener._a16.hi - listener._a16.lo <= lookback_s * 16_000
    assert listener._a24.hi - listener._a24.lo <= lookback_s * 24_000
    assert len(listener._a24.store) <= 4 * lookback_s * 24_000


def test_bad_input_is_refused_and_disturbs_nothing():
    for rate in (7_999, 96_000, "16000", 16_000.0, True):
        with pytest.raises(ListenError, match="sample_rate must be an integer from 8000 to 48000"):
            make(rate)
    listener = make(16_000)
    with pytest.raises(ListenError, match="odd byte count"):
        listener.feed(b"\x00" * 641)
    with pytest.raises(ListenError, match="longer than the 5 s"):
        listener.feed(b"\x00" * 2 * 16_000 * 6)
    with pytest.raises(ListenError, match="bytes of 16-bit PCM"):
        listener.feed("hello")
    assert listener.received == 0
    assert listener.feed(b"\x00" * 640) == [] and listener.received == 320


def test_audio_faster_than_real_time_is_refused():
    now = [100.0]
    listener = make(16_000, max_ahead_s=2.0, clock=lambda: now[0])
    second = pcm16(silence(1.0))
    listener.feed(second)
    listener.feed(second)  # 2 s of audio at t = 0: at the limit
    with pytest.raises(ListenError, match="faster than real time"):
        listener.feed(pcm16(silence(0.1)))
    now[0] += 1.0
    assert listener.feed(pcm16(silence(0.1))) == []  # the clock caught up


@needs_espeak
def test_without_codec_or_transcriber_turns_have_audio_only():
    audio, _ = two_sentences(16_000)
    events = listen(make(16_000, codec=None, transcriber=None), chunks(audio, 16_000))
    turns = [e for e in events if isinstance(e, UserTurn)]
    assert len(turns) == 2 and all(t.text == "" and t.heard.codes is None and len(t.heard.audio) for t in turns)


@needs_espeak
def test_a_stream_that_ends_mid_turn_still_makes_the_turn():
    rate = 16_000
    audio = np.concatenate([silence(0.5, rate), spoken(SENTENCES[3], rate)])
    events = listen(make(rate), chunks(audio, rate))
    assert [type(e) for e in events] == [SpeechStarted, SpeechPaused, SpeechStopped, UserTurn]  # (espeak's end)
    turn = events[-1]
    assert turn.heard.reason == "end" and overlap(turn.text, SENTENCES[3]) >= 0.5
    torch.testing.assert_close(turn.heard.codes, codec().encode_waveform(turn.heard.audio), rtol=0, atol=0)


@needs_espeak
def test_the_pause_that_ends_a_turn_holds_its_audio_and_its_transcript_is_the_turns():
    """A turn transcribed at its pause (`listen(early=True)`) takes that transcript: the pause's
    audio is exactly the turn's, so the text is what transcribing at the stop would give."""
    audio, _ = two_sentences(16_000)
    early = listen(make(16_000, codec=None), chunks(audio, 16_000), early=True)
    pauses = [e for e in early if isinstance(e, SpeechPaused)]
    stops = [e for e in early if isinstance(e, SpeechStopped)]
    turns = [e for e in early if isinstance(e, UserTurn)]
    assert len(pauses) == len(stops) == len(turns) == 2
    for pause, stop, turn, sentence in zip(pauses, stops, turns, SENTENCES, strict=False):
        assert pause.ends(stop.heard) and pause.heard_ms < stop.heard_ms
        np.testing.assert_array_equal(pause.audio_16k, stop.heard.audio_16k)
        assert turn.early and turn.timings["transcribe"] == 0.0
        assert overlap(turn.text, sentence) >= 0.75, turn.text
    late = [e for e in listen(make(16_000, codec=None), chunks(audio, 16_000)) if isinstance(e, UserTurn)]
    assert not any(t.early for t in late) and all(t.timings["transcribe"] > 0 for t in late)


@needs_espeak
def test_a_pause_the_user_speaks_past_is_not_the_turn():
    """Two sentences with espeak-ng's own quiet (360 ms) between them are one turn (the silence that
    ends a turn is 500 ms): the first pause's audio is the start of the turn's, and the turn takes
    the second pause's transcript."""
    rate = 16_000
    first, second = spoken(SENTENCES[2], rate), spoken(SENTENCES[3], rate)
    audio = np.concatenate([silence(0.5, rate), first, second, silence(1.0, rate)])
    events = listen(make(rate, codec=None), chunks(audio, rate), early=True)
    started, *pauses, stop, turn = events
    assert (type(started), type(stop), type(turn)) == (SpeechStarted, SpeechStopped, UserTurn)
    assert len(pauses) >= 2 and all(isinstance(p, SpeechPaused) for p in pauses)
    *went_on, last = pauses
    assert last.ends(stop.heard)
    for pause in went_on:
        assert not pause.ends(stop.heard) and pause.end_ms < last.end_ms
        np.testing.assert_array_equal(pause.audio_16k, stop.heard.audio_16k[:len(pause.audio_16k)])
    assert turn.early and overlap(turn.text, f"{SENTENCES[2]} {SENTENCES[3]}") >= 0.75, turn.text


@needs_espeak
def test_live_turns_are_decoded_from_exactly_their_audio():
    """With `live=True` the first turn is decoded whole (and the listener adapts to it); later turns
    are decoded as they are spoken, their pauses and stop carrying the transcript: the same words
    as one live decode of the turn's audio, so nothing was fed twice or left out, also when the
    user speaks past a pause and the search starts over."""
    rate = 16_000
    audio = np.concatenate([silence(0.5, rate), spoken(SENTENCES[0], rate), silence(1.0, rate),
                            spoken(SENTENCES[2], rate), spoken(SENTENCES[3], rate), silence(1.0, rate)])
    listener, t = make(rate, codec=None, live=True), sphinx()
    adapted, pauses, turns = [], [], []
    for chunk in chunks(audio, rate):
        for e in listener.feed(chunk):
            if isinstance(e, SpeechStarted):
                adapted.append(listener.adapted)
            elif isinstance(e, SpeechPaused):
                pauses.append(e)
            elif isinstance(e, SpeechStopped):
                last = pauses[-1]
                assert last.ends(e.heard) and e.heard.live is last.live
                early = last.live.result(timeout=30) if last.live is not None else t.transcribe(last.audio_16k)
                turns.append(listener.transcribe(e.heard, early=early))
    assert len(turns) == 2 and adapted[0] is None and adapted[1]
    first, second = turns
    assert first.heard.live is None and first.transcript.adapted == adapted[1]
    assert overlap(first.text, SENTENCES[0]) >= 0.75, first.text
    went_on = [p for p in pauses if p.start_ms == second.heard.start_ms][:-1]
    assert went_on and all(p.live is not None for p in went_on)
    live = t.live(adapted[1])
    try:
        live.feed(second.heard.audio_16k)
        alone = live.finish().result(timeout=30)
    finally:
        live.close()
    assert second.text == alone.text and second.transcript.duration == alone.duration
    # (a live decode this early in a stream, not yet adapted to the voice, mishears part of it)
    assert overlap(second.text, f"{SENTENCES[2]} {SENTENCES[3]}") >= 0.25, second.text
    assert listener.adapted == second.transcript.adapted != adapted[1]
