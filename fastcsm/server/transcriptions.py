"""OpenAI's transcription responses from a `Transcript`: json, text, verbose_json, srt and vtt.

`POST /v1/audio/transcriptions` (app.py) decodes the upload, has the recogniser transcribe it
(`Service.transcribe`) and answers with `render(transcript, response_format, granularities)`.
This module only shapes text; it knows nothing of engines or requests.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from ..listen.asr import Transcript

RESPONSE_FORMATS = ("json", "text", "verbose_json", "srt", "vtt")
GRANULARITIES = ("segment", "word")
MEDIA_TYPES = {"json": "application/json", "verbose_json": "application/json", "text": "text/plain",
               "srt": "application/x-subrip", "vtt": "text/vtt"}


class TranscriptionWord(BaseModel):
    word: str
    start: float
    end: float


class TranscriptionSegment(BaseModel):
    id: int
    seek: int = 0
    start: float
    end: float
    text: str
    tokens: list[int] = Field(default_factory=list)
    temperature: float = 0.0
    avg_logprob: float = 0.0
    compression_ratio: float = 0.0
    no_speech_prob: float = 0.0


class Transcription(BaseModel):
    """`response_format=json`: the text alone."""

    text: str


class TranscriptionVerbose(BaseModel):
    """`response_format=verbose_json`: segments (unless only words were asked for) and words (if asked)."""

    task: str = "transcribe"
    language: str
    duration: float
    text: str
    segments: list[TranscriptionSegment] | None = None
    words: list[TranscriptionWord] | None = None


def render(t: Transcript, response_format: str, granularities: list[str]) -> tuple[str | dict, str]:
    """The body (text, or a dict for JSON) and its media type."""
    if response_format == "json":
        return Transcription(text=t.text).model_dump(), MEDIA_TYPES["json"]
    if response_format == "text":
        return t.text + "\n", MEDIA_TYPES["text"]
    if response_format == "verbose_json":
        return verbose(t, granularities).model_dump(exclude_none=True), MEDIA_TYPES["verbose_json"]
    return subtitles(t, vtt=response_format == "vtt"), MEDIA_TYPES[response_format]


def verbose(t: Transcript, granularities: list[str]) -> TranscriptionVerbose:
    segments = words = None
    if "segment" in granularities or not granularities:  # OpenAI's default: segments
        segments = [TranscriptionSegment(id=i, start=s.start, end=s.end, text=s.text)
                    for i, s in enumerate(t.segments)]
    if "word" in granularities:
        words = [TranscriptionWord(word=w.text, start=w.start, end=w.end) for w in t.words]
    return TranscriptionVerbose(language=t.language, duration=t.duration, text=t.text, segments=segments, words=words)


def subtitles(t: Transcript, vtt: bool) -> str:
    """SubRip (numbered cues, `00:00:01,250`) or WebVTT (a header, `00:00:01.250`), a cue a segment."""
    mark = "." if vtt else ","
    cues = []
    for i, s in enumerate((s for s in t.segments if s.text), start=1):
        timing = f"{_clock(s.start, mark)} --> {_clock(s.end, mark)}"
        cues.append(f"{timing}\n{s.text}\n" if vtt else f"{i}\n{timing}\n{s.text}\n")
    return ("WEBVTT\n\n" if vtt else "") + "\n".join(cues)


def _clock(seconds: float, mark: str) -> str:
    ms = int(round(seconds * 1000))
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{mark}{ms:03d}"
