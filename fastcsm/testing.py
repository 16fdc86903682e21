"""Tiny stand-ins for tests and benchmarks: a byte-level tokenizer and random checkpoints.

Real checkpoints are loaded by the same code paths; only the sizes differ. Writing a
transformers-format checkpoint needs the `transformers` package (a test dependency).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from .model.config import CsmConfig, tiny_config


def byte_tokenizer_json(bos_id: int = 128_000, eos_id: int = 128_001, **more_specials: int) -> dict:
    """A byte-level BPE tokenizer (no merges: one token per UTF-8 byte, ids 0..255) with the
    Llama-3 special tokens, at their real ids unless told otherwise. `more_specials` adds special
    tokens by content (`**{"<|AUDIO|>": 258}`)."""
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}

    def special(i, text):
        return {"id": i, "content": text, "single_word": False, "lstrip": False, "rstrip": False,
                "normalized": False, "special": True}

    specials = {"<|begin_of_text|>": bos_id, "<|end_of_text|>": eos_id, **more_specials}
    vocab.update(specials)  # in the model's vocabulary too, or `tokenizers` renumbers them from 256
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [special(i, text) for text, i in specials.items()],
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": False, "vocab": vocab, "merges": []},
    }


def write_tokenizer(root: str | Path, tokenizer: dict | None = None) -> Path:
    path = Path(root) / "tokenizer.json"
    path.write_text(json.dumps(tokenizer or byte_tokenizer_json()))
    return path


# A small text vocabulary whose specials are not at Llama-3's ids: bytes 0..255, then these.
SMALL_VOCAB_SPECIALS = {"<|begin_of_text|>": 260, "<|end_of_text|>": 261, "<|AUDIO|>": 262, "<|audio_eos|>": 263}
SMALL_TEXT_VOCAB = 272


def write_small_vocab_checkpoint(root: str | Path, seed: int = 0):
    """A tiny transformers-format CSM whose tokenizer is not Llama-3's: a text vocabulary of 272
    with its specials at 260..263 (see `SMALL_VOCAB_SPECIALS`), and a config.json that names the
    begin-of-text id but no `eos_token_id` (as transformers' own CSM config does). Returns the HF model."""
    root = Path(root)
    ids = SMALL_VOCAB_SPECIALS
    cfg = dataclasses.replace(tiny_config(), text_vocab_size=SMALL_TEXT_VOCAB, bos_token_id=ids["<|begin_of_text|>"])
    model = hf_model(cfg, seed, pad_token_id=ids["<|AUDIO|>"], audio_token_id=ids["<|AUDIO|>"],
                     audio_eos_token_id=ids["<|audio_eos|>"])
    model.save_pretrained(root)
    config = json.loads((root / "config.json").read_text())
    config.pop("eos_token_id", None)
    (root / "config.json").write_text(json.dumps(config, indent=2))
    bos, eos, *_ = ids.values()
    more = {k: v for k, v in ids.items() if v not in (bos, eos)}
    write_tokenizer(root, byte_tokenizer_json(bos, eos, **more))
    return model


def tiny_mimi_hf_config() -> dict:
    """fastcsm's tiny Mimi (real strides and codebook count, tiny widths) as a transformers `MimiConfig`."""
    from .codec.mimi import tiny_mimi_config

    return tiny_mimi_config().to_hf_dict()


def randomize_(module: torch.nn.Module, seed: int, std: float = 0.3) -> None:
    """Replace every weight with N(0, std) noise (norm scales near 1) so no weight hides a bug. The
    weights are drawn in state-dict order (the checkpoint's linears: a fused linear's parts get the
    numbers the separate linears would)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.state_dict().items():
            noise = torch.randn(p.shape, generator=g) * std
            p.copy_(1 + 0.1 * noise if name.endswith(("norm.weight", "layernorm.weight", "norm.scale")) else noise)


def hf_model(cfg: CsmConfig | None = None, seed: int = 0, **hf_config):
    """A random transformers `CsmForConditionalGeneration` with fastcsm's `cfg` shapes (fp32, eval);
    `hf_config` sets more transformers config fields (special ids)."""
    from transformers import CsmConfig as HFCsmConfig, CsmForConditionalGeneration

    cfg = cfg or tiny_config()
    d = cfg.to_hf_dict()
    d.pop("model_type")
    torch.manual_seed(seed)
    model = CsmForConditionalGeneration(HFCsmConfig(**{**d, **hf_config}, codec_config=tiny_mimi_hf_config()))
    randomize_(model.backbone_model, seed + 1)
    randomize_(model.depth_decoder, seed + 2)
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 3)
        for p in (model.lm_head.weight, model.embed_text_tokens.weight):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    model.backbone_model.embed_tokens.embed_audio_tokens.weight = model.depth_decoder.model.embed_tokens.weight
    _randomize_hf_codebooks_(model.codec_model, seed + 4)
    return model.eval()


def random_mimi(config=None, seed: int = 0):
    """fastcsm's Mimi (tiny by default) with random codebooks, so decoded audio depends on the
    codes (freshly built codebooks are all zero)."""
    from .codec.mimi import Mimi, tiny_mimi_config

    torch.manual_seed(seed)
    mimi = Mimi(config or tiny_mimi_config())
    with torch.no_grad():
        mimi.quantizer.codebooks.normal_()
    return mimi.eval()


def _randomize_hf_codebooks_(codec: torch.nn.Module, seed: int) -> None:
    """transformers' Mimi starts with all-zero codebooks (embed_sum 0): give them random entries."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, b in codec.named_buffers():
            if name.endswith("embed_sum"):
                b.copy_(torch.randn(b.shape, generator=g))
            elif name.endswith("cluster_usage"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g))
    for m in codec.modules():
        if hasattr(m, "_embed"):
            m._embed = None  # a cached codebook, derived from the buffers above


def write_hf_checkpoint(root: str | Path, cfg: CsmConfig | None = None, seed: int = 0, **save_kwargs):
    """Save a random transformers CSM (+ byte tokenizer) to `root`; returns the HF model."""
    root = Path(root)
    model = hf_model(cfg, seed)
    model.save_pretrained(root, **save_kwargs)
    write_tokenizer(root)
    return model


def run_alone(model, request, **engine_kw) -> torch.Tensor:
    """The codes [frames, K] of `request` generated alone, in an engine of one slot."""
    from .engine.engine import Engine

    return torch.stack([e.codes for e in Engine(model, max_slots=1, **engine_kw).run(request)])


def speech_ending_step(ends: dict[int, int]):
    """The real frame step, except that slot s says its end frame as its frame number `ends[s]`
    (from 0), as a trained model ends its speech; `ends` may change between steps."""
    from .engine.step import engine_step

    def step(model, mimi, state, *rest):
        engine_step(model, mimi, state, *rest)
        for slot, frame in ends.items():  # state.frame counts the frame just sampled
            if slot < state.codes.shape[0] and bool(state.active[slot]) and int(state.frame[slot]) == frame + 1:
                state.codes[slot] = model.cfg.codebook_eos_id

    return step


def run_together(engine, requests) -> list[torch.Tensor]:
    """The codes [frames, K] of each request, all added to `engine` and stepped together."""
    out = {r: [] for r in requests}
    for r in requests:
        engine.add(r)
    while any(r in engine for r in requests):
        for e in engine.step():
            if not e.ended:
                out[e.request].append(e.codes)
    return [torch.stack(out[r]) for r in requests]


def assert_compiled_step_equals_eager(model, requests, backend: str, atol: float = 1e-4, rtol: float = 1e-5,
                                      steps: int = 3) -> None:
    """Run `requests` in two engines over `model` to their first frame, then `steps` frame
    steps each: eager in one, `torch.compile(fullgraph=True)` with `backend` in the other. The
    codes and positions must be equal, the hidden state and backbone cache close."""
    from .engine.engine import Engine
    from .engine.step import frame_step
    from .nested import first_rows

    torch._dynamo.reset()
    B = len(requests)
    engines = [Engine(model, max_slots=B), Engine(model, max_slots=B)]
    for e in engines:
        for r in requests:
            e.add(r)
        while e.waiting:  # the same eager steps in both: prefill, and a first frame
            e.step()
    compiled = torch.compile(frame_step, fullgraph=True, dynamic=False, backend=backend)
    eager, comp = (e.buffers for e in engines)
    with torch.inference_mode():
        for _ in range(steps):
            for step, bufs in ((frame_step, eager), (compiled, comp)):
                step(model, bufs.state.rows(B), bufs.cache.rows(0, B), bufs.decoder_cache.rows(0, B),
                     first_rows(bufs.decoder_tables, B))
            assert torch.equal(eager.state.codes, comp.state.codes)
            assert torch.allclose(eager.state.h, comp.state.h, atol=atol, rtol=rtol)
            assert torch.equal(eager.state.pos, comp.state.pos)
            for a, b in zip(eager.cache.layers, comp.cache.layers, strict=True):
                assert torch.allclose(a, b, atol=atol, rtol=rtol)


# Whisper's shapes (d_model, layers, heads, ffn) by name, for random models of the real sizes.
WHISPER_SHAPES = {"test": (32, 1, 2, 64), "tiny": (384, 4, 6, 1536), "base": (512, 6, 8, 2048),
                  "small": (768, 12, 12, 3072)}
WHISPER_EN_VOCAB = 50_257  # byte-level tokens of the English-only models, before their special tokens


def write_tiny_whisper(root: str | Path, seed: int = 0, shape: str = "test") -> Path:
    """A random English-only Whisper (transformers' `WhisperForConditionalGeneration`, byte-level
    tokenizer) converted by CTranslate2's converter (what `ct2-transformers-converter` runs) into
    `root`/ct2, a directory faster-whisper loads. Its text is noise; its plumbing is the real one.
    `shape` "test" is tiny; "tiny", "base", "small" have Whisper's sizes, its vocabulary included
    (unused filler tokens), so that their speed is the real models'."""
    from ctranslate2.converters import TransformersConverter
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import (
        PreTrainedTokenizerFast,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
    )

    root = Path(root)
    hf, out = root / "hf", root / "ct2"
    specials = ["<|endoftext|>", "<|startoftranscript|>", "<|translate|>", "<|transcribe|>", "<|startoflm|>",
                "<|startofprev|>", "<|nocaptions|>", "<|notimestamps|>"]  # the converter adds the timestamps
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    if shape != "test":
        vocab.update({f"<filler{i}>": i for i in range(len(vocab), WHISPER_EN_VOCAB - 1)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    eot = tok.token_to_id("<|endoftext|>")
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=specials[0], bos_token=specials[0],
                            unk_token=specials[0]).save_pretrained(hf)
    timestamps = 1501  # <|0.00|> .. <|30.00|>
    dim, layers, heads, ffn = WHISPER_SHAPES[shape]
    cfg = WhisperConfig(vocab_size=tok.get_vocab_size() + timestamps, num_mel_bins=80, d_model=dim,
                        encoder_layers=layers, decoder_layers=layers, encoder_attention_heads=heads,
                        decoder_attention_heads=heads, encoder_ffn_dim=ffn, decoder_ffn_dim=ffn,
                        max_source_positions=1500, max_target_positions=448,
                        decoder_start_token_id=tok.token_to_id("<|startoftranscript|>"), eos_token_id=eot,
                        bos_token_id=eot, pad_token_id=eot, suppress_tokens=[], begin_suppress_tokens=[eot])
    torch.manual_seed(seed)
    WhisperForConditionalGeneration(cfg).eval().save_pretrained(hf)
    WhisperFeatureExtractor(feature_size=cfg.num_mel_bins).save_pretrained(hf)
    TransformersConverter(str(hf), copy_files=["tokenizer.json", "preprocessor_config.json"]).convert(str(out),
                                                                                                      force=True)
    return out
