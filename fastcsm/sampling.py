"""Sync-free sampling: temperature, top-k and top-p with caller-supplied noise.

Sampling is split in two so that a request's codes depend only on its own random stream:
`exponential_noise` draws Exp(1) noise from a request's `torch.Generator`, and `sample` picks
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


def exponential_noise(shape, generator: torch.Generator | None, device=None) -> torch.Tensor:
    """Exp(1) noise [*shape] in fp32 from `generator` (on the generator's device)."""
    dev = generator.device if generator is not None else device
    return torch.empty(shape, device=dev, dtype=torch.float32).exponential_(generator=generator)


def sample(
    logits: torch.Tensor,
    noise: torch.Tensor,
    temperature: torch.Tensor,
    topk: torch.Tensor,
    topp: torch.Tensor,
) -> torch.Tensor:
    """Pick one token per row.

    logits: [B, V]; noise: [B, V] Exp(1); temperature, topp: [B] float; topk: [B] long.
    Returns [B] long.
    """
    logits = logits.float()
    V = logits.shape[-1]
    greedy = logits.argmax(dim=-1)
    scores = logits / temperature.clamp_min(1e-6)[:, None]
    sorted_scores, order = scores.sort(dim=-1, descending=True)
    rank = torch.arange(V, device=logits.device)
    k = torch.where(topk > 0, topk, V)
    keep = rank[None, :] < k[:, None]
    probs = torch.softmax(sorted_scores.masked_fill(~keep, float("-inf")), dim=-1)
    # Keep the smallest prefix whose mass reaches topp (the first token is always kept).
    keep &= (probs.cumsum(dim=-1) - probs) < topp[:, None]
    keep_mask = torch.zeros_like(keep).scatter(-1, order, keep)
    race = scores.masked_fill(~keep_mask, float("-inf")) - noise.log()
    picked = race.argmax(dim=-1)
    return torch.where(temperature > 0, picked, greedy)
