"""Word times of a line as the server sends its audio: what the speech route's `timestamps` and
the conversation's `word` events carry, and which words of an interrupted line were heard.

`LineWords` follows one line piece by piece: it is given each piece's written words when the
piece starts (`start`), its PCM as it is sent (`audio`), and times the piece's words when its
audio is whole (`done`, see timestamps.py), in the line's timeline. A piece cut off mid-way
never gets times; `heard` says which of its words began in the audio sent. Nothing here knows
of sockets or HTTP.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..speech.timestamps import WordTime, heard, rate, word_times
from . import protocol as P


class LineWords:
    def __init__(self, sample_rate: int, speed: float = 1.0):
        self.sample_rate = sample_rate
        self.speed = speed  # the audio is time-scaled by 1/speed after this (HTTP's `speed`)
        self.offset = 0  # samples of the pieces done
        self.words: list[WordTime] = []  # the timed words of the pieces done, in the line's timeline
        self.heard_text: list[str] = []  # the written words heard, all pieces
        self._piece: Sequence = ()  # `normalize.Word`s of the piece in flight
        self._pcm: list[np.ndarray] = []
        self._spoken: list = []  # `normalize.Word`s of the pieces done

    def start(self, words: Sequence) -> None:
        """A piece begins: its written words (`normalize.Word`s)."""
        self._piece, self._pcm = words, []

    def audio(self, pcm) -> None:
        """PCM [samples] of the piece in flight, as it is sent."""
        self._pcm.append(np.asarray(pcm, dtype=np.float32).reshape(-1))

    def done(self) -> list[WordTime]:
        """The piece in flight is whole: its words with their times (seconds into the line)."""
        pcm = np.concatenate(self._pcm) if self._pcm else np.zeros(0, np.float32)
        timed = word_times(self._piece, pcm, self.sample_rate, self.offset / self.sample_rate)
        if self.speed != 1.0:
            timed = [WordTime(w.text, round(w.start / self.speed, 4), round(w.end / self.speed, 4)) for w in timed]
        self.offset += len(pcm)
        self.words += timed
        self._spoken += list(self._piece)
        self.heard_text += [w.text for w in self._piece]
        self._piece, self._pcm = (), []
        return timed

    @property
    def in_flight(self) -> bool:
        """A piece was started and has not been timed (it is generating, or it was cut off)."""
        return bool(self._piece)

    def cut(self) -> list:
        """The piece in flight was cut off: its words (`normalize.Word`s) whose audio was begun in
        what was sent, placed at this line's speaking rate so far (see `timestamps.heard`)."""
        piece, pcm = self._piece, np.concatenate(self._pcm) if self._pcm else None
        self._piece, self._pcm = (), []
        if not piece or pcm is None:
            return []
        seconds = rate(self.words, self._spoken)
        n = heard(piece, pcm, self.sample_rate, *([seconds * self.speed] if seconds else []))
        self.heard_text += [w.text for w in piece[:n]]
        return list(piece[:n])


def word_events(id: str | None, utterance: int, timed: Sequence[WordTime]) -> list[P.WordEvent]:
    """The conversation's `word` events for a piece's timed words."""
    return [P.WordEvent(id=id, utterance=utterance, word=w.text, start=w.start, end=w.end) for w in timed]
