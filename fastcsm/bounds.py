"""The defaults and limits of speaking's numbers, written once.

Every entry point reads them from here: `SamplingParams` and `SpeakOptions` (and through them
`Generator`'s signatures), the CLI's flags, and the server's request fields (protocol.py), so the
same bad value gets the same refusal, in the same words, wherever it is given:

    >>> TEMPERATURE.check(float("inf"))
    ValueError: temperature must be a finite number from 0 to 10 (0 is greedy), got inf

A boundary may wrap the message (the server names the field, the CLI its flag), never reword it.
`max_audio_length_ms` has no fixed upper limit here: the model's window bounds it in the
library and the CLI, a server's own limit on the server (`planner.requested_frames`).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass


@dataclass(frozen=True)
class Bound:
    """One option: its default and the values it accepts (`low` <= value <= `high`; `low_open`
    excludes `low`, `high_open` excludes `high`; no `high`: no upper limit)."""

    name: str
    default: float | int | None
    low: float | int
    high: float | int | None = None
    integer: bool = False
    low_open: bool = False
    high_open: bool = False
    note: str = ""  # what a special value means, said with the limits

    @property
    def accepts(self) -> str:
        """The accepted values, in words: "an integer from 0 to 2048 (0 is all)"."""
        kind = "an integer" if self.integer else "a finite number"
        low, high = _number(self.low), _number(self.high)
        if self.high is None:
            span = f"{'>' if self.low_open else '>='} {low}"
        elif self.low_open or self.high_open:
            span = f"{'>' if self.low_open else '>='} {low} and {'<' if self.high_open else '<='} {high}"
        else:
            span = f"from {low} to {high}"
        return f"{kind} {span}" + (f" ({self.note})" if self.note else "")

    def check(self, value):
        """`value` if it is accepted, else a ValueError saying what is (NaN and infinities are no numbers)."""
        if self.ok(value):
            return int(value) if self.integer else value
        raise ValueError(f"{self.name} must be {self.accepts}, got {self._shown(value)}")

    def _shown(self, value) -> str:
        """The refused value, the same whether it came as 5 or 5.0 (JSON and the CLI differ there)."""
        if self.integer or isinstance(value, bool) or not isinstance(value, numbers.Real):
            return repr(value)
        try:
            return repr(float(value))
        except OverflowError:
            return repr(value)

    def ok(self, value) -> bool:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral if self.integer else numbers.Real):
            return False
        if not math.isfinite(value):
            return False
        if value < self.low or (self.low_open and value == self.low):
            return False
        return self.high is None or value < self.high or (value == self.high and not self.high_open)

    def json_schema(self) -> dict:
        """The bounds as JSON Schema keywords (for the server's request models)."""
        out = {"type": "integer" if self.integer else "number",
               "exclusiveMinimum" if self.low_open else "minimum": self.low}
        if self.high is not None:
            out["exclusiveMaximum" if self.high_open else "maximum"] = self.high
        return out


def _number(x) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


TEMPERATURE = Bound("temperature", 0.9, 0.0, 10.0, note="0 is greedy")
TOPK = Bound("topk", 50, 0, 2048, integer=True, note="0 is all")
TOPP = Bound("topp", 1.0, 0.0, 1.0, low_open=True, note="1 switches it off")
# The bound of each generated piece (Sesame's `generate`: 90 s); a length guard lowers it per piece.
MAX_AUDIO_LENGTH_MS = Bound("max_audio_length_ms", 90_000, 0, low_open=True)
SPEAKER = Bound("speaker", 0, 0, 1_000_000, integer=True)  # however it is given (`speaker`, or a voice "7")
SEED = Bound("seed", None, 0, 2**62, integer=True, high_open=True)
