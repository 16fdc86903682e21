"""The user API: load a checkpoint, speak a line in a conversation, get Mimi codes (or audio).

    gen = Generator.from_pretrained("sesame/csm-1b")
    codes = gen.generate_codes("Hello there.", speaker=0, context=[Segment(1, "Hi!", codes=...)])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .checkpoints import load_model, resolve
from .codec import resolve_codec
from .engine import Engine, Request
from .model import CSM
from .prompt import Prompt, Segment, TextTokenizer, build_prompt
from .sampling import SamplingParams


class Generator:
    def __init__(self, model: CSM, tokenizer: TextTokenizer, codec=None):
        self.model = model
        self.cfg = model.cfg
        self.tokenizer = tokenizer
        self.codec = codec
        self.device = model.codebook0_head.weight.device
        self.dtype = model.codebook0_head.weight.dtype
        self.engine: Engine | None = None  # created on first use

    @classmethod
    def from_pretrained(cls, path_or_repo, device=None, dtype=None, tokenizer=None, codec="auto") -> Generator:
        """Load CSM from a local directory or hub repo id, in any published format.

        `tokenizer` is a `tokenizer.json` (or its directory) when the checkpoint has none.
        `codec`: "auto" takes the Mimi stored in a transformers-format checkpoint (if any); a path
        or hub id loads a separate Mimi checkpoint; a `Codec` is used as is; None loads none.
        """
        root = resolve(path_or_repo)
        model, files = load_model(root, device, dtype)
        tok = TextTokenizer.from_file(tokenizer if tokenizer is not None else root)
        return cls(model, tok, codec=resolve_codec(codec, files, model.codebook0_head.weight.device))

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

    def check_fits(self, prompt_rows: int, frames: int) -> None:
        window = self.cfg.max_seq_len
        if prompt_rows + frames > window:
            raise ValueError(
                f"the prompt takes {prompt_rows} rows and {frames} frames of audio were requested "
                f"({frames * self.cfg.frame_ms} ms), but the context window holds {window} rows: "
                f"shorten the context or the text, or lower max_audio_length_ms to at most "
                f"{max(0, window - prompt_rows) * self.cfg.frame_ms} ms"
            )

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
        self.check_fits(len(prompt), frames)
        return torch.cat(list(self._frames(prompt, frames, params, seed)) or
                         [torch.zeros(0, self.cfg.num_codebooks, dtype=torch.long)])

    def _frames(self, prompt: Prompt, max_frames: int, params: SamplingParams, seed: int | None):
        """Yield each generated frame [1, K] (CPU long) until the end frame or `max_frames`."""
        if self.engine is None:
            self.engine = Engine(self.model, max_slots=1)
        request = Request(prompt, max_frames, params, seed)
        for codes in self.engine.run(request):
            yield codes[None]


def load_csm_1b(device: str = "cuda", dtype=None) -> Generator:
    """Sesame's published CSM-1B from the hub (a gated repo: accept its terms and log in first)."""
    return Generator.from_pretrained("sesame/csm-1b", device=device, dtype=dtype)
