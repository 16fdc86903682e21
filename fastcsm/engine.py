"""The frame step: from the backbone's last hidden state to one sampled Mimi frame, and back.

Everything here works on a batch of cache rows with static shapes and without host syncs, so
the same functions serve one request or many slots, eagerly or compiled.

One frame (DESIGN.md):
  h --codebook0_head--> c0 ; decoder([h, emb0(c0)]) --audio_head[0]--> c1 ;
  decoder(emb1(c1)) --audio_head[1]--> c2 ; ... ; c31.
  Then the 32 codes are embedded as one row and fed to the backbone at the slot's next position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .model import CSM, KVCache
from .sampling import sample


@dataclass
class SamplingTensors:
    """Per-row sampling parameters as tensors, so rows can differ without recompiling."""

    temperature: torch.Tensor  # [B] float
    topk: torch.Tensor  # [B] long
    topp: torch.Tensor  # [B] float

    @staticmethod
    def fill(batch: int, temperature: float, topk: int, topp: float, device) -> SamplingTensors:
        return SamplingTensors(
            torch.full((batch,), float(temperature), device=device),
            torch.full((batch,), int(topk), device=device, dtype=torch.long),
            torch.full((batch,), float(topp), device=device),
        )


def prefill(model: CSM, tokens: torch.Tensor, mask: torch.Tensor, start: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Run the backbone over prompt rows.

    tokens, mask: [B, S, K+1]; start: [B] first position of these rows; cache: B rows.
    Returns the final-normed hidden state of each row's last prompt row [B, D].
    """
    S = tokens.shape[1]
    pos = start[:, None] + torch.arange(S, device=tokens.device)
    h = model.run_backbone(model.embed_rows(tokens, mask), pos, cache)
    return h[:, -1]


def sample_frame(
    model: CSM, h: torch.Tensor, decoder_cache: KVCache, params: SamplingTensors, noise: torch.Tensor
) -> torch.Tensor:
    """h: [B, D] backbone hidden; noise: [B, K, V] Exp(1). Returns codes [B, K]."""
    K = model.cfg.num_codebooks
    B = h.shape[0]
    c = sample(model.codebook0_logits(h), noise[:, 0], params.temperature, params.topk, params.topp)
    codes = [c]
    x = torch.stack([h, model.embed_code(c, 0)], dim=1)  # [B, 2, D]
    pos = torch.arange(2, device=h.device).expand(B, 2)
    for i in range(1, K):
        out = model.run_decoder(x, pos, decoder_cache)[:, -1]  # [B, d]
        c = sample(model.codebook_logits(out, i), noise[:, i], params.temperature, params.topk, params.topp)
        codes.append(c)
        x = model.embed_code(c, i)[:, None]  # [B, 1, D]
        pos = pos[:, -1:] + 1
    return torch.stack(codes, dim=1)


def feed_frame(model: CSM, codes: torch.Tensor, pos: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """codes: [B, K] at positions pos: [B] -> the backbone's hidden state for the next frame [B, D]."""
    return model.run_backbone(model.embed_frame(codes), pos[:, None], cache)[:, 0]
