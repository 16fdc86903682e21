"""Find CSM weights (local directory or hub repo id) and load every published format.

Formats:
- Hugging Face transformers (`CsmForConditionalGeneration`): `config.json` with model_type
  "csm", `model.safetensors` or sharded safetensors with `model.safetensors.index.json`. The
  codec lives in the same files under `codec_model.*`.
- Original Sesame: `model.safetensors` or `ckpt.pt` with torchtune names, `config.json` with
  `backbone_flavor` (or no config: the shapes are then matched against known flavours). Its q/k
  rows are in the interleaved-pair RoPE order and are permuted here to rotate-half.

Tensors are read one at a time, converted to the target device and dtype, and assigned into a
model built on the meta device (the parts of a fused q/k/v or gate/up linear straight into its
stacked rows, `model.FusedState`), so a checkpoint never sits in memory twice.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from . import quant
from .config import FLAVORS, CsmConfig
from .network import CSM, FusedState


class CheckpointError(ValueError):
    """The checkpoint is missing, of an unknown format, or does not fit the model."""


# -- finding the files ------------------------------------------------------------------------

# Fetched first: configs, the shard index and the tokenizer (small). Then the weights of one
# format only: a repo may carry both the transformers safetensors and the original ckpt.pt.
SMALL_PATTERNS = ["*.json", "*.model", "*.txt"]
# Weight files to fetch, in order of preference: the first that the repo has is taken.
CSM_WEIGHTS = (["*.safetensors"], ["ckpt.pt"])


def resolve(path_or_repo: str | os.PathLike, weights: tuple[list[str], ...] = CSM_WEIGHTS) -> Path:
    """A local directory (or a weights file inside one), else a hub repo id fetched through
    huggingface_hub (with its progress bars; from the local cache when offline). From a repo,
    only the first of the `weights` pattern lists that matches files is downloaded."""
    path = Path(path_or_repo).expanduser()
    if path.is_file():
        return path.parent
    if path.is_dir():
        return path
    name = str(path_or_repo)
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise CheckpointError(f"{name!r} is neither an existing directory nor a hub repo id like 'sesame/csm-1b'")
    try:
        return _download(name, weights, local_only=False)
    except Exception as online_error:  # network down, gated repo, unknown id...
        try:
            return _download(name, weights, local_only=True)
        except Exception:
            raise CheckpointError(
                f"could not download {name!r} and it is not in the local hub cache ({online_error}). "
                "If the repo is gated, accept its terms on huggingface.co and run `huggingface-cli login`; "
                "or pass the path of a directory that holds the weights."
            ) from online_error


def _download(repo: str, weights: tuple[list[str], ...], local_only: bool) -> Path:
    from huggingface_hub import snapshot_download

    def fetch(patterns):
        return Path(snapshot_download(repo, allow_patterns=patterns, local_files_only=local_only))

    root = fetch(SMALL_PATTERNS)
    for patterns in weights:
        root = fetch(patterns)
        if any(f for p in patterns for f in root.glob(p)):
            break
    return root


@dataclass
class CheckpointFiles:
    root: Path
    format: str  # "hf" or "sesame"
    config: CsmConfig
    weights: list[Path]
    quantization: str | None = None  # "int8"/"fp8" for a checkpoint written by `fastcsm quantize`
    config_dict: dict | None = None  # config.json as read (or as inferred from the tensors)


def inspect(root: Path) -> CheckpointFiles:
    """Decide the format of the checkpoint in `root` and read (or infer) its config."""
    cfg_path = root / "config.json"
    raw = json.loads(cfg_path.read_text()) if cfg_path.is_file() else None
    index = root / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        weights = [root / s for s in shards]
        missing = [str(w) for w in weights if not w.is_file()]
        if missing:
            raise CheckpointError(f"{index} names shards that are not there: {missing}")
    elif (root / "model.safetensors").is_file():
        weights = [root / "model.safetensors"]
    elif (root / "ckpt.pt").is_file():
        weights = [root / "ckpt.pt"]
    else:
        raise CheckpointError(
            f"no CSM weights in {root}: expected model.safetensors, model.safetensors.index.json with shards, "
            "or ckpt.pt"
        )
    stored = (raw or {}).get("quantization", {}).get("method")
    if stored is not None and stored not in ("int8", "fp8"):
        raise CheckpointError(f"{cfg_path} names an unknown quantization {stored!r} (known: int8, fp8)")
    if raw is not None and (raw.get("model_type") == "csm" or "depth_decoder_config" in raw):
        return CheckpointFiles(root, "hf", CsmConfig.from_dict(raw), weights, stored, raw)
    if raw is not None and "backbone_flavor" in raw:
        return CheckpointFiles(root, "sesame", CsmConfig.from_dict(raw), weights, stored, raw)
    if raw is not None and raw.get("model_type") not in (None, "csm"):
        raise CheckpointError(f"{cfg_path} describes a {raw.get('model_type')!r} model, not CSM")
    with TensorReader(weights) as reader:
        names = set(reader.names())
        if not any(n.startswith("backbone.layers.") for n in names):
            raise CheckpointError(f"unknown checkpoint format in {root}: no config.json and no Sesame tensor names")
        raw = _infer_sesame_dict(reader)
        return CheckpointFiles(root, "sesame", CsmConfig.from_dict(raw), weights, None, raw)


def _infer_sesame_dict(reader: TensorReader) -> dict:
    """Match a config-less original checkpoint against the known flavours by its shapes."""

    def flavor(prefix: str) -> str:
        layers = len({n.split(".")[2] for n in reader.names() if n.startswith(f"{prefix}.layers.")})
        dim = reader.shape(f"{prefix}.norm.scale")[0]
        hidden = reader.shape(f"{prefix}.layers.0.mlp.w1.weight")[0]
        for name, f in FLAVORS.items():
            if (f.num_layers, f.dim, f.intermediate_size) == (layers, dim, hidden):
                return name
        raise CheckpointError(
            f"the {prefix} has {layers} layers of width {dim} (MLP {hidden}), which matches no known flavour; "
            "add a config.json with backbone_flavor/decoder_flavor"
        )

    text_vocab = reader.shape("text_embeddings.weight")[0]
    k_minus_1, _, audio_vocab = reader.shape("audio_head")
    return {
        "backbone_flavor": flavor("backbone"), "decoder_flavor": flavor("decoder"),
        "text_vocab_size": text_vocab, "audio_vocab_size": audio_vocab, "audio_num_codebooks": k_minus_1 + 1,
    }


# -- reading tensors one at a time ------------------------------------------------------------

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


class SafetensorsFile:
    """One safetensors file, each tensor read with plain reads into its own memory. Unlike a
    memory map, the file's pages never count towards the process (peak RSS while loading is the
    model being built plus one tensor)."""

    def __init__(self, path: Path):
        self.path = path
        self.file = open(path, "rb")  # noqa: SIM115 (held open for reads tensor by tensor; see close)
        n = int.from_bytes(self.file.read(8), "little")
        header = json.loads(self.file.read(n))
        header.pop("__metadata__", None)
        self.header, self.base = header, 8 + n

    def keys(self) -> list[str]:
        return list(self.header)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def get_tensor(self, name: str) -> torch.Tensor:
        info = self.header[name]
        start, stop = info["data_offsets"]
        dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise CheckpointError(f"{self.path}: tensor {name!r} has an unsupported dtype {info['dtype']}")
        if stop == start:
            return torch.empty(info["shape"], dtype=dtype)
        data = bytearray(stop - start)
        self.file.seek(self.base + start)
        if self.file.readinto(data) != len(data):
            raise CheckpointError(f"{self.path} is truncated: tensor {name!r} is cut short")
        return torch.frombuffer(data, dtype=dtype).reshape(info["shape"])

    def close(self) -> None:
        self.file.close()


class TensorReader:
    """Lazy access to the tensors of one or more safetensors files or a torch `ckpt.pt`."""

    def __init__(self, files: list[Path]):
        self.files = files
        self._where: dict[str, object] = {}
        self._handles = []

    def __enter__(self) -> TensorReader:
        for f in self.files:
            if f.suffix == ".safetensors":
                try:
                    h = SafetensorsFile(f)
                except (ValueError, UnicodeDecodeError) as e:
                    raise CheckpointError(f"{f} is not a valid safetensors file: {e}") from e
                self._handles.append(h)
                for name in h.keys():  # noqa: SIM118 (a reader's names, not a dict)
                    self._where[name] = h
            else:
                state = torch.load(str(f), map_location="cpu", mmap=True, weights_only=True)
                state = state.get("model", state) if isinstance(state, dict) else state
                if not isinstance(state, dict):
                    raise CheckpointError(f"{f} does not hold a state dict")
                self._handles.append(state)
                for name in state:
                    self._where[name] = state
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            if isinstance(h, SafetensorsFile):
                h.close()
        self._handles.clear()
        self._where.clear()

    def names(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        src = self._where[name]
        if isinstance(src, dict):
            return tuple(src[name].shape)
        return src.shape(name)

    def get(self, name: str) -> torch.Tensor:
        src = self._where[name]
        return src[name] if isinstance(src, dict) else src.get_tensor(name)


# -- name maps --------------------------------------------------------------------------------

_HF_LAYER = {
    "self_attn.q_proj.weight": "attn.q_proj.weight",
    "self_attn.k_proj.weight": "attn.k_proj.weight",
    "self_attn.v_proj.weight": "attn.v_proj.weight",
    "self_attn.o_proj.weight": "attn.output_proj.weight",
    "mlp.gate_proj.weight": "mlp.w1.weight",
    "mlp.down_proj.weight": "mlp.w2.weight",
    "mlp.up_proj.weight": "mlp.w3.weight",
    "input_layernorm.weight": "sa_norm.scale",
    "post_attention_layernorm.weight": "mlp_norm.scale",
}
_HF_TOP = {
    "embed_text_tokens.weight": "text_embeddings.weight",
    "backbone_model.embed_tokens.embed_audio_tokens.weight": "audio_embeddings.weight",
    "depth_decoder.model.embed_tokens.weight": "audio_embeddings.weight",  # tied copy
    "lm_head.weight": "codebook0_head.weight",
    "depth_decoder.model.inputs_embeds_projector.weight": "projection.weight",
    "depth_decoder.codebooks_head.weight": "audio_head",
    "backbone_model.norm.weight": "backbone.norm.scale",
    "depth_decoder.model.norm.weight": "decoder.norm.scale",
}
_HF_STACKS = {"backbone_model.layers.": "backbone.layers.", "depth_decoder.model.layers.": "decoder.layers."}
# Buffers some exporters save that carry no weights.
_IGNORED = re.compile(r"(rotary_emb\.inv_freq|pos_embeddings\.(theta|cache)|kv_cache\.|_causal_mask)")
CODEC_PREFIX = "codec_model."


def hf_name(name: str) -> str | None:
    """transformers name -> fastcsm name (None for tensors that are not part of the network)."""
    if name in _HF_TOP:
        return _HF_TOP[name]
    for src, dst in _HF_STACKS.items():
        if name.startswith(src):
            idx, rest = name[len(src):].split(".", 1)
            if rest in _HF_LAYER:
                return f"{dst}{idx}.{_HF_LAYER[rest]}"
    return None


def interleaved_to_half(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder q/k projection rows from interleaved-pair RoPE, which rotates rows (0,1),(2,3)...
    of each head (Sesame's original checkpoints, Kyutai's Mimi), to rotate-half RoPE, which
    rotates rows i and i + head_dim/2 (fastcsm, transformers). The one place this is written."""
    out, d = w.shape
    return w.reshape(heads, out // heads // 2, 2, d).transpose(1, 2).reshape(out, d)


def half_to_interleaved(w: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse of `interleaved_to_half`."""
    out, d = w.shape
    return w.reshape(heads, 2, out // heads // 2, d).transpose(1, 2).reshape(out, d)


_QK = re.compile(r"^(backbone|decoder)\.layers\.\d+\.attn\.(q|k)_proj\.weight$")


def _rope_heads(name: str, cfg: CsmConfig) -> int | None:
    m = _QK.match(name)
    if not m:
        return None
    stack = cfg.backbone if m.group(1) == "backbone" else cfg.decoder
    return stack.num_heads if m.group(2) == "q" else stack.num_kv_heads


def to_sesame_state_dict(state: dict[str, torch.Tensor], cfg: CsmConfig) -> dict[str, torch.Tensor]:
    """fastcsm state dict -> original Sesame naming and RoPE order (for export and tests)."""
    out = {}
    for name, t in state.items():
        heads = _rope_heads(name, cfg)
        out[name] = half_to_interleaved(t, heads).contiguous() if heads else t
    return out


# -- loading ----------------------------------------------------------------------------------

def load_weights(model: CSM, files: CheckpointFiles, device: torch.device, dtype: torch.dtype,
                 quantize: str | None = None) -> None:
    """Fill `model` (built on the meta device, `quant.prepare`d for `quantize`) from `files`,
    tensor by tensor: each weight is quantized as it arrives, so no full-precision copy of the
    model exists. The HF codec tensors (`codec_model.*`) are left for the codec loader
    (`iter_codec_tensors`)."""
    with torch.device("meta"):
        expected = {n: tuple(p.shape) for n, p in CSM(model.cfg).state_dict().items()}  # as checkpoints hold them
    loaded = FusedState(model)  # a fused linear's parts go straight into its stacked tensor
    done: set[str] = set()
    unexpected = []
    with TensorReader(files.weights) as reader:
        for name in reader.names():
            if files.quantization and name.endswith(quant.SCALE_SUFFIX):
                continue  # read with its tensor
            if files.format == "hf":
                if name.startswith(CODEC_PREFIX):
                    continue
                target = hf_name(name)
            else:
                target = name if name in expected else None
            if target is None:
                if not _IGNORED.search(name):
                    unexpected.append(name)
                continue
            found = reader.shape(name)
            if found != expected[target]:
                raise CheckpointError(
                    f"tensor {name!r} has shape {list(found)}, expected {list(expected[target])} for this config"
                )
            if target in done:  # the tied audio table saved under both names
                continue
            t = reader.get(name)
            scale = reader.get(name + quant.SCALE_SUFFIX) if quant.stored_mode(t) else None
            heads = _rope_heads(target, model.cfg) if files.format == "sesame" else None
            if heads:
                t = interleaved_to_half(t, heads)
                scale = interleaved_to_half(scale[:, None], heads)[:, 0] if scale is not None else None
            loaded.add(quant.convert(target, t, scale, quantize, device, dtype))
            done.add(target)
        if unexpected:
            raise CheckpointError(f"checkpoint holds tensors this model does not have: {sorted(unexpected)[:10]}")
        missing = sorted(set(expected) - done)
        if missing:
            raise CheckpointError(
                "checkpoint lacks tensors: " + ", ".join(f"{n} {list(expected[n])}" for n in missing[:10])
            )
    model.load_state_dict(loaded, assign=True, strict=True)


def unavailable_device(device) -> str | None:
    """Why `device` cannot run here, in words for any caller (None: it can)."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        return "PyTorch sees no CUDA GPU"
    if device.type == "mps" and not torch.backends.mps.is_available():
        return "Apple's MPS is not available"
    return None


def resolve_device_dtype(device=None, dtype=None) -> tuple[torch.device, torch.dtype]:
    """Defaults: CUDA if present with bf16, else CPU with fp32. Refuses what the device cannot run."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    reason = unavailable_device(device)
    if reason:
        raise ValueError(f"device {device.type!r} was asked for, but {reason}; use device='cpu'")
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        names = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
                 "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
        if dtype not in names:
            raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(names)}")
        dtype = names[dtype]
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype {dtype} is not supported: use float32, bfloat16 or float16")
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise ValueError(f"this GPU ({torch.cuda.get_device_name(device)}) cannot run bfloat16; use dtype=float16")
    return device, dtype


def load_model(path_or_repo, device=None, dtype=None, quantize=None) -> tuple[CSM, CheckpointFiles]:
    """quantize: "int8"/"fp8" quantizes while loading; None keeps the checkpoint's own precision
    (8-bit for one written by `fastcsm quantize`); "none" loads full precision."""
    device, dtype = resolve_device_dtype(device, dtype)
    files = inspect(resolve(path_or_repo))
    mode = quant.check_mode(files.quantization if quantize is None else quantize, device)
    with torch.device("meta"):
        model = quant.prepare(CSM(files.config), mode)
    load_weights(model, files, device, dtype, mode)
    model.init_buffers(device)
    return model.eval().requires_grad_(False), files


def write_quantized(path_or_repo, out_dir: str | os.PathLike, mode: str = "int8") -> Path:
    """Write a quantized copy of a checkpoint: the same format, names and shards, each quantized
    weight as 8 bits with its per-output-channel scales beside it (`NAME_scale`, fp32), config.json
    marked `"quantization": {"method": mode}`, the other files (tokenizer, codec tensors) as they
    are. Read shard by shard. `load_model` loads it directly, in 8 bits."""
    import shutil

    from safetensors.torch import save_file

    if quant.check_mode(mode) is None:
        raise ValueError("quantize to 'int8' or 'fp8'")
    root = resolve(path_or_repo)
    files = inspect(root)
    if files.quantization:
        raise CheckpointError(f"{root} is already quantized ({files.quantization})")
    out = Path(out_dir).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"{out} exists and is not an empty directory")
    out.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for src in files.weights:
        shard = src.name if src.suffix == ".safetensors" else "model.safetensors"
        tensors = {}
        with TensorReader([src]) as reader:
            for name in reader.names():
                t = reader.get(name)
                target = hf_name(name) if files.format == "hf" else name
                if target is not None and quant.QUANTIZED.match(target):
                    w = t.transpose(1, 2) if target == "audio_head" else t  # rows are output channels
                    q, s = quant.to_checkpoint(target, *quant.quantize(w, mode))
                    tensors[name], tensors[name + quant.SCALE_SUFFIX] = q, s
                else:
                    tensors[name] = t.contiguous().clone() if src.suffix != ".safetensors" else t
        save_file(tensors, str(out / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, shard))
        del tensors
    if len(files.weights) > 1:
        index = {"metadata": {}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = dict(files.config_dict, quantization={"method": mode, "scales": "per_output_channel",
                                                   "scale_suffix": quant.SCALE_SUFFIX})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    weights = {p.name for p in files.weights} | {"config.json", "model.safetensors.index.json"}
    for f in root.iterdir():
        if f.is_file() and f.name not in weights:
            shutil.copy2(f, out / f.name)
    return out


def iter_codec_tensors(files: CheckpointFiles) -> Iterator[tuple[str, torch.Tensor]]:
    """The `codec_model.*` tensors of an HF checkpoint, prefix removed."""
    if files.format != "hf":
        return
    with TensorReader(files.weights) as reader:
        for name in reader.names():
            if name.startswith(CODEC_PREFIX):
                yield name[len(CODEC_PREFIX):], reader.get(name)
