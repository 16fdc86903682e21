"""Speech recognition on the server: OpenAI's `audio.transcriptions.create` through the real
`openai` package, voices registered without a transcript, and the errors around them."""

from __future__ import annotations

import io

import httpx
import numpy as np
import pytest
import soundfile as sf
from listen_audio import SENTENCES, needs_espeak, overlap, silence, spoken

openai = pytest.importorskip("openai")
pytest.importorskip("pocketsphinx")

from server_harness import LiveServer  # noqa: E402
from test_server import AUTH, KEY, client  # noqa: E402

from fastcsm.server.app import create_app  # noqa: E402
from fastcsm.server.settings import Settings  # noqa: E402


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with LiveServer(slots=2, api_keys=[KEY], asr_model="pocketsphinx", max_transcription_s=20,
                    voices_dir=str(tmp_path_factory.mktemp("voices"))) as s:
        yield s


def wav_of(sentence: str, rate: int = 22_050, pad_s: float = 0.3) -> bytes:
    audio = np.concatenate([silence(pad_s, rate), spoken(sentence, rate), silence(pad_s, rate)])
    buf = io.BytesIO()
    sf.write(buf, audio, rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


@needs_espeak
def test_openai_sdk_transcribes(server):
    text = client(server).audio.transcriptions.create(file=("said.wav", wav_of(SENTENCES[0]), "audio/wav"),
                                                      model="whisper-1")
    assert overlap(text.text, SENTENCES[0]) >= 0.75, text.text


@needs_espeak
def test_verbose_json_has_segments_and_words(server):
    t = client(server).audio.transcriptions.create(file=("said.wav", wav_of(SENTENCES[3]), "audio/wav"),
                                                   model="whisper-1", language="en", response_format="verbose_json",
                                                   timestamp_granularities=["word", "segment"])
    assert overlap(t.text, SENTENCES[3]) >= 0.75 and t.language == "en"
    assert t.duration == pytest.approx(0.6 + len(spoken(SENTENCES[3], 22_050)) / 22_050, abs=0.01)
    assert [w.word for w in t.words] == t.text.split()
    assert all(0.2 <= w.start < w.end <= t.duration for w in t.words)
    assert t.segments and t.segments[0].start == t.words[0].start and t.segments[-1].end == t.words[-1].end
    only_words = client(server).audio.transcriptions.create(
        file=("said.wav", wav_of(SENTENCES[3]), "audio/wav"), model="whisper-1", response_format="verbose_json",
        timestamp_granularities=["word"])
    assert only_words.words and not only_words.segments


@needs_espeak
@pytest.mark.parametrize("fmt", ["text", "srt", "vtt"])
def test_text_and_subtitles(server, fmt):
    out = client(server).audio.transcriptions.create(file=("said.wav", wav_of(SENTENCES[2]), "audio/wav"),
                                                     model="whisper-1", response_format=fmt)
    assert isinstance(out, str) and overlap(out, SENTENCES[2]) >= 0.75, out
    if fmt == "srt":
        assert out.startswith("1\n00:00:00,") and " --> 00:00:0" in out
    if fmt == "vtt":
        assert out.startswith("WEBVTT\n\n00:00:00.") and " --> 00:00:0" in out


def test_bad_uploads_and_fields_are_400(server):
    url = server.url + "/v1/audio/transcriptions"

    def post(files=None, **data):
        return httpx.post(url, headers=AUTH, data={"model": "whisper-1", **data},
                          files=files or {"file": ("a.wav", wav_of_silence(), "audio/wav")}, timeout=30)

    for files, message in [({"file": ("a.wav", b"RIFF\x00\x00garbage" * 10, "audio/wav")}, "file"),
                           ({"file": ("a.wav", b"", "audio/wav")}, "empty")]:
        r = post(files)
        assert r.status_code == 400 and r.json()["error"]["param"] == "file" and message in r.json()["error"]["message"]
    long = io.BytesIO()
    sf.write(long, silence(21.0), 16_000, format="WAV")
    r = post({"file": ("long.wav", long.getvalue(), "audio/wav")})
    assert r.status_code == 400 and "20 s" in r.json()["error"]["message"]
    for data, param in [({"response_format": "docx"}, "response_format"), ({"language": "fr"}, "language"),
                        ({"timestamp_granularities[]": "word"}, "timestamp_granularities"),
                        ({"timestamp_granularities[]": "line", "response_format": "verbose_json"},
                         "timestamp_granularities")]:
        r = post(**data)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    assert httpx.post(url, data={"model": "whisper-1"}).status_code == 401
    # The server still transcribes after all that.
    assert post().status_code == 200


def wav_of_silence() -> bytes:
    buf = io.BytesIO()
    sf.write(buf, silence(0.5), 16_000, format="WAV")
    return buf.getvalue()


@needs_espeak
def test_voices_without_a_transcript_are_transcribed_once(server):
    said = SENTENCES[1]
    sample = {"audio": ("me.wav", wav_of(said), "audio/wav")}
    try:
        r = httpx.post(server.url + "/v1/voices", headers=AUTH, data={"name": "heard"}, files=sample, timeout=60)
        assert r.status_code == 201, r.text
        assert overlap(r.json()["text"], said) >= 0.75
        stored = httpx.get(server.url + "/v1/voices/heard", headers=AUTH).json()
        assert stored["text"] == r.json()["text"]
        assert server.service.voice("heard").meta["transcribed_by"] == "pocketsphinx:en-us"
        # A given transcript wins.
        r = httpx.post(server.url + "/v1/voices", headers=AUTH, data={"name": "typed", "text": "Typed words."},
                       files=sample, timeout=60)
        assert r.status_code == 201 and r.json()["text"] == "Typed words."
        assert "transcribed_by" not in server.service.voice("typed").meta
        r = httpx.post(server.url + "/v1/audio/voices", headers=AUTH, data={"name": "oai", "consent": "c1"},
                       files={"audio_sample": sample["audio"]}, timeout=60)
        assert r.status_code == 201 and overlap(r.json()["text"], said) >= 0.75, r.text
    finally:
        for name in ("heard", "typed", "oai"):
            httpx.delete(server.url + f"/v1/voices/{name}", headers=AUTH)


def test_without_speech_recognition_the_routes_say_so(tmp_path):
    from fastapi.testclient import TestClient

    sample = {"audio_sample": ("me.wav", wav_of_silence(), "audio/wav")}
    app = create_app(Settings(device="cpu", voices_dir=str(tmp_path)))
    http = TestClient(app, base_url="http://127.0.0.1")  # no lifespan: nothing loads, and nothing here needs the model
    r = http.post("/v1/audio/transcriptions", data={"model": "whisper-1"},
                  files={"file": ("a.wav", wav_of_silence(), "audio/wav")})
    assert r.status_code == 400 and "--asr-model" in r.json()["error"]["message"]
    r = http.post("/v1/audio/voices", data={"name": "x"}, files=sample)
    assert r.status_code == 400 and r.json()["error"]["param"] == "text"
    assert "--asr-model" in r.json()["error"]["message"]


def test_a_recogniser_that_fails_to_load_is_named(tmp_path):
    pytest.importorskip("faster_whisper")
    from fastapi.testclient import TestClient

    app = create_app(Settings(device="cpu", voices_dir=str(tmp_path), asr_model="someone/no-such-whisper"))
    app.state.service.load_asr()
    r = TestClient(app, base_url="http://127.0.0.1").post("/v1/audio/transcriptions", data={"model": "whisper-1"},
                             files={"file": ("a.wav", wav_of_silence(), "audio/wav")})
    assert r.status_code == 503 and "no-such-whisper" in r.json()["error"]["message"]


@needs_espeak
def test_cli_voices_add_transcribes_without_text(tmp_path, tiny_csm_dir, capsys):
    from fastcsm.cli import main
    from fastcsm.speech.voices import VoiceStore

    ref = tmp_path / "me.wav"
    ref.write_bytes(wav_of(SENTENCES[0]))
    vdir = str(tmp_path / "voices")
    base = ["voices", "add", "me", "--audio", str(ref), "--model", str(tiny_csm_dir), "--device", "cpu",
            "--voices-dir", vdir]
    assert main([*base, "--asr-model", ""]) == 2
    assert "--asr-model to transcribe" in capsys.readouterr().err
    assert main([*base, "--asr-model", "pocketsphinx"]) == 0
    assert "heard: " in capsys.readouterr().out
    voice = VoiceStore(vdir).get("me")
    assert overlap(voice.text, SENTENCES[0]) >= 0.75 and voice.meta["transcribed_by"] == "pocketsphinx"
    assert main([*base, "--asr-model", "pocketsphinx", "--text", "Given.", "--force"]) == 0
    assert VoiceStore(vdir).get("me").text == "Given."


def pcm_of(sentence: str, rate: int = 16_000) -> np.ndarray:
    return (np.concatenate([silence(0.3, rate), spoken(sentence, rate), silence(0.3, rate)]) * 32767).astype("<i2")


@needs_espeak
def test_pipecat_openai_stt_service(server):
    pytest.importorskip("pipecat")
    import asyncio

    from pipecat.frames.frames import TranscriptionFrame
    from pipecat.services.openai.stt import OpenAISTTService
    from pipecat.transcriptions.language import Language

    async def run():
        stt = OpenAISTTService(api_key=KEY, base_url=server.url + "/v1",
                               settings=OpenAISTTService.Settings(model="whisper-1", language=Language.EN))
        buf = io.BytesIO()
        sf.write(buf, pcm_of(SENTENCES[0]), 16_000, format="WAV", subtype="PCM_16")
        try:
            return [f async for f in stt.run_stt(buf.getvalue())]  # what Pipecat runs on each spoken segment
        finally:
            await stt._client.close()

    frames = asyncio.run(run())
    assert len(frames) == 1 and isinstance(frames[0], TranscriptionFrame), frames
    assert overlap(frames[0].text, SENTENCES[0]) >= 0.75


@needs_espeak
def test_livekit_openai_stt(server):
    pytest.importorskip("livekit.plugins.openai")
    import asyncio

    from livekit import rtc
    from livekit.agents import stt as agents_stt
    from livekit.plugins import openai as lk_openai

    async def run():
        stt = lk_openai.STT(base_url=server.url + "/v1", api_key=KEY, model="whisper-1", language="en",
                            use_realtime=False)
        pcm = pcm_of(SENTENCES[1])
        try:
            return await stt.recognize(rtc.AudioFrame(pcm.tobytes(), 16_000, 1, len(pcm)))
        finally:
            await stt.aclose()

    event = asyncio.run(run())
    assert event.type == agents_stt.SpeechEventType.FINAL_TRANSCRIPT
    assert overlap(event.alternatives[0].text, SENTENCES[1]) >= 0.75
