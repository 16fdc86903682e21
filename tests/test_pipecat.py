"""Pipecat against a real `fastcsm serve` on loopback: its own `OpenAITTSService` unchanged with
an OpenAI voice name, and `FastCSMTTSService` over the conversation WebSocket."""

from __future__ import annotations

import asyncio
import base64
import io
import itertools

import numpy as np
import pytest
import soundfile as sf

pytest.importorskip("pipecat", reason="Pipecat is not installed: pip install \"fastcsm[pipecat]\"")
from pipecat.frames.frames import (  # noqa: E402
    InterruptionFrame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    LLMTextFrame,
    TranscriptionFrame,
    TTSAudioRawFrame,
    TTSSpeakFrame,
    TTSStoppedFrame,
    TTSTextFrame,
)
from pipecat.services.openai.tts import OpenAITTSService  # noqa: E402
from pipecat.tests.utils import SleepFrame, run_test  # noqa: E402
from server_harness import LiveServer, recorded_turns, spoken_whole  # noqa: E402

from fastcsm.integrations.pipecat import FastCSMTTSService  # noqa: E402

FRAME_BYTES = 1920 * 2


@pytest.fixture(scope="module")
def server():
    with LiveServer(slots=4, max_audio_length_ms=8000) as s:
        yield s


def audio_of(frames) -> bytes:
    return b"".join(f.audio for f in frames if isinstance(f, TTSAudioRawFrame))


def llm_reply(tokens: list[str]) -> list:
    return [LLMFullResponseStartFrame(), *[LLMTextFrame(t) for t in tokens], LLMFullResponseEndFrame()]


def test_openai_tts_service_unchanged_with_an_openai_voice(server):
    tts = OpenAITTSService(api_key="none", base_url=server.url + "/v1",  # no fastcsm field: its defaults
                           settings=OpenAITTSService.Settings(voice="alloy"))
    down, up = asyncio.run(run_test(tts, frames_to_send=[TTSSpeakFrame("Hello from Pipecat.")]))
    audio = [f for f in down if isinstance(f, TTSAudioRawFrame)]
    assert not up and audio and {f.sample_rate for f in audio} == {24_000}
    assert len(audio_of(down)) % FRAME_BYTES == 0 and len(audio_of(down)) > 0


def test_fastcsm_service_streams_the_llm_reply_as_one_line(server):
    tts = FastCSMTTSService(url=server.url, voice="alloy", seed=3, max_audio_length_ms=240)
    tokens = ["Hello", " there.", " How", " are", " you", " today?"]
    down, up = asyncio.run(run_test(tts, frames_to_send=[*llm_reply(tokens), SleepFrame(1.0)]))
    assert not up
    audio = [f for f in down if isinstance(f, TTSAudioRawFrame)]
    assert {f.sample_rate for f in audio} == {24_000} and all(len(f.audio) == FRAME_BYTES for f in audio)
    # Two pieces of three frames, exactly the line spoken whole (same seed).
    assert audio_of(down) == spoken_whole(server, "Hello there. How are you today?", voice="alloy", seed=3,
                                          max_audio_length_ms=240)
    assert any(isinstance(f, TTSStoppedFrame) for f in down)


def test_fastcsm_service_sends_each_word_at_its_time(server):
    tts = FastCSMTTSService(url=server.url, voice="0", seed=5, max_audio_length_ms=800)
    tokens = ["Meet", " me", " at", " 10:30pm,", " Dr.", " Nguyen.", " Bring", " $3.50", " please."]
    down, up = asyncio.run(run_test(tts, frames_to_send=[*llm_reply(tokens), SleepFrame(2.0)]))
    assert not up
    words = [f for f in down if isinstance(f, TTSTextFrame)]
    assert [f.text for f in words] == [t.strip() for t in tokens]  # as written, not "ten thirty p m"
    pts = [f.pts for f in words]
    duration_ns = len(audio_of(down)) // 2 * 1_000_000_000 // 24_000
    assert all(a < b for a, b in itertools.pairwise(pts))  # each at its own time
    assert pts[-1] - pts[0] < duration_ns


def test_fastcsm_service_interrupt_keeps_the_socket_and_the_user_turn_goes_in(server, monkeypatch):
    from fastcsm.server.conversation import Conversation

    turns, interrupted = [], []
    add_turn, finish = Conversation.add_turn, Conversation.finish

    async def recording_add_turn(self, m):
        turns.append(m.text)
        return await add_turn(self, m)

    async def recording_finish(self, u, reason):
        interrupted.append(reason)
        return await finish(self, u, reason)

    monkeypatch.setattr(Conversation, "add_turn", recording_add_turn)
    monkeypatch.setattr(Conversation, "finish", recording_finish)
    tts = FastCSMTTSService(url=server.url, voice="0", max_audio_length_ms=8000)
    connects = []

    @tts.event_handler("on_connected")
    async def on_connected(service):
        connects.append(1)

    frames = [*llm_reply(["A long answer that goes on."]), SleepFrame(0.5), InterruptionFrame(), SleepFrame(0.3),
              TranscriptionFrame("Wait, stop.", "user", "2026-01-01T00:00:00Z"), SleepFrame(0.2),
              *llm_reply(["Sorry."]), SleepFrame(0.5)]
    down, up = asyncio.run(asyncio.wait_for(run_test(tts, frames_to_send=frames), 120))
    assert interrupted[0] == "interrupted"  # the server stopped the first line at the barge-in
    assert turns == ["Wait, stop."]  # the user's words went into the conversation
    assert len(connects) == 1  # one socket throughout: the conversation and its KV cache were kept
    assert interrupted[-1] == "max_length" and any(isinstance(f, TTSStoppedFrame) for f in down)  # "Sorry."


def test_a_late_done_of_an_earlier_line_leaves_the_line_playing_now():
    """A line refused or failed mid-way gets its error (which ends it here) and, from the server,
    its done afterwards; by then the next line may be playing: that done must not clear it."""
    async def scenario():
        tts = FastCSMTTSService(url="ws://127.0.0.1:9", voice="alloy")  # never connects here
        tts._playing = "old"
        tts._idle.clear()
        await tts._end_line("old")  # the error: the old line ends here
        assert tts._playing is None and tts._idle.is_set()
        tts._idle.clear()
        tts._open = tts._playing = "new"  # the next line starts
        await tts._end_line("old")  # the old line's done arrives late
        assert tts._playing == "new" and tts._open == "new" and not tts._idle.is_set()
        await tts._end_line("new")
        assert tts._playing is None and tts._open is None and tts._idle.is_set()

    asyncio.run(scenario())


def test_the_user_turn_goes_in_with_the_users_audio(monkeypatch):
    """The audio between the user starting and stopping to speak reaches fastcsm with the turn: with
    its transcript when one reaches the service, else alone, and the server transcribes it."""
    from listen_audio import needs_espeak, overlap, pcm16, silence, spoken
    from pipecat.frames.frames import InputAudioRawFrame, UserStartedSpeakingFrame, UserStoppedSpeakingFrame

    if needs_espeak.args[0]:
        pytest.skip(needs_espeak.kwargs["reason"])
    turns, added = recorded_turns(monkeypatch)

    def user_says(text: str) -> list:
        chunk = 320  # 20 ms at 16 kHz, as transports send
        wav = pcm16(np.concatenate([silence(1.0), spoken(text)]))
        frames = [InputAudioRawFrame(wav[i: i + 2 * chunk], 16_000, 1) for i in range(0, len(wav), 2 * chunk)]
        at = int(1.0 * 16_000 * 2 // (2 * chunk))  # the user is said to start 0.1 s into the speech
        return [*frames[:at + 5], UserStartedSpeakingFrame(), *frames[at + 5:], UserStoppedSpeakingFrame()]

    with LiveServer(slots=2, asr_model="pocketsphinx", max_audio_length_ms=8000) as server:
        tts = FastCSMTTSService(url=server.url, voice="0", max_audio_length_ms=160)
        frames = [*user_says("thank you very much"), SleepFrame(0.2),
                  TranscriptionFrame("thank you very much", "user", "2026-01-01T00:00:00Z"), SleepFrame(0.2),
                  *llm_reply(["You are welcome."]), SleepFrame(0.5),
                  *user_says("what time is it"), SleepFrame(0.2),  # no transcript reaches the service
                  *llm_reply(["It is noon."]), SleepFrame(0.5)]
        down, up = asyncio.run(asyncio.wait_for(run_test(tts, frames_to_send=frames), 120))
    assert [m.text for m in turns] == ["thank you very much", None]
    for m, said in zip(turns, ["thank you very much", "what time is it"], strict=True):
        wav, rate = sf.read(io.BytesIO(base64.b64decode(m.audio)), dtype="float32")
        assert rate == 16_000
        # From half a second (the pre-roll) before the user was said to start, 0.1 s into the speech.
        assert len(wav) / rate == pytest.approx(0.5 - 0.1 + len(spoken(said)) / 16_000, abs=0.03)
        assert np.abs(wav).max() > 0.1
    assert added[0][1] is None and overlap(added[1][1], "what time is it") >= 0.75  # transcribed by the server
    assert all(speaker == 1 and rows > 12 for speaker, _, rows in added)  # frames of audio, not text alone
    assert sum(isinstance(f, TTSStoppedFrame) for f in down) == 2
