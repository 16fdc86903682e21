"""Streaming audio encoders: float PCM frames in, bytes ready to send out, as they are made.

    enc = encoder("mp3", 24_000)
    send(enc.start()); for pcm in frames: send(enc.write(pcm)); send(enc.finish())

wav  16-bit PCM after a 44-byte header whose sizes are 0xFFFFFFFF: the length is unknown while
     streaming, and readers take the data to the end of the stream.
pcm  raw signed 16-bit little-endian samples (OpenAI's `pcm`).
flac, mp3, opus (Ogg), aac (ADTS)  encoded by FFmpeg through PyAV into a write-only sink whose new bytes are
     sent after every frame: the muxer flushes after every packet and an Ogg page holds at most
     80 ms, so each 80 ms frame goes out as soon as the encoder has it. The sink cannot seek, so
     nothing is patched afterwards: mp3 has no Xing header, and FLAC's STREAMINFO says "unknown
     length"; every FLAC decoder plays that, but libsndfile-based readers need the length (read
     those with `flac -d` or ffmpeg). ADTS frames each carry their own header, so an aac stream
     plays from any point; AAC's encoder holds back about 1024 samples, which come with the next frame.

`speed` (OpenAI's 0.25-4.0) time-scales the audio without changing its pitch: FFmpeg's `atempo`
filter between the frames and the encoder (`TempoFilter`), frame by frame, so the stream stays
live. Speed 1.0 bypasses it: those bytes are exactly what they were without the option.
"""

from __future__ import annotations

import io
import struct

import numpy as np

MEDIA_TYPES = {"wav": "audio/wav", "pcm": "audio/pcm", "flac": "audio/flac", "mp3": "audio/mpeg", "opus": "audio/ogg",
               "aac": "audio/aac"}
# response format -> (FFmpeg muxer, FFmpeg encoder, muxer options)
_FFMPEG = {
    "flac": ("flac", "flac", {}),
    "mp3": ("mp3", "libmp3lame", {}),
    "opus": ("ogg", "libopus", {"page_duration": "80000"}),  # microseconds
    "aac": ("adts", "aac", {}),
}
MP3_BIT_RATE = 64_000  # constant: plenty for 24 kHz mono speech


def available_formats() -> list[str]:
    """Response formats this build can encode (flac, mp3, opus and aac need PyAV with those encoders)."""
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


class TempoFilter:
    """FFmpeg's `atempo` (speed without a pitch change) over a stream of float frames. atempo
    takes factors from 0.5 to 2.0 in one stage, so 0.25 and 4.0 are two stages of 0.5 and 2.0."""

    def __init__(self, speed: float, sample_rate: int):
        import fractions

        import av

        if not 0.25 <= speed <= 4.0:
            raise ValueError(f"speed must be from 0.25 to 4.0, got {speed}")
        stages = []
        while speed > 2.0:
            stages.append(2.0)
            speed /= 2.0
        while speed < 0.5:
            stages.append(0.5)
            speed /= 0.5
        stages.append(speed)
        self.graph = av.filter.Graph()
        node = self.graph.add_abuffer(sample_rate=sample_rate, format="flt", layout="mono",
                                      time_base=fractions.Fraction(1, sample_rate))
        for factor in stages:
            stage = self.graph.add("atempo", repr(factor))
            node.link_to(stage)
            node = stage
        out = self.graph.add("abuffersink")
        node.link_to(out)
        self.graph.configure()
        self.sample_rate = sample_rate
        self.samples = 0

    def _pull(self) -> np.ndarray:
        import av

        parts = []
        while True:
            try:
                frame = self.graph.pull()
            except (av.BlockingIOError, av.EOFError):
                break
            parts.append(frame.to_ndarray().reshape(-1))
        return np.concatenate(parts).astype(np.float32) if parts else np.zeros(0, np.float32)

    def write(self, pcm: np.ndarray) -> np.ndarray:
        """The time-scaled samples ready so far (atempo holds back a few tens of ms)."""
        import av

        samples = np.ascontiguousarray(pcm, dtype=np.float32).reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(samples, format="flt", layout="mono")
        frame.sample_rate = self.sample_rate
        frame.pts = self.samples
        self.samples += samples.shape[1]
        self.graph.push(frame)
        return self._pull()

    def finish(self) -> np.ndarray:
        self.graph.push(None)
        return self._pull()


class TempoEncoder(Encoder):
    """An encoder whose input is time-scaled first (`speed` != 1)."""

    def __init__(self, inner: Encoder, speed: float, sample_rate: int):
        self.inner, self.tempo = inner, TempoFilter(speed, sample_rate)
        self.media_type = inner.media_type

    def start(self) -> bytes:
        return self.inner.start()

    def write(self, pcm: np.ndarray) -> bytes:
        out = self.tempo.write(pcm)
        return self.inner.write(out) if out.size else b""

    def finish(self) -> bytes:
        out = self.tempo.finish()
        return (self.inner.write(out) if out.size else b"") + self.inner.finish()


def encoder(name: str, sample_rate: int, speed: float = 1.0) -> Encoder:
    if name == "pcm":
        enc = PcmEncoder()
    elif name == "wav":
        enc = WavEncoder(sample_rate)
    elif name in _FFMPEG and name in available_formats():
        enc = FFmpegEncoder(name, sample_rate)
    else:
        raise ValueError(f"unknown audio format {name!r}; choose one of {available_formats()}")
    return enc if speed == 1.0 else TempoEncoder(enc, speed, sample_rate)
