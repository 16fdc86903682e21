"""The optional watermark: Sesame's key and SilentCipher's rate reach the model, through the
library, `fastcsm speak --watermark` and `fastcsm serve --watermark`; a missing package or model
is a clear error that names the extra.

SilentCipher's model is downloaded at run time, so a stand-in takes its place: it records what it
was given and returns the audio negated (resampling is linear, so marked audio is then exactly
the negation of what an identity stand-in gives back)."""

import json
import sys
import types

import numpy as np
import pytest
import soundfile as sf
import torch

from fastcsm.cli import main
from fastcsm.errors import EXIT_MODEL
from fastcsm.generator import Generator
from fastcsm.speech import watermark as wm
from fastcsm.speech.speech import SpeakOptions

SESAME_KEY = [212, 211, 146, 56, 201]  # csm's watermarking.py: CSM_1B_GH_WATERMARK
TEXT = "First sentence here. And a second one."
TWO_PIECES = SpeakOptions(max_audio_length_ms=400, max_piece_chars=24)
LOAD_SILENTCIPHER = wm.load_silentcipher


class StandIn:
    """SilentCipher's `encode_wav`, recording its arguments; `sign` -1 negates the audio."""

    def __init__(self, sign: float = -1.0):
        self.sign = sign
        self.calls = []

    def encode_wav(self, audio, sample_rate, key, calc_sdr=True, message_sdr=None):
        self.calls.append({"audio": np.array(audio), "sample_rate": sample_rate, "key": key,
                           "calc_sdr": calc_sdr, "message_sdr": message_sdr})
        return self.sign * np.asarray(audio), 0


@pytest.fixture(scope="module")
def gen(tiny_csm_dir):
    return Generator.from_pretrained(tiny_csm_dir, device="cpu")


def speak(gen, watermarker):
    gen.watermarker = watermarker
    try:
        return gen.speak(TEXT, 0, seed=5, options=TWO_PIECES)
    finally:
        gen.watermarker = None


def test_off_by_default(gen):
    assert gen.watermarker is None


def test_each_piece_is_marked_with_sesames_key_at_44khz(gen):
    plain, same = StandIn(+1.0), StandIn(-1.0)
    a = speak(gen, wm.Watermarker(plain))
    b = speak(gen, wm.Watermarker(same))
    assert len(a.pieces) == 2 and len(plain.calls) == 2 == len(same.calls)
    for call, piece in zip(plain.calls, a.pieces, strict=True):
        assert call["key"] == SESAME_KEY and call["sample_rate"] == 44_100
        assert call["calc_sdr"] is False and call["message_sdr"] == 36
        samples = piece.frames * 1920
        assert abs(call["audio"].shape[0] - samples * 44_100 / 24_000) <= 1  # the piece, at 44.1 kHz
        assert np.abs(call["audio"]).max() > 0  # its audio, not silence
    unmarked = gen.speak(TEXT, 0, seed=5, options=TWO_PIECES).audio
    assert a.audio.shape == b.audio.shape == unmarked.shape
    assert torch.allclose(b.audio, -a.audio, atol=1e-6)  # what the model returned, back at 24 kHz
    assert torch.equal(a.codes, b.codes)


def test_a_stream_gives_each_marked_piece_when_it_is_done(gen):
    whole = speak(gen, wm.Watermarker(StandIn())).audio
    gen.watermarker = wm.Watermarker(stand_in := StandIn())
    try:
        with gen.stream(TEXT, 0, seed=5, options=TWO_PIECES, chunk_frames=1) as stream:
            chunks = list(stream)
    finally:
        gen.watermarker = None
    assert len(chunks) == 2 == len(stand_in.calls)
    assert torch.allclose(torch.cat(chunks), whole, atol=1e-4)


def test_a_bad_key_or_argument_is_refused():
    with pytest.raises(ValueError, match="byte values"):
        wm.Watermarker(StandIn(), key=[1, 300])
    with pytest.raises(TypeError, match="watermark must be"):
        wm.resolve_watermark("yes")


def test_missing_package_or_model_names_the_extra(monkeypatch, tiny_csm_dir):
    monkeypatch.setitem(sys.modules, "silentcipher", None)  # import fails
    with pytest.raises(wm.WatermarkUnavailable, match=r'silentcipher package.*pip install "fastcsm\[watermark\]"'):
        Generator.from_pretrained(tiny_csm_dir, device="cpu", watermark=True)

    def no_model(**kw):
        raise OSError("offline and not in the hub cache")

    monkeypatch.setitem(sys.modules, "silentcipher", types.SimpleNamespace(get_model=no_model))
    with pytest.raises(wm.WatermarkUnavailable, match=r"sony/silentcipher.*offline.*fastcsm\[watermark\]"):
        wm.Watermarker.load("cpu")


def test_watermark_true_loads_sesames_model(monkeypatch, tiny_csm_dir):
    seen = {}

    def get_model(**kw):
        seen.update(kw)
        return StandIn()

    monkeypatch.setitem(sys.modules, "silentcipher", types.SimpleNamespace(get_model=get_model))
    g = Generator.from_pretrained(tiny_csm_dir, device="cpu", watermark=True)
    assert seen == {"model_type": "44.1k", "device": "cpu"} and list(g.watermarker.key) == SESAME_KEY


# -- the command line and the server ---------------------------------------------------------------

def speak_cli(tmp_path, model, name, *extra):
    out = tmp_path / name
    rc = main(["speak", "Hello there.", "-o", str(out), "--model", str(model), "--device", "cpu", "--seed", "2",
               "--max-ms", "320", "-q", "--voices-dir", str(tmp_path / "voices"), *extra])
    return rc, out


def test_fastcsm_speak_watermark(monkeypatch, tmp_path, tiny_csm_dir, capsys):
    stand_ins = []
    monkeypatch.setattr(wm, "load_silentcipher", lambda device: stand_ins.append(StandIn(+1.0)) or stand_ins[-1])
    rc, plain = speak_cli(tmp_path, tiny_csm_dir, "plain.wav", "--watermark")
    assert rc == 0 and len(stand_ins[0].calls) == 1 and stand_ins[0].calls[0]["key"] == SESAME_KEY
    monkeypatch.setattr(wm, "load_silentcipher", lambda device: StandIn(-1.0))
    rc, marked = speak_cli(tmp_path, tiny_csm_dir, "marked.wav", "--watermark")
    assert rc == 0
    a, _ = sf.read(str(plain), dtype="float32")
    b, _ = sf.read(str(marked), dtype="float32")
    assert a.shape == b.shape and np.abs(a + b).max() <= 2 / 32768  # (16-bit rounding, clipping at -1)

    monkeypatch.setitem(sys.modules, "silentcipher", None)
    monkeypatch.setattr(wm, "load_silentcipher", LOAD_SILENTCIPHER)
    capsys.readouterr()
    rc, _ = speak_cli(tmp_path, tiny_csm_dir, "none.wav", "--watermark")
    assert rc == EXIT_MODEL and 'pip install "fastcsm[watermark]"' in capsys.readouterr().err


def test_fastcsm_serve_watermark_flag_and_missing_package(monkeypatch, capsys):
    from fastcsm.cli import build_parser
    from fastcsm.server.settings import settings_from_args

    assert settings_from_args(build_parser().parse_args(["serve", "--watermark"])).watermark is True
    assert settings_from_args(build_parser().parse_args(["serve"])).watermark is False
    monkeypatch.setenv("FASTCSM_WATERMARK", "1")
    assert settings_from_args(build_parser().parse_args(["serve"])).watermark is True
    # Checked before the model is loaded: this model does not even exist.
    monkeypatch.setitem(sys.modules, "silentcipher", None)
    argv = ["serve", "--watermark", "--model", "/nonexistent/model", "--device", "cpu", "--port", "0"]
    assert main(argv) == EXIT_MODEL
    assert 'pip install "fastcsm[watermark]"' in capsys.readouterr().err


def test_served_speech_is_marked(monkeypatch, tmp_path):
    pytest.importorskip("fastapi")
    import httpx
    from server_harness import LiveServer
    from websockets.sync.client import connect

    stand_in = StandIn(+1.0)
    monkeypatch.setattr(wm, "load_silentcipher", lambda device: stand_in)
    body = {"input": "Hello from the server.", "voice": "0", "response_format": "pcm", "max_audio_length_ms": 400,
            "seed": 3}
    got = []
    with LiveServer(slots=2, watermark=True, voices_dir=str(tmp_path / "v")) as server:
        for sign in (+1.0, -1.0):
            stand_in.sign = sign
            r = httpx.post(server.url + "/v1/audio/speech", json=body, timeout=120)
            assert r.status_code == 200
            got.append(np.frombuffer(r.content, "<i2").astype(np.float32) / 32768)
        # A live conversation's line is marked too, and comes frame by frame once it is done.
        with connect(server.url.replace("http", "ws") + "/v1/conversations", open_timeout=30) as ws:
            assert json.loads(ws.recv(timeout=60))["type"] == "ready"
            ws.send(json.dumps({"type": "speak", "text": "Hello from the server.", "voice": "0", "seed": 3,
                                "max_audio_length_ms": 400}))
            frames, events = [], []
            while not events or events[-1]["type"] not in ("done", "error"):
                msg = ws.recv(timeout=60)
                if isinstance(msg, bytes):
                    frames.append(msg)
                else:
                    events.append(json.loads(msg))
    assert events[-1]["type"] == "done" and events[-1]["frames"] == len(frames) >= 1
    said = np.frombuffer(b"".join(frames), "<i2").astype(np.float32) / 32768
    assert said.shape == got[1].shape and np.abs(said - got[1]).max() <= 2 / 32768  # same seed, same mark
    assert len(stand_in.calls) == 3 and all(c["key"] == SESAME_KEY and c["sample_rate"] == 44_100
                                            for c in stand_in.calls)
    # Same seed, same audio: what the client got is what the stand-in returned.
    assert got[0].shape == got[1].shape and len(got[0]) % 1920 == 0
    assert np.abs(got[0] + got[1]).max() <= 2 / 32768
