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


def av_decode(data: bytes) -> tuple[np.ndarray, int]:
    import av

    with av.open(io.BytesIO(data)) as f:
        frames = [fr.to_ndarray().reshape(-1) for fr in f.decode(audio=0)]
        rate = f.streams.audio[0].sample_rate
    return np.concatenate(frames), rate


def test_aac_streams_adts_frames_that_decode_to_the_tone():
    frames = 12
    audio = tone(frames)
    enc = encoder("aac", RATE)
    assert enc.media_type == "audio/aac"
    chunks = [enc.start()] + [enc.write(audio[i * FRAME:(i + 1) * FRAME]) for i in range(frames)]
    chunks.append(enc.finish())
    # AAC's encoder holds back its first 1024 samples; from the second frame on each frame goes out.
    assert all(chunks[2:-1]), [len(c) for c in chunks]
    data = b"".join(chunks)
    assert data[0] == 0xFF and data[1] & 0xF0 == 0xF0  # ADTS sync word: every frame is self-describing
    decoded, rate = av_decode(data)
    assert rate == RATE
    assert audio.shape[0] <= decoded.shape[0] <= audio.shape[0] + 3 * 1024
    # The encoder's priming delay shifts the audio: find it, then the tone must match.
    scores = [np.dot(decoded[d:d + 4 * FRAME], audio[FRAME:5 * FRAME]) for d in range(FRAME, FRAME + 2049)]
    delay = int(np.argmax(scores))
    aligned = decoded[FRAME + delay:FRAME + delay + 8 * FRAME]
    assert np.corrcoef(aligned, audio[FRAME:9 * FRAME])[0, 1] > 0.9


def dominant_hz(x: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / RATE)[np.argmax(spectrum)])


@pytest.mark.parametrize("speed", [0.25, 0.5, 1.5, 2.0, 4.0])
def test_speed_scales_time_and_keeps_the_pitch(speed):
    frames = 25  # 2 s
    audio = tone(frames)
    enc = encoder("pcm", RATE, speed=speed)
    chunks = [enc.write(audio[i * FRAME:(i + 1) * FRAME]) for i in range(frames)]
    # Live: audio leaves while frames are still coming in, not all at the end.
    assert sum(map(len, chunks[: frames // 2])) > 0
    out = np.frombuffer(b"".join(chunks) + enc.finish(), "<i2").astype(np.float32) / 32768
    assert out.shape[0] == pytest.approx(audio.shape[0] / speed, rel=0.03)
    assert dominant_hz(out[len(out) // 4: 3 * len(out) // 4]) == pytest.approx(220, abs=8)


@pytest.mark.parametrize("fmt", ["wav", "pcm", "mp3", "aac"])
def test_speed_one_is_the_plain_encoder(fmt):
    frames = 4
    audio = tone(frames)
    plain, same = encoder(fmt, RATE), encoder(fmt, RATE, speed=1.0)
    assert type(plain) is type(same)

    def run(enc):
        return enc.start() + b"".join(enc.write(audio[i * FRAME:(i + 1) * FRAME]) for i in range(frames)) + enc.finish()

    assert run(plain) == run(same)


def test_unknown_format_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown audio format 'ogg'"):
        encoder("ogg", RATE)
