"""The streaming encoders: every 80 ms frame goes out as soon as it is encoded, and the whole
stream decodes to the audio that went in."""

import io

import numpy as np
import pytest
import soundfile as sf

from fastcsm.server.audio_out import available_formats, encoder, to_int16

RATE = 24_000
FRAME = 1920


def tone(frames: int) -> np.ndarray:
    t = np.arange(frames * FRAME) / RATE
    return (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


def test_to_int16_clips_and_rounds():
    pcm = np.array([-2.0, -1.0, -0.5, 0.0, 1e-5, 0.5, 1.0, 2.0], np.float32)
    assert np.frombuffer(to_int16(pcm), "<i2").tolist() == [-32767, -32767, -16384, 0, 0, 16384, 32767, 32767]


@pytest.mark.parametrize("fmt", ["flac", "mp3", "opus"])
def test_encoded_formats_stream_every_frame(fmt):
    assert fmt in available_formats()
    frames = 12
    audio = tone(frames)
    enc = encoder(fmt, RATE)
    chunks = [enc.start()] + [enc.write(audio[i * FRAME:(i + 1) * FRAME]) for i in range(frames)]
    chunks.append(enc.finish())
    # Nothing waits for a later frame: a page, block or mp3 frame leaves with the frame that fills it.
    assert all(chunks[1:-1]), [len(c) for c in chunks]
    data = b"".join(chunks)
    if fmt == "flac":  # "unknown length" while streaming: fill it in for libsndfile
        assert data[:4] == b"fLaC"
        word = int.from_bytes(data[18:26], "big")
        assert word & ((1 << 36) - 1) == 0
        data = data[:18] + (word | frames * FRAME).to_bytes(8, "big") + data[26:]
    decoded, rate = sf.read(io.BytesIO(data), dtype="float32")
    assert rate == RATE
    if fmt == "flac":  # lossless at 16 bits
        np.testing.assert_allclose(decoded, np.frombuffer(to_int16(audio), "<i2") / 32768, atol=1e-4)
    elif fmt == "opus":
        assert decoded.shape == audio.shape
        # A lossy codec: the tone survives (correlation), not the samples.
        assert np.corrcoef(decoded[FRAME:], audio[FRAME:])[0, 1] > 0.9
    else:  # mp3 adds the encoder's delay and padding
        assert audio.shape[0] <= decoded.shape[0] <= audio.shape[0] + 3 * 1152
        assert np.abs(decoded).max() > 0.2


def test_unknown_format_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown audio format 'aac'"):
        encoder("aac", RATE)
