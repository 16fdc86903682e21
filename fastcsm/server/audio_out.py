"""Streaming audio encoders: float PCM frames in, bytes ready to send out, as they are made.

    enc = encoder("mp3", 24_000)
    send(enc.start()); for pcm in frames: send(enc.write(pcm)); send(enc.finish())

wav  16-bit PCM after a 44-byte header whose sizes are 0xFFFFFFFF: the length is unknown while
     streaming, and readers take the data to the end of the stream.
pcm  raw signed 16-bit little-endian samples (OpenAI's `pcm`).
flac, mp3, opus (Ogg)  encoded by FFmpeg through PyAV into a write-only sink whose new bytes are
     sent after every frame: the muxer flushes after every packet and an Ogg page holds at most
     80 ms, so each 80 ms frame goes out as soon as the encoder has it. The sink cannot seek, so
     nothing is patched afterwards: mp3 has no Xing header, and FLAC's STREAMINFO says "unknown
     length"; every FLAC decoder plays that, but libsndfile-based readers need the length (read
     those with `flac -d` or ffmpeg).
"""

from __future__ import annotations

import io
import struct

import numpy as np

MEDIA_TYPES = {"wav": "audio/wav", "pcm": "audio/pcm", "flac": "audio/flac", "mp3": "audio/mpeg", "opus": "audio/ogg"}
# response format -> (FFmpeg muxer, FFmpeg encoder, muxer options)
_FFMPEG = {
    "flac": ("flac", "flac", {}),
    "mp3": ("mp3", "libmp3lame", {}),
    "opus": ("ogg", "libopus", {"page_duration": "80000"}),  # microseconds
}
MP3_BIT_RATE = 64_000  # constant: plenty for 24 kHz mono speech


def available_formats() -> list[str]:
    """Response formats this build can encode (flac, mp3 and opus need PyAV with those encoders)."""
    formats = ["wav", "pcm"]
    try:
        import av
    except ImportError:
        return formats
    for name, (muxer, codec, _) in _FFMPEG.items():
        if muxer in av.formats_available and codec in av.codecs_available:
            formats.append(name)
    return formats


def to_int16(pcm: np.ndarray) -> bytes:
    """Float samples in [-1, 1] (clipped) as signed 16-bit little-endian bytes."""
    return (np.clip(pcm, -1.0, 1.0) * 32767.0).round().astype("<i2").tobytes()


class Encoder:
    media_type = "application/octet-stream"

    def start(self) -> bytes:
        return b""

    def write(self, pcm: np.ndarray) -> bytes:
        raise NotImplementedError

    def finish(self) -> bytes:
        return b""


class PcmEncoder(Encoder):
    media_type = MEDIA_TYPES["pcm"]

    def write(self, pcm: np.ndarray) -> bytes:
        return to_int16(pcm)


class WavEncoder(PcmEncoder):
    media_type = MEDIA_TYPES["wav"]

    def __init__(self, sample_rate: int):
        self.sample_rate = sample_rate

    def start(self) -> bytes:
        unknown = 0xFFFFFFFF
        return (b"RIFF" + struct.pack("<I", unknown) + b"WAVE"
                + b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, self.sample_rate, self.sample_rate * 2, 2, 16)
                + b"data" + struct.pack("<I", unknown))


class _Sink(io.RawIOBase):
    """A write-only in-memory stream that hands out what was written since it was last asked."""

    def __init__(self):
        self.buf = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.buf += b
        return len(b)

    def take(self) -> bytes:
        out = bytes(self.buf)
        self.buf.clear()
        return out


class FFmpegEncoder(Encoder):
    def __init__(self, name: str, sample_rate: int):
        import av

        muxer, codec, options = _FFMPEG[name]
        self.media_type = MEDIA_TYPES[name]
        self.sink = _Sink()
        self.container = av.open(self.sink, "w", format=muxer, options={**options, "flush_packets": "1"})
        # FLAC blocks of one 80 ms frame, so each frame goes out whole (the default block is longer).
        stream_options = {"frame_size": str(sample_rate * 2 // 25)} if name == "flac" else {}
        self.stream = self.container.add_stream(codec, rate=sample_rate, layout="mono", options=stream_options)
        if name == "mp3":
            self.stream.bit_rate = MP3_BIT_RATE
        self.planar = self.stream.codec_context.format.is_planar
        self.sample_rate = sample_rate
        self.samples = 0

    def _encode(self, frame) -> bytes:
        for packet in self.stream.encode(frame):
            self.container.mux(packet)
        return self.sink.take()

    def write(self, pcm: np.ndarray) -> bytes:
        import av

        samples = np.frombuffer(to_int16(pcm), "<i2").reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(samples, format="s16p" if self.planar else "s16", layout="mono")
        frame.sample_rate = self.sample_rate
        frame.pts = self.samples
        self.samples += samples.shape[1]
        return self._encode(frame)

    def finish(self) -> bytes:
        if self.container is None:
            return b""
        tail = self._encode(None)
        self.container.close()
        self.container = None
        return tail + self.sink.take()


def encoder(name: str, sample_rate: int) -> Encoder:
    if name == "pcm":
        return PcmEncoder()
    if name == "wav":
        return WavEncoder(sample_rate)
    if name in _FFMPEG and name in available_formats():
        return FFmpegEncoder(name, sample_rate)
    raise ValueError(f"unknown audio format {name!r}; choose one of {available_formats()}")
