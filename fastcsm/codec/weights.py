"""Load Mimi weights from every published layout into `fastcsm.codec.mimi.Mimi`.

Layouts (names after an optional prefix such as `codec_model.` inside a CSM checkpoint):
- `kyutai`: Kyutai's `tokenizer-e351c8d8-checkpoint125.safetensors` (`encoder.model.N.conv.conv.weight`,
  `encoder_transformer.transformer.layers.N.self_attn.in_proj_weight` fused q/k/v with RoPE on
  interleaved pairs, `quantizer.rvq_first.vq.layers.N._codebook.embedding_sum`, ...).
- `hf`: the transformers `MimiModel` checkpoint (`kyutai/mimi`, and `codec_model.*` in a transformers
  CSM checkpoint): `encoder.layers.N.conv.weight`, split `q_proj/k_proj/v_proj` permuted for
  rotate-half RoPE, `quantizer.semantic_residual_vector_quantizer.layers.N.codebook.embed_sum`, ...
  The nested in-memory names of recent transformers (`encoder.encoder_seanet.layers...`) are accepted.
- `fastcsm`: `Mimi.state_dict()` itself.

Each layout is described by one export function from fastcsm names (`_to_hf`, `_to_kyutai`). The
expected names and shapes of a layout are that function applied to a shape-only (meta) model, so a
missing, extra or mis-shaped tensor is reported in the layout's own names before anything is
converted; import is the inverse of the export. `export_state_dict` writes a model back out in
either layout.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from ..model.checkpoints import half_to_interleaved, interleaved_to_half
from .mimi import CausalConvTranspose1d, Mimi, MimiConfig

KYUTAI_FILENAME = "tokenizer-e351c8d8-checkpoint125.safetensors"
CSM_PREFIX = "codec_model."
LAYOUTS = ("kyutai", "hf", "fastcsm")

_CODEBOOK_EPS = 1e-5  # the reference's clamp on cluster_usage

# fastcsm (= transformers) transformer-layer names -> Kyutai's
_KYUTAI_LAYER_NAMES = {
    "input_layernorm": "norm1",
    "post_attention_layernorm": "norm2",
    "self_attn.o_proj": "self_attn.out_proj",
    "mlp.fc1": "linear1",
    "mlp.fc2": "linear2",
    "self_attn_layer_scale": "layer_scale_1",
    "mlp_layer_scale": "layer_scale_2",
}
# Names that newer moshi code writes for the same tensors.
_KYUTAI_ALIASES = [
    (re.compile(r"\.self_attn\.in_projs\.0\.weight$"), ".self_attn.in_proj_weight"),
    (re.compile(r"\.self_attn\.in_proj\.weight$"), ".self_attn.in_proj_weight"),
    (re.compile(r"\.self_attn\.out_projs\.0\.weight$"), ".self_attn.out_proj.weight"),
]
# transformers' nested in-memory names -> its flat checkpoint names
_HF_NESTED = [
    ("encoder.encoder_seanet.", "encoder."),
    ("encoder.encoder_transformer.", "encoder_transformer."),
    ("encoder.downsample.", "downsample."),
    ("decoder.upsample.", "upsample."),
    ("decoder.decoder_transformer.", "decoder_transformer."),
    ("decoder.decoder_seanet.", "decoder."),
]
_HF_RVQ = {
    "semantic": "quantizer.semantic_residual_vector_quantizer",
    "acoustic": "quantizer.acoustic_residual_vector_quantizer",
}
_KYUTAI_RVQ = {"semantic": "quantizer.rvq_first", "acoustic": "quantizer.rvq_rest"}
_OPTIONAL = re.compile(r"(^|\.)_?initialized$")  # training flags: accepted, never required


# ----------------------------------------------------------------------------------------------
# Export: fastcsm names -> a layout. Works on meta tensors, which is how expected shapes are made.
# ----------------------------------------------------------------------------------------------


def _rvq_part(j: int, c: MimiConfig) -> tuple[str, int]:
    return ("semantic", j) if j < c.num_semantic_codebooks else ("acoustic", j - c.num_semantic_codebooks)


def _export_codebooks(books: Tensor, c: MimiConfig, layout: str) -> dict[str, Tensor]:
    out = {}
    for j in range(books.shape[0]):
        part, i = _rvq_part(j, c)
        if layout == "hf":
            base = f"{_HF_RVQ[part]}.layers.{i}.codebook."
            names = ("embed_sum", "cluster_usage", "initialized")
        else:
            base = f"{_KYUTAI_RVQ[part]}.vq.layers.{i}._codebook."
            names = ("embedding_sum", "cluster_usage", "_initialized")
        # usage 1 makes embedding_sum the codebook itself: the round trip is exact.
        out[base + names[0]] = books[j]
        out[base + names[1]] = books.new_ones(books.shape[1])
        out[base + names[2]] = books.new_ones(1)
    return out


def _to_hf(sd: Mapping[str, Tensor], c: MimiConfig) -> dict[str, Tensor]:
    out = {}
    for name, t in sd.items():
        if name.endswith(".self_attn.qkv_proj.weight"):
            base = name[: -len("qkv_proj.weight")]
            q, k, v = t.chunk(3)
            out.update({base + "q_proj.weight": q, base + "k_proj.weight": k, base + "v_proj.weight": v})
        elif name == "quantizer.codebooks":
            out.update(_export_codebooks(t, c, "hf"))
        elif m := re.fullmatch(r"quantizer\.(semantic|acoustic)_(input|output)_proj\.weight", name):
            out[f"{_HF_RVQ[m[1]]}.{m[2]}_proj.weight"] = t
        else:
            out[name] = t
    return out


def _kyutai_conv_names(c: MimiConfig) -> set[str]:
    """fastcsm prefixes of the SEANet decoder layers that are transposed convolutions."""
    with torch.device("meta"):
        layers = Mimi(c).decoder.layers
    return {f"decoder.layers.{i}." for i, layer in enumerate(layers) if isinstance(layer, CausalConvTranspose1d)}


def _to_kyutai(sd: Mapping[str, Tensor], c: MimiConfig) -> dict[str, Tensor]:
    out = {}
    transposed = _kyutai_conv_names(c)
    for name, t in sd.items():
        if name == "quantizer.codebooks":
            out.update(_export_codebooks(t, c, "kyutai"))
            continue
        if m := re.fullmatch(r"quantizer\.(semantic|acoustic)_(input|output)_proj\.weight", name):
            out[f"{_KYUTAI_RVQ[m[1]]}.{m[2]}_proj.weight"] = t
            continue
        if m := re.fullmatch(r"(encoder|decoder)_transformer\.layers\.(\d+)\.(.+)\.(weight|bias|scale)", name):
            stack, layer, module, kind = m.groups()
            prefix = f"{stack}_transformer.transformer.layers.{layer}."
            if module == "self_attn.qkv_proj":
                q, k, v = t.chunk(3)
                t = torch.cat([half_to_interleaved(q, c.num_heads), half_to_interleaved(k, c.num_heads), v])
                out[prefix + "self_attn.in_proj_weight"] = t
            else:
                out[f"{prefix}{_KYUTAI_LAYER_NAMES[module]}.{kind}"] = t
            continue
        if m := re.fullmatch(r"(encoder|decoder)\.layers\.(\d+)\.(.*)conv\.(weight|bias)", name):
            stack, layer, inner, kind = m.groups()
            conv = "convtr.convtr" if f"{stack}.layers.{layer}." in transposed else "conv.conv"
            out[f"{stack}.model.{layer}.{inner}{conv}.{kind}"] = t
            continue
        if name == "downsample.conv.weight":
            out["downsample.conv.conv.conv.weight"] = t
        elif name == "upsample.conv.weight":
            out["upsample.convtr.convtr.convtr.weight"] = t
        else:
            raise AssertionError(f"no Kyutai name for fastcsm tensor {name}")
    return out


_EXPORT = {"hf": _to_hf, "kyutai": _to_kyutai, "fastcsm": lambda sd, c: dict(sd)}


def export_state_dict(mimi: Mimi, layout: str = "hf") -> dict[str, Tensor]:
    """The model's weights in a published layout ('hf' or 'kyutai'), loadable by `load_mimi`."""
    if layout not in _EXPORT:
        raise ValueError(f"unknown Mimi layout {layout!r}; known: {list(_EXPORT)}")
    return {k: v.detach().clone() for k, v in _EXPORT[layout](mimi.state_dict(), mimi.config).items()}


# ----------------------------------------------------------------------------------------------
# Import: a layout -> fastcsm names
# ----------------------------------------------------------------------------------------------


def _normalise_names(sd: Mapping[str, Tensor], layout: str) -> dict[str, Tensor]:
    out = {}
    for name, t in sd.items():
        if layout == "kyutai":
            for pattern, repl in _KYUTAI_ALIASES:
                name = pattern.sub(repl, name)
        elif layout == "hf":
            for nested, flat in _HF_NESTED:
                if name.startswith(nested):
                    name = flat + name[len(nested):]
                    break
        out[name] = t
    return out


def _import_codebooks(sd: Mapping[str, Tensor], c: MimiConfig, layout: str) -> Tensor:
    books = []
    for j in range(c.num_codebooks):
        part, i = _rvq_part(j, c)
        if layout == "hf":
            base, total = f"{_HF_RVQ[part]}.layers.{i}.codebook.", "embed_sum"
        else:
            base, total = f"{_KYUTAI_RVQ[part]}.vq.layers.{i}._codebook.", "embedding_sum"
        usage = sd[base + "cluster_usage"].float()
        books.append(sd[base + total].float() / usage.clamp(min=_CODEBOOK_EPS)[:, None])
    return torch.stack(books)


def _from_layout(sd: Mapping[str, Tensor], c: MimiConfig, layout: str) -> dict[str, Tensor]:
    """Inverse of the export: the fastcsm state dict. `sd` has been checked against the layout."""
    if layout == "fastcsm":
        return dict(sd)
    with torch.device("meta"):
        meta = Mimi(c).state_dict()
    # Plain renames pass the same tensor object through the export: invert them by identity.
    source_of = {id(t): name for name, t in _EXPORT[layout](meta, c).items()}
    out = {}
    for name, t in meta.items():
        if name == "quantizer.codebooks":
            out[name] = _import_codebooks(sd, c, layout)
        elif name.endswith(".self_attn.qkv_proj.weight") and layout == "hf":
            base = name[: -len("qkv_proj.weight")]
            out[name] = torch.cat([sd[base + p + "_proj.weight"] for p in "qkv"])
        elif name.endswith(".self_attn.qkv_proj.weight"):
            stack, layer = re.fullmatch(r"(\w+)_transformer\.layers\.(\d+)\..*", name).groups()
            q, k, v = sd[f"{stack}_transformer.transformer.layers.{layer}.self_attn.in_proj_weight"].chunk(3)
            out[name] = torch.cat([interleaved_to_half(q, c.num_heads), interleaved_to_half(k, c.num_heads), v])
        else:
            out[name] = sd[source_of[id(t)]]
    return out


def detect_layout(names) -> str:
    """'kyutai', 'hf' or 'fastcsm' from tensor names (prefix already removed)."""
    names = list(names)
    if "quantizer.codebooks" in names:
        return "fastcsm"
    if any(n.startswith(("encoder.model.", "decoder.model.", "quantizer.rvq_first.")) or
           "_transformer.transformer." in n for n in names):
        return "kyutai"
    if any(n.startswith(("encoder.layers.", "decoder.layers.", "encoder.encoder_seanet.", "decoder.decoder_seanet.")) or
           "residual_vector_quantizer" in n for n in names):
        return "hf"
    raise ValueError(
        "could not recognise these Mimi weights: expected Kyutai names (encoder.model.*), transformers "
        f"names (encoder.layers.*) or fastcsm names (quantizer.codebooks); found e.g. {names[:5]}"
    )


def _check_against(sd: Mapping[str, Tensor], expected: Mapping[str, Tensor], layout: str, prefix: str) -> None:
    problems = []
    for name, want in expected.items():
        if name not in sd:
            if not _OPTIONAL.search(name):
                problems.append(f"missing tensor '{prefix}{name}' (expected shape {list(want.shape)})")
        elif tuple(sd[name].shape) != tuple(want.shape):
            problems.append(
                f"tensor '{prefix}{name}' has shape {list(sd[name].shape)}, expected {list(want.shape)}"
            )
    for name, t in sd.items():
        if name not in expected:
            problems.append(f"unexpected tensor '{prefix}{name}' (shape {list(t.shape)})")
    if problems:
        more = f"\n  ... and {len(problems) - 12} more" if len(problems) > 12 else ""
        raise ValueError(
            f"Mimi weights ({layout} layout) do not match the config: {problems[0]}"
            + "".join(f"\n  {p}" for p in problems[1:12]) + more
            + "\n(check that the config matches the checkpoint, e.g. num_quantizers / hidden_size)"
        )


def mimi_from_state_dict(
    state_dict: Mapping[str, Tensor],
    config: MimiConfig | None = None,
    prefix: str = "",
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    layout: str | None = None,
) -> Mimi:
    """Build a Mimi from the tensors under `prefix` in `state_dict` (others are ignored).

    For a transformers CSM checkpoint: `mimi_from_state_dict(sd, MimiConfig.from_dict(csm_config),
    prefix="codec_model.")`. The layout is detected from the names unless given. Missing, extra or
    mis-shaped tensors raise ValueError naming the tensor and both shapes.
    """
    config = config or MimiConfig()
    sd = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not sd:
        raise ValueError(f"no Mimi tensors under prefix {prefix!r} ({len(state_dict)} tensors in the state dict)")
    layout = layout or detect_layout(sd)
    if layout not in LAYOUTS:
        raise ValueError(f"unknown Mimi layout {layout!r}; known: {LAYOUTS}")
    sd = _normalise_names(sd, layout)
    with torch.device("meta"):
        expected = _EXPORT[layout](Mimi(config).state_dict(), config)
    _check_against(sd, expected, layout, prefix)
    weights = _from_layout(sd, config, layout)
    mimi = Mimi(config)
    mimi.load_state_dict({k: v.to(torch.float32) for k, v in weights.items()}, strict=True)
    return mimi.to(device=device, dtype=dtype).eval()


# ----------------------------------------------------------------------------------------------
# Files and directories
# ----------------------------------------------------------------------------------------------


def _safetensors_names(files: list[Path]) -> list[str]:
    from safetensors import safe_open

    names = []
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            names.extend(f.keys())
    return names


def _read_safetensors(files: list[Path], prefix: str) -> dict[str, Tensor]:
    """Only the tensors under `prefix`: a CSM checkpoint's codec is a small part of it."""
    from safetensors import safe_open

    out = {}
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict: keys() is its API)
                if name.startswith(prefix):
                    out[name] = f.get_tensor(name)
    return out


def _weight_files(directory: Path) -> tuple[list[Path], list[str] | None]:
    """The safetensors files of a transformers-style directory, and the tensor names if indexed."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return sorted({directory / f for f in weight_map.values()}), list(weight_map)
    single = directory / "model.safetensors"
    if single.is_file():
        return [single], None
    kyutai = directory / KYUTAI_FILENAME
    candidates = [kyutai] if kyutai.is_file() else sorted(directory.glob("tokenizer-*.safetensors"))
    return candidates[:1], None


def _read_config(directory: Path) -> dict | None:
    cfg_file = directory / "config.json"
    if not cfg_file.is_file():
        return None
    cfg = json.loads(cfg_file.read_text())
    return cfg if cfg.get("model_type") in ("mimi", "csm") or "codec_config" in cfg else None


def _default_prefix(names) -> str:
    return CSM_PREFIX if any(n.startswith(CSM_PREFIX) for n in names) else ""


def _read_torch_file(path: Path) -> dict[str, Tensor]:
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        obj = obj["model"]  # moshi's training packages
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict")
    return dict(obj)


def load_mimi(
    source: str | Path | Mapping[str, Tensor],
    config: MimiConfig | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    prefix: str | None = None,
) -> Mimi:
    """Load Mimi from a state dict, a weights file or a directory, in any published layout.

    - a directory with `config.json` of a transformers Mimi (`kyutai/mimi`) or CSM checkpoint
      (the codec under `codec_model.`, read from `model.safetensors` or its sharded index, loading
      only the codec's tensors);
    - a directory holding Kyutai's `tokenizer-e351c8d8-checkpoint125.safetensors`;
    - a `.safetensors` or torch file;
    - a mapping of tensors.
    The config is `config` if given, else the `config.json` beside the weights (a Mimi config, or a
    CSM config's `codec_config`), else the published Mimi shapes. `prefix` defaults to `codec_model.`
    when such names are present, else none. Mimi is kept in fp32 unless `dtype` says otherwise
    (only fp32 is verified against the reference).
    """
    if isinstance(source, Mapping):
        sd = source
        prefix = _default_prefix(sd) if prefix is None else prefix
    else:
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"Mimi weights not found: {path}")
        directory = path if path.is_dir() else path.parent
        if config is None and (cfg := _read_config(directory)) is not None:
            config = MimiConfig.from_dict(cfg)
        if path.is_dir():
            files, names = _weight_files(path)
            if not files:
                raise FileNotFoundError(
                    f"no Mimi weights in {path}: expected model.safetensors (with config.json), "
                    f"model.safetensors.index.json, or Kyutai's {KYUTAI_FILENAME}"
                )
        elif path.suffix in (".safetensors", ".sft"):
            files, names = [path], None
        else:
            sd = _read_torch_file(path)
            prefix = _default_prefix(sd) if prefix is None else prefix
            return mimi_from_state_dict(sd, config, prefix=prefix, device=device, dtype=dtype)
        if prefix is None:
            prefix = _default_prefix(names if names is not None else _safetensors_names(files))
        if names is not None:  # sharded: open only the shards that hold the codec
            weight_map = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
            files = sorted({path / f for n, f in weight_map.items() if n.startswith(prefix)})
        sd = _read_safetensors(files, prefix)
    return mimi_from_state_dict(sd, config, prefix=prefix, device=device, dtype=dtype)
