"""The user API: load a checkpoint, speak a line in a conversation, get audio (or Mimi codes).

    gen = Generator.from_pretrained("sesame/csm-1b")
    audio = gen.generate("Hello there.", speaker=0, context=[Segment(1, "Hi!", audio=wav)])
    for chunk in gen.stream("Hello there.", 0, voice="alice"): play(chunk)
    speech = gen.speak("Hello there.", 0, options=SpeakOptions(temperature=0), seed=1)
    codes = gen.generate_codes("Hello there.", speaker=0)

Speaking (`speak`, `generate`, `stream`) checks the inputs, builds the rows of voices and
context once, and drives a `speech.line.Line` (the loop the server runs too): it splits the
text, bounds each piece, fits each piece's prompt into the window and chains each piece's audio
to the next, exactly as the server does. The pieces run one after the other on a one-slot
`Engine` that decodes every frame to PCM inside its step, so the audio is one seamless stream
(docs/design.md, "One request, from text to PCM").
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import replace

import torch

from .bounds import MAX_AUDIO_LENGTH_MS, TEMPERATURE, TOPK, TOPP
from .codec.codec import resolve_codec
from .engine.engine import EndReason, Engine, Request
from .engine.sampling import SamplingParams
from .model.checkpoints import load_model, resolve
from .model.context import check_fits
from .model.network import CSM
from .model.prompt import Prompt, Segment, TextTokenizer, build_prompt, check_speaker, check_text, segment_rows
from .speech.line import Line
from .speech.planner import requested_frames
from .speech.speech import AudioStream, SpeakOptions, Speech
from .speech.timestamps import word_times
from .speech.watermark import Watermarker, resolve_watermark

log = logging.getLogger("fastcsm")


def _as_voices(voice) -> list:
    """None, a Voice, a voice name/path, or a sequence of those -> list of Voice."""
    from .speech.voices import Voice, load_voice

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
    def __init__(self, model: CSM, tokenizer: TextTokenizer, codec=None, watermark=False,
                 engine: Engine | None = None):
        """`engine`: the one-slot engine to speak on (e.g. with a runner of one's own); by default
        one over `model` and `codec` is made on first use."""
        if engine is not None and (engine.cfg != model.cfg or engine.codec is not codec):
            raise ValueError("the engine must run this generator's model (or its quantized copy) and codec")
        self.model = model
        self.cfg = model.cfg
        self.tokenizer = tokenizer
        self.codec = codec
        self.device = model.device
        self.dtype = model.dtype
        self.engine: Engine | None = engine  # created on first use
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
        """`max_audio_length_ms` in whole frames (rounded down; at least one, at most the window)."""
        return requested_frames(max_audio_length_ms, self.cfg.frame_ms, self.cfg.max_seq_len * self.cfg.frame_ms)

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
        max_audio_length_ms: float = MAX_AUDIO_LENGTH_MS.default,
        temperature: float = TEMPERATURE.default,
        topk: int = TOPK.default,
        topp: float = TOPP.default,
        seed: int | None = None,
    ) -> torch.LongTensor:
        """Speak `text` as `speaker` after `context`. Returns Mimi codes [frames, K] (on CPU),
        without the all-zero end frame: one generation of the text as given (no normalisation),
        no splitting, no length guard, no codec needed. `temperature=0` is greedy; `seed` reproduces a draw."""
        params = SamplingParams(temperature, topk, topp)
        frames = self.frames_for(max_audio_length_ms)
        prompt = self.prompt(text, speaker, context)
        check_fits(len(prompt), frames, self.cfg.max_seq_len, self.cfg.frame_ms,
                   f"the prompt ({len(prompt)} rows)", "shorten the context or the text, or lower max_audio_length_ms")
        codes = [e.codes for e in self._run(Request(prompt, frames, params, seed)) if not e.ended]
        return torch.stack(codes) if codes else torch.zeros(0, self.cfg.num_codebooks, dtype=torch.long)

    # -- speaking: text to audio -----------------------------------------------------------------

    def generate(
        self,
        text: str,
        speaker: int,
        context: Sequence[Segment] = (),
        max_audio_length_ms: float = MAX_AUDIO_LENGTH_MS.default,
        temperature: float = TEMPERATURE.default,
        topk: int = TOPK.default,
        *,
        seed: int | None = None,
        voice=None,
        options: SpeakOptions | None = None,
    ) -> torch.Tensor:
        """Speak `text` as `speaker` after `context`: the 24 kHz waveform [samples] (fp32, CPU).

        The signature and result of Sesame's reference `generate`; its three numbers replace
        those of `options` (which supplies the rest: top-p, splitting, the length guard). The
        keyword-only arguments are `speak`'s. Long text is split into pieces (see `SpeakOptions`).
        """
        options = replace(options or SpeakOptions(), max_audio_length_ms=max_audio_length_ms,
                          temperature=temperature, topk=topk)
        return self.speak(text, speaker, context, voice=voice, seed=seed, options=options).audio

    def speak(
        self,
        text: str,
        speaker: int | None = None,
        context: Sequence[Segment] = (),
        *,
        voice=None,
        seed: int | None = None,
        options: SpeakOptions | None = None,
    ) -> Speech:
        """Speak `text` and return the waveform with its codes and one record per piece.

        voice: a `Voice` (or a voice name or file) pinned at the head of the prompt, never
            dropped; its audio is placed under `speaker`, which defaults to the voice's own id.
            A list of voices gives several speakers their voices, each under its own id.
        context: earlier turns, oldest first; the oldest are dropped whole when the window is
            short (each `Piece` says which, and a warning is logged).
        seed: pieces use seed, seed+1, ...; None draws one (recorded in `pieces`).
        options: sampling, the bound of each piece, splitting and fitting (`SpeakOptions`).
        """
        codec = self._need_codec()
        line = self._line(text, speaker, context, voice, seed, options)
        codes, audio, piece_audio = [], [], []
        for frame in self._speak_frames(line):
            if frame is None:  # a piece ended: it is watermarked whole, as `stream` gives it
                if piece_audio:
                    pcm = torch.cat(piece_audio)
                    audio.append(pcm if self.watermarker is None else self.watermarker.apply(pcm, codec.sample_rate))
                piece_audio = []
            else:
                codes.append(frame.codes)
                piece_audio.append(frame.pcm)
        return Speech(torch.cat(audio) if audio else torch.zeros(0),
                      torch.stack(codes) if codes else torch.zeros(0, self.cfg.num_codebooks, dtype=torch.long),
                      codec.sample_rate, line.pieces)

    def stream(
        self,
        text: str,
        speaker: int | None = None,
        context: Sequence[Segment] = (),
        *,
        voice=None,
        seed: int | None = None,
        options: SpeakOptions | None = None,
        chunk_frames: int = 4,
    ) -> AudioStream:
        """Like `speak`, but yield PCM chunks (fp32 [samples], 24 kHz) as frames are generated:
        the first after one frame, then `chunk_frames` frames at a time. The chunks concatenate
        to `speak(...).audio` with the same seed. Input errors raise here, not at the first chunk;
        `close()` the stream (or use it in a `with` block) to stop early. With a watermark, each
        piece comes as one chunk when it is done (the mark is computed over the whole piece).
        """
        codec = self._need_codec()
        if isinstance(chunk_frames, bool) or not isinstance(chunk_frames, int) or chunk_frames < 1:
            raise ValueError(f"chunk_frames must be a positive integer, got {chunk_frames!r}")
        line = self._line(text, speaker, context, voice, seed, options)
        pcm = (None if frame is None else frame.pcm for frame in self._speak_frames(line))
        return AudioStream(pcm, chunk_frames, codec.sample_rate, line.pieces, len(line.texts), self.watermarker)

    def _need_codec(self):
        if self.codec is None:
            raise ValueError(
                "this generator has no audio codec (original Sesame checkpoints carry none): load one with "
                "Generator.from_pretrained(..., codec='kyutai/mimi' or a Mimi directory), or use generate_codes()"
            )
        return self.codec

    @torch.inference_mode()
    def _line(self, text, speaker, context, voice, seed, options) -> Line:
        """Check every input, build the rows that stay fixed, and cut the text into pieces."""
        options = options if options is not None else SpeakOptions()
        if not isinstance(options, SpeakOptions):
            raise TypeError(f"options must be a SpeakOptions, got {type(options).__name__}")
        self.frames_for(options.max_audio_length_ms)  # checked before any audio is encoded
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
        return Line(check_text(text), speaker, pinned, history, self.tokenizer, self.cfg, options, seed)

    @torch.inference_mode()
    def _speak_frames(self, line: Line):
        """Yield each generated frame (an `Emitted`: codes [K] and PCM), and None at the end of
        every piece."""
        rate, n, offset = self.codec.sample_rate, len(line.texts), 0  # offset: samples of the pieces before
        while (planned := line.next()) is not None:
            piece = line.pieces[-1]
            if planned.trim.dropped:
                log.warning("piece %d/%d: dropped context segments %s and earlier pieces %s (%d rows) so that %d "
                            "frames fit the %d-row window", piece.index + 1, n, piece.dropped_context,
                            piece.dropped_pieces, planned.trim.dropped_rows, piece.max_frames, self.cfg.max_seq_len)
            pcm = []
            for event in self._run(planned.request):
                if event.ended:
                    line.end(event.reason)
                else:
                    line.add(event.codes)
                    pcm.append(event.pcm)
                    yield event
            if piece.reason is EndReason.LENGTH:
                log.warning("piece %d/%d stopped at its bound of %d ms without an end frame", piece.index + 1, n,
                            piece.max_frames * self.cfg.frame_ms)
            audio = torch.cat(pcm) if pcm else torch.zeros(0)
            piece.words = word_times(planned.text.spoken.words, audio, rate, offset / rate)
            offset += audio.numel()
            yield None

    def _run(self, request: Request):
        """The frame events, then the end event, of `request` on this generator's one-slot engine
        (created on first use; with the codec, it decodes PCM in its step). Everything before the
        line (`prefix_rows`: voice, context, earlier pieces) is kept, so a later request that
        starts with the same rows prefills only what follows them. Closing the iterator frees the slot."""
        if self.engine is None:
            self.engine = Engine(self.model, max_slots=1, codec=self.codec)
        if self.engine.free_slots == 0:
            raise RuntimeError(
                "this Generator speaks one stream at a time and one is still open: close it (or finish "
                "reading it) first; for many streams at once, use the engine's slots (`fastcsm serve`)"
            )
        return self.engine.events(request)


def load_csm_1b(device: str = "cuda", dtype=None) -> Generator:
    """Sesame's published CSM-1B from the hub (a gated repo: accept its terms and log in first)."""
    return Generator.from_pretrained("sesame/csm-1b", device=device, dtype=dtype)


def load_generator(model, device=None, dtype=None, tokenizer=None, codec=None, quantize=None) -> Generator:
    """What `fastcsm speak` and `fastcsm serve` load: `model` with an audio codec (its own, else
    `codec`), or a `CheckpointError` that says what failed and how to fix it."""
    from .model.checkpoints import CheckpointError

    try:
        gen = Generator.from_pretrained(model, device=device, dtype=dtype, tokenizer=tokenizer, codec=codec or "auto",
                                        quantize=quantize)
    except (OSError, ValueError) as e:  # CheckpointError is a ValueError
        raise CheckpointError(f"could not load the model {model!r}: {e}") from e
    if gen.codec is None:
        raise CheckpointError(f"the model {model!r} carries no audio codec: pass --codec kyutai/mimi "
                              "(or a directory holding Mimi weights)")
    return gen
