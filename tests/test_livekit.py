"""LiveKit Agents against a real `fastcsm serve` on loopback, with no LiveKit server (the TTS
objects are driven directly): `livekit-plugins-openai`'s TTS unchanged, and fastcsm's own
streaming `TTS` over the conversation WebSocket."""

from __future__ import annotations

import asyncio
import base64
import io
import itertools

import numpy as np
import pytest
import soundfile as sf

pytest.importorskip("livekit.agents", reason="LiveKit Agents is not installed: pip install \"fastcsm[livekit]\"")
lk_openai = pytest.importorskip("livekit.plugins.openai",
                                reason="livekit-plugins-openai is not installed: pip install \"fastcsm[livekit]\"")
from server_harness import LiveServer, recorded_turns, spoken_whole  # noqa: E402

from fastcsm.integrations.livekit import TTS  # noqa: E402

FRAME = 1920


@pytest.fixture(scope="module")
def server():
    with LiveServer(slots=4, max_audio_length_ms=8000) as s:
        yield s


def pcm(frame) -> bytes:
    return bytes(memoryview(frame.data).cast("B"))


@pytest.mark.parametrize("model,fmt", [("tts-1", "mp3"), ("gpt-4o-mini-tts", "mp3"), ("gpt-4o-mini-tts", "aac"),
                                       ("gpt-4o-mini-tts", "opus"), ("gpt-4o-mini-tts", "flac"),
                                       ("gpt-4o-mini-tts", "wav"), ("gpt-4o-mini-tts", "pcm")])
def test_openai_plugin_unchanged_with_an_openai_voice(server, model, fmt):
    # tts-1 asks for server-sent events, the others for the audio itself; the plugin decodes each format.
    async def run():
        tts = lk_openai.TTS(base_url=server.url + "/v1", api_key="none", voice="alloy", model=model,
                            response_format=fmt)
        async with tts.synthesize("Hello from LiveKit.") as stream:
            frames = [ev.frame async for ev in stream]
        await tts.aclose()
        return frames

    frames = asyncio.run(run())
    assert {f.sample_rate for f in frames} == {24_000} and {f.num_channels for f in frames} == {1}
    # The server's default bound for this text is 5.85 s: a little more or less after a lossy codec.
    assert sum(f.samples_per_channel for f in frames) >= 5 * FRAME


def test_stream_speaks_the_llm_reply_as_one_line(server):
    async def run():
        tts = TTS(base_url=server.url, voice="alloy", seed=3, max_audio_length_ms=240)
        stream = tts.stream()
        for token in ["Hello", " there.", " How", " are", " you", " today?"]:
            stream.push_text(token)
        stream.flush()
        stream.end_input()
        events = [ev async for ev in stream]
        async with tts.synthesize("Hello there.") as whole:
            synthesized = [ev.frame async for ev in whole]
        await tts.aclose()
        return events, synthesized

    events, synthesized = asyncio.run(run())
    assert {ev.frame.sample_rate for ev in events} == {24_000} and events[-1].is_final
    audio = b"".join(pcm(ev.frame) for ev in events)
    # Exactly the line spoken whole (two pieces of three frames, same seed).
    assert audio == spoken_whole(server, "Hello there. How are you today?", voice="alloy", seed=3,
                                 max_audio_length_ms=240)
    assert sum(f.samples_per_channel for f in synthesized) >= 3 * FRAME


def test_stream_gives_the_aligned_transcript(server):
    async def run():
        tts = TTS(base_url=server.url, voice="0", seed=5, max_audio_length_ms=800)
        stream = tts.stream()
        for token in ["Meet", " me", " at", " 10:30pm,", " Dr.", " Nguyen.", " Bring", " $3.50", " please."]:
            stream.push_text(token)
        stream.end_input()
        events = [ev async for ev in stream]
        await tts.aclose()
        return events

    events = asyncio.run(run())
    assert TTS().capabilities.aligned_transcript
    timed = [w for ev in events for w in ev.frame.userdata.get("lk.timed_transcripts", [])]
    assert "".join(timed) == "Meet me at 10:30pm, Dr. Nguyen. Bring $3.50 please. "  # as written
    duration = sum(ev.frame.samples_per_channel for ev in events) / 24_000
    assert all(a.end_time <= b.start_time for a, b in itertools.pairwise(timed))
    assert all(0 <= w.start_time < w.end_time <= duration + 1e-3 for w in timed)


def test_closing_a_stream_interrupts_and_the_conversation_goes_on(server, monkeypatch):
    from fastcsm.server.conversation import Conversation

    reasons, turns = [], []
    finish, add_turn = Conversation.finish, Conversation.add_turn

    async def recording_finish(self, u, reason):
        if not u.finished:
            reasons.append(reason)
        return await finish(self, u, reason)

    async def recording_add_turn(self, m):
        turns.append(m.text)
        return await add_turn(self, m)

    monkeypatch.setattr(Conversation, "finish", recording_finish)
    monkeypatch.setattr(Conversation, "add_turn", recording_add_turn)

    async def run():
        tts = TTS(base_url=server.url, voice="0", max_audio_length_ms=8000)
        stream = tts.stream()
        stream.push_text("A long answer that goes on and on.")
        stream.flush()
        first = await stream.__anext__()  # audio is playing
        socket = tts._ws
        await stream.aclose()  # barge-in
        await tts.add_user_turn("Wait, stop.")
        stream = tts.stream()
        stream.push_text("Sorry.")
        stream.end_input()
        events = [ev async for ev in stream]
        same = tts._ws is socket
        await tts.aclose()
        return first, events, same

    first, events, same = asyncio.run(run())
    assert first.frame.samples_per_channel > 0 and events
    assert reasons[0] == "interrupted" and reasons[-1] == "max_length"
    assert turns == ["Wait, stop."] and same  # one socket: the conversation and its KV cache were kept


def test_the_user_turn_goes_in_with_the_users_audio(server, monkeypatch):
    """The session's events say when the user speaks and what they said; the agent's STT node lends
    the TTS the microphone's frames: the turn reaches fastcsm with its transcript and its audio."""
    from listen_audio import needs_espeak, pcm16, silence, spoken
    from livekit import rtc
    from livekit.agents import AgentSession
    from livekit.agents.voice.events import UserInputTranscribedEvent, UserStateChangedEvent

    if needs_espeak.args[0]:
        pytest.skip(needs_espeak.kwargs["reason"])
    turns, added = recorded_turns(monkeypatch)
    said = "thank you very much"
    wav = pcm16(np.concatenate([silence(1.0, 48_000), spoken(said, 48_000)]))
    chunk = 480 * 2  # 10 ms at 48 kHz, as LiveKit's frames come
    start = int(1.1 * 48_000 * 2) // chunk  # the user is said to start 0.1 s into the speech

    async def run():
        tts = TTS(base_url=server.url, voice="0", max_audio_length_ms=160)
        session = AgentSession()
        tts.listen(session)

        async def microphone():
            for n, i in enumerate(range(0, len(wav), chunk)):
                if n == start:
                    session.emit("user_state_changed", UserStateChangedEvent(old_state="listening",
                                                                             new_state="speaking"))
                data = wav[i: i + chunk]
                yield rtc.AudioFrame(data, 48_000, 1, len(data) // 2)
            session.emit("user_state_changed", UserStateChangedEvent(old_state="speaking", new_state="listening"))
            session.emit("user_input_transcribed", UserInputTranscribedEvent(transcript=said, is_final=True))

        frames = [f async for f in tts.hear(microphone())]  # as the STT node passes them on
        stream = tts.stream()
        stream.push_text("You are welcome.")
        stream.end_input()
        events = [ev async for ev in stream]
        await tts.aclose()
        return frames, events

    frames, events = asyncio.run(run())
    assert sum(f.samples_per_channel for f in frames) * 2 == len(wav) and events
    assert [m.text for m in turns] == [said]
    audio, rate = sf.read(io.BytesIO(base64.b64decode(turns[0].audio)), dtype="float32")
    assert rate == 48_000
    # From half a second (the pre-roll) before the user was said to start, 0.1 s into the speech.
    assert len(audio) / rate == pytest.approx(0.5 - 0.1 + len(spoken(said, 48_000)) / 48_000, abs=0.03)
    assert added[0][0] == 1 and added[0][2] > 20  # the turn's rows hold its audio frames
