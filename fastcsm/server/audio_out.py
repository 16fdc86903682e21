"""Streaming audio encoders: float PCM frames in, bytes ready to send out, as they are made.

    enc = encoder("mp3")
    send(enc.start()); for pcm in frames: send(enc.write(pcm)); send(enc.finish())

wav  16-bit PCM after a 44-byte header whose sizes are 0xFFFFFFFF: the length is unknown while
     streaming, and readers take the data to the end of the stream.
pcm  raw signed 16-bit little-endian samples (OpenAI's `pcm`).
flac, mp3, opus (Ogg)  encoded by libsndfile (>= 1.1 for mp3 and opus) into a sink whose new
     bytes are sent after every frame. The encoders are set for streaming: mp3 at a constant
     bitrate (no Xing header to patch afterwards), Ogg pages every 80 ms. FLAC's STREAMINFO
     goes out before the length is known, so it says "unknown length"; every FLAC decoder plays
     that, but libsndfile-based readers need the length (read those with `flac -d` or ffmpeg).
"""

from __future__ import annotations

import io
import struct

import numpy as np
import soundfile as sf

MEDIA_TYPES = {"wav": "audio/wav", "pcm": "audio/pcm", "flac": "audio/flac", "mp3": "audio/mpeg", "opus": "audio/ogg"}
_SNDFILE = {"flac": ("FLAC", "PCM_16"), "mp3": ("MP3", "MPEG_LAYER_III"), "opus": ("OGG", "OPUS")}
# libsndfile commands (sndfile.h) soundfile does not wrap.
_SFC_SET_OGG_PAGE_LATENCY_MS = 0x1302
_SFC_SET_BITRATE_MODE = 0x1305
_SF_BITRATE_MODE_CONSTANT = 0


def available_formats() -> list[str]:
    """Response formats this build can encode (mp3 and opus need libsndfile >= 1.1)."""
    formats = ["wav", "pcm"]
    have = sf.available_formats()
    for name, (fmt, subtype) in _SNDFILE.items():
        if fmt in have and subtype in sf.available_subtypes(fmt):
            formats.append(name)
    return formats


def to_int16(pcm: np.ndarray) -> bytes:
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
    """A seekable in-memory file that remembers how much of it has been handed out."""

    def __init__(self):
        self.buf = bytearray()
        self.pos = 0
        self.sent = 0

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def write(self, b) -> int:
        b = bytes(b)
        end = self.pos + len(b)
        if end > len(self.buf):
            self.buf.extend(bytes(end - len(self.buf)))
        self.buf[self.pos:end] = b
        self.pos = end
        return len(b)

    def read(self, n: int = -1) -> bytes:
        n = len(self.buf) - self.pos if n is None or n < 0 else n
        out = bytes(self.buf[self.pos:self.pos + n])
        self.pos += len(out)
        return out

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = offset if whence == 0 else self.pos + offset if whence == 1 else len(self.buf) + offset
        return self.pos

    def tell(self) -> int:
        return self.pos

    def take(self) -> bytes:
        """The bytes written since the last call (a rewrite of bytes already sent is ignored)."""
        out = bytes(self.buf[self.sent:])
        self.sent = len(self.buf)
        return out


class SndfileEncoder(Encoder):
    def __init__(self, name: str, sample_rate: int):
        from soundfile import _ffi, _snd

        fmt, subtype = _SNDFILE[name]
        self.media_type = MEDIA_TYPES[name]
        self.sink = _Sink()
        self.file = sf.SoundFile(self.sink, "w", samplerate=sample_rate, channels=1, format=fmt, subtype=subtype)
        if name == "mp3":
            mode = _ffi.new("int*", _SF_BITRATE_MODE_CONSTANT)
            _snd.sf_command(self.file._file, _SFC_SET_BITRATE_MODE, mode, _ffi.sizeof("int"))
        if fmt == "OGG":
            latency = _ffi.new("double*", 80.0)
            _snd.sf_command(self.file._file, _SFC_SET_OGG_PAGE_LATENCY_MS, latency, _ffi.sizeof("double"))

    def write(self, pcm: np.ndarray) -> bytes:
        self.file.write(np.clip(pcm, -1.0, 1.0).astype(np.float32, copy=False))
        return self.sink.take()

    def finish(self) -> bytes:
        if not self.file.closed:
            self.file.close()
        return self.sink.take()


def encoder(name: str, sample_rate: int) -> Encoder:
    if name == "pcm":
        return PcmEncoder()
    if name == "wav":
        return WavEncoder(sample_rate)
    if name in _SNDFILE:
        return SndfileEncoder(name, sample_rate)
    raise ValueError(f"unknown audio format {name!r}; choose one of {available_formats()}")
