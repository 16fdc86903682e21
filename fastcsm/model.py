"""The CSM network: embeddings, Llama-style backbone, depth decoder and heads, in plain PyTorch.

The network holds weights only. Generation state (KV caches, positions, random streams) lives
outside it in `KVCache` objects that the caller allocates once and passes in, so the same
module serves one request or a batch of slots, eagerly or inside a captured graph.

Module names follow the original Sesame checkpoint (torchtune naming) so that format loads
as-is; attention uses the rotate-half RoPE convention of the Hugging Face port (the original
checkpoint's interleaved-pair q/k rows are permuted once at load time, see `checkpoints.py`).

Shapes: B batch (= cache rows), S new rows, T cache length, D width, H heads, G kv heads,
K codebooks, V audio vocabulary per codebook.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import CsmConfig, TransformerConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One call for what Llama's norm spells out: normalize in fp32, cast back, then scale.
        return F.rms_norm(x, self.scale.shape, self.scale, self.eps)


class KVCache:
    """Preallocated keys and values for every layer of one stack: k, v [L, B, G, T, hd].

    Row b of the batch is cache row b. `rows(start, stop)` is a view for a sub-range of rows
    (prefill of one new request into its slot writes through it). Stale entries beyond a
    row's current position are never read: attention masks keys by position.
    """

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        self.k, self.v = k, v

    @staticmethod
    def allocate(cfg: TransformerConfig, batch: int, length: int, device=None, dtype=None) -> KVCache:
        shape = (cfg.num_layers, batch, cfg.num_kv_heads, length, cfg.head_dim)
        return KVCache(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def length(self) -> int:
        return self.k.shape[3]

    def rows(self, start: int, stop: int) -> KVCache:
        return KVCache(self.k[:, start:stop], self.v[:, start:stop])


def rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE, x * cos + cat(-x2, x1) * sin for x = cat(x1, x2): swapping the halves is a
    roll and their signs ride in sin_signed = cat(-sin_half, sin_half) (the same numbers, fewer ops)."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin_signed


def linears(x: torch.Tensor, *modules: nn.Module) -> list[torch.Tensor]:
    """[m(x) for m in modules]; 8-bit linears (quant.QuantLinear) may run them as one matmul."""
    if isinstance(modules[0], nn.Linear):
        return [m(x) for m in modules]
    return type(modules[0]).fused(x, list(modules))


class Attention(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        hd = cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.num_heads * hd, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.num_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.num_kv_heads * hd, bias=False)
        self.output_proj = nn.Linear(cfg.num_heads * hd, cfg.dim, bias=False)

    def forward(self, x, cos, sin, index, mask, k_cache, v_cache):
        # x: [B, S, D]; cos/sin: [B, 1, S, hd] (sin signed, see `rope`); index: [B, G, S, hd] the
        # cache positions of the new rows; mask: [B, 1, R*S, T] (see Transformer); k/v_cache: [B, G, T, hd]
        B, S, _ = x.shape
        hd = self.cfg.head_dim
        q, k, v = (t.view(B, S, -1, hd).transpose(1, 2) for t in linears(x, self.q_proj, self.k_proj, self.v_proj))
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        # Write the new keys/values at each row's own positions: [B, G, S, hd] -> cache[b, :, pos[b, s]].
        # (The casts are skipped, not called, where the dtypes agree: ~600 no-op calls a frame.)
        cast = k_cache.dtype != q.dtype
        k_cache.scatter_(2, index, k.to(k_cache.dtype) if cast else k)
        v_cache.scatter_(2, index, v.to(v_cache.dtype) if cast else v)
        # Grouped-query attention without copying keys: the R query heads that share a kv head
        # become R times as many query rows of that head (head h = g * R + r uses kv head g).
        G = k_cache.shape[1]
        R = q.shape[1] // G
        q = q.reshape(B, G, R * S, hd)
        keys, values = (k_cache.to(q.dtype), v_cache.to(q.dtype)) if cast else (k_cache, v_cache)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        out = out.reshape(B, G * R, S, hd)  # (a view on the CPU; CUDA kernels may lay out S>1 rows otherwise)
        return self.output_proj(out.transpose(1, 2).reshape(B, S, -1))


class MLP(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)  # gate
        self.w2 = nn.Linear(hidden, dim, bias=False)  # down
        self.w3 = nn.Linear(dim, hidden, bias=False)  # up

    def forward(self, x):
        gate, up = linears(x, self.w1, self.w3)
        return self.w2(F.silu(gate) * up)


class Layer(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.sa_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg.dim, cfg.intermediate_size)

    def forward(self, x, cos, sin, index, mask, k_cache, v_cache):
        x = x + self.attn(self.sa_norm(x), cos, sin, index, mask, k_cache, v_cache)
        return x + self.mlp(self.mlp_norm(x))


class Tables(NamedTuple):
    """What every layer of a stack shares for one set of positions (`Transformer.tables`)."""

    cos: torch.Tensor  # [B, 1, S, hd]
    sin: torch.Tensor  # [B, 1, S, hd], signed (see `rope`)
    index: torch.Tensor  # [B, G, S, hd], the cache positions of the new rows
    mask: torch.Tensor  # [B, 1, R*S, T] additive (0 or -inf); [B, 1, S, T] where that broadcasts the same

    def at(self, p: int) -> Tables:
        """The tables of the single position p of tables made for positions 0..S-1 (a one-row pass)."""
        return Tables(*(t[:, :, p:p + 1] for t in self))


class DecoderTables(NamedTuple):
    """The depth decoder's tables for one frame, the same every frame (`CSM.decoder_tables`)."""

    first: Tables  # the first pass: positions 0 and 1 (h and codebook 0)
    rows: Tables  # positions 0..K-1 one row at a time: pass i > 1 takes `rows.at(i)`


class Transformer(nn.Module):
    """A Llama-style stack with external KV cache; returns final-normed hidden states."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.register_buffer("inv_freq", cfg.inv_freq(), persistent=False)

    def tables(self, pos: torch.Tensor, length: int, dtype: torch.dtype, one_row: bool = False) -> Tables:
        """RoPE tables, cache write index and mask for positions pos [B, S] over a cache of `length`.
        `one_row`: the rows will be used one at a time (`Tables.at`), so the mask is left per row."""
        cfg = self.cfg
        B, S = pos.shape
        freqs = pos[:, None, :, None].float() * self.inv_freq.float()  # [B, 1, S, hd/2]
        cos, sin = freqs.cos().to(dtype), freqs.sin().to(dtype)
        cos, sin = torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)  # [B, 1, S, hd]
        index = pos[:, None, :, None].expand(B, cfg.num_kv_heads, S, cfg.head_dim)
        # Causal by position: a query at position p sees cache entries 0..p of its own row; the
        # R query heads of a kv head are R blocks of S query rows (see Attention), which a
        # one-row mask covers by broadcasting.
        seen = torch.arange(length, device=pos.device) <= pos[:, None, :, None]  # [B, 1, S, T]
        # Additive, as attention would turn a boolean mask into in every layer.
        mask = torch.where(seen, 0.0, float("-inf")).to(dtype)
        R = cfg.num_heads // cfg.num_kv_heads
        if S > 1 and R > 1 and not one_row:
            mask = mask.expand(B, R, S, length).reshape(B, 1, R * S, length)
        return Tables(cos, sin, index, mask)

    def forward(self, x: torch.Tensor, pos: torch.Tensor | Tables, cache: KVCache) -> torch.Tensor:
        # x: [B, S, D]; pos: [B, S] absolute positions (each row may be at its own position), or
        # the `tables` made for them. Everything the layers share is made once per stack.
        t = pos if isinstance(pos, Tables) else self.tables(pos, cache.length, x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, t.cos, t.sin, t.index, t.mask, cache.k[i], cache.v[i])
        return self.norm(x)


class CSM(nn.Module):
    """Backbone + depth decoder over Mimi codes. See docs/design.md for the frame step."""

    def __init__(self, cfg: CsmConfig):
        super().__init__()
        self.cfg = cfg
        b, d, K, V = cfg.backbone, cfg.decoder, cfg.num_codebooks, cfg.audio_vocab_size
        self.text_embeddings = nn.Embedding(cfg.text_vocab_size, b.dim)
        self.audio_embeddings = nn.Embedding(K * V, b.dim)  # row = code + codebook * V
        self.backbone = Transformer(b)
        self.decoder = Transformer(d)
        self.projection = nn.Linear(b.dim, d.dim, bias=False)
        self.codebook0_head = nn.Linear(b.dim, V, bias=False)
        self.audio_head = nn.Parameter(torch.empty(K - 1, d.dim, V))  # codebook i uses audio_head[i-1]
        self.register_buffer("codebook_offsets", torch.arange(K) * V, persistent=False)

    def init_buffers(self, device) -> CSM:
        """(Re)compute the buffers derived from the config, on `device`: a model built on the meta
        device and filled from a checkpoint has none (they are not stored)."""
        for stack in (self.backbone, self.decoder):
            stack.inv_freq = stack.cfg.inv_freq().to(device)
        self.codebook_offsets = torch.arange(self.cfg.num_codebooks, device=device) * self.cfg.audio_vocab_size
        return self

    @property
    def device(self) -> torch.device:
        return self.text_embeddings.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype (embeddings and norms; linears may hold 8-bit weights, see quant.py)."""
        return self.text_embeddings.weight.dtype

    # -- caches -------------------------------------------------------------------------------

    def backbone_cache(self, batch: int, length: int | None = None, device=None, dtype=None) -> KVCache:
        return KVCache.allocate(self.cfg.backbone, batch, length or self.cfg.max_seq_len,
                                device or self.device, dtype or self.dtype)

    def decoder_cache(self, batch: int, device=None, dtype=None) -> KVCache:
        """Sized for one frame (positions 0..K-1); it restarts every frame, nothing is cleared."""
        return KVCache.allocate(self.cfg.decoder, batch, self.cfg.num_codebooks, device or self.device,
                                dtype or self.dtype)

    # -- pieces of the frame step --------------------------------------------------------------

    def embed_rows(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """tokens, mask: [B, S, K+1] (audio codes, then the text token) -> masked sum [B, S, D]."""
        K = self.cfg.num_codebooks
        text = self.text_embeddings(tokens[..., K])  # [B, S, D]
        audio = self.audio_embeddings(tokens[..., :K] + self.codebook_offsets)  # [B, S, K, D]
        m = mask.to(text.dtype)
        return text * m[..., K:] + (audio * m[..., :K, None]).sum(dim=2)

    def embed_frame(self, codes: torch.Tensor) -> torch.Tensor:
        """codes: [B, K] one audio frame -> backbone input [B, 1, D] (a fully masked audio row)."""
        return self.audio_embeddings(codes + self.codebook_offsets).sum(dim=1, keepdim=True)

    def embed_code(self, code: torch.Tensor, codebook: int) -> torch.Tensor:
        """code: [B] -> [B, D], the audio embedding of `code` in `codebook` (the rows of its codebook
        are a view of the table: no offset to add)."""
        V = self.cfg.audio_vocab_size
        return F.embedding(code, self.audio_embeddings.weight[codebook * V:(codebook + 1) * V])

    def run_backbone(self, x: torch.Tensor, pos: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """x: [B, S, D] embedded rows at positions pos [B, S] -> final-normed hidden [B, S, D]."""
        return self.backbone(x, pos, cache)

    def codebook0_logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.codebook0_head(h)

    def run_decoder(self, x: torch.Tensor, pos: torch.Tensor | Tables, cache: KVCache) -> torch.Tensor:
        """x: [B, S, D_backbone] -> decoder hidden [B, S, d] (projection applied here). pos: [B, S]
        positions or the tables of `decoder_tables`."""
        return self.decoder(self.projection(x), pos, cache)

    def decoder_tables(self, batch: int) -> DecoderTables:
        """The decoder's tables for a frame's passes over `batch` rows: the same for every frame,
        so the engine makes them once (`step.Buffers`)."""
        K = self.cfg.num_codebooks
        pos = torch.arange(K, device=self.device).expand(batch, K)
        return DecoderTables(self.decoder.tables(pos[:, :2], K, self.dtype),
                             self.decoder.tables(pos, K, self.dtype, one_row=True))

    def codebook_logits(self, h: torch.Tensor, codebook: int) -> torch.Tensor:
        """h: [B, d] decoder hidden -> logits [B, V] for codebook 1..K-1."""
        if isinstance(self.audio_head, nn.Module):  # 8-bit heads (quant.QuantHeads)
            return self.audio_head(h, codebook - 1)
        return h @ self.audio_head[codebook - 1]
