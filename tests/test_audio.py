"""Audio I/O: what comes in is mono float32 at 24 kHz, and every bad input gets a clear AudioError."""

import io
import warnings

import numpy as np
import pytest
import soundfile as sf
import soxr
import torch

from fastcsm.audio import AudioError, read_audio, validate_waveform, write_audio

SR = 24_000


def _tone(seconds: float, sr: int, channels: int = 1, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return np.stack([amp * np.sin(2 * np.pi * 220 * (c + 1) * t) for c in range(channels)], axis=1).astype(np.float32)


def _file(tmp_path, data: np.ndarray, sr: int, name: str = "a.wav", **kw) -> str:
    path = str(tmp_path / name)
    sf.write(path, data, sr, **kw)
    return path


@pytest.mark.parametrize("suffix", [".wav", ".flac"])
def test_write_then_read_round_trips(tmp_path, suffix):
    wav = torch.from_numpy(_tone(0.5, SR)[:, 0])
    write_audio(tmp_path / f"out{suffix}", wav)
    back = read_audio(tmp_path / f"out{suffix}")
    assert back.dtype == torch.float32 and back.shape == wav.shape
    torch.testing.assert_close(back, wav, atol=1.0 / 32768 + 1e-7, rtol=0)  # 16-bit quantisation


def test_reads_any_rate_and_channels_as_mono_24k(tmp_path):
    stereo = _tone(1.0, 44_100, channels=2)
    wav = read_audio(_file(tmp_path, stereo, 44_100))
    expected = soxr.resample(stereo.mean(axis=1), 44_100, SR, quality="HQ")
    assert wav.shape == (SR,)
    np.testing.assert_allclose(wav.numpy(), expected, atol=1e-4)  # 16-bit file


def test_reads_ogg_and_file_objects(tmp_path):
    data = _tone(0.5, 16_000)
    buf = io.BytesIO()
    sf.write(buf, data, 16_000, format="OGG", subtype="VORBIS")
    from_bytes = read_audio(buf.getvalue())
    buf.seek(0)
    from_file = read_audio(buf)
    assert from_bytes.shape == from_file.shape == (SR // 2,)
    torch.testing.assert_close(from_bytes, from_file)
    assert 0.3 < float(from_bytes.abs().max()) <= 1.0


def test_missing_file(tmp_path):
    with pytest.raises(AudioError, match="no such file"):
        read_audio(tmp_path / "nope.wav")


def test_unreadable_file(tmp_path):
    path = tmp_path / "junk.wav"
    path.write_bytes(b"this is not audio" * 100)
    with pytest.raises(AudioError, match="could not read audio"):
        read_audio(path)


def test_empty_file(tmp_path):
    with pytest.raises(AudioError, match="empty"):
        read_audio(_file(tmp_path, np.zeros((0, 1), np.float32), SR))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_samples(tmp_path, bad):
    data = _tone(0.1, SR)
    data[100] = bad
    with pytest.raises(AudioError, match="1 samples are NaN or Inf"):
        read_audio(_file(tmp_path, data, SR, subtype="FLOAT"))


def test_too_long(tmp_path):
    path = _file(tmp_path, _tone(2.0, 8_000), 8_000)
    with pytest.raises(AudioError, match=r"2.0 s of audio is longer than the 1 s allowed"):
        read_audio(path, max_duration_s=1.0)
    assert read_audio(path, max_duration_s=2.0).shape == (2 * SR,)


def test_implausible_sample_rate(tmp_path):
    with pytest.raises(AudioError, match="sample rate 100 Hz"):
        read_audio(_file(tmp_path, _tone(1.0, 100), 100))


def test_clipping_is_peak_normalised_with_a_warning(tmp_path):
    data = _tone(0.2, SR, amp=1.0) * 2.0
    with pytest.warns(UserWarning, match="peak 2.000 exceeds 1.0"):
        wav = read_audio(_file(tmp_path, data, SR, subtype="FLOAT"))
    assert float(wav.abs().max()) == pytest.approx(1.0)
    np.testing.assert_allclose(wav.numpy(), data[:, 0] / 2.0, atol=1e-6)


def test_full_scale_audio_is_not_flagged(tmp_path):
    """Resampling overshoot on legal full-scale audio is scaled back quietly."""
    data = np.sign(_tone(0.5, 44_100, amp=1.0))  # square wave at ±1: resampling rings past 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        wav = read_audio(_file(tmp_path, data, 44_100, subtype="FLOAT"))
    assert float(wav.abs().max()) <= 1.0


# -- in-memory waveforms ------------------------------------------------------------------------------


def test_validate_waveform_shapes_and_resampling():
    mono = _tone(0.5, SR)[:, 0]
    for shaped in (mono, mono[None], mono[None, None], mono[:, None], torch.from_numpy(mono)):
        out = validate_waveform(shaped)
        assert out.shape == (SR // 2,) and out.dtype == torch.float32
    stereo = _tone(0.5, SR, channels=2)
    expected = stereo.mean(axis=1)
    np.testing.assert_allclose(validate_waveform(stereo).numpy(), expected, atol=1e-7)  # [T, C]
    np.testing.assert_allclose(validate_waveform(stereo.T).numpy(), expected, atol=1e-7)  # [C, T]
    assert validate_waveform(_tone(0.5, 16_000)[:, 0], sample_rate=16_000).shape == (SR // 2,)


@pytest.mark.parametrize(
    "wav, message",
    [
        (np.zeros(0, np.float32), "empty"),
        (np.array([0.0, np.nan], np.float32), "NaN or Inf"),
        (torch.tensor([0.0, float("inf")]), "NaN or Inf"),
        (np.zeros(100, np.int16), "floats in"),
        (torch.zeros(100, dtype=torch.int32), "floats in"),
        (np.zeros((10, 10), np.float32), "cannot tell channels"),
        (np.zeros((2, 3, 100), np.float32), "shape"),
        ([0.0, 0.1], "torch tensor or numpy array"),
        (np.zeros(SR * 3, np.float32), "longer than"),
    ],
    ids=["empty", "nan", "inf", "int16", "int32", "ambiguous", "3d", "list", "too-long"],
)
def test_validate_waveform_rejects(wav, message):
    with pytest.raises(AudioError, match=message):
        validate_waveform(wav, max_duration_s=2.0)


def test_validate_waveform_normalises_clipping():
    with pytest.warns(UserWarning, match="exceeds 1.0"):
        out = validate_waveform(np.array([0.5, -3.0, 1.5], np.float32))
    np.testing.assert_allclose(out.numpy(), [0.5 / 3, -1.0, 0.5], rtol=1e-6)


# -- writing ---------------------------------------------------------------------------------------


def test_write_rejects_bad_input(tmp_path):
    with pytest.raises(AudioError, match="cannot write .mp3"):
        write_audio(tmp_path / "x.mp3", np.zeros(10, np.float32))
    with pytest.raises(AudioError, match="mono"):
        write_audio(tmp_path / "x.wav", np.zeros((2, 10), np.float32))
    with pytest.raises(AudioError, match="NaN"):
        write_audio(tmp_path / "x.wav", np.array([np.nan], np.float32))
    with pytest.raises(AudioError, match="nothing to write"):
        write_audio(tmp_path / "x.wav", np.zeros(0, np.float32))


def test_write_clips_out_of_range(tmp_path):
    write_audio(tmp_path / "x.wav", torch.tensor([[[0.5, 2.0, -2.0]]]))
    back, _ = sf.read(str(tmp_path / "x.wav"), dtype="float32")
    np.testing.assert_allclose(back, [0.5, 32767 / 32768, -1.0], atol=1e-4)
