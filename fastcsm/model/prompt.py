"""Text tokenizer, conversation segments, and the [T, K+1] prompt rows the backbone reads.

A row has one column per codebook and a last column for the text token, with a boolean mask
saying which columns count. Text rows carry `<|begin_of_text|>[speaker]text<|end_of_text|>`
(with the tokenizer's ids for both; mask on the text column only); audio rows carry one Mimi
frame each (mask on the codebook columns), and every context audio ends with one all-zero EOS
frame. The prompt is every context segment (text rows, then audio rows) followed by the text
rows of the line to speak.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ..bounds import SPEAKER
from .config import CsmConfig

log = logging.getLogger("fastcsm")


BEGIN_OF_TEXT, END_OF_TEXT = "<|begin_of_text|>", "<|end_of_text|>"
LLAMA3_BOS_ID, LLAMA3_EOS_ID = 128_000, 128_001


def _template_ids(tokenizer) -> tuple[int | None, int | None]:
    """The ids a `TemplateProcessing` post-processor puts before and after a single text, if any."""
    post = json.loads(tokenizer.to_str()).get("post_processor") or {}
    steps = post.get("processors", []) if post.get("type") == "Sequence" else [post]
    for step in steps:
        if step.get("type") == "TemplateProcessing" and step.get("single"):
            single, specials = step["single"], step.get("special_tokens") or {}
            first = _special_id(single[0], specials)
            last = _special_id(single[-1], specials) if len(single) > 1 else None
            return first, last
    return None, None


def _special_id(item: dict, specials: dict) -> int | None:
    """The id of one template item when it is a special token of exactly one id."""
    ids = specials.get(item.get("SpecialToken", {}).get("id"), {}).get("ids") or []
    return ids[0] if len(ids) == 1 else None


class TextTokenizer:
    """The text tokenizer from a `tokenizer.json`, without its own special-token template.

    `bos_id` / `eos_id`, which every text row starts and ends with, are resolved once, here:
    from the tokenizer itself (its `<|begin_of_text|>` / `<|end_of_text|>` tokens, else what its
    post-processor template puts around a text, as Sesame's generator does), else from the
    checkpoint's `config.json` (`bos_token_id` / `eos_token_id`, given here), else Llama-3's ids.
    When the tokenizer and config.json disagree, the tokenizer wins with a warning: it is what
    wrote the training text, and both references (Sesame's generator, transformers' processor)
    take these ids from it.
    """

    def __init__(self, tokenizer, bos_token_id: int | None = None, eos_token_id: int | None = None):
        self._tok = tokenizer
        template = _template_ids(tokenizer)
        self.bos_id = _resolve_special("begin", BEGIN_OF_TEXT, tokenizer.token_to_id(BEGIN_OF_TEXT), template[0],
                                       "bos_token_id", bos_token_id, LLAMA3_BOS_ID)
        self.eos_id = _resolve_special("end", END_OF_TEXT, tokenizer.token_to_id(END_OF_TEXT), template[1],
                                       "eos_token_id", eos_token_id, LLAMA3_EOS_ID)

    @staticmethod
    def from_file(path: str | Path, bos_token_id: int | None = None, eos_token_id: int | None = None) -> TextTokenizer:
        from tokenizers import Tokenizer

        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"no tokenizer.json at {path}; pass tokenizer= a directory or file holding the Llama-3 tokenizer"
            )
        return TextTokenizer(Tokenizer.from_file(str(path)), bos_token_id, eos_token_id)

    @staticmethod
    def from_json(text: str | dict, bos_token_id: int | None = None, eos_token_id: int | None = None) -> TextTokenizer:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_str(text if isinstance(text, str) else json.dumps(text))
        return TextTokenizer(tok, bos_token_id, eos_token_id)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)


def _resolve_special(which: str, token: str, named: int | None, template: int | None, key: str,
                     configured: int | None, default: int) -> int:
    """One special id: the tokenizer's named token, its template's, config.json's, then Llama-3's."""
    if named is not None:
        found, source = named, f"its {token} token"
    elif template is not None:
        found, source = template, "its post-processor template"
    else:
        return default if configured is None else configured
    if configured is not None and configured != found:
        log.warning("the tokenizer's %s-of-text id is %d (%s) but config.json says %s=%d; using %d, the "
                    "tokenizer's: it wrote the text the model was trained on", which, found, source, key,
                    configured, found)
    return found


@dataclass
class Segment:
    """One turn of a conversation. `audio` is a 24 kHz mono waveform [samples]; `codes` are its
    Mimi codes [frames, K]. Give either (codes win if both are given)."""

    speaker: int
    text: str
    audio: torch.Tensor | None = None
    codes: torch.Tensor | None = None


@dataclass
class Prompt:
    tokens: torch.Tensor  # [T, K+1] long
    mask: torch.Tensor  # [T, K+1] bool

    def __len__(self) -> int:
        return self.tokens.shape[0]


def check_speaker(speaker) -> int:
    return SPEAKER.check(speaker)


def check_text(text) -> str:
    if not isinstance(text, str):
        raise TypeError(f"text must be a string, got {type(text).__name__}")
    if not text.strip():
        raise ValueError("text is empty: give the words to speak")
    return text


def check_codes(codes, cfg: CsmConfig) -> torch.Tensor:
    """codes: [frames, K] integers in 0..codebook_size-1 (the all-zero EOS frame is added later)."""
    if not isinstance(codes, torch.Tensor):
        raise TypeError(f"codes must be a torch.Tensor of shape [frames, {cfg.num_codebooks}]")
    if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise ValueError(f"codes must be an integer tensor, got dtype {codes.dtype}")
    if codes.ndim != 2 or codes.shape[1] != cfg.num_codebooks:
        raise ValueError(f"codes must have shape [frames, {cfg.num_codebooks}], got {list(codes.shape)}")
    if codes.shape[0] == 0:
        raise ValueError("codes hold no frames; drop the audio or give at least one frame")
    low, high = int(codes.min()), int(codes.max())
    if low < 0 or high >= cfg.codebook_size:
        raise ValueError(f"codes must lie in 0..{cfg.codebook_size - 1}, found values from {low} to {high}")
    return codes.long().cpu()


def text_rows(tokenizer: TextTokenizer, speaker: int, text: str, cfg: CsmConfig) -> Prompt:
    ids = [tokenizer.bos_id, *tokenizer.encode(f"[{speaker}]{text}"), tokenizer.eos_id]
    bad = [i for i in ids if not 0 <= i < cfg.text_vocab_size]
    if bad:
        raise ValueError(f"tokenizer produced ids {bad[:5]} outside the model's text vocabulary of "
                         f"{cfg.text_vocab_size}: is this the checkpoint's own tokenizer?")
    tokens = torch.zeros(len(ids), cfg.num_columns, dtype=torch.long)
    mask = torch.zeros(len(ids), cfg.num_columns, dtype=torch.bool)
    tokens[:, cfg.text_column] = torch.tensor(ids)
    mask[:, cfg.text_column] = True
    return Prompt(tokens, mask)


def audio_rows(codes: torch.Tensor, cfg: CsmConfig) -> Prompt:
    """codes [frames, K] -> frames + 1 rows (the last one the all-zero EOS frame)."""
    frames = codes.shape[0] + 1
    tokens = torch.zeros(frames, cfg.num_columns, dtype=torch.long)
    mask = torch.zeros(frames, cfg.num_columns, dtype=torch.bool)
    tokens[:-1, : cfg.num_codebooks] = codes
    tokens[-1, : cfg.num_codebooks] = cfg.codebook_eos_id
    mask[:, : cfg.num_codebooks] = True
    return Prompt(tokens, mask)


def concat(parts: list[Prompt]) -> Prompt:
    return Prompt(torch.cat([p.tokens for p in parts]), torch.cat([p.mask for p in parts]))


def segment_rows(segment: Segment, tokenizer: TextTokenizer, cfg: CsmConfig, encode_audio=None) -> Prompt:
    """A context segment's rows: its text, then its audio (if any) with the EOS frame."""
    speaker = check_speaker(segment.speaker)
    parts = [text_rows(tokenizer, speaker, check_text(segment.text), cfg)]
    codes = segment.codes
    if codes is None and segment.audio is not None:
        if encode_audio is None:
            raise ValueError("this generator has no audio codec loaded: give Segment.codes instead of Segment.audio")
        codes = encode_audio(segment.audio)
    if codes is not None:
        parts.append(audio_rows(check_codes(codes, cfg), cfg))
    return concat(parts)


def build_prompt(
    text: str,
    speaker: int,
    context: list[Segment] | tuple[Segment, ...],
    tokenizer: TextTokenizer,
    cfg: CsmConfig,
    encode_audio=None,
) -> Prompt:
    """Every context segment's rows, then the text rows of the line to speak."""
    line = text_rows(tokenizer, check_speaker(speaker), check_text(text), cfg)
    parts = [segment_rows(s, tokenizer, cfg, encode_audio) for s in context]
    return concat([*parts, line])
