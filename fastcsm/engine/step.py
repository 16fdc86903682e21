"""The frame step and prefill as plain functions over preallocated per-slot tensors.

One frame (docs/design.md):
  h --codebook0_head--> c0 ; decoder([h, emb0(c0)]) --audio_head[0]--> c1 ;
  decoder(emb1(c1)) --audio_head[1]--> c2 ; ... ; c31 ; then the 32 codes, embedded as one
  row, go through the backbone at the slot's next position to give the next h.

`engine_step` does all of it for rows 0..B-1 with static shapes, in place, without host syncs
(and, with a codec, decodes the new frame to 80 ms of PCM), so the same function runs eagerly,
under `torch.compile(fullgraph=True)` or captured as a CUDA graph (`runner.py`). It knows
nothing of requests: the engine fills and reads the rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..codec.mimi import Mimi, MimiDecoderState
from ..model.network import CSM, DecoderTables, KVCache
from ..nested import first_rows
from .sampling import EVERY_FILTER, FrameNoise, SamplingPath, pick, row_params


@dataclass
class SlotState:
    """Per-slot tensors, one row per slot. `rows(n)` gives views of the first n rows."""

    h: torch.Tensor  # [S, D] backbone hidden state the next frame is sampled from
    pos: torch.Tensor  # [S] long, position the next frame is written at
    frame: torch.Tensor  # [S] long, frames sampled so far (the noise counter)
    key: torch.Tensor  # [S] long, the request's noise key: `sampling.row_key(seed)`
    active: torch.Tensor  # [S] bool
    temperature: torch.Tensor  # [S] float
    topk: torch.Tensor  # [S] long
    topp: torch.Tensor  # [S] float
    codes: torch.Tensor  # [S, K] long, the newest frame

    @staticmethod
    def allocate(slots: int, dim: int, num_codebooks: int, device, dtype) -> SlotState:
        long = dict(device=device, dtype=torch.long)
        return SlotState(
            h=torch.zeros(slots, dim, device=device, dtype=dtype),
            pos=torch.zeros(slots, **long),
            frame=torch.zeros(slots, **long),
            key=torch.zeros(slots, **long),
            active=torch.zeros(slots, device=device, dtype=torch.bool),
            temperature=torch.ones(slots, device=device),
            topk=torch.zeros(slots, **long),
            topp=torch.ones(slots, device=device),
            codes=torch.zeros(slots, num_codebooks, **long),
        )

    def rows(self, n: int) -> SlotState:
        return first_rows(self, n)


@dataclass
class Buffers:
    """Everything a step reads and writes, allocated once by the engine, one row per slot."""

    model: CSM
    mimi: Mimi | None  # decodes each new frame inside the step when given
    state: SlotState
    cache: KVCache  # the backbone's
    decoder_cache: KVCache  # the depth decoder's (restarts at 0 every frame)
    decoder_tables: DecoderTables  # its RoPE tables, cache index and masks: the same every frame
    codec_state: MimiDecoderState | None  # one streaming decoder row per slot
    pcm: torch.Tensor | None  # [S, frame_size] fp32, the newest frame's audio

    @staticmethod
    def allocate(model: CSM, slots: int, seq_len: int, mimi: Mimi | None) -> Buffers:
        cfg = model.cfg
        return Buffers(
            model=model, mimi=mimi,
            state=SlotState.allocate(slots, cfg.backbone.dim, cfg.num_codebooks, model.device, model.dtype),
            # One position more than a stream may reach: where inactive rows write (`frame_step`).
            cache=model.backbone_cache(slots, seq_len + 1), decoder_cache=model.decoder_cache(slots),
            decoder_tables=model.decoder_tables(slots),
            codec_state=mimi.init_decoder_state(slots, 1) if mimi is not None else None,
            pcm=torch.zeros(slots, mimi.config.frame_size, device=model.device) if mimi is not None else None,
        )

    def step_args(self, batch: int, path: SamplingPath, window: int | None = None, span: bool = False) -> tuple:
        """`engine_step`'s arguments for rows 0..batch-1; `window`: the backbone attends over
        positions 0..window-1 only (every active row sits below it; see `KVCache.within`, and
        for `span` too)."""
        return (self.model, self.mimi, self.state.rows(batch), self.cache.rows(0, batch).within(window, span),
                self.decoder_cache.rows(0, batch), first_rows(self.decoder_tables, batch),
                first_rows(self.codec_state, batch), first_rows(self.pcm, batch), path)


def sample_frame(model: CSM, state: SlotState, decoder_cache: KVCache, tables: DecoderTables,
                 path: SamplingPath = EVERY_FILTER) -> torch.Tensor:
    """Sample one frame [B, K] from state.h for every row (the decoder cache restarts at 0).
    tables: `model.decoder_tables(B)`; path: which sampling ops run (`sampling.SamplingPath`)."""
    K, C = model.cfg.num_codebooks, model.cfg.codebook_size
    h = state.h
    # What the 32 picks share is made once: the rows' settings and the frame's noise keys.
    noise = rows = None
    if path.sampled:
        noise = FrameNoise(state.key, state.frame, K, C)
        rows = row_params(state.temperature, state.topk, state.topp, C, path)

    def choose(logits, codebook):
        # Only real Mimi codes are drawn: ids from codebook_size up (padding) are never audio.
        return pick(logits[:, :C], lambda order: noise.log_at(codebook, order), rows, path)

    c = choose(model.codebook0_logits(h), 0)
    codes = [c]
    x = torch.stack([h, model.embed_code(c, 0)], dim=1)  # [B, 2, D]
    out = model.run_decoder(x, tables.first, decoder_cache)[:, -1]  # [B, d]
    for i in range(1, K):
        c = choose(model.codebook_logits(out, i), i)
        codes.append(c)
        if i < K - 1:  # pass i > 1 runs one row at position i
            out = model.run_decoder(model.embed_code(c, i)[:, None], tables.rows.at(i + 1), decoder_cache)[:, 0]
    return torch.stack(codes, dim=1)


def frame_step(model: CSM, state: SlotState, cache: KVCache, decoder_cache: KVCache,
               decoder_tables: DecoderTables, path: SamplingPath = EVERY_FILTER) -> None:
    """Advance every active row by one frame, in place. Inactive rows compute and keep nothing."""
    codes = sample_frame(model, state, decoder_cache, decoder_tables, path)
    active = state.active
    # Inactive rows (free, or a prompt being prefilled) write at the cache's last position, one
    # past any a request reaches (`Buffers.allocate`), which no active row attends to.
    pos = torch.where(active, state.pos, cache.length - 1)
    h = model.run_backbone(model.embed_frame(codes), pos[:, None], cache)[:, 0]
    state.codes.copy_(codes)
    state.h.copy_(torch.where(active[:, None], h.to(state.h.dtype), state.h))
    advance = active.long()
    state.pos.add_(advance)
    state.frame.add_(advance)


def engine_step(model: CSM, mimi: Mimi | None, state: SlotState, cache: KVCache, decoder_cache: KVCache,
                decoder_tables: DecoderTables, codec_state: MimiDecoderState | None, pcm: torch.Tensor | None,
                path: SamplingPath) -> None:
    """One frame for rows 0..B-1 and, with a codec, its 80 ms of audio into pcm [B, frame_size]."""
    frame_step(model, state, cache, decoder_cache, decoder_tables, path)
    if mimi is not None:
        pcm.copy_(mimi.decode_step(state.codes[:, :, None], codec_state)[:, 0].to(pcm.dtype))


def prefill(model: CSM, tokens: torch.Tensor, mask: torch.Tensor, start: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Run the backbone over prompt rows.

    tokens, mask: [B, S, K+1]; start: [B] first position of these rows; cache: B rows.
    Returns the final-normed hidden state of each row's last prompt row [B, D].
    """
    S = tokens.shape[1]
    pos = start[:, None] + torch.arange(S, device=tokens.device)
    return model.run_backbone(model.embed_rows(tokens, mask), pos, cache)[:, -1]
