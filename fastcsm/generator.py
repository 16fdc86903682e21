"""The user API: load a checkpoint, speak a line in a conversation, get audio (or Mimi codes).

    gen = Generator.from_pretrained("sesame/csm-1b")
    audio = gen.generate("Hello there.", speaker=0, context=[Segment(1, "Hi!", audio=wav)])
    for chunk in gen.stream("Hello there.", 0, voice="alice"): play(chunk)
    codes = gen.generate_codes("Hello there.", speaker=0)

Speaking (`speak`, `generate`, `stream`) plans a request once — voice prompts pinned, context
rows built, the text split into pieces, each piece bounded by its length guard and checked to
fit — then generates piece after piece, each with the earlier pieces' audio as context, fitting
every prompt into the window by dropping the oldest context (see context.py, speech.py).
"""

from __future__ import annotations

import logging
import math
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .checkpoints import load_model, resolve
from .codec import resolve_codec
from .context import check_fits, check_line_fits, fit
from .engine import Engine, Request
from .model import CSM
from .prompt import (
    Prompt,
    Segment,
    TextTokenizer,
    audio_rows,
    build_prompt,
    check_speaker,
    check_text,
    concat,
    segment_rows,
    text_rows,
)
from .sampling import SamplingParams
from .speech import AudioStream, Piece, SpeakOptions, Speech
from .text import split_text
from .watermark import Watermarker, resolve_watermark

log = logging.getLogger("fastcsm")


@dataclass
class _Plan:
    """A checked request to speak: fixed rows, one (text, rows, max frames) per piece."""

    speaker: int
    pinned: list[Prompt]
    context: list[Prompt]
    lines: list[tuple[str, Prompt, int]]
    params: SamplingParams
    seed: int
    options: SpeakOptions
    pieces: list[Piece]


def _as_voices(voice) -> list:
    """None, a Voice, a voice name/path, or a sequence of those -> list of Voice."""
    from .voices import Voice, load_voice

    if voice is None:
        return []
    items = list(voice) if isinstance(voice, (list, tuple)) else [voice]
    out = []
    for v in items:
        if isinstance(v, Voice):
            out.append(v)
        elif isinstance(v, (str, os.PathLike)):
            out.append(load_voice(v))
        else:
            raise TypeError(f"voice must be a Voice, a voice name or a voice file path, got {type(v).__name__}")
    return out


class Generator:
    def __init__(self, model: CSM, tokenizer: TextTokenizer, codec=None, watermark=False):
        self.model = model
        self.cfg = model.cfg
        self.tokenizer = tokenizer
        self.codec = codec
        self.device = model.device
        self.dtype = model.dtype
        self.engine: Engine | None = None  # created on first use
        self.watermarker: Watermarker | None = resolve_watermark(watermark, self.device)

    @classmethod
    def from_pretrained(cls, path_or_repo, device=None, dtype=None, tokenizer=None, codec="auto",
                        quantize=None, watermark=False) -> Generator:
        """Load CSM from a local directory or hub repo id, in any published format.

        `quantize`: "int8" (or "fp8" on GPUs of compute capability 8.9+) stores every linear in
        8 bits, quantized tensor by tensor while loading; None keeps the checkpoint's precision (a
        checkpoint written by `fastcsm quantize` loads in 8 bits); "none" loads full precision.
        `dtype` is then the precision of the embeddings and activations.
        `tokenizer` is a `tokenizer.json` (or its directory) when the checkpoint has none; the
        begin/end-of-text ids come from it (then config.json, then Llama-3's: see `TextTokenizer`).
        `codec`: "auto" takes the Mimi stored in a transformers-format checkpoint (if any); a path
        or hub id loads a separate Mimi checkpoint; a `Codec` is used as is; None loads none.
        `watermark=True` marks all audio with Sesame's SilentCipher watermark (off by default; needs
        `fastcsm[watermark]`, see watermark.py); a `Watermarker` brings its own model or key.
        """
        root = resolve(path_or_repo)
        model, files = load_model(root, device, dtype, quantize)
        cfg = files.config
        tok = TextTokenizer.from_file(tokenizer if tokenizer is not None else root, cfg.bos_token_id, cfg.eos_token_id)
        return cls(model, tok, codec=resolve_codec(codec, files, model.device), watermark=watermark)

    # -- prompts --------------------------------------------------------------------------------

    def frames_for(self, max_audio_length_ms) -> int:
        if isinstance(max_audio_length_ms, bool) or not isinstance(max_audio_length_ms, (int, float)):
            raise TypeError(f"max_audio_length_ms must be a number, got {max_audio_length_ms!r}")
        frames = int(max_audio_length_ms // self.cfg.frame_ms)
        if frames < 1:
            raise ValueError(
                f"max_audio_length_ms={max_audio_length_ms} is shorter than one {self.cfg.frame_ms} ms frame"
            )
        return frames

    def prompt(self, text: str, speaker: int, context: Sequence[Segment] = ()) -> Prompt:
        encode = self.codec.encode_waveform if self.codec is not None else None
        return build_prompt(text, speaker, list(context), self.tokenizer, self.cfg, encode)

    # -- generation -----------------------------------------------------------------------------

    @torch.inference_mode()
    def generate_codes(
        self,
        text: str,
        speaker: int,
        context: Sequence[Segment] = (),
        max_audio_length_ms: float = 90_000,
        temperature: float = 0.9,
        topk: int = 50,
        topp: float = 1.0,
        seed: int | None = None,
    ) -> torch.LongTensor:
        """Speak `text` as `speaker` after `context`. Returns Mimi codes [frames, K] (on CPU),
        without the all-zero end frame. `temperature=0` is greedy; `seed` reproduces a draw."""
        params = SamplingParams(temperature, topk, topp)
        frames = self.frames_for(max_audio_length_ms)
        prompt = self.prompt(text, speaker, context)
        check_fits(len(prompt), frames, self.cfg.max_seq_len, self.cfg.frame_ms,
                   f"the prompt ({len(prompt)} rows)", "shorten the context or the text, or lower max_audio_length_ms")
        return torch.cat(list(self._frames(prompt, frames, params, seed)) or
                         [torch.zeros(0, self.cfg.num_codebooks, dtype=torch.long)])

    # -- speaking: text to audio -----------------------------------------------------------------

    def generate(
        self,
        text: str,
        speaker: int,
        context: Sequence[Segment] = (),
        max_audio_length_ms: float = 90_000,
        temperature: float = 0.9,
        topk: int = 50,
        *,
        topp: float = 1.0,
        seed: int | None = None,
        voice=None,
        options: SpeakOptions | None = None,
    ) -> torch.Tensor:
        """Speak `text` as `speaker` after `context`: the 24 kHz waveform [samples] (fp32, CPU).

        The signature and result of Sesame's reference `generate`; the keyword-only arguments
        are `speak`'s. Long text is split into pieces (see `SpeakOptions`).
        """
        return self.speak(text, speaker, context, max_audio_length_ms=max_audio_length_ms,
                          temperature=temperature, topk=topk, topp=topp, seed=seed, voice=voice,
                          options=options).audio

    def speak(
        self,
        text: str,
        speaker: int | None = None,
        context: Sequence[Segment] = (),
        *,
        voice=None,
        max_audio_length_ms: float = 90_000,
        temperature: float = 0.9,
        topk: int = 50,
        topp: float = 1.0,
        seed: int | None = None,
        options: SpeakOptions | None = None,
    ) -> Speech:
        """Speak `text` and return the waveform with its codes and one record per piece.

        voice: a `Voice` (or a voice name or file) pinned at the head of the prompt, never
            dropped; its audio is placed under `speaker`, which defaults to the voice's own id.
            A list of voices gives several speakers their voices, each under its own id.
        context: earlier turns, oldest first; the oldest are dropped whole when the window is
            short (each `Piece` says which, and a warning is logged).
        max_audio_length_ms: the bound for each generated piece; the length guard of `options`
            lowers it to what the piece's text can plausibly take.
        seed: pieces use seed, seed+1, ...; None draws one (recorded in `pieces`).
        """
        codec = self._need_codec()
        plan = self._plan(text, speaker, context, voice, max_audio_length_ms, temperature, topk, topp, seed, options)
        frames = [f for f in self._speak_frames(plan) if f is not None]
        codes = torch.cat(frames) if frames else torch.zeros(0, self.cfg.num_codebooks, dtype=torch.long)
        audio = codec.decode(codes)
        if self.watermarker is not None:  # piece by piece, as `stream` gives it
            cuts = [p.frames * codec.frame_size for p in plan.pieces]
            audio = torch.cat([self.watermarker.apply(a, codec.sample_rate) for a in audio.split(cuts)])
        return Speech(audio, codes, codec.sample_rate, plan.pieces)

    def stream(
        self,
        text: str,
        speaker: int | None = None,
        context: Sequence[Segment] = (),
        *,
        voice=None,
        max_audio_length_ms: float = 90_000,
        temperature: float = 0.9,
        topk: int = 50,
        topp: float = 1.0,
        seed: int | None = None,
        options: SpeakOptions | None = None,
        chunk_frames: int = 4,
    ) -> AudioStream:
        """Like `speak`, but yield PCM chunks (fp32 [samples], 24 kHz) as frames are generated:
        the first after one frame, then `chunk_frames` frames at a time. The chunks concatenate
        to `generate(...)` with the same seed. Input errors raise here, not at the first chunk;
        `close()` the stream (or use it in a `with` block) to stop early. With a watermark, each
        piece comes as one chunk when it is done (the mark is computed over the whole piece).
        """
        codec = self._need_codec()
        if isinstance(chunk_frames, bool) or not isinstance(chunk_frames, int) or chunk_frames < 1:
            raise ValueError(f"chunk_frames must be a positive integer, got {chunk_frames!r}")
        plan = self._plan(text, speaker, context, voice, max_audio_length_ms, temperature, topk, topp, seed, options)
        return AudioStream(self._speak_frames(plan), codec.open_stream(), chunk_frames, codec.sample_rate,
                           plan.pieces, len(plan.lines), self.watermarker)

    def _need_codec(self):
        if self.codec is None:
            raise ValueError(
                "this generator has no audio codec (original Sesame checkpoints carry none): load one with "
                "Generator.from_pretrained(..., codec='kyutai/mimi' or a Mimi directory), or use generate_codes()"
            )
        return self.codec

    @torch.inference_mode()
    def _plan(self, text, speaker, context, voice, max_audio_length_ms, temperature, topk, topp, seed,
              options) -> _Plan:
        """Check every input and build the rows that stay fixed while pieces are generated."""
        options = options if options is not None else SpeakOptions()
        params = SamplingParams(temperature, topk, topp)
        if isinstance(max_audio_length_ms, (int, float)) and not math.isfinite(max_audio_length_ms):
            raise ValueError(f"max_audio_length_ms must be a finite number, got {max_audio_length_ms!r}")
        user_frames = self.frames_for(max_audio_length_ms)
        voices = _as_voices(voice)
        if speaker is None:
            speaker = voices[0].speaker if voices else 0
        speaker = check_speaker(speaker)
        pinned_segments = [voices[0].segment(speaker)] if len(voices) == 1 else [v.segment() for v in voices]
        if isinstance(context, Segment) or not all(isinstance(s, Segment) for s in context):
            raise TypeError("context must be a sequence of Segment (oldest first)")
        encode = self.codec.encode_waveform if self.codec is not None else None
        pinned = [segment_rows(s, self.tokenizer, self.cfg, encode) for s in pinned_segments]
        history = [segment_rows(s, self.tokenizer, self.cfg, encode) for s in context]
        text = check_text(text)
        texts = [text] if options.max_piece_chars is None else split_text(text, options.max_piece_chars)
        lines = []
        for piece in texts:
            rows = text_rows(self.tokenizer, speaker, piece, self.cfg)
            guard = options.guard_ms(piece)
            frames = user_frames if guard is None else min(user_frames, math.ceil(guard / self.cfg.frame_ms))
            check_line_fits(pinned, rows, frames, self.cfg)
            lines.append((piece, rows, frames))
        if seed is None:
            seed = secrets.randbits(62)
        return _Plan(speaker, pinned, history, lines, params, seed, options, [])

    @torch.inference_mode()
    def _speak_frames(self, plan: _Plan):
        """Yield each generated frame [1, K], and None at the end of every piece."""
        opts, cfg = plan.options, self.cfg
        history = list(plan.context)
        labels = [("context", i) for i in range(len(history))]
        for i, (text, line, max_frames) in enumerate(plan.lines):
            prompt, trim = fit(plan.pinned, history, line, max_frames, cfg, opts.older_audio, opts.keep_full_audio)
            dropped = [labels[j] for j in trim.dropped]
            piece = Piece(i, text, max_frames, len(prompt), trim, [j for kind, j in dropped if kind == "context"],
                          [j for kind, j in dropped if kind == "piece"], plan.seed + i)
            plan.pieces.append(piece)
            if dropped:
                log.warning("piece %d/%d: dropped context segments %s and earlier pieces %s "
                            "(%d rows) so that %d frames fit the %d-row window", i + 1, len(plan.lines),
                            piece.dropped_context, piece.dropped_pieces, trim.dropped_rows, max_frames,
                            cfg.max_seq_len)
            got = []
            # Everything before the line (voice, context, earlier pieces) is kept for reuse.
            frames = self._frames(prompt, max_frames, plan.params, piece.seed, len(prompt) - len(line))
            try:
                for f in frames:
                    got.append(f)
                    piece.frames += 1
                    yield f
            finally:
                frames.close()
            piece.ended = piece.frames < max_frames
            if not piece.ended:
                log.warning("piece %d/%d stopped at its bound of %d ms without an end frame",
                            i + 1, len(plan.lines), max_frames * cfg.frame_ms)
            if opts.carry_pieces and got:
                history.append(concat([line, audio_rows(torch.cat(got), cfg)]))
                labels.append(("piece", i))
            yield None

    def _frames(self, prompt: Prompt, max_frames: int, params: SamplingParams, seed: int | None,
                prefix_rows: int = 0):
        """Yield each generated frame [1, K] (CPU long) until the end frame or `max_frames`.
        The KV of the first `prefix_rows` rows is kept, so a later call that starts with the same
        rows (the same voice, a conversation that grew) prefills only what follows them."""
        if self.engine is None:
            self.engine = Engine(self.model, max_slots=1)
        if self.engine.free_slots == 0:
            raise RuntimeError(
                "this Generator speaks one stream at a time and one is still open: close it (or finish "
                "reading it) first; for many streams at once, use the engine's slots (`fastcsm serve`)"
            )
        request = Request(prompt, max_frames, params, seed, prefix_rows=prefix_rows)
        for e in self.engine.run(request):
            yield e.codes[None]


def load_csm_1b(device: str = "cuda", dtype=None) -> Generator:
    """Sesame's published CSM-1B from the hub (a gated repo: accept its terms and log in first)."""
    return Generator.from_pretrained("sesame/csm-1b", device=device, dtype=dtype)
