"""The codec as fastcsm uses it: encode reference audio, decode codes to a waveform.

`Codec` wraps a `fastcsm.codec.mimi.Mimi` in CSM's row layout (codes [frames, K], waveforms
[samples] on the CPU). Generated speech is decoded frame by frame inside the engine's step, in
the engine's per-slot streaming state (`Mimi.decode_step`); `Codec.decode` decodes a whole
sequence at once (tests, tools).

The codec of a transformers-format CSM checkpoint is stored under `codec_model.*` in the same
files; `load_codec_for` builds it from there. Original Sesame checkpoints carry no codec: pass
one from a separate Mimi checkpoint (`load_codec("kyutai/mimi")` or a local directory).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from ..audio import validate_waveform
from ..model.checkpoints import CheckpointFiles, iter_codec_tensors, resolve
from .mimi import Mimi, MimiConfig

log = logging.getLogger("fastcsm")

class Codec:
    """Mimi for CSM: `num_codebooks` (CSM's K) of Mimi's codebooks, fp32, on `mimi`'s device."""

    def __init__(self, mimi: Mimi, num_codebooks: int | None = None):
        c = mimi.config
        self.mimi = mimi
        self.num_codebooks = num_codebooks or c.num_codebooks
        if not 1 <= self.num_codebooks <= c.num_codebooks:
            raise ValueError(f"the codec has {c.num_codebooks} codebooks; CSM asks for {self.num_codebooks}")
        self.sample_rate = c.sample_rate
        self.frame_size = c.frame_size  # samples per frame (1920)

    @property
    def device(self) -> torch.device:
        return self.mimi.device

    def encode_waveform(self, audio: torch.Tensor) -> torch.LongTensor:
        """A mono waveform [samples] at `sample_rate` -> codes [frames, K] (CPU int64).

        The waveform is checked as `fastcsm.audio.validate_waveform` checks it (NaN, empty, clipping)."""
        audio = validate_waveform(audio, self.sample_rate, self.sample_rate, what="segment audio")
        return self.mimi.encode_frames(audio.to(self.device, self.mimi.dtype), self.num_codebooks).cpu()

    def playable(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [frames, K] as Mimi takes them [1, K, frames], with ids outside the codebook clamped.

        CSM's heads score 2051 ids per codebook, of which only 0..2047 are Mimi codes; a trained
        model does not emit the others, but an untrained or damaged one can, and they must not
        reach the codebook lookup.
        """
        high = self.mimi.config.codebook_size - 1
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) > high):
            log.warning("%d generated codes lie outside the codebook 0..%d; decoded as the nearest valid code",
                        int(((codes < 0) | (codes > high)).sum()), high)
            codes = codes.clamp(0, high)
        return codes.T[None].to(self.device)

    @torch.inference_mode()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [frames, K] -> waveform [frames * frame_size] (CPU fp32), decoded as one sequence."""
        if codes.shape[0] == 0:
            return torch.zeros(0)
        return self.mimi.decode(self.playable(codes)).reshape(-1).float().cpu()


def load_codec_for(files: CheckpointFiles, device=None) -> Codec | None:
    """The codec stored in a transformers-format CSM checkpoint (`codec_model.*`), else None."""
    from .weights import mimi_from_state_dict

    tensors = dict(iter_codec_tensors(files))
    if not tensors:
        return None
    cfg_path = files.root / "config.json"
    raw = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    mimi = mimi_from_state_dict(tensors, MimiConfig.from_dict(raw.get("codec_config") or {}), device=device)
    return Codec(mimi, files.config.num_codebooks)


def load_codec(source: str | os.PathLike, device=None, num_codebooks: int | None = None) -> Codec:
    """A codec from a Mimi checkpoint: a directory or file (transformers `MimiModel`, Kyutai's
    tokenizer file, or a CSM checkpoint) or a hub repo id such as `kyutai/mimi`."""
    from .weights import KYUTAI_FILENAME, load_mimi

    path = Path(source).expanduser()
    if not path.exists():  # a hub repo: Kyutai's Mimi file alone (its repos also hold a whole LM), else transformers'
        path = resolve(source, weights=([KYUTAI_FILENAME], ["model.safetensors"]))
    return Codec(load_mimi(path, device=device), num_codebooks)


def resolve_codec(codec, files: CheckpointFiles, device=None) -> Codec | None:
    """`Generator.from_pretrained`'s `codec` argument: "auto", None, a `Codec`, or a Mimi source."""
    if codec is None or isinstance(codec, Codec):
        return codec
    if isinstance(codec, str) and codec == "auto":
        return load_codec_for(files, device)
    if isinstance(codec, (str, os.PathLike)):
        return load_codec(codec, device, files.config.num_codebooks)
    raise TypeError(f"codec must be 'auto', None, a Codec, or a Mimi checkpoint path or hub id; got {codec!r}")
