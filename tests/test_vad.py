"""Voice activity on espeak-ng speech with silences: turns start and stop where the speech does;
silence and noise make no turn; a turn over the cap is cut; chunking changes nothing."""

from __future__ import annotations

import functools

import numpy as np
import pytest
from listen_audio import SENTENCES, needs_espeak, silence, speech_bounds, spoken

from fastcsm.listen.vad import WINDOW, SileroVad, Started, Stopped, TurnConfig, TurnDetector

pytest.importorskip("onnxruntime")
RATE = 16_000
TOLERANCE_S = 0.25  # Silero's 32 ms windows and its lag, espeak-ng's soft word edges
PAD_S = TurnConfig().pad_ms / 1000


@functools.cache
def vad() -> SileroVad:
    return SileroVad()


def events_of(audio: np.ndarray, chunk: int | None = None, **config) -> list:
    detector = TurnDetector(vad(), TurnConfig(**config))
    if chunk is None:
        events = detector.feed(audio)
    else:
        events = [e for i in range(0, len(audio), chunk) for e in detector.feed(audio[i: i + chunk])]
    return events + detector.finish()


def conversation() -> tuple[np.ndarray, list[tuple[float, float]]]:
    """Two sentences between silences, and where each one's sound is (seconds)."""
    parts, spans, t = [], [], 0.0
    for sentence in SENTENCES[:2]:
        gap = silence(1.2)
        speech = spoken(sentence)
        a, b = speech_bounds(speech)
        t += len(gap) / RATE
        spans.append((t + a, t + b))
        t += len(speech) / RATE
        parts += [gap, speech]
    parts.append(silence(1.0))
    return np.concatenate(parts), spans


@needs_espeak
def test_turns_start_and_stop_where_the_speech_does():
    audio, spans = conversation()
    events = events_of(audio)
    assert [type(e) for e in events] == [Started, Stopped] * 2
    for (start, stop), (a, b) in zip(zip(events[::2], events[1::2], strict=True), spans, strict=True):
        # A turn holds all of its speech and its padding, give or take the tolerance.
        assert a - PAD_S - TOLERANCE_S <= start.at / RATE <= a
        assert b <= stop.at / RATE <= b + PAD_S + TOLERANCE_S
        assert stop.reason == "silence"
        # Decided end_silence_ms after the speech ended (give or take a window), never before it.
        assert b + 0.5 <= stop.now / RATE <= b + 0.5 + TOLERANCE_S
        assert start.now >= start.at


@needs_espeak
def test_end_silence_is_configurable():
    audio, _ = conversation()
    # About 1.6 s of quiet between the sentences' sounds (1.2 s of silence and espeak-ng's own
    # quiet at the end of the first): a 2 s end-of-turn silence makes them one turn.
    events = events_of(audio, end_silence_ms=2000)
    assert [type(e) for e in events] == [Started, Stopped]
    assert events[1].reason in ("silence", "end")


@needs_espeak
def test_chunking_changes_nothing():
    audio, _ = conversation()
    assert events_of(audio, chunk=123) == events_of(audio, chunk=4000) == events_of(audio)


def test_silence_and_noise_make_no_turn():
    rng = np.random.default_rng(0)
    assert events_of(silence(3.0)) == []
    assert events_of(rng.normal(0, 0.05, 3 * RATE).astype(np.float32)) == []
    hum = 0.3 * np.sin(2 * np.pi * 50 * np.arange(3 * RATE) / RATE).astype(np.float32)
    assert events_of(hum) == []


@needs_espeak
def test_a_turn_over_the_cap_is_cut():
    speech = np.concatenate([silence(0.5), spoken(SENTENCES[1]), spoken(SENTENCES[0]), silence(1.0)])
    events = events_of(speech, max_turn_s=1.0)
    cuts = [e for e in events if isinstance(e, Stopped) and e.reason == "max_length"]
    assert cuts, events
    starts = [e for e in events if isinstance(e, Started)]
    for e in events:
        if isinstance(e, Stopped):
            start = max(s.at for s in starts if s.at <= e.at)
            assert e.at - start <= RATE * 1.0
    assert isinstance(events[-1], Stopped)


@needs_espeak
def test_a_stream_ending_mid_turn_stops_it():
    events = events_of(np.concatenate([silence(0.5), spoken(SENTENCES[0])]))
    assert [type(e) for e in events] == [Started, Stopped] and events[-1].reason == "end"


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="end_silence_ms"):
        TurnConfig(end_silence_ms=10)
    with pytest.raises(ValueError, match="max_turn_s"):
        TurnConfig(max_turn_s=0)


@needs_espeak
def test_a_turns_silence_counts_from_where_its_sound_stopped():
    """Silero goes on hearing speech for 90-140 ms after the sound stops; the turn's speech ends at
    its last loud window instead, so the turn ends end_silence_ms after the sound, within a window."""
    audio, spans = conversation()
    trimmed, silero = events_of(audio), events_of(audio, max_trim_ms=0)
    for stop, late, (_, b) in zip(trimmed[1::2], silero[1::2], spans, strict=True):
        assert b + 0.5 <= stop.now / RATE <= b + 0.5 + WINDOW / RATE
        assert late.now - stop.now >= WINDOW  # Silero's own end: at least a window later
        assert b <= stop.at / RATE  # the turn still holds all of its sound


@needs_espeak
def test_a_loud_background_leaves_the_end_of_speech_to_silero():
    """Under noise as loud as a speech tail every window is loud: trimming changes nothing."""
    audio, _ = conversation()
    noisy = audio + np.random.default_rng(0).normal(0, 0.02, len(audio)).astype(np.float32)
    trimmed = events_of(noisy)
    assert [type(e) for e in trimmed] == [Started, Stopped] * 2
    assert trimmed == events_of(noisy, max_trim_ms=0)
