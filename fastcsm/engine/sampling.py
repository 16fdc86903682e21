"""Sync-free sampling: temperature, top-k and top-p with caller-supplied noise.

Sampling is split in two so that a request's codes depend only on its own random stream:
`counter_noise` derives Exp(1) noise from the request's seed and frame counter, and `sample` picks
`argmax(logits / T - log(noise))` over the kept tokens, which is an exact draw from the
softmax (the exponential race, equivalently the Gumbel-max trick). No `.item()`, no
data-dependent shapes, no host branches: the same code runs on CPU, on GPU and inside a
captured graph, and per-row parameters are tensors so one batch can mix settings.

A frame samples 32 codebooks with the same rows: `FrameNoise` derives the frame's keys once
(and, for a small batch, the noise of every codebook and token in one pass) and `row_params`
the rows' settings, so each codebook's `pick` is a handful of small ops, not a hundred. Which
filters run at all is static (`SamplingPath`): the engine knows on the host which settings its
running rows use, and a path leaves out the ops no row needs (the nucleus when every topp is 1,
the greedy argmax when every row samples, the whole draw when every row is greedy), with the
same picks as the path that runs them all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..bounds import TEMPERATURE, TOPK, TOPP


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy; topk 0 and topp 1.0 switch those filters off."""

    temperature: float = TEMPERATURE.default
    topk: int = TOPK.default
    topp: float = TOPP.default

    def __post_init__(self):
        TEMPERATURE.check(self.temperature)
        TOPK.check(self.topk)
        TOPP.check(self.topp)


_MASK32 = 0xFFFFFFFF
# Precompute a whole frame's noise (every codebook, every token) up to this many numbers: a few
# dozen ops a frame instead of a few dozen per codebook, which is what a small batch on a CPU pays
# for. Above it (e.g. 256 rows x 32 x 2051 would be 134 MB per int64 temporary) each codebook
# hashes only the tokens `sample` ranks. Both give the same bits.
WHOLE_FRAME_NOISE = 1 << 20


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xorshift-multiply rounds) on int64 tensors holding values < 2**32.

    Products stay below 2**59, so int64 arithmetic never overflows on any device. (In place on
    its own temporaries: x itself is never written.)"""
    x = (x >> 16).bitwise_xor_(x).mul_(0x45D9F3B).bitwise_and_(_MASK32)
    x = (x >> 16).bitwise_xor_(x).mul_(0x45D9F3B).bitwise_and_(_MASK32)
    return (x >> 16).bitwise_xor_(x)


def row_key(seed: torch.Tensor) -> torch.Tensor:
    """seed [B] int64 -> the row's 32-bit key [B]: a request's, made once (the engine keeps it per slot)."""
    return _mix32(_mix32(seed & _MASK32) ^ ((seed >> 32) & _MASK32))


def _codebook_keys(row: torch.Tensor, frame: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """Row keys, frames [B] and codebook ids [K] (< 64) -> per-(row, codebook) keys [B, K]."""
    return _mix32((row[:, None] + frame[:, None] * 64 + codebooks).bitwise_and_(_MASK32))


def _uniform(key: torch.Tensor, token: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
    """The (0, 1) uniform (24 bits) of each token id under its (row, codebook) key; broadcasts."""
    bits = _mix32((_mix32(key ^ token) + row).bitwise_and_(_MASK32))
    return (bits >> 8).float().add_(0.5).mul_(1.0 / (1 << 24))


def counter_noise(seed: torch.Tensor, frame: torch.Tensor, codebook: int, vocab: int) -> torch.Tensor:
    """Exp(1) noise [B, vocab] that is a pure function of (seed, frame, codebook, token).

    seed, frame: [B] int64. A counter-based stream: a row's draws never depend on which other
    rows share the batch or on any generator state, and replaying a seed reproduces them.
    `FrameNoise` gives the same numbers for all codebooks of a frame at once.
    """
    row = row_key(seed)
    key = _codebook_keys(row, frame, torch.tensor([codebook], device=seed.device))  # [B, 1]
    return -torch.log(_uniform(key, torch.arange(vocab, device=seed.device), row[:, None]))


class FrameNoise:
    """`counter_noise` for every codebook of one frame, as the log of the noise (what the race
    subtracts), derived once: `log_at(codebook, tokens)` is `counter_noise(...).gather(-1, tokens).log()`.
    key: the rows' `row_key(seed)` [B]; frame: [B].

    `whole` (static; default: when B * codebooks * vocab <= WHOLE_FRAME_NOISE) hashes every token of
    every codebook up front; otherwise each call hashes just the tokens it is given.
    """

    def __init__(self, key: torch.Tensor, frame: torch.Tensor, codebooks: int, vocab: int,
                 whole: bool | None = None):
        device = key.device
        self.row = key[:, None]  # [B, 1]
        self.keys = _codebook_keys(key, frame, torch.arange(codebooks, device=device))  # [B, K]
        if whole is None:
            whole = key.shape[0] * codebooks * vocab <= WHOLE_FRAME_NOISE
        self.table = None
        if whole:  # [B, K, vocab]
            token = torch.arange(vocab, device=device)
            self.table = _log_noise(_uniform(self.keys[:, :, None], token, self.row[:, :, None]))

    def log_at(self, codebook: int, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, n] ids -> log of their Exp(1) noise [B, n] in `codebook`."""
        if self.table is not None:
            return self.table[:, codebook].gather(-1, tokens)
        return _log_noise(_uniform(self.keys[:, codebook, None], tokens, self.row))


def _log_noise(uniform: torch.Tensor) -> torch.Tensor:
    """log(-log(u)): the log of the Exp(1) noise, from u in place."""
    return uniform.log_().neg_().log_()


class SamplingPath(NamedTuple):
    """The static part of sampling a step: which ops it runs, one compiled / captured step variant
    each. `of` picks the leanest path for a set of rows, and it picks what the path with every
    filter and the same `candidates` picks for those rows, bit for bit (tests/test_sampling.py)."""

    candidates: int | None = None  # rank only the best n tokens (a partial top-k); None: sort them all
    nucleus: bool = True  # some row has topp < 1
    greedy: bool = True  # some row is greedy (temperature 0): its argmax is taken
    sampled: bool = True  # some row samples (temperature > 0); False: the argmax is all there is

    @staticmethod
    def of(params, candidates: int | None = None) -> SamplingPath:
        """The path for rows with these `SamplingParams`: `candidates` when every top-k fits in it."""
        params = list(params)
        sampled = [p for p in params if p.temperature > 0]
        if not sampled:
            return SamplingPath(None, False, True, False)
        fits = candidates and all(0 < p.topk <= candidates for p in sampled)
        return SamplingPath(candidates if fits else None, any(p.topp < 1 for p in sampled),
                            len(sampled) < len(params), True)

    @staticmethod
    def every(candidates: int | None = None) -> list[SamplingPath]:
        """Every path `of` can give for `candidates`."""
        ranks = dict.fromkeys([candidates or None, None])
        return [SamplingPath(None, False, True, False)] + [SamplingPath(n, nucleus, greedy, True) for n in ranks
                                                             for nucleus in (False, True) for greedy in (False, True)]


EVERY_FILTER = SamplingPath()  # the full sort, the nucleus and the argmax: right for any rows


class RowParams(NamedTuple):
    """The per-row sampling settings in the form `pick` uses, made once for all codebooks of a frame."""

    divisor: torch.Tensor  # [B, 1] float, temperature clamped away from 0
    sampled: torch.Tensor  # [B] bool, temperature > 0 (else greedy)
    keep: torch.Tensor  # [B, n] bool, rank < top-k (n: `candidates`, or V for the full sort)
    drop: torch.Tensor | None  # [B, n] bool, ~keep (with the nucleus)
    topp: torch.Tensor | None  # [B, 1] float, topp where < 1, else inf: the filter is off (with the nucleus)


def row_params(temperature: torch.Tensor, topk: torch.Tensor, topp: torch.Tensor, vocab: int,
               path: SamplingPath = EVERY_FILTER) -> RowParams:
    """temperature, topp: [B] float; topk: [B] long; `path.candidates` as in `sample`."""
    n = path.candidates if path.candidates is not None and path.candidates < vocab else vocab
    rank = torch.arange(n, device=temperature.device)
    k = torch.where(topk > 0, topk, vocab)
    keep = rank < k[:, None]
    drop = topp_off = None
    if path.nucleus:
        # topp = 1 is off by definition, not by arithmetic: a prefix mass that rounds up to 1
        # would otherwise drop a tail token, and only with the nucleus on.
        drop, topp_off = ~keep, torch.where(topp < 1, topp, float("inf"))[:, None]
    return RowParams(temperature.clamp_min(1e-6)[:, None], temperature > 0, keep, drop, topp_off)


def pick(logits: torch.Tensor, log_noise, rows: RowParams | None, path: SamplingPath = EVERY_FILTER) -> torch.Tensor:
    """`sample` with its per-row settings made beforehand (`row_params`, for the same `path`) and the
    noise as a function from token ids [B, n] to the log of their Exp(1) noise (e.g.
    `FrameNoise.log_at`). A path without `sampled` needs neither (the argmax of every row)."""
    logits = logits if logits.dtype == torch.float32 else logits.float()
    greedy = logits.argmax(dim=-1) if path.greedy else None
    if not path.sampled:
        return greedy
    scores = logits / rows.divisor
    n = rows.keep.shape[-1]
    if n < logits.shape[-1]:
        best, order = scores.topk(n, dim=-1)  # [B, n], descending
    else:
        best, order = scores.sort(dim=-1, descending=True)
    keep = rows.keep
    if path.nucleus:
        probs = torch.softmax(best.masked_fill(rows.drop, float("-inf")), dim=-1)
        # Keep the smallest prefix whose mass reaches topp (the first token is always kept).
        keep = keep & ((probs.cumsum(dim=-1) - probs) < rows.topp)
    race = torch.where(keep, best - log_noise(order), float("-inf"))
    picked = order.gather(-1, race.argmax(dim=-1, keepdim=True))[:, 0]
    return torch.where(rows.sampled, picked, greedy) if path.greedy else picked


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
    A frame's codebooks share their settings and noise keys: `row_params`, `FrameNoise` and `pick`
    make those once (the same picks). topp = 1 (and above) switches the nucleus off exactly.
    """
    path = SamplingPath(candidates)
    rows = row_params(temperature, topk, topp, logits.shape[-1], path)
    return pick(logits, lambda order: noise.gather(-1, order).log(), rows, path)
