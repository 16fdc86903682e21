"""Shapes of the CSM network as dataclasses with named presets (Mimi's are `mimi.MimiConfig`).

A `CsmConfig` holds two `TransformerConfig`s (backbone and depth decoder) plus the vocabularies.
It can be built from a preset name (`csm-1b`, `tiny`, ...) or read from a checkpoint's
`config.json` in either published format (Hugging Face `CsmForConditionalGeneration`, or the
original Sesame `{"backbone_flavor": "llama-1B", ...}` form).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3 frequency scaling, in the original checkpoint's convention.

    Hugging Face writes the same curve with other numbers (e.g. low 0.125 / high 0.5 / original
    1024 for the backbone); only the wavelengths `original / low` and `original / high` matter,
    so `from_hf` normalises to this form.
    """

    factor: float = 32.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_context: int = 8192

    @staticmethod
    def from_hf(params: dict) -> RopeScaling | None:
        kind = params.get("rope_type", params.get("type", "default"))
        if kind == "default":
            return None
        if kind != "llama3":
            raise ValueError(f"unsupported rope_type {kind!r} in config.json (expected 'llama3' or 'default')")
        original = float(params["original_max_position_embeddings"])
        low, high = float(params["low_freq_factor"]), float(params["high_freq_factor"])
        # Same wavelength band, expressed against the 8192-step convention when that is exact.
        scale = 8192.0 / original
        if math.isclose(low * scale, round(low * scale)) and math.isclose(high * scale, round(high * scale)):
            return RopeScaling(float(params["factor"]), low * scale, high * scale, 8192)
        return RopeScaling(float(params["factor"]), low, high, int(original))

    def to_hf(self, theta: float) -> dict:
        return {
            "rope_type": "llama3",
            "rope_theta": theta,
            "factor": self.factor,
            "low_freq_factor": self.low_freq_factor,
            "high_freq_factor": self.high_freq_factor,
            "original_max_position_embeddings": self.original_context,
        }


@dataclass(frozen=True)
class TransformerConfig:
    """One Llama-style decoder stack (pre-norm RMSNorm, GQA attention, SwiGLU MLP, RoPE)."""

    num_layers: int
    dim: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    max_seq_len: int  # positions the stack can see: 2048 for the backbone, 33 for the depth decoder
    head_dim: int = 0  # 0: dim // num_heads
    norm_eps: float = 1e-5
    rope_theta: float = 500_000.0
    rope_scaling: RopeScaling | None = field(default_factory=RopeScaling)

    def __post_init__(self):
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.dim // self.num_heads)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")

    def inv_freq(self) -> torch.Tensor:
        """RoPE inverse frequencies [head_dim // 2], fp32, with Llama-3 scaling if configured."""
        dim = self.head_dim
        inv = 1.0 / (self.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        s = self.rope_scaling
        if s is None:
            return inv
        low_wavelen = s.original_context / s.low_freq_factor
        high_wavelen = s.original_context / s.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / s.factor, inv)
        smooth = (s.original_context / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
        smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)

    def param_count(self) -> int:
        attn = self.dim * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
        mlp = 3 * self.dim * self.intermediate_size
        return self.num_layers * (attn + mlp + 2 * self.dim) + self.dim


@dataclass(frozen=True)
class CsmConfig:
    """The whole CSM network: backbone, depth decoder, vocabularies and special ids."""

    backbone: TransformerConfig
    decoder: TransformerConfig
    text_vocab_size: int = 128_256
    audio_vocab_size: int = 2051  # per codebook: Mimi codes 0..2047 plus padding ids
    num_codebooks: int = 32
    codebook_size: int = 2048  # valid Mimi codes are 0..codebook_size-1
    # <|begin_of_text|> / <|end_of_text|> as config.json gives them (None: it does not say). The
    # tokenizer decides the ids text rows use (prompt.TextTokenizer); these are its fallback.
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    codebook_eos_id: int = 0  # an all-zero frame ends an utterance
    codebook_pad_id: int = 2050
    frame_ms: int = 80  # one Mimi frame at 12.5 Hz

    @property
    def num_columns(self) -> int:
        """Columns of one prompt row: the codebooks, then the text token."""
        return self.num_codebooks + 1

    @property
    def text_column(self) -> int:
        return self.num_codebooks

    @property
    def max_seq_len(self) -> int:
        return self.backbone.max_seq_len

    def param_count(self) -> int:
        b, d = self.backbone, self.decoder
        emb = self.text_vocab_size * b.dim + self.num_codebooks * self.audio_vocab_size * b.dim
        heads = self.audio_vocab_size * b.dim + d.dim * b.dim + (self.num_codebooks - 1) * d.dim * self.audio_vocab_size
        return emb + heads + b.param_count() + d.param_count()

    # -- reading and writing config.json -------------------------------------------------------

    @staticmethod
    def from_json(path: str | Path) -> CsmConfig:
        with open(path) as f:
            return CsmConfig.from_dict(json.load(f))

    @staticmethod
    def from_dict(cfg: dict) -> CsmConfig:
        """Read either published `config.json`: transformers' `csm`, or Sesame's flavour names."""
        if cfg.get("model_type") == "csm" or "depth_decoder_config" in cfg:
            return _from_hf_dict(cfg)
        if "backbone_flavor" in cfg:
            return _from_sesame_dict(cfg)
        raise ValueError(
            "config.json is neither a transformers CSM config (model_type 'csm') nor a Sesame CSM config "
            f"('backbone_flavor'); found keys {sorted(cfg)}"
        )

    def to_hf_dict(self) -> dict:
        """The transformers `CsmConfig` fields for these shapes (used to build oracles in tests)."""
        b, d = self.backbone, self.decoder

        def stack(t: TransformerConfig) -> dict:
            return dict(
                hidden_size=t.dim,
                intermediate_size=t.intermediate_size,
                num_hidden_layers=t.num_layers,
                num_attention_heads=t.num_heads,
                num_key_value_heads=t.num_kv_heads,
                head_dim=t.head_dim,
                max_position_embeddings=t.max_seq_len,
                rms_norm_eps=t.norm_eps,
                rope_parameters=(
                    t.rope_scaling.to_hf(t.rope_theta)
                    if t.rope_scaling
                    else {"rope_type": "default", "rope_theta": t.rope_theta}
                ),
            )

        return dict(
            model_type="csm",
            **stack(b),
            text_vocab_size=self.text_vocab_size,
            vocab_size=self.audio_vocab_size,
            num_codebooks=self.num_codebooks,
            **({"bos_token_id": self.bos_token_id} if self.bos_token_id is not None else {}),
            **({"eos_token_id": self.eos_token_id} if self.eos_token_id is not None else {}),
            codebook_eos_token_id=self.codebook_eos_id,
            codebook_pad_token_id=self.codebook_pad_id,
            depth_decoder_config=dict(
                **stack(d),
                backbone_hidden_size=b.dim,
                vocab_size=self.audio_vocab_size,
                num_codebooks=self.num_codebooks,
            ),
        )


def _stack_from_hf(c: dict, default_max: int) -> TransformerConfig:
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    theta = float(rope.get("rope_theta", c.get("rope_theta", 500_000.0)))
    return TransformerConfig(
        num_layers=c["num_hidden_layers"],
        dim=c["hidden_size"],
        num_heads=c["num_attention_heads"],
        num_kv_heads=c.get("num_key_value_heads") or c["num_attention_heads"],
        intermediate_size=c["intermediate_size"],
        max_seq_len=c.get("max_position_embeddings", default_max),
        head_dim=c.get("head_dim") or 0,
        norm_eps=c.get("rms_norm_eps", 1e-5),
        rope_theta=theta,
        rope_scaling=RopeScaling.from_hf(rope) if rope else None,
    )


def _token_id(value) -> int | None:
    """A special-token id from config.json: an int, the first of a list, or None."""
    if isinstance(value, list):
        value = value[0] if value else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _from_hf_dict(cfg: dict) -> CsmConfig:
    dec = dict(cfg.get("depth_decoder_config") or {})
    return CsmConfig(
        backbone=_stack_from_hf(cfg, 2048),
        decoder=_stack_from_hf(dec, 33),
        text_vocab_size=cfg.get("text_vocab_size", 128_256),
        audio_vocab_size=cfg.get("vocab_size", 2051),
        num_codebooks=cfg.get("num_codebooks", 32),
        bos_token_id=_token_id(cfg.get("bos_token_id")),
        eos_token_id=_token_id(cfg.get("eos_token_id")),
        codebook_eos_id=cfg.get("codebook_eos_token_id", 0),
        codebook_pad_id=cfg.get("codebook_pad_token_id", 2050),
    )


# Sesame's reference names its stacks by flavour (torchtune llama3_2 builders).
FLAVORS: dict[str, TransformerConfig] = {
    "llama-1B": TransformerConfig(num_layers=16, dim=2048, num_heads=32, num_kv_heads=8,
                                  intermediate_size=8192, max_seq_len=2048),
    "llama-100M": TransformerConfig(num_layers=4, dim=1024, num_heads=8, num_kv_heads=2,
                                    intermediate_size=8192, max_seq_len=2048),
    # The paper's larger sizes, for benchmarks only: no weights are public, and the decoder
    # shapes are estimates from the published parameter counts.
    "llama-3B": TransformerConfig(num_layers=28, dim=3072, num_heads=24, num_kv_heads=8,
                                  intermediate_size=8192, max_seq_len=2048, head_dim=128),
    "llama-250M": TransformerConfig(num_layers=6, dim=1536, num_heads=12, num_kv_heads=4,
                                    intermediate_size=6144, max_seq_len=2048, head_dim=128),
    "llama-8B": TransformerConfig(num_layers=32, dim=4096, num_heads=32, num_kv_heads=8,
                                  intermediate_size=14336, max_seq_len=2048, head_dim=128),
    "llama-300M": TransformerConfig(num_layers=6, dim=1536, num_heads=12, num_kv_heads=4,
                                    intermediate_size=8192, max_seq_len=2048, head_dim=128),
    # Tiny stacks for tests: the real structure at a few hundred kilobytes.
    "tiny-backbone": TransformerConfig(num_layers=2, dim=64, num_heads=4, num_kv_heads=2,
                                       intermediate_size=128, max_seq_len=2048),
    "tiny-decoder": TransformerConfig(num_layers=2, dim=32, num_heads=4, num_kv_heads=2,
                                      intermediate_size=64, max_seq_len=2048, head_dim=16),
}


def _from_sesame_dict(cfg: dict) -> CsmConfig:
    try:
        backbone, decoder = FLAVORS[cfg["backbone_flavor"]], FLAVORS[cfg["decoder_flavor"]]
    except KeyError as e:
        raise ValueError(f"unknown CSM flavour {e.args[0]!r}; known: {sorted(FLAVORS)}") from None
    return CsmConfig(
        backbone=backbone,
        # The decoder only ever sees one frame: its positions restart at 0 every frame.
        decoder=dataclasses.replace(decoder, max_seq_len=cfg.get("audio_num_codebooks", 32) + 1),
        text_vocab_size=cfg.get("text_vocab_size", 128_256),
        audio_vocab_size=cfg.get("audio_vocab_size", 2051),
        num_codebooks=cfg.get("audio_num_codebooks", 32),
    )


def _preset(backbone: str, decoder: str) -> CsmConfig:
    return _from_sesame_dict({"backbone_flavor": backbone, "decoder_flavor": decoder})


def tiny_config(num_codebooks: int = 32) -> CsmConfig:
    """A CSM of a few megabytes for tests: real vocabularies and codebook count, tiny widths."""
    return _from_sesame_dict({"backbone_flavor": "tiny-backbone", "decoder_flavor": "tiny-decoder",
                              "audio_num_codebooks": num_codebooks})


PRESETS = {
    "csm-1b": lambda: _preset("llama-1B", "llama-100M"),
    "csm-3b": lambda: _preset("llama-3B", "llama-250M"),
    "csm-8b": lambda: _preset("llama-8B", "llama-300M"),
    "tiny": tiny_config,
}


def preset(name: str) -> CsmConfig:
    try:
        return PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown CSM preset {name!r}; known: {sorted(PRESETS)}") from None
