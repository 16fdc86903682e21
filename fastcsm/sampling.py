"""Sync-free sampling: temperature, top-k and top-p with caller-supplied noise.

Sampling is split in two so that a request's codes depend only on its own random stream:
`counter_noise` derives Exp(1) noise from the request's seed and frame counter, and `sample` picks
`argmax(logits / T - log(noise))` over the kept tokens, which is an exact draw from the
softmax (the exponential race, equivalently the Gumbel-max trick). No `.item()`, no
data-dependent shapes, no host branches: the same code runs on CPU, on GPU and inside a
captured graph, and per-row parameters are tensors so one batch can mix settings.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy; topk 0 and topp 1.0 switch those filters off."""

    temperature: float = 0.9
    topk: int = 50
    topp: float = 1.0

    def __post_init__(self):
        if not (isinstance(self.temperature, (int, float)) and self.temperature >= 0):
            raise ValueError(f"temperature must be a number >= 0 (0 means greedy), got {self.temperature!r}")
        if isinstance(self.topk, bool) or not isinstance(self.topk, int) or self.topk < 0:
            raise ValueError(f"topk must be an integer >= 0 (0 disables it), got {self.topk!r}")
        if not (isinstance(self.topp, (int, float)) and 0 < self.topp <= 1):
            raise ValueError(f"topp must be in (0, 1] (1 disables it), got {self.topp!r}")


_MASK32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xorshift-multiply rounds) on int64 tensors holding values < 2**32.

    Products stay below 2**59, so int64 arithmetic never overflows on any device."""
    x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK32
    x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK32
    return (x >> 16) ^ x


def counter_noise(seed: torch.Tensor, frame: torch.Tensor, codebook: int, vocab: int) -> torch.Tensor:
    """Exp(1) noise [B, vocab] that is a pure function of (seed, frame, codebook, token).

    seed, frame: [B] int64. A counter-based stream: a row's draws never depend on which other
    rows share the batch or on any generator state, and replaying a seed reproduces them.
    """
    s = _mix32(_mix32(seed & _MASK32) ^ ((seed >> 32) & _MASK32))  # [B]
    key = _mix32((s + frame * 64 + codebook) & _MASK32)  # [B]; codebooks < 64
    token = torch.arange(vocab, device=seed.device)
    bits = _mix32((_mix32(key[:, None] ^ token) + s[:, None]) & _MASK32)  # [B, vocab]
    uniform = ((bits >> 8).float() + 0.5) * (1.0 / (1 << 24))  # (0, 1), 24 bits
    return -torch.log(uniform)


def sample(
    logits: torch.Tensor,
    noise: torch.Tensor,
    temperature: torch.Tensor,
    topk: torch.Tensor,
    topp: torch.Tensor,
    candidates: int | None = None,
) -> torch.Tensor:
    """Pick one token per row.

    logits, noise: [B, V] (noise Exp(1), indexed by token id); temperature, topp: [B] float;
    topk: [B] long. Returns [B] long.

    `candidates` (static) limits the work to the best `candidates` tokens of each row (a partial
    top-k instead of a full sort). The pick is the same as with all V tokens whenever every
    row's top-k is within `candidates`; rows with top-k off (0) need candidates=None.
    """
    logits = logits.float()
    V = logits.shape[-1]
    greedy = logits.argmax(dim=-1)
    scores = logits / temperature.clamp_min(1e-6)[:, None]
    if candidates is not None and candidates < V:
        best, order = scores.topk(candidates, dim=-1)  # [B, n], descending
    else:
        best, order = scores.sort(dim=-1, descending=True)
    rank = torch.arange(best.shape[-1], device=logits.device)
    k = torch.where(topk > 0, topk, V)
    keep = rank[None, :] < k[:, None]
    probs = torch.softmax(best.masked_fill(~keep, float("-inf")), dim=-1)
    # Keep the smallest prefix whose mass reaches topp (the first token is always kept).
    keep &= (probs.cumsum(dim=-1) - probs) < topp[:, None]
    race = (best - noise.gather(-1, order).log()).masked_fill(~keep, float("-inf"))
    picked = order.gather(-1, race.argmax(dim=-1, keepdim=True))[:, 0]
    return torch.where(temperature > 0, picked, greedy)
