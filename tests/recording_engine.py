"""A one-slot engine that notes what it runs, injected into a `Generator` (never patched in)."""

from __future__ import annotations

from dataclasses import dataclass, field

from fastcsm.engine.engine import Engine
from fastcsm.generator import Generator


@dataclass
class Record:
    runs: list = field(default_factory=list)  # (request, its frames' codes), in order

    @property
    def requests(self) -> list:
        return [r for r, _ in self.runs]

    @property
    def prompts(self) -> list:
        return [r.prompt for r, _ in self.runs]

    @property
    def frames(self) -> int:
        return sum(len(codes) for _, codes in self.runs)


class RecordingEngine(Engine):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.record = Record()

    def events(self, request):
        codes = []
        self.record.runs.append((request, codes))
        frames = super().events(request)
        try:
            for e in frames:
                if not e.ended:
                    codes.append(e.codes)
                yield e
        finally:
            frames.close()


def recording_generator(loaded: Generator) -> Generator:
    """`loaded`'s model, tokenizer and codec, speaking on a `RecordingEngine` (its `engine.record`)."""
    engine = RecordingEngine(loaded.model, max_slots=1, codec=loaded.codec)
    return Generator(loaded.model, loaded.tokenizer, loaded.codec, engine=engine)
