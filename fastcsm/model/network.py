"""The CSM network: embeddings, Llama-style backbone, depth decoder and heads, in plain PyTorch.

The network holds weights only. Generation state (KV caches, positions, random streams) lives
outside it in `KVCache` objects that the caller allocates once and passes in, so the same
module serves one request or a batch of slots, eagerly or inside a captured graph.

State-dict names follow the original Sesame checkpoint (torchtune naming) so that format loads
as-is. A layer runs 4 linears, not the checkpoint's 7: q/k/v are one matmul and so are gate/up
(`FusedLinears`), while its state dict still holds the separate ones. Attention uses the
rotate-half RoPE convention of the Hugging Face port (the original checkpoint's interleaved-pair
q/k rows are permuted once at load time, see `checkpoints.py`).

Shapes: B batch (= cache rows), S new rows, T cache length, D width, H heads, G kv heads,
K codebooks, V audio vocabulary per codebook.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import CsmConfig, TransformerConfig

# Full-precision linears of a few rows on the CPU run as oneDNN's matmul (`mkldnn::_linear_pointwise`,
# over the weight as it is stored). From memory it reads a weight at about twice the speed of
# `F.linear`'s MKL GEMM for one row, and 2-4x for 2 to 32 rows (`benchmarks/bench_linears.py`): a
# csm-1b fp32 frame on 2 cores takes 681 ms instead of 1249 at batch 1, 1501 instead of 2844 at
# batch 8. Its fixed cost (~20 us a call) makes it slower for small weights, which stay with
# `F.linear`, and so do bf16 (where `F.linear` already goes to oneDNN) and every other device.
#
# oneDNN keeps a primitive, with memory of its own (~0.6-3 MB), for every weight shape and number of
# rows it has run. So it gets at most `ONEDNN_MAX_ROWS` rows, the rows of a frame step up to batch 32
# (and of Mimi's streamed frames up to batch 16): csm-1b's and Mimi's 14 shapes at every count from
# 1 to 32 hold ~280 MB. Prompts of every length through it grew a process by 3.3 GB for 200 lengths,
# and 6.8 GB after a second pass. More rows go to `F.linear`, within 1.2-2x of oneDNN there.
ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
ONEDNN_MIN = 1 << 18  # elements of a weight from which the CPU runs it with oneDNN (512 x 512)
ONEDNN_MAX_ROWS = 32  # the most rows a call runs with oneDNN


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`F.linear(x, weight)` without bias; fp32 on the CPU through oneDNN (see `ONEDNN`). The sums
    are the same products in another order: equal to float rounding. Compiled graphs keep the call
    opaque (`fastcsm::onednn_linear`), with no branch on the rows: inductor's own lowering of the op
    needs frozen weights."""
    if not (ONEDNN and x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32
            and weight.numel() >= ONEDNN_MIN):
        return F.linear(x, weight)
    if torch.compiler.is_compiling():
        return torch.ops.fastcsm.onednn_linear(x, weight)
    return _onednn_linear(x, weight)


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if not 0 < x.numel() // x.shape[-1] <= ONEDNN_MAX_ROWS:
        return F.linear(x, weight)
    return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")


_library = torch.library.Library("fastcsm", "FRAGMENT")
_library.define("onednn_linear(Tensor x, Tensor weight) -> Tensor")
_library.impl("onednn_linear", _onednn_linear, "CPU")


@torch.library.register_fake("fastcsm::onednn_linear", lib=_library)
def _(x, weight):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


class Linear(nn.Linear):
    """A linear without bias that runs as `linear` (8-bit ones are swapped in by quant.prepare)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One call for what Llama's norm spells out: normalize in fp32, cast back, then scale.
        return F.rms_norm(x, self.scale.shape, self.scale, self.eps)


class KVCache:
    """Preallocated keys and values, one tensor a layer: layers[i] [B, 2G, T, hd], the layer's G
    key heads, then its G value heads, so one indexed write stores both.

    Each layer's cache is a tensor of its own, not a view of one stacked buffer: a compiled step
    then writes a graph input in place. (Writing into a view of an input made inductor copy the
    whole layer's cache every frame, and a `scatter_` is not written in place at all: the write
    is an indexed assignment, `index_put_`.)

    Row b of the batch is cache row b. `rows(start, stop)` is a view for a sub-range of rows
    (prefill of one new request into its slot writes through it). Stale entries beyond a
    row's current position are never read: attention masks keys by position.

    `window`: attention reads positions 0..window-1 only (`within`); None reads the whole cache.
    A caller that knows every row's position (the engine does, on the host) gives the live
    window, so a frame early in a 2048-position cache does not attend over 2048 masked keys
    (on a 2-core CPU: 0.4 ms a backbone layer against 0.04 ms for 100 live positions). Writes
    may still go anywhere in the cache. A captured step keeps static shapes: no window. A compiled
    one that is not captured gets its window as `span`, the positions 0..W-1 as a tensor whose
    length dynamo is told is dynamic (`within(window, span=True)`), so one compiled graph serves
    every window instead of one a value.
    """

    def __init__(self, layers: list[torch.Tensor], window: int | None = None, span: torch.Tensor | None = None):
        self.layers = layers
        self.window = window
        self.span = span  # [W] long, 0..W-1: the positions attended (a window as a tensor), or None

    @staticmethod
    def allocate(cfg: TransformerConfig, batch: int, length: int, device=None, dtype=None) -> KVCache:
        shape = (batch, 2 * cfg.num_kv_heads, length, cfg.head_dim)
        return KVCache([torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)])

    @property
    def batch(self) -> int:
        return self.layers[0].shape[0]

    @property
    def length(self) -> int:
        return self.layers[0].shape[2]

    @property
    def attended(self) -> int:
        """How many positions attention reads: the window (or span), or the whole cache."""
        if self.span is not None:
            return self.span.shape[0]
        return self.length if self.window is None else self.window

    def rows(self, start: int, stop: int) -> KVCache:
        return KVCache([t[start:stop] for t in self.layers])

    def within(self, window: int | None, span: bool = False) -> KVCache:
        """The same cache, attention reading positions 0..window-1 (None or more than the
        length: all of it). Every row that attends must sit below the window. `span`: give the
        window as a tensor of its positions (`span`, dim 0 marked dynamic), even the whole cache."""
        if span:
            W = self.length if window is None else min(max(window, 2), self.length)
            with torch.inference_mode():  # (as every frame makes it: a tensor of another kind is a recompile)
                positions = torch.arange(W, device=self.layers[0].device)
            torch._dynamo.maybe_mark_dynamic(positions, 0)
            return KVCache(self.layers, span=positions)
        return KVCache(self.layers, None if window is None or window >= self.length else max(window, 1))

    def read(self, row: int, n: int) -> torch.Tensor:
        """A copy of row `row`'s first n positions in every layer: [L, 2G, n, hd]."""
        return torch.stack([t[row, :, :n] for t in self.layers])

    def write(self, row: int, kv: torch.Tensor) -> None:
        """Put `read`'s [L, 2G, n, hd] into row `row`'s first n positions."""
        for t, layer in zip(self.layers, kv, strict=True):
            t[row, :, :layer.shape[1]].copy_(layer)


def rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE, x * cos + cat(-x2, x1) * sin for x = cat(x1, x2): swapping the halves is a
    roll and their signs ride in sin_signed = cat(-sin_half, sin_half); the last product and the sum
    are one `addcmul` (3 ops in all; the sum rounds once). Where cos is 1 and sin 0, x comes out as
    it went in, bit for bit (the value heads, see `Transformer.tables`)."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin_signed)


class FusedLinears(nn.Module):
    """Base of a layer's attention and MLP, which run some of the checkpoint's linears as one
    matmul: `fuse` stacks their weights by rows, in the order given, in one linear.

    The state dict keeps the checkpoint's names: each part is a view of its rows (`weight`, and
    `scale` when 8-bit: per-output-channel scales stack exactly like the rows), listed in the
    checkpoint's order `ORDER`; a state dict in those names loads by stacking them again. So every
    checkpoint format and every reader or writer of state dicts sees the separate linears."""

    ORDER: tuple[str, ...]  # the checkpoint's linears of this module, in state-dict order

    def __init__(self):
        super().__init__()
        self.fused: dict[str, dict[str, int]] = {}  # fused linear -> {part: rows}, parts in row order
        self.register_state_dict_post_hook(_split_fused)
        self.register_load_state_dict_pre_hook(_stack_fused)

    def fuse(self, name: str, in_features: int, parts: dict[str, int]) -> tuple[int, ...]:
        """Add the linear `name` holding `parts` (name -> output rows); returns the rows of each, to
        split its output by."""
        self.fused[name] = dict(parts)
        setattr(self, name, Linear(in_features, sum(parts.values())))
        return tuple(parts.values())


def _split_fused(module: FusedLinears, state: dict, prefix: str, local_metadata) -> None:
    """state_dict post-hook: each fused linear's entries become its parts' (views of their rows),
    and the module's entries are put in the checkpoint's order."""
    local = {}
    for key in [k for k in state if k.startswith(prefix)]:
        t = state.pop(key)
        name, _, attr = key[len(prefix):].partition(".")
        parts = module.fused.get(name)
        if parts is None:
            local[key] = t
            continue
        for part, rows in zip(parts, t.split(list(parts.values())), strict=True):
            local[f"{prefix}{part}.{attr}"] = rows
    rank = {name: i for i, name in enumerate(module.ORDER)}
    state.update(sorted(local.items(), key=lambda kv: rank.get(kv[0][len(prefix):].partition(".")[0], len(rank))))


def _stack_fused(module: FusedLinears, state: dict, prefix: str, local_metadata, strict, missing_keys,
                 unexpected_keys, error_msgs) -> None:
    """load_state_dict pre-hook: the parts' entries (checkpoint names) -> their fused linear's.
    A part that is absent is reported missing under its own name."""
    for name, parts in module.fused.items():
        heads = [f"{prefix}{part}." for part in parts]
        attrs = {k[len(h):] for h in heads for k in state if k.startswith(h)}
        for attr in sorted(attrs):
            keys = [f"{prefix}{part}.{attr}" for part in parts]
            pieces = [state.pop(k, None) for k in keys]
            if any(t is None for t in pieces):
                missing_keys.extend(k for k, t in zip(keys, pieces, strict=True) if t is None)
            else:
                state[f"{prefix}{name}.{attr}"] = torch.cat(pieces)


class FusedState(dict):
    """A state dict of `model` from entries in the checkpoint's names, added tensor by tensor, that
    writes each part of a fused linear straight into the rows of the stacked tensor (made at its
    first part): loading a checkpoint never holds a part twice, and `model.load_state_dict` takes
    it as it is."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.rows: dict[str, tuple[str, int, int, int]] = {}  # part -> (fused linear, first row, rows, all rows)
        for path, m in model.named_modules():
            if isinstance(m, FusedLinears):
                for name, parts in m.fused.items():
                    start, total = 0, sum(parts.values())
                    for part, rows in parts.items():
                        self.rows[f"{path}.{part}"] = (f"{path}.{name}", start, rows, total)
                        start += rows

    def add(self, entries: dict[str, torch.Tensor]) -> None:
        for name, t in entries.items():
            module, _, attr = name.rpartition(".")
            where = self.rows.get(module)
            if where is None:
                self[name] = t
                continue
            fused, start, rows, total = where
            if t.shape[0] != rows:
                raise ValueError(f"{name} has {t.shape[0]} rows, expected {rows}")
            key = f"{fused}.{attr}"
            stacked = self.get(key)
            if stacked is None:
                stacked = self[key] = t.new_empty((total, *t.shape[1:]))
            elif stacked.dtype != t.dtype or stacked.shape[1:] != t.shape[1:]:
                raise ValueError(f"{name} is {t.dtype} {list(t.shape)}, unlike the other parts of {key} "
                                 f"({stacked.dtype} {list(stacked.shape)})")
            stacked[start:start + rows].copy_(t)


class Attention(FusedLinears):
    """q, k and v come from one linear, `qkv_proj` (weight [(H + 2G) * hd, D]); the state dict holds
    the checkpoint's q_proj, k_proj, v_proj (see `FusedLinears`)."""

    ORDER = ("q_proj", "k_proj", "v_proj", "output_proj")

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        hd = cfg.head_dim
        # One output of H + 2G heads, which the forward reads by head, not split by part.
        self.fuse("qkv_proj", cfg.dim, {"q_proj": cfg.num_heads * hd, "k_proj": cfg.num_kv_heads * hd,
                                        "v_proj": cfg.num_kv_heads * hd})
        self.output_proj = Linear(cfg.num_heads * hd, cfg.dim)

    def forward(self, x: torch.Tensor, t: Tables, kv_cache: torch.Tensor) -> torch.Tensor:
        # x: [B, S, D]; t: the stack's tables for these rows (`Transformer.tables`); kv_cache:
        # [B, 2G, T, hd], G key heads then G value heads
        B, S, _ = x.shape
        cfg = self.cfg
        H, G, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        # q, k and v are heads of the one output: one RoPE pass turns q and k and leaves v as it is
        # (its tables hold cos 1 and sin 0 there), so the new keys and values come out adjacent and
        # one write stores both at each row's own positions: [B, 2G, S, hd] -> cache[b, :, pos[b, s]].
        qkv = rope(self.qkv_proj(x).view(B, S, H + 2 * G, hd).transpose(1, 2), t.cos, t.sin)  # [B, H + 2G, S, hd]
        kv = qkv[:, H:].transpose(1, 2)  # [B, S, 2G, hd]: the order an indexed write over (row, :, pos) takes
        # (The casts are skipped, not called, where the dtypes agree: ~140 no-op calls a frame.)
        cast = kv_cache.dtype != qkv.dtype
        kv_cache[t.rows, :, t.pos] = kv.to(kv_cache.dtype) if cast else kv
        # Grouped-query attention without copying keys: the R query heads that share a kv head
        # become R times as many query rows of that head (head h = g * R + r uses kv head g).
        R = H // G
        q = qkv[:, :H].reshape(B, G, R * S, hd)
        # The W positions attended (a window, or the whole cache: then the slices are the whole).
        # No branch on W: with a span, W is dynamic, and a test of it would be a guard to recompile on.
        # (`narrow`, not a slice: a slice's end may pass the size, which a dynamic W would guard on.)
        W = t.mask.shape[-1]
        keys, values = kv_cache[:, :G].narrow(2, 0, W), kv_cache[:, G:].narrow(2, 0, W)
        if cast:
            keys, values = keys.to(q.dtype), values.to(q.dtype)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=t.mask)
        out = out.reshape(B, G * R, S, hd)  # (a view on the CPU; CUDA kernels may lay out S>1 rows otherwise)
        return self.output_proj(out.transpose(1, 2).reshape(B, S, -1))


class MLP(FusedLinears):
    """SwiGLU: w2(silu(w1 x) * w3 x), the gate w1 and up w3 as one linear, `gate_up_proj` (weight
    [2 * hidden, D]); the state dict holds the checkpoint's w1, w2, w3 (see `FusedLinears`)."""

    ORDER = ("w1", "w2", "w3")

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_up_rows = self.fuse("gate_up_proj", dim, {"w1": hidden, "w3": hidden})
        self.w2 = Linear(hidden, dim)  # down

    def forward(self, x):
        gate, up = self.gate_up_proj(x).split(self.gate_up_rows, dim=-1)
        return self.w2(F.silu(gate) * up)


class Layer(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.sa_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg.dim, cfg.intermediate_size)

    def forward(self, x: torch.Tensor, t: Tables, kv_cache: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.sa_norm(x), t, kv_cache)
        return x + self.mlp(self.mlp_norm(x))


class Tables(NamedTuple):
    """What every layer of a stack shares for one set of positions (`Transformer.tables`)."""

    cos: torch.Tensor  # [B, H + 2G, S, hd]: q and k heads, then value heads (1)
    sin: torch.Tensor  # [B, H + 2G, S, hd], signed (see `rope`); 0 at the value heads
    rows: torch.Tensor  # [B, 1] long, 0..B-1: the cache row each batch row writes
    pos: torch.Tensor  # [B, S] long, the cache positions of the new rows (their keys and values)
    mask: torch.Tensor  # [B, 1, R*S, W] additive (0 or -inf) over the W positions attended (the cache's
    # length or its window); [B, 1, S, W] where that broadcasts the same

    def at(self, p: int) -> Tables:
        """The tables of the single position p of tables made for positions 0..S-1 (a one-row pass)."""
        cos, sin, mask = (t[:, :, p:p + 1] for t in (self.cos, self.sin, self.mask))
        return Tables(cos, sin, self.rows, self.pos[:, p:p + 1], mask)


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

    def tables(self, pos: torch.Tensor, length: int, dtype: torch.dtype, one_row: bool = False,
               span: torch.Tensor | None = None) -> Tables:
        """RoPE tables, cache write positions and mask for positions pos [B, S] over a cache of `length`
        (or over the positions `span`, `KVCache.span`). `one_row`: the rows will be used one at a
        time (`Tables.at`), so the mask is left per row."""
        cfg = self.cfg
        B, S = pos.shape
        H, G, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        freqs = pos[:, None, :, None].float() * self.inv_freq.float()  # [B, 1, S, hd/2]
        cos, sin = freqs.cos().to(dtype), freqs.sin().to(dtype)
        cos, sin = torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)  # [B, 1, S, hd]
        # One pass turns the q and k heads and passes the value heads through (cos 1, sin 0).
        cos = torch.cat((cos.expand(B, H + G, S, hd), torch.ones_like(cos).expand(B, G, S, hd)), dim=1)
        sin = torch.cat((sin.expand(B, H + G, S, hd), torch.zeros_like(sin).expand(B, G, S, hd)), dim=1)
        # Causal by position: a query at position p sees cache entries 0..p of its own row; the
        # R query heads of a kv head are R blocks of S query rows (see Attention), which a
        # one-row mask covers by broadcasting.
        if span is None:
            span = torch.arange(length, device=pos.device)
        else:
            length = span.shape[0]
        seen = span <= pos[:, None, :, None]  # [B, 1, S, T]
        # Additive, as attention would turn a boolean mask into in every layer.
        mask = torch.where(seen, 0.0, float("-inf")).to(dtype)
        R = H // G
        if S > 1 and R > 1 and not one_row:
            mask = mask.expand(B, R, S, length).reshape(B, 1, R * S, length)
        return Tables(cos, sin, torch.arange(B, device=pos.device)[:, None], pos, mask)

    def forward(self, x: torch.Tensor, pos: torch.Tensor | Tables, cache: KVCache) -> torch.Tensor:
        # x: [B, S, D]; pos: [B, S] absolute positions (each row may be at its own position), or
        # the `tables` made for them. Everything the layers share is made once per stack.
        t = pos if isinstance(pos, Tables) else self.tables(pos, cache.attended, x.dtype, span=cache.span)
        for i, layer in enumerate(self.layers):
            x = layer(x, t, cache.layers[i])
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
        self.projection = Linear(b.dim, d.dim)
        self.codebook0_head = Linear(b.dim, V)
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
