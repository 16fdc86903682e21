"""Reading, checking, resampling and writing audio at the edges of fastcsm.

Everything inside fastcsm works on mono float32 waveforms at 24 kHz in [-1, 1]. This module is
where audio from outside (files, bytes, arrays) is brought to that form, and where every problem a
user can cause is caught with an `AudioError` that says what was wrong:

- unreadable or missing files, unknown formats (soundfile reads WAV, FLAC, OGG/Vorbis/Opus, MP3
  with libsndfile >= 1.1, and the other libsndfile formats);
- empty audio; NaN or Inf samples; non-float in-memory arrays;
- absurd lengths: longer than `max_duration_s` (default `MAX_DURATION_S`, 10 minutes; a voice
  prompt is seconds long, and CSM's whole context is 2048 frames, under 3 minutes);
- implausible sample rates (outside `MIN_SAMPLE_RATE`..`MAX_SAMPLE_RATE`, or above a caller's
  `max_sample_rate`) and channel counts (above `max_channels`), refused from the file's header
  before any decoding; decoding then mixes to mono block by block.

Clipping: audio whose peak exceeds 1.0 (only float data can) is peak-normalised to 1.0 with a
`UserWarning` rather than rejected or hard-clipped: the recording is kept undistorted, only
quieter. Resampling itself can overshoot ±1 slightly on full-scale audio; that is scaled back
silently. Channels are mixed to mono by averaging; resampling uses soxr (high quality).
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
import torch

SAMPLE_RATE = 24_000  # Mimi's rate
MAX_DURATION_S = 600.0
MIN_SAMPLE_RATE = 1_000
MAX_SAMPLE_RATE = 768_000
MAX_CHANNELS = 64
_BLOCK_FRAMES = 1 << 16  # frames decoded at a time
_UNKNOWN_LENGTH = 2**62  # libsndfile reports SF_COUNT_MAX frames for streams of unknown length
WRITE_FORMATS = {".wav": ("WAV", "PCM_16"), ".flac": ("FLAC", "PCM_16")}


class AudioError(ValueError):
    """Audio that fastcsm cannot use, with the reason."""


def _describe(source) -> str:
    return str(source) if isinstance(source, (str, os.PathLike)) else f"<{type(source).__name__}>"


def _check_rate(sr: int, what: str) -> None:
    if not MIN_SAMPLE_RATE <= sr <= MAX_SAMPLE_RATE:
        raise AudioError(f"{what}: sample rate {sr} Hz is outside {MIN_SAMPLE_RATE}..{MAX_SAMPLE_RATE} Hz")


def _check_length(frames: int, sr: int, max_duration_s: float, what: str) -> None:
    if frames == 0:
        raise AudioError(f"{what}: the audio is empty (0 samples)")
    if frames > max_duration_s * sr:
        raise AudioError(
            f"{what}: {frames / sr:.1f} s of audio is longer than the {max_duration_s:g} s allowed "
            "(pass a larger max_duration_s, or trim it)"
        )


def _finite_and_peak(x: np.ndarray, what: str) -> np.ndarray:
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).sum())
        raise AudioError(f"{what}: {bad} samples are NaN or Inf")
    peak = float(np.abs(x).max())
    if peak > 1.0:
        warnings.warn(f"{what}: peak {peak:.3f} exceeds 1.0 (clipping); peak-normalised to 1.0", stacklevel=3)
        x = x / peak
    return x


def _to_mono(x: np.ndarray) -> np.ndarray:
    # x: [T, C] -> [T]
    return x.mean(axis=1, dtype=np.float32) if x.shape[1] > 1 else x[:, 0]


def resample(wav: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """Mono float32 [T] from orig_sr to target_sr (soxr, high quality); a no-op when equal."""
    if orig_sr == target_sr:
        return wav
    out = soxr.resample(wav, orig_sr, target_sr, quality="HQ").astype(np.float32, copy=False)
    peak = float(np.abs(out).max()) if out.size else 0.0
    return out / peak if peak > 1.0 else out


def read_audio(source, target_sr: int = SAMPLE_RATE, max_duration_s: float = MAX_DURATION_S,
               max_sample_rate: int = MAX_SAMPLE_RATE, max_channels: int = MAX_CHANNELS) -> torch.Tensor:
    """Read a file (path, bytes, or binary file object) as mono float32 [T] at `target_sr`.

    Any sample rate and channel count that soundfile reads; see the module docstring for the errors
    raised and for the handling of clipping. The header's sample rate, channels and length are
    checked before anything is decoded, and decoding runs in blocks mixed to mono as they come, so
    memory stays near the mono length (a tiny file cannot claim gigabytes of many-channel audio).
    """
    what = _describe(source)
    if isinstance(source, (bytes, bytearray)):
        source = io.BytesIO(source)
    elif isinstance(source, (str, os.PathLike)) and not Path(source).is_file():
        raise AudioError(f"{what}: no such file")
    _check_rate(target_sr, "target")
    try:
        with sf.SoundFile(source) as f:
            sr, frames, channels = f.samplerate, f.frames, f.channels
            _check_rate(sr, what)
            if sr > max_sample_rate:
                raise AudioError(f"{what}: sample rate {sr} Hz is above the {max_sample_rate} Hz accepted here")
            if not 1 <= channels <= max_channels:
                raise AudioError(f"{what}: {channels} channels; at most {max_channels} are accepted")
            known = 0 <= frames < _UNKNOWN_LENGTH
            if known:
                _check_length(frames, sr, max_duration_s, what)  # before reading any of it
            # A stream whose header gives no length: read no more than allowed, plus one frame.
            budget = frames if known else int(max_duration_s * sr) + 1
            mono = np.empty(budget, dtype=np.float32)
            n = 0
            for block in f.blocks(blocksize=_BLOCK_FRAMES, dtype="float32", always_2d=True, frames=budget):
                mono[n:n + block.shape[0]] = _to_mono(block)
                n += block.shape[0]
    except (RuntimeError, TypeError) as e:  # soundfile errors are RuntimeErrors
        raise AudioError(f"{what}: could not read audio ({e}); fastcsm reads WAV, FLAC and OGG files") from e
    _check_length(n, sr, max_duration_s, what)
    wav = _finite_and_peak(mono[:n], what)
    return torch.from_numpy(np.ascontiguousarray(resample(wav, sr, target_sr), dtype=np.float32))


def validate_waveform(
    wav,
    sample_rate: int = SAMPLE_RATE,
    target_sr: int = SAMPLE_RATE,
    max_duration_s: float = MAX_DURATION_S,
    what: str = "waveform",
) -> torch.Tensor:
    """Check an in-memory waveform and return it as mono float32 [T] at `target_sr` (on the CPU).

    Accepts a torch tensor or numpy array of floats: [T], or [C, T] / [T, C] with up to 8 channels
    (mixed to mono; the shorter axis is the channels), or [1, ..., T]. Errors and clipping are
    handled as for files.
    """
    if isinstance(wav, torch.Tensor):
        if not wav.dtype.is_floating_point:
            raise AudioError(f"{what}: samples must be floats in [-1, 1], got {wav.dtype} (e.g. divide int16 by 32768)")
        x = wav.detach().to("cpu", torch.float32).numpy()
    elif isinstance(wav, np.ndarray):
        if not np.issubdtype(wav.dtype, np.floating):
            raise AudioError(f"{what}: samples must be floats in [-1, 1], got {wav.dtype} (e.g. divide int16 by 32768)")
        x = wav.astype(np.float32, copy=False)
    else:
        raise AudioError(f"{what}: expected a torch tensor or numpy array, got {type(wav).__name__}")
    _check_rate(sample_rate, what)
    _check_rate(target_sr, "target")
    while x.ndim > 1 and x.shape[0] == 1:  # [1, T], [1, 1, T]
        x = x[0]
    if x.ndim == 2 and x.shape[1] == 1:  # [T, 1]
        x = x[:, 0]
    if x.ndim == 2:
        channels, samples = sorted(x.shape)
        if channels > 8 or channels == samples:
            raise AudioError(f"{what}: cannot tell channels from samples in shape {list(x.shape)}; pass mono [samples]")
        x = _to_mono(x if x.shape[1] == channels else x.T)
    elif x.ndim != 1:
        raise AudioError(f"{what}: expected a waveform [samples] or [channels, samples], got shape {list(x.shape)}")
    _check_length(x.shape[0], sample_rate, max_duration_s, what)
    x = _finite_and_peak(x, what)
    return torch.from_numpy(np.ascontiguousarray(resample(x, sample_rate, target_sr), dtype=np.float32))


def write_audio(path, wav, sr: int = SAMPLE_RATE) -> None:
    """Write mono [T] (or [1, T] / [1, 1, T]) float audio as 16-bit WAV or FLAC, chosen by suffix.

    Samples beyond ±1 are clipped: 16-bit PCM cannot hold them.
    """
    suffix = Path(path).suffix.lower()
    if suffix not in WRITE_FORMATS:
        what = suffix or "files without a suffix"
        raise AudioError(f"{path}: cannot write {what}; use one of {sorted(WRITE_FORMATS)}")
    if isinstance(wav, torch.Tensor):
        wav = wav.detach().to("cpu", torch.float32).numpy()
    x = np.asarray(wav, dtype=np.float32)
    if x.ndim > 1 and all(d == 1 for d in x.shape[:-1]):
        x = x.reshape(-1)
    if x.ndim != 1:
        raise AudioError(f"{path}: write_audio takes a mono waveform [samples], got shape {list(x.shape)}")
    if x.size == 0:
        raise AudioError(f"{path}: nothing to write (0 samples)")
    if not np.isfinite(x).all():
        raise AudioError(f"{path}: the waveform holds NaN or Inf samples")
    fmt, subtype = WRITE_FORMATS[suffix]
    sf.write(str(path), np.clip(x, -1.0, 1.0), sr, format=fmt, subtype=subtype)
