"""Optional audio watermark, the one Sesame's reference generator applies (off by default).

Sesame's reference marks every waveform it generates with SilentCipher, an imperceptible audio
watermark, under the public key `CSM_1B_GH_WATERMARK`, and asks users to keep it. fastcsm does
not watermark unless asked: `Generator.from_pretrained(..., watermark=True)`, `fastcsm speak
--watermark`, `fastcsm serve --watermark`. It needs the `silentcipher` package (Sesame's build,
`pip install "fastcsm[watermark]"`), whose model (`sony/silentcipher` on the hub) is downloaded on
first use like the CSM weights.

The watermark is computed over a whole utterance, as the reference does: the waveform is
resampled to SilentCipher's 44.1 kHz, marked at a message SDR of 36 dB, and resampled back.
fastcsm marks each generated piece of a line, so streamed audio comes out a piece at a time.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..audio import resample

# Sesame's public key (csm `watermarking.py`). It is not secret: anyone can check for it. An
# application that wants its own, private mark passes its own key.
CSM_1B_GH_WATERMARK = (212, 211, 146, 56, 201)
WATERMARK_SAMPLE_RATE = 44_100  # the SilentCipher model the reference loads ("44.1k")
MESSAGE_SDR_DB = 36
INSTALL_HINT = 'pip install "fastcsm[watermark]"'


class WatermarkUnavailable(RuntimeError):
    """The watermark was asked for, but silentcipher or its model could not be loaded."""


def load_silentcipher(device: str | torch.device = "cpu"):
    """SilentCipher's 44.1 kHz model, as Sesame's reference loads it; a clear error when missing."""
    try:
        import silentcipher
    except ImportError as e:
        raise WatermarkUnavailable(
            f"watermarking needs the silentcipher package, which is not installed ({e}): {INSTALL_HINT}"
        ) from e
    try:
        return silentcipher.get_model(model_type="44.1k", device=str(device))
    except Exception as e:  # no network, no hub cache, a broken download...
        raise WatermarkUnavailable(
            f"could not load silentcipher's watermark model (sony/silentcipher on the Hugging Face hub, fetched "
            f"on first use): {type(e).__name__}: {e}. Check the network or the hub cache; {INSTALL_HINT} "
            "installs the package"
        ) from e


def _check_key(key) -> tuple[int, ...]:
    if (isinstance(key, (str, bytes)) or not isinstance(key, Sequence) or not key
            or not all(isinstance(b, int) and not isinstance(b, bool) and 0 <= b < 256 for b in key)):
        raise ValueError(f"a watermark key is a sequence of byte values 0..255, e.g. {list(CSM_1B_GH_WATERMARK)}; "
                         f"got {key!r}")
    return tuple(key)


class Watermarker:
    """Marks waveforms with `key` through a SilentCipher model (anything with its `encode_wav`)."""

    def __init__(self, model, key: Sequence[int] = CSM_1B_GH_WATERMARK):
        self.model = model
        self.key = _check_key(key)

    @classmethod
    def load(cls, device: str | torch.device = "cpu", key: Sequence[int] = CSM_1B_GH_WATERMARK) -> Watermarker:
        key = _check_key(key)  # a bad key fails before the download
        return cls(load_silentcipher(device), key)

    @torch.inference_mode()
    def apply(self, audio: torch.Tensor, sample_rate: int) -> torch.Tensor:
        """audio [samples] (fp32) at `sample_rate` -> the same length, watermarked, on the CPU."""
        if audio.numel() == 0:
            return audio
        wav = audio.detach().float().cpu().numpy()
        wide = resample(wav, sample_rate, WATERMARK_SAMPLE_RATE)
        # numpy in: both Sesame's silentcipher (which also takes tensors) and PyPI's accept it.
        encoded, _ = self.model.encode_wav(wide, WATERMARK_SAMPLE_RATE, list(self.key), calc_sdr=False,
                                           message_sdr=MESSAGE_SDR_DB)
        if isinstance(encoded, torch.Tensor):
            encoded = encoded.detach().float().cpu().numpy()
        out = resample(np.asarray(encoded, dtype=np.float32).reshape(-1), WATERMARK_SAMPLE_RATE, sample_rate)
        n = wav.shape[0]  # resampling twice may leave a sample more or less
        out = out[:n] if out.shape[0] >= n else np.pad(out, (0, n - out.shape[0]))
        return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32))


def resolve_watermark(watermark, device: str | torch.device = "cpu") -> Watermarker | None:
    """False/None: no watermark; True: SilentCipher with Sesame's key; a `Watermarker` as is."""
    if watermark is None or watermark is False:
        return None
    if watermark is True:
        return Watermarker.load(device)
    if isinstance(watermark, Watermarker):
        return watermark
    raise TypeError(f"watermark must be True, False or a Watermarker, got {type(watermark).__name__}")

