"""Mimi, Kyutai's neural audio codec, in plain PyTorch with per-slot streaming state.

CSM speaks in Mimi codes: 32 codebooks of 2048 entries at 12.5 frames a second, 1920 samples of
24 kHz audio a frame. This module turns waveforms into codes and codes back into waveforms.

    wav [B, 1, T] -> SEANet encoder (strides 4·5·6·8, 25 Hz) -> encoder transformer
        -> learnt ×2 downsample (12.5 Hz) -> split RVQ (1 semantic + 31 acoustic) -> codes [B, K, n]
    codes -> RVQ lookup -> channel-wise ×2 transposed-conv upsample -> decoder transformer
        -> SEANet decoder (strides 8·6·5·4) -> pcm [B, 1, n*1920]

Design: every layer is causal, and there is exactly one forward path, the streaming one. Each layer
takes its slice of a preallocated state (a convolution's left context, a transposed convolution's
overlap tail, a transformer's ring of keys and values with per-slot positions), reads it and updates
it in place. Whole-sequence `Mimi.encode` / `Mimi.decode` run that same path from a fresh state,
chunk by chunk, so streamed and whole outputs agree by construction and memory stays bounded on
long inputs. A whole-sequence encode whose length is not a multiple of a frame pads each strided
convolution on the right exactly as the reference does (`pad_for_conv1d`), so its codes equal the
reference's for any length.

The state holds `num_slots` independent streams. `reset(slot_mask)` restarts some of them without
touching the others. A step performs no host synchronisation and no Python branching on tensor
values, so `MimiStreamingDecoder.step` can be compiled with `fullgraph=True` and captured in a CUDA
graph. Validation of user codes (which needs a host sync) happens once, at the public boundary;
below it, codes are clamped so that nothing outside the codebook can reach the lookup.

Weights are loaded by `fastcsm.codec.weights` (Kyutai's and Hugging Face's names). The codec runs in
fp32, the precision the reference tests were made at.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..model.network import Linear
from ..nested import leaves

# Whole-sequence encode/decode work through the streaming path this many frames at a time.
WHOLE_CHUNK_FRAMES = 64


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MimiConfig:
    """Shapes of the codec. Defaults are the published Mimi (`kyutai/mimi`, CSM's `codec_config`)."""

    sample_rate: int = 24_000
    channels: int = 1  # mono
    dim: int = 512  # latent width: SEANet output, transformer width, quantizer input
    num_filters: int = 64  # SEANet width at full sample rate; doubles at every stride
    ratios: tuple[int, ...] = (8, 6, 5, 4)  # decoder upsampling order; the encoder uses them reversed
    kernel_size: int = 7  # first SEANet convolution
    last_kernel_size: int = 3  # last SEANet convolution
    residual_kernel_size: int = 3
    num_residual_layers: int = 1  # residual blocks per stride
    dilation_base: int = 2  # dilation of residual block j is dilation_base**j
    compress: int = 2  # residual blocks narrow their hidden width by this factor
    downsample_stride: int = 2  # learnt resampling between the SEANet rate (25 Hz) and the frame rate
    num_layers: int = 8  # per transformer (encoder and decoder each have one)
    num_heads: int = 8
    intermediate_size: int = 2048  # GELU MLP width
    sliding_window: int = 250  # attention span in transformer steps (25 Hz), including the current step
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-5
    codebook_size: int = 2048  # valid codes are 0..codebook_size-1
    codebook_dim: int = 256
    num_codebooks: int = 32  # codebooks in the checkpoint; encode/decode may use a prefix of them
    num_semantic_codebooks: int = 1  # the first codebooks come from the semantic quantizer

    def __post_init__(self):
        object.__setattr__(self, "ratios", tuple(int(r) for r in self.ratios))
        if self.dim % self.num_heads or (self.dim // self.num_heads) % 2:
            raise ValueError(f"Mimi dim {self.dim} must split into {self.num_heads} heads of even width")
        if not 0 < self.num_semantic_codebooks < self.num_codebooks:
            raise ValueError(
                f"Mimi needs 1 <= num_semantic_codebooks ({self.num_semantic_codebooks}) "
                f"< num_codebooks ({self.num_codebooks})"
            )
        if self.downsample_stride < 2:
            raise ValueError(f"Mimi downsample_stride must be >= 2, got {self.downsample_stride}")

    @property
    def hop_length(self) -> int:
        """Samples per SEANet step (960: 25 Hz at 24 kHz)."""
        return math.prod(self.ratios)

    @property
    def frame_size(self) -> int:
        """Samples per code frame (1920: 12.5 Hz at 24 kHz)."""
        return self.hop_length * self.downsample_stride

    @property
    def frame_rate(self) -> float:
        return self.sample_rate / self.frame_size

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    # -- transformers' MimiConfig ------------------------------------------------------------

    @staticmethod
    def from_json(path: str | Path) -> MimiConfig:
        with open(path) as f:
            return MimiConfig.from_dict(json.load(f))

    @staticmethod
    def from_dict(cfg: dict) -> MimiConfig:
        """Read a transformers `MimiConfig` dict, or a CSM `config.json` holding one as `codec_config`.

        Keys left out take the transformers defaults, which are the published Mimi's shapes (a
        nested config saved by `save_pretrained` may hold only the fields that differ).
        """
        if "codec_config" in cfg:
            cfg = cfg["codec_config"] or {}
        d = MimiConfig()
        unsupported = {
            "audio_channels": (1, "only mono Mimi exists"),
            "use_causal_conv": (True, "streaming needs causal convolutions"),
            "pad_mode": ("constant", "only zero padding is implemented"),
            "trim_right_ratio": (1.0, "causal transposed convolutions trim on the right"),
            "use_conv_shortcut": (False, "residual blocks use an identity skip"),
            "hidden_act": ("gelu", "the MLP uses exact GELU"),
            "attention_bias": (False, "attention projections have no bias"),
        }
        for key, (want, why) in unsupported.items():
            if key in cfg and cfg[key] != want:
                raise ValueError(f"unsupported Mimi config {key}={cfg[key]!r} (expected {want!r}: {why})")
        dim = cfg.get("hidden_size", d.dim)
        heads = cfg.get("num_attention_heads", d.num_heads)
        if cfg.get("num_key_value_heads") not in (None, heads):
            raise ValueError(
                f"unsupported Mimi config num_key_value_heads={cfg['num_key_value_heads']} (expected {heads})"
            )
        if cfg.get("head_dim") not in (None, dim // heads):
            raise ValueError(f"unsupported Mimi config head_dim={cfg['head_dim']} (expected {dim // heads})")
        if cfg.get("upsample_groups") not in (None, dim):
            raise ValueError(
                f"unsupported Mimi config upsample_groups={cfg['upsample_groups']} (expected {dim}: channel-wise)"
            )
        codebook_dim = cfg.get("codebook_dim", d.codebook_dim) or dim  # transformers: null means hidden_size
        if cfg.get("vector_quantization_hidden_dimension", codebook_dim) != codebook_dim:
            raise ValueError(
                "unsupported Mimi config: vector_quantization_hidden_dimension "
                f"{cfg['vector_quantization_hidden_dimension']} != codebook_dim {codebook_dim}"
            )
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise ValueError(f"unsupported Mimi rope {rope!r} (expected plain RoPE)")
        theta = rope.get("rope_theta", cfg.get("rope_theta", d.rope_theta))
        ratios = tuple(cfg.get("upsampling_ratios") or d.ratios)
        sample_rate = cfg.get("sampling_rate", d.sample_rate)
        stride = d.downsample_stride
        if cfg.get("frame_rate"):  # older configs state the frame rate; newer ones derive it (×2)
            seanet_rate = math.ceil(sample_rate / math.prod(ratios))
            stride = round(seanet_rate / cfg["frame_rate"])
            if not math.isclose(seanet_rate / stride, cfg["frame_rate"]):
                raise ValueError(
                    f"Mimi frame_rate {cfg['frame_rate']} is not the SEANet rate {seanet_rate} / an integer"
                )
        return MimiConfig(
            sample_rate=sample_rate,
            dim=dim,
            num_filters=cfg.get("num_filters", d.num_filters),
            ratios=ratios,
            kernel_size=cfg.get("kernel_size", d.kernel_size),
            last_kernel_size=cfg.get("last_kernel_size", d.last_kernel_size),
            residual_kernel_size=cfg.get("residual_kernel_size", d.residual_kernel_size),
            num_residual_layers=cfg.get("num_residual_layers", d.num_residual_layers),
            dilation_base=cfg.get("dilation_growth_rate", d.dilation_base),
            compress=cfg.get("compress", d.compress),
            downsample_stride=stride,
            num_layers=cfg.get("num_hidden_layers", d.num_layers),
            num_heads=heads,
            intermediate_size=cfg.get("intermediate_size", d.intermediate_size),
            sliding_window=cfg.get("sliding_window", d.sliding_window),
            rope_theta=float(theta),
            norm_eps=cfg.get("norm_eps", d.norm_eps),
            codebook_size=cfg.get("codebook_size", d.codebook_size),
            codebook_dim=codebook_dim,
            num_codebooks=cfg.get("num_quantizers", d.num_codebooks),
            num_semantic_codebooks=cfg.get("num_semantic_quantizers", d.num_semantic_codebooks),
        )

    def to_hf_dict(self) -> dict:
        """The transformers `MimiConfig` fields for these shapes (used to build reference models)."""
        return dict(
            model_type="mimi",
            sampling_rate=self.sample_rate,
            audio_channels=self.channels,
            hidden_size=self.dim,
            num_filters=self.num_filters,
            upsampling_ratios=list(self.ratios),
            kernel_size=self.kernel_size,
            last_kernel_size=self.last_kernel_size,
            residual_kernel_size=self.residual_kernel_size,
            num_residual_layers=self.num_residual_layers,
            dilation_growth_rate=self.dilation_base,
            compress=self.compress,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_heads,
            head_dim=self.head_dim,
            intermediate_size=self.intermediate_size,
            sliding_window=self.sliding_window,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
            norm_eps=self.norm_eps,
            codebook_size=self.codebook_size,
            codebook_dim=self.codebook_dim,
            vector_quantization_hidden_dimension=self.codebook_dim,
            num_quantizers=self.num_codebooks,
            num_semantic_quantizers=self.num_semantic_codebooks,
            upsample_groups=self.dim,
        )


def tiny_mimi_config(sliding_window: int = 8, num_codebooks: int = 32) -> MimiConfig:
    """A Mimi with the real strides, codebook count and codebook size, and tiny widths, for tests.

    The default 8-step window (4 frames) makes sequences longer than the window cheap.
    """
    return MimiConfig(
        dim=32,
        num_filters=4,
        num_layers=2,
        num_heads=4,
        intermediate_size=64,
        sliding_window=sliding_window,
        codebook_dim=16,
        num_codebooks=num_codebooks,
    )


MIMI_PRESETS = {"mimi": MimiConfig, "tiny": tiny_mimi_config}


def mimi_preset(name: str) -> MimiConfig:
    try:
        return MIMI_PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown Mimi preset {name!r}; known: {sorted(MIMI_PRESETS)}") from None


# ----------------------------------------------------------------------------------------------
# Streaming state: preallocated per slot, updated in place, reset by mask
# ----------------------------------------------------------------------------------------------


def _row_mask(mask: Tensor, like: Tensor) -> Tensor:
    """`mask [B]` viewed so it broadcasts over `like [B, ...]`."""
    return mask.view(-1, *([1] * (like.dim() - 1)))


@dataclass
class ConvState:
    ctx: Tensor  # [B, C_in, context]: the last input samples the next window still needs
    fresh: Tensor | None = None  # [B] bool, replicate-padded convs only: no input seen yet

    def reset(self, mask: Tensor) -> None:
        self.ctx.masked_fill_(_row_mask(mask, self.ctx), 0.0)
        if self.fresh is not None:
            self.fresh.masked_fill_(mask, True)


@dataclass
class ConvTrState:
    tail: Tensor  # [B, C_out, stride]: the last step's overlapping half, without bias

    def reset(self, mask: Tensor) -> None:
        self.tail.masked_fill_(_row_mask(mask, self.tail), 0.0)


@dataclass
class KVRing:
    k: Tensor  # [B, H, capacity, head_dim], RoPE already applied
    v: Tensor  # [B, H, capacity, head_dim]


@dataclass
class TransformerState:
    pos: Tensor  # [B] int64: position of the next step of each slot's stream
    key_pos: Tensor  # [B, capacity] int64: position held by each ring entry, -1 when empty
    layers: list[KVRing]

    @property
    def capacity(self) -> int:
        return self.key_pos.shape[1]

    def reset(self, mask: Tensor) -> None:
        # Keys and values need no clearing: entries with key_pos -1 are masked out.
        self.pos.masked_fill_(mask, 0)
        self.key_pos.masked_fill_(_row_mask(mask, self.key_pos), -1)


_STATES = (ConvState, ConvTrState, TransformerState)  # the pieces with their own reset


@dataclass
class MimiEncoderState:
    seanet: list
    transformer: TransformerState
    downsample: ConvState
    max_chunk_frames: int

    def reset(self, mask: Tensor) -> None:
        for leaf in leaves([self.seanet, self.transformer, self.downsample], _STATES):
            leaf.reset(mask)


@dataclass
class MimiDecoderState:
    upsample: ConvTrState
    transformer: TransformerState
    seanet: list
    max_chunk_frames: int

    def reset(self, mask: Tensor) -> None:
        for leaf in leaves([self.upsample, self.transformer, self.seanet], _STATES):
            leaf.reset(mask)


# ----------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------


class CausalConv1d(nn.Module):
    """Conv1d that sees only the past: `context` samples of left context come from the state.

    The right edge follows the reference's whole-sequence convention: an input whose length is not
    a multiple of the stride is padded on the right to complete its last window. Streams fed whole
    strides never pad.
    """

    def __init__(self, cin: int, cout: int, kernel_size: int, stride: int = 1, dilation: int = 1,
                 groups: int = 1, bias: bool = True, replicate: bool = False):
        super().__init__()
        self.conv = nn.Conv1d(cin, cout, kernel_size, stride, dilation=dilation, groups=groups, bias=bias)
        self.stride = stride
        self.context = (kernel_size - 1) * dilation + 1 - stride
        # Replicate padding: a stream starts as if its first sample had always been there.
        self.replicate = replicate

    def init_state(self, batch: int, device, dtype) -> ConvState | None:
        if self.context <= 0:
            return None
        fresh = torch.ones(batch, dtype=torch.bool, device=device) if self.replicate else None
        return ConvState(torch.zeros(batch, self.conv.in_channels, self.context, device=device, dtype=dtype), fresh)

    def forward(self, x: Tensor, state: ConvState | None) -> Tensor:
        # x: [B, C_in, L] -> [B, C_out, ceil(L / stride)]
        if self.context > 0:
            ctx = state.ctx
            if state.fresh is not None:
                ctx = torch.where(state.fresh[:, None, None], x[..., :1].expand_as(ctx), ctx)
                state.fresh.zero_()
            x = torch.cat([ctx, x], dim=-1)
            state.ctx.copy_(x[..., x.shape[-1] - self.context:])
        extra = -x.shape[-1] % self.stride if self.stride > 1 else 0
        if extra:
            x = F.pad(x, (0, extra), mode="replicate" if self.replicate else "constant")
        return self.conv(x)


class CausalConvTranspose1d(nn.Module):
    """ConvTranspose1d with kernel = 2 * stride (as everywhere in Mimi), streamed.

    Each input step writes two stride-long halves; the second overlaps the next step's first. The
    reference trims the last step's second half from the right of a whole sequence; the state
    holds it instead, and adds it to the first half of the next input. Computed as one matmul and
    an overlap-add: PyTorch's CPU transposed convolution falls back to a very slow kernel for the
    small inputs of streaming.
    """

    def __init__(self, cin: int, cout: int, kernel_size: int, stride: int, groups: int = 1, bias: bool = True):
        super().__init__()
        if kernel_size != 2 * stride:
            raise ValueError(f"transposed conv kernel {kernel_size} must be twice its stride {stride}")
        if groups not in (1, cin) or (groups == cin and cout != cin):
            raise ValueError(f"transposed conv must be dense or channel-wise, got {groups} groups for {cin}->{cout}")
        self.conv = nn.ConvTranspose1d(cin, cout, kernel_size, stride, groups=groups, bias=bias)
        self.stride = stride

    def init_state(self, batch: int, device, dtype) -> ConvTrState:
        return ConvTrState(torch.zeros(batch, self.conv.out_channels, self.stride, device=device, dtype=dtype))

    def forward(self, x: Tensor, state: ConvTrState) -> Tensor:
        # x: [B, C_in, L] -> [B, C_out, L * stride]
        B, _, L = x.shape
        s, w = self.stride, self.conv.weight  # w: [C_in, C_out / groups, 2s]
        if self.conv.groups == 1:
            y = (x.transpose(1, 2) @ w.flatten(1)).view(B, L, -1, 2 * s)  # [B, L, C_out, 2s]
        else:
            y = x.transpose(1, 2)[..., None] * w[:, 0]  # channel-wise: [B, L, C, 2s]
        first, second = y[..., :s], y[..., s:]
        overlap = torch.cat([state.tail[:, None], second[:, :-1]], dim=1)  # step t-1's second half
        state.tail.copy_(second[:, -1])
        out = (first + overlap).permute(0, 2, 1, 3).reshape(B, -1, L * s)
        if self.conv.bias is not None:
            out = out + self.conv.bias[:, None]
        return out


def _init_states(layers: nn.ModuleList, batch: int, device, dtype) -> list:
    return [layer.init_state(batch, device, dtype) if hasattr(layer, "init_state") else None for layer in layers]


def _run(layers: nn.ModuleList, x: Tensor, states: list) -> Tensor:
    for layer, state in zip(layers, states, strict=True):
        x = layer(x, state) if hasattr(layer, "init_state") else layer(x)
    return x


class ResnetBlock(nn.Module):
    """SEANet residual block: x + conv1x1(elu(conv_k(elu(x)))), identity skip."""

    def __init__(self, dim: int, hidden: int, kernel_size: int, dilation: int):
        super().__init__()
        # Indices mirror the published checkpoints: block.1 and block.3 are the convolutions.
        self.block = nn.ModuleList([
            nn.ELU(), CausalConv1d(dim, hidden, kernel_size, dilation=dilation),
            nn.ELU(), CausalConv1d(hidden, dim, 1),
        ])

    def init_state(self, batch: int, device, dtype) -> list:
        return _init_states(self.block, batch, device, dtype)

    def forward(self, x: Tensor, state: list) -> Tensor:
        return x + _run(self.block, x, state)


class _Seanet(nn.Module):
    """A SEANet stack: `layers` run in order, each with its own streaming state."""

    layers: nn.ModuleList

    def init_state(self, batch: int, device, dtype) -> list:
        return _init_states(self.layers, batch, device, dtype)

    def forward(self, x: Tensor, state: list) -> Tensor:
        return _run(self.layers, x, state)


class SeanetEncoder(_Seanet):
    """wav [B, 1, T] -> [B, dim, T / hop_length]."""

    def __init__(self, c: MimiConfig):
        super().__init__()
        layers: list[nn.Module] = [CausalConv1d(c.channels, c.num_filters, c.kernel_size)]
        width = c.num_filters
        for ratio in reversed(c.ratios):
            for j in range(c.num_residual_layers):
                layers.append(ResnetBlock(width, width // c.compress, c.residual_kernel_size, c.dilation_base**j))
            layers += [nn.ELU(), CausalConv1d(width, 2 * width, 2 * ratio, stride=ratio)]
            width *= 2
        layers += [nn.ELU(), CausalConv1d(width, c.dim, c.last_kernel_size)]
        self.layers = nn.ModuleList(layers)


class SeanetDecoder(_Seanet):
    """[B, dim, n] -> wav [B, 1, n * hop_length]."""

    def __init__(self, c: MimiConfig):
        super().__init__()
        width = c.num_filters * 2 ** len(c.ratios)
        layers: list[nn.Module] = [CausalConv1d(c.dim, width, c.kernel_size)]
        for ratio in c.ratios:
            layers += [nn.ELU(), CausalConvTranspose1d(width, width // 2, 2 * ratio, ratio)]
            width //= 2
            for j in range(c.num_residual_layers):
                layers.append(ResnetBlock(width, width // c.compress, c.residual_kernel_size, c.dilation_base**j))
        layers += [nn.ELU(), CausalConv1d(width, c.channels, c.last_kernel_size)]
        self.layers = nn.ModuleList(layers)


class LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.full((dim,), 0.01))

    def forward(self, x: Tensor) -> Tensor:
        return self.scale * x


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = Linear(dim, hidden)
        self.fc2 = Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


class Attention(nn.Module):
    """Causal self-attention over a sliding window, keys and values kept in a per-slot ring.

    RoPE rotates halves (the transformers convention); Kyutai's interleaved-pair weights are
    permuted into this form when loaded.
    """

    def __init__(self, c: MimiConfig):
        super().__init__()
        self.num_heads, self.head_dim = c.num_heads, c.head_dim
        self.qkv_proj = Linear(c.dim, 3 * c.dim)  # rows: q, then k, then v
        self.o_proj = Linear(c.dim, c.dim)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, ring: KVRing, rows: Tensor,
                slots: Tensor) -> Tensor:
        # x: [B, S, D]; cos/sin: [B, 1, S, head_dim]; mask: [B, 1, S, capacity]; rows: [B, 1] 0..B-1;
        # slots: [B, S] ring indices
        B, S, _ = x.shape
        q, k, v = self.qkv_proj(x).view(B, S, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        # Indexed writes, which a compiled step does in place (see `fastcsm.model.network.KVCache`).
        ring.k[rows, :, slots] = k.transpose(1, 2)
        ring.v[rows, :, slots] = v.transpose(1, 2)
        out = F.scaled_dot_product_attention(q, ring.k, ring.v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(B, S, -1))


class TransformerLayer(nn.Module):
    def __init__(self, c: MimiConfig):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(c.dim, eps=c.norm_eps)
        self.self_attn = Attention(c)
        self.self_attn_layer_scale = LayerScale(c.dim)
        self.post_attention_layernorm = nn.LayerNorm(c.dim, eps=c.norm_eps)
        self.mlp = MLP(c.dim, c.intermediate_size)
        self.mlp_layer_scale = LayerScale(c.dim)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, ring: KVRing, rows: Tensor,
                slots: Tensor) -> Tensor:
        x = x + self.self_attn_layer_scale(self.self_attn(self.input_layernorm(x), cos, sin, mask, ring, rows, slots))
        return x + self.mlp_layer_scale(self.mlp(self.post_attention_layernorm(x)))


class MimiTransformer(nn.Module):
    """Pre-norm transformer (LayerNorm, layer scale, GELU MLP, RoPE), causal over a sliding window."""

    def __init__(self, c: MimiConfig):
        super().__init__()
        self.window = c.sliding_window
        self.num_heads, self.head_dim = c.num_heads, c.head_dim
        self.layers = nn.ModuleList([TransformerLayer(c) for _ in range(c.num_layers)])
        inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, c.head_dim, 2, dtype=torch.float32) / c.head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def init_state(self, batch: int, max_chunk_steps: int, device, dtype) -> TransformerState:
        # Keys are written before they are attended to, so the ring holds the window plus the
        # rest of the longest chunk: the first query of a chunk still sees its whole window.
        capacity = self.window + max_chunk_steps - 1
        shape = (batch, self.num_heads, capacity, self.head_dim)
        return TransformerState(
            pos=torch.zeros(batch, dtype=torch.long, device=device),
            key_pos=torch.full((batch, capacity), -1, dtype=torch.long, device=device),
            layers=[KVRing(torch.zeros(shape, device=device, dtype=dtype),
                           torch.zeros(shape, device=device, dtype=dtype)) for _ in self.layers],
        )

    def forward(self, x: Tensor, state: TransformerState) -> Tensor:
        # x: [B, S, D], S <= the chunk size the state was made for
        B, S, _ = x.shape
        capacity = state.capacity
        qpos = state.pos[:, None] + torch.arange(S, device=x.device)  # [B, S]
        slots = qpos % capacity
        rows = torch.arange(B, device=x.device)[:, None]
        state.key_pos[rows, slots] = qpos
        delta = qpos[:, :, None] - state.key_pos[:, None, :]  # [B, S, capacity]
        mask = ((state.key_pos >= 0)[:, None, :] & (delta >= 0) & (delta < self.window))[:, None]
        freqs = qpos.to(torch.float32)[..., None] * self.inv_freq  # [B, S, head_dim / 2]
        emb = torch.cat([freqs, freqs], dim=-1)[:, None]
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        for layer, ring in zip(self.layers, state.layers, strict=True):
            x = layer(x, cos, sin, mask, ring, rows, slots)
        state.pos.add_(S)
        return x


class SplitResidualVectorQuantizer(nn.Module):
    """One semantic RVQ and one acoustic RVQ over the same latent, each with its own projections.

    `codebooks [num_codebooks, codebook_size, codebook_dim]` holds the published
    `embedding_sum / cluster_usage.clamp(min=1e-5)`, computed once at load.
    """

    def __init__(self, c: MimiConfig):
        super().__init__()
        self.num_semantic = c.num_semantic_codebooks
        self.codebook_size = c.codebook_size
        self.semantic_input_proj = nn.Conv1d(c.dim, c.codebook_dim, 1, bias=False)
        self.semantic_output_proj = nn.Conv1d(c.codebook_dim, c.dim, 1, bias=False)
        self.acoustic_input_proj = nn.Conv1d(c.dim, c.codebook_dim, 1, bias=False)
        self.acoustic_output_proj = nn.Conv1d(c.codebook_dim, c.dim, 1, bias=False)
        self.register_buffer("codebooks", torch.zeros(c.num_codebooks, c.codebook_size, c.codebook_dim))

    @staticmethod
    def _rvq_encode(x: Tensor, books: Tensor) -> Tensor:
        # x: [B, D, T], books: [k, N, D] -> codes [B, k, T]
        B, D, T = x.shape
        residual = x.transpose(1, 2).reshape(-1, D)
        codes = []
        for book in books:
            index = torch.cdist(residual[None], book[None], p=2)[0].argmin(dim=-1)
            residual = residual - F.embedding(index, book)
            codes.append(index)
        return torch.stack(codes, dim=1).view(B, T, -1).transpose(1, 2)

    def encode(self, z: Tensor, num_codebooks: int) -> Tensor:
        # z: [B, dim, T] -> codes [B, num_codebooks, T]
        codes = self._rvq_encode(self.semantic_input_proj(z), self.codebooks[: self.num_semantic])
        if num_codebooks > self.num_semantic:
            acoustic = self._rvq_encode(self.acoustic_input_proj(z), self.codebooks[self.num_semantic: num_codebooks])
            codes = torch.cat([codes, acoustic], dim=1)
        return codes

    def decode(self, codes: Tensor) -> Tensor:
        # codes: [B, K, T] -> [B, dim, T]. Clamped: an unchecked caller can't index outside the table.
        B, K, T = codes.shape
        books = self.codebooks[:K].flatten(0, 1)  # [K * N, D]
        offsets = torch.arange(K, device=codes.device)[None, :, None] * self.codebook_size
        emb = F.embedding(codes.clamp(0, self.codebook_size - 1) + offsets, books)  # [B, K, T, D]
        out = self.semantic_output_proj(emb[:, : self.num_semantic].sum(1).transpose(1, 2))
        if K > self.num_semantic:
            out = out + self.acoustic_output_proj(emb[:, self.num_semantic:].sum(1).transpose(1, 2))
        return out


# ----------------------------------------------------------------------------------------------
# The codec
# ----------------------------------------------------------------------------------------------


def check_codes(codes, config: MimiConfig, num_slots: int | None = None) -> None:
    """Raise ValueError unless `codes` is an integer tensor [B, K, n] of valid codes (one host sync)."""
    dtype = codes.dtype if isinstance(codes, Tensor) else None
    if dtype is None or dtype.is_floating_point or dtype.is_complex or dtype == torch.bool:
        kind = codes.dtype if isinstance(codes, Tensor) else type(codes).__name__
        raise ValueError(f"Mimi codes must be an integer tensor [batch, codebooks, frames], got {kind}")
    if codes.dim() != 3:
        raise ValueError(f"Mimi codes must have shape [batch, codebooks, frames], got {list(codes.shape)}")
    B, K, n = codes.shape
    if num_slots is not None and B != num_slots:
        raise ValueError(f"Mimi codes have batch {B}, but the streaming decoder has {num_slots} slots")
    if not 1 <= K <= config.num_codebooks:
        raise ValueError(f"Mimi codes have {K} codebooks; this Mimi has 1..{config.num_codebooks}")
    if n < 1:
        raise ValueError("Mimi codes hold no frames (shape [..., 0]); decode needs at least one")
    bad = (codes < 0) | (codes >= config.codebook_size)
    if bool(bad.any()):
        b, k, t = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"Mimi code {int(codes[b, k, t])} at [batch {b}, codebook {k}, frame {t}] is outside "
            f"0..{config.codebook_size - 1} ({int(bad.sum())} invalid codes in all); "
            "padding or special ids must be removed before decoding"
        )


def _check_waveform(wav, config: MimiConfig) -> None:
    if not isinstance(wav, Tensor) or not wav.dtype.is_floating_point:
        kind = wav.dtype if isinstance(wav, Tensor) else type(wav).__name__
        raise ValueError(f"Mimi encodes a float waveform tensor [batch, 1, samples], got {kind}")
    if wav.dim() != 3 or wav.shape[1] != config.channels:
        raise ValueError(f"Mimi encodes a waveform of shape [batch, {config.channels}, samples], got {list(wav.shape)}")
    if wav.shape[-1] < 1:
        raise ValueError("Mimi cannot encode an empty waveform")
    if not bool(torch.isfinite(wav).all()):
        raise ValueError("waveform contains NaN or Inf samples")


class Mimi(nn.Module):
    """The codec. `encode`/`decode` take whole sequences; `streaming_encoder`/`streaming_decoder` make
    per-slot streams. Module names follow the transformers checkpoint layout where one exists."""

    def __init__(self, config: MimiConfig):
        super().__init__()
        c = self.config = config
        self.encoder = SeanetEncoder(c)
        self.encoder_transformer = MimiTransformer(c)
        self.downsample = CausalConv1d(c.dim, c.dim, 2 * c.downsample_stride, c.downsample_stride,
                                       bias=False, replicate=True)
        self.quantizer = SplitResidualVectorQuantizer(c)
        self.upsample = CausalConvTranspose1d(c.dim, c.dim, 2 * c.downsample_stride, c.downsample_stride,
                                              groups=c.dim, bias=False)
        self.decoder_transformer = MimiTransformer(c)
        self.decoder = SeanetDecoder(c)

    @property
    def device(self) -> torch.device:
        return self.quantizer.codebooks.device

    @property
    def dtype(self) -> torch.dtype:
        return self.quantizer.codebooks.dtype

    # -- states -------------------------------------------------------------------------------
    # Allocated as normal tensors even under torch.inference_mode, so that a state made there can
    # still be updated in place outside it (and the reverse).

    @torch.inference_mode(False)
    def init_encoder_state(self, batch: int, max_chunk_frames: int = 1) -> MimiEncoderState:
        dev, dt, c = self.device, self.dtype, self.config
        return MimiEncoderState(
            seanet=self.encoder.init_state(batch, dev, dt),
            transformer=self.encoder_transformer.init_state(batch, max_chunk_frames * c.downsample_stride, dev, dt),
            downsample=self.downsample.init_state(batch, dev, dt),
            max_chunk_frames=max_chunk_frames,
        )

    @torch.inference_mode(False)
    def init_decoder_state(self, batch: int, max_chunk_frames: int = 1) -> MimiDecoderState:
        dev, dt, c = self.device, self.dtype, self.config
        return MimiDecoderState(
            upsample=self.upsample.init_state(batch, dev, dt),
            transformer=self.decoder_transformer.init_state(batch, max_chunk_frames * c.downsample_stride, dev, dt),
            seanet=self.decoder.init_state(batch, dev, dt),
            max_chunk_frames=max_chunk_frames,
        )

    # -- one streaming step: no checks, no host syncs -------------------------------------------

    def encode_step(self, wav: Tensor, state: MimiEncoderState, num_codebooks: int | None = None) -> Tensor:
        """wav [B, 1, L] -> codes [B, K, ceil(L / frame_size)], continuing each slot's stream.

        L should be a multiple of frame_size except for the last chunk of a stream.
        """
        c = self.config
        if wav.shape[-1] > state.max_chunk_frames * c.frame_size:
            raise ValueError(f"chunk of {wav.shape[-1]} samples exceeds the state's {state.max_chunk_frames} frames")
        h = self.encoder(wav, state.seanet)  # [B, dim, L / hop]
        h = self.encoder_transformer(h.transpose(1, 2), state.transformer).transpose(1, 2)
        z = self.downsample(h, state.downsample)  # [B, dim, frames]
        return self.quantizer.encode(z, num_codebooks or c.num_codebooks)

    def decode_step(self, codes: Tensor, state: MimiDecoderState) -> Tensor:
        """codes [B, K, n] -> pcm [B, 1, n * frame_size], continuing each slot's stream."""
        if codes.shape[-1] > state.max_chunk_frames:
            raise ValueError(f"chunk of {codes.shape[-1]} frames exceeds the state's {state.max_chunk_frames}")
        z = self.quantizer.decode(codes)  # [B, dim, n]
        h = self.upsample(z, state.upsample)  # [B, dim, 2n]
        h = self.decoder_transformer(h.transpose(1, 2), state.transformer).transpose(1, 2)
        return self.decoder(h, state.seanet)

    # -- whole sequences ------------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, wav: Tensor, num_codebooks: int | None = None) -> Tensor:
        """wav [B, 1, T] float at `sample_rate` -> codes [B, K, ceil(T / frame_size)] int64.

        Equal to the reference encoder for any length T (the last frame is zero-padded as it pads).
        """
        c = self.config
        _check_waveform(wav, c)
        k = num_codebooks or c.num_codebooks
        if not 1 <= k <= c.num_codebooks:
            raise ValueError(f"num_codebooks must be in 1..{c.num_codebooks}, got {k}")
        wav = wav.to(device=self.device, dtype=self.dtype)
        state = self.init_encoder_state(wav.shape[0], WHOLE_CHUNK_FRAMES)
        chunk = WHOLE_CHUNK_FRAMES * c.frame_size
        return torch.cat([self.encode_step(wav[..., i: i + chunk], state, k)
                          for i in range(0, wav.shape[-1], chunk)], dim=-1)

    @torch.no_grad()
    def encode_frames(self, wav: Tensor, num_codebooks: int | None = None) -> Tensor:
        """A mono waveform [T] -> codes [frames, K], the row layout of a CSM prompt."""
        if not isinstance(wav, Tensor) or wav.dim() != 1:
            shape = list(wav.shape) if isinstance(wav, Tensor) else type(wav).__name__
            raise ValueError(f"encode_frames takes a mono waveform [samples], got {shape}")
        return self.encode(wav[None, None], num_codebooks)[0].T

    @torch.no_grad()
    def decode(self, codes: Tensor) -> Tensor:
        """codes [B, K, n] -> pcm [B, 1, n * frame_size], equal to the reference's whole decode."""
        check_codes(codes, self.config)
        codes = codes.to(self.device)
        state = self.init_decoder_state(codes.shape[0], WHOLE_CHUNK_FRAMES)
        return torch.cat([self.decode_step(codes[..., i: i + WHOLE_CHUNK_FRAMES], state)
                          for i in range(0, codes.shape[-1], WHOLE_CHUNK_FRAMES)], dim=-1)

    # -- streams --------------------------------------------------------------------------------

    def streaming_decoder(self, num_slots: int, max_chunk_frames: int = 1) -> MimiStreamingDecoder:
        return MimiStreamingDecoder(self, num_slots, max_chunk_frames)

    def streaming_encoder(self, num_slots: int, max_chunk_frames: int = 1,
                          num_codebooks: int | None = None) -> MimiStreamingEncoder:
        return MimiStreamingEncoder(self, num_slots, max_chunk_frames, num_codebooks)


def _slot_mask(slot_mask, num_slots: int, device) -> Tensor:
    if slot_mask is None:
        return torch.ones(num_slots, dtype=torch.bool, device=device)
    mask = torch.as_tensor(slot_mask, device=device)
    if mask.dtype != torch.bool or mask.shape != (num_slots,):
        raise ValueError(f"slot_mask must be a bool tensor [{num_slots}], got {mask.dtype} {list(mask.shape)}")
    return mask


class MimiStreamingDecoder:
    """`num_slots` independent decode streams with all state preallocated.

    `decode(codes [num_slots, K, n])` continues every slot by n frames and returns their audio;
    `reset(slot_mask)` starts fresh streams in the masked slots. `step` is the sync-free,
    unvalidated core (at most `max_chunk_frames` frames) to compile or capture in a CUDA graph.
    """

    def __init__(self, mimi: Mimi, num_slots: int, max_chunk_frames: int = 1):
        if num_slots < 1 or max_chunk_frames < 1:
            raise ValueError(f"need num_slots >= 1 and max_chunk_frames >= 1, got {num_slots}, {max_chunk_frames}")
        self.mimi, self.num_slots, self.max_chunk_frames = mimi, num_slots, max_chunk_frames
        self.state = mimi.init_decoder_state(num_slots, max_chunk_frames)

    @torch.no_grad()
    def step(self, codes: Tensor) -> Tensor:
        """codes [num_slots, K, n <= max_chunk_frames] int64 on the model's device -> pcm [num_slots, 1, n * 1920]."""
        return self.mimi.decode_step(codes, self.state)

    @torch.no_grad()
    def decode(self, codes: Tensor) -> Tensor:
        """Validated: codes [num_slots, K, n] for any n >= 1 -> pcm [num_slots, 1, n * frame_size]."""
        check_codes(codes, self.mimi.config, self.num_slots)
        codes = codes.to(self.mimi.device)
        c = self.max_chunk_frames
        return torch.cat([self.step(codes[..., i: i + c]) for i in range(0, codes.shape[-1], c)], dim=-1)

    @torch.no_grad()
    def reset(self, slot_mask: Tensor | None = None) -> None:
        """Restart the masked slots (all when None); the others keep their streams."""
        self.state.reset(_slot_mask(slot_mask, self.num_slots, self.mimi.device))


class MimiStreamingEncoder:
    """`num_slots` independent encode streams: `encode(wav [num_slots, 1, n * frame_size])` -> codes [num_slots, K, n].

    `step` is the sync-free, unvalidated core (at most `max_chunk_frames` frames).
    """

    def __init__(self, mimi: Mimi, num_slots: int, max_chunk_frames: int = 1, num_codebooks: int | None = None):
        if num_slots < 1 or max_chunk_frames < 1:
            raise ValueError(f"need num_slots >= 1 and max_chunk_frames >= 1, got {num_slots}, {max_chunk_frames}")
        self.mimi, self.num_slots, self.max_chunk_frames = mimi, num_slots, max_chunk_frames
        self.num_codebooks = num_codebooks or mimi.config.num_codebooks
        self.state = mimi.init_encoder_state(num_slots, max_chunk_frames)

    @torch.no_grad()
    def step(self, wav: Tensor) -> Tensor:
        """wav [num_slots, 1, n * frame_size], n <= max_chunk_frames -> codes [num_slots, K, n]; sync-free."""
        return self.mimi.encode_step(wav, self.state, self.num_codebooks)

    @torch.no_grad()
    def encode(self, wav: Tensor) -> Tensor:
        c = self.mimi.config
        _check_waveform(wav, c)
        if wav.shape[0] != self.num_slots or wav.shape[-1] % c.frame_size:
            raise ValueError(
                f"streaming encode takes [{self.num_slots}, {c.channels}, k * {c.frame_size}] samples, "
                f"got {list(wav.shape)}"
            )
        wav = wav.to(device=self.mimi.device, dtype=self.mimi.dtype)
        chunk = self.max_chunk_frames * c.frame_size
        return torch.cat([self.step(wav[..., i: i + chunk]) for i in range(0, wav.shape[-1], chunk)], dim=-1)

    @torch.no_grad()
    def reset(self, slot_mask: Tensor | None = None) -> None:
        self.state.reset(_slot_mask(slot_mask, self.num_slots, self.mimi.device))
