"""OpenAI's speech API, exactly: its voice names through the voice map, aac, speed, models by
short id, and the custom-voice routes, against the `openai` package on a real server."""

from __future__ import annotations

import io

import httpx
import numpy as np
import pytest

openai = pytest.importorskip("openai")

from server_harness import LiveServer  # noqa: E402
from test_server import AUTH, FRAME, KEY, client, decode, speak_bytes, wav_bytes  # noqa: E402

OPENAI_VOICES = ["alloy", "ash", "ballad", "coral", "echo", "fable", "nova", "onyx", "sage", "shimmer", "verse",
                 "marin", "cedar"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with LiveServer(slots=4, api_keys=[KEY], max_audio_length_ms=8000, model_name="csm-tiny",
                    voice_map="coral=narrator,echo=7", voices_dir=str(tmp_path_factory.mktemp("voices"))) as s:
        yield s


def av_decode(data: bytes) -> np.ndarray:
    import av

    with av.open(io.BytesIO(data)) as f:
        return np.concatenate([fr.to_ndarray().reshape(-1) for fr in f.decode(audio=0)])


@pytest.mark.parametrize("fmt", ["wav", "pcm", "flac", "mp3", "opus", "aac"])
def test_openai_voice_names_in_every_format(server, fmt):
    frames = 5
    with client(server).audio.speech.with_streaming_response.create(
            model="gpt-4o-mini-tts", voice="alloy", input="Hello from fastcsm.", response_format=fmt,
            instructions="Speak cheerfully.", extra_body={"max_audio_length_ms": 80 * frames, "seed": 7}) as response:
        data = b"".join(response.iter_bytes())
        media = response.headers["content-type"]
    if fmt == "aac":
        assert media == "audio/aac"
        audio = av_decode(data)
        assert frames * FRAME <= audio.shape[0] <= frames * FRAME + 3 * 1024
    else:
        audio = decode(data, fmt, frames * FRAME)
        assert audio.shape[0] >= frames * FRAME
    assert np.isfinite(audio).all() and np.abs(audio).max() > 0


def test_alloy_is_speaker_0_by_default_and_the_map_overrides(server):
    assert speak_bytes(server, 4, voice="alloy", seed=3) == speak_bytes(server, 4, voice="0", seed=3)
    assert speak_bytes(server, 4, voice="ash", seed=3) == speak_bytes(server, 4, voice="1", seed=3)
    assert speak_bytes(server, 4, voice="echo", seed=3) == speak_bytes(server, 4, voice="7", seed=3)
    # coral maps to a voice that is not registered yet: a clear 400 that says what to do.
    r = httpx.post(server.url + "/v1/audio/speech", headers=AUTH, json={"input": "hi", "voice": "coral"})
    assert r.status_code == 400 and "narrator" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/audio/speech", headers=AUTH, json={"input": "hi", "voice": "nobody"})
    assert r.status_code == 400 and "alloy" in r.json()["error"]["message"]


def test_voices_lists_the_map_and_a_registered_voice_of_the_same_name_wins(server):
    aliases = {a["name"]: a for a in httpx.get(server.url + "/v1/voices", headers=AUTH).json()["aliases"]}
    assert list(aliases) == OPENAI_VOICES
    assert aliases["alloy"]["speaker"] == 0 and aliases["echo"]["speaker"] == 7
    assert aliases["coral"]["voice"] == "narrator" and aliases["coral"]["speaker"] is None
    for name, speaker in (("narrator", 2), ("nova", 5)):
        r = httpx.post(server.url + "/v1/voices", headers=AUTH, data={"name": name, "text": "Hello there.",
                                                                      "speaker": str(speaker)},
                       files={"audio": ("v.wav", wav_bytes(0.5), "audio/wav")})
        assert r.status_code == 201, r.text
    try:
        aliases = {a["name"]: a for a in httpx.get(server.url + "/v1/voices", headers=AUTH).json()["aliases"]}
        assert aliases["nova"]["shadowed"] and not aliases["alloy"]["shadowed"]
        # nova is now the registered voice (speaker 5 with its recording), not bare speaker 6.
        assert speak_bytes(server, 3, voice="nova", seed=1) == speak_bytes(server, 3, voice={"id": "nova"}, seed=1)
        assert speak_bytes(server, 3, voice="nova", seed=1) != speak_bytes(server, 3, voice="6", seed=1)
        # coral reaches the registered narrator.
        assert speak_bytes(server, 3, voice="coral", seed=1) == speak_bytes(server, 3, voice="narrator", seed=1)
    finally:
        for name in ("narrator", "nova"):
            httpx.delete(f"{server.url}/v1/voices/{name}", headers=AUTH)


@pytest.mark.parametrize("speed", [0.5, 2.0])
def test_speed_time_scales_the_stream(server, speed):
    frames = 20
    plain = np.frombuffer(speak_bytes(server, frames, seed=5), "<i2")
    assert plain.shape[0] == frames * FRAME
    scaled = np.frombuffer(speak_bytes(server, frames, seed=5, speed=speed), "<i2")
    assert scaled.shape[0] == pytest.approx(frames * FRAME / speed, rel=0.03)


def test_speed_through_an_encoded_format(server):
    # Pitch is kept by the filter (tests/test_audio_out.py checks a tone); here the scaled stream
    # must still be a well-formed file of the scaled length.
    plain = decode(speak_bytes(server, 10, "wav", seed=5), "wav", 10 * FRAME)
    fast = decode(speak_bytes(server, 10, "wav", seed=5, speed=1.5), "wav", 0)
    assert fast.shape[0] == pytest.approx(plain.shape[0] / 1.5, rel=0.05)
    assert np.isfinite(fast).all() and np.abs(fast).max() > 0


def test_speed_1_is_bit_identical_and_bad_speeds_are_refused(server):
    assert speak_bytes(server, 4, "mp3", seed=9, speed=1.0) == speak_bytes(server, 4, "mp3", seed=9)
    for speed in (0.1, 4.5):
        r = httpx.post(server.url + "/v1/audio/speech", headers=AUTH, json={"input": "hi", "voice": "0",
                                                                            "speed": speed})
        assert r.status_code == 400 and r.json()["error"]["param"] == "speed"


def test_models_by_short_id(server):
    models = client(server).models.list().data
    assert [m.id for m in models] == ["csm-tiny"] and isinstance(models[0].created, int)
    assert "/" not in httpx.get(server.url + "/v1/info", headers=AUTH).json()["model"]
    model = client(server).models.retrieve("csm-tiny")
    assert model.id == "csm-tiny" and model.created == models[0].created
    with pytest.raises(openai.NotFoundError):
        client(server).models.retrieve("tts-1")
    # The listed id is accepted as `model`.
    with client(server).audio.speech.with_streaming_response.create(
            model="csm-tiny", voice="verse", input="Hi.", response_format="pcm",
            extra_body={"max_audio_length_ms": 160}) as response:
        assert len(response.read()) == 2 * FRAME * 2


def test_default_model_name_is_the_checkpoint_directory_name():
    from fastcsm.server.settings import Settings

    assert Settings(model="/srv/models/csm-1b/").served_model_name == "csm-1b"
    assert Settings(model="sesame/csm-1b").served_model_name == "csm-1b"
    assert Settings(model="/srv/x", model_name="mine").served_model_name == "mine"


def test_voice_map_parsing(tmp_path):
    from fastcsm.server.settings import DEFAULT_VOICE_MAP, Settings, parse_voice_map

    assert list(DEFAULT_VOICE_MAP) == OPENAI_VOICES and DEFAULT_VOICE_MAP["alloy"] == 0
    table = parse_voice_map("alloy=3, coral=me")
    assert table["alloy"] == 3 and table["coral"] == "me" and table["echo"] == DEFAULT_VOICE_MAP["echo"]
    f = tmp_path / "voices.map"
    f.write_text("# OpenAI names\nalloy = 1\nfriend=me  # a registered voice\n")
    assert parse_voice_map(str(f))["friend"] == "me"
    assert Settings.from_env({"FASTCSM_VOICE_MAP": "ash=4"}).voice_map == "ash=4"
    for bad in ("alloy", "alloy=", "=3", "7=1", "a/b=1", str(tmp_path / "missing")):
        with pytest.raises(ValueError):
            parse_voice_map(bad)


def test_openai_shaped_custom_voices(server):
    url = server.url + "/v1/audio/voices"
    sample = {"audio_sample": ("me.wav", wav_bytes(0.5), "audio/wav")}
    r = httpx.post(url, headers=AUTH, data={"name": "custom", "consent": "cons_123"}, files=sample)
    assert r.status_code == 400 and r.json()["error"]["param"] == "text"
    assert "transcript" in r.json()["error"]["message"]
    r = httpx.post(url, headers=AUTH, data={"name": "custom", "consent": "cons_123", "text": "Hello there."},
                   files=sample)
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["object"] == "audio.voice" and body["id"] == body["name"] == "custom"
    assert isinstance(body["created_at"], int)
    try:
        listed = httpx.get(url, headers=AUTH).json()
        assert listed["object"] == "list" and [v["id"] for v in listed["data"]] == ["custom"]
        assert httpx.post(url, headers=AUTH, data={"name": "custom", "text": "Again."},
                          files=sample).status_code == 409
        assert httpx.get(url, headers={"Authorization": "Bearer wrong"}).status_code == 401
        # Usable as OpenAI's voice object and by name.
        assert speak_bytes(server, 2, voice={"id": "custom"}, seed=2) == speak_bytes(server, 2, voice="custom", seed=2)
    finally:
        httpx.delete(server.url + "/v1/voices/custom", headers=AUTH)
