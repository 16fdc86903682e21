"""The user's audio of each turn, kept by an integration so that fastcsm hears the user: the
frameworks say when the user starts and stops speaking and hand over the microphone's audio; the
turn goes to the server in `add_turn` with its transcript (or alone: the server transcribes it)."""

from __future__ import annotations

import base64
import io
import wave

import numpy as np

PREROLL_S = 0.5  # audio kept from before the user is said to start (VAD decides after the speech begins)
MAX_TURN_S = 60.0  # the user's audio kept for one turn (the server's max_voice_audio_s by default)


class UserAudio:
    """The user's audio of the turns not yet sent, as 16-bit mono PCM at the transport's rate: the
    last `PREROLL_S` before each turn starts, then everything until it stops (at most `MAX_TURN_S`
    of it). Between turns only the pre-roll is kept."""

    def __init__(self):
        self.rate: int | None = None
        self.preroll: list[bytes] = []
        self.turn: list[bytes] = []  # the turns heard and not yet sent, the one in progress included
        self.turn_bytes = 0
        self.speaking = False
        self.heard = False  # a finished turn waits to be sent
        self.texts: list[str] = []  # its transcript, when it came while the user spoke

    def add(self, audio: bytes, rate: int, channels: int) -> None:
        if channels > 1:
            x = np.frombuffer(audio[: len(audio) - len(audio) % (2 * channels)], "<i2").reshape(-1, channels)
            audio = x.mean(axis=1).astype("<i2").tobytes()
        if rate != self.rate:  # another stream: what was kept does not join it
            self.rate, self.preroll, self.turn, self.turn_bytes = rate, [], [], 0
            self.heard = False
        if self.speaking:
            if self.turn_bytes < MAX_TURN_S * rate * 2:
                self.turn.append(audio)
                self.turn_bytes += len(audio)
            return
        self.preroll.append(audio)
        while len(self.preroll) > 1 and sum(map(len, self.preroll[1:])) >= PREROLL_S * rate * 2:
            self.preroll.pop(0)

    def start(self) -> None:
        self.speaking = True
        self.turn += self.preroll
        self.turn_bytes += sum(map(len, self.preroll))
        self.preroll = []

    def stop(self) -> None:
        self.speaking, self.heard = False, bool(self.turn)

    def take(self) -> str | None:
        """Base64 of a WAV of the turns heard (None if none, or while the user still speaks), which
        are forgotten with the transcript held for them."""
        if self.speaking:
            return None
        self.texts, self.heard = [], False
        if not self.turn:
            return None
        pcm, self.turn, self.turn_bytes = b"".join(self.turn), [], 0
        out = io.BytesIO()
        with wave.open(out, "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(self.rate)
            w.writeframes(pcm)
        return base64.b64encode(out.getvalue()).decode()


def user_turn(speaker: int, text: str | None, hearing: UserAudio | None) -> dict | None:
    """The `add_turn` message of the user's `text` and the audio heard since the last one (None
    when there is neither: audio alone is transcribed by the server)."""
    audio = hearing.take() if hearing is not None else None
    if text is None and audio is None:
        return None
    message = {"type": "add_turn", "speaker": speaker}
    if text is not None:
        message["text"] = text
    if audio is not None:
        message["audio"] = audio
    return message
