"""The server's wire contract: HTTP request/response bodies and the WebSocket message schema.

Everything a client (the `openai` package, the browser page, a voice agent) sends or receives
is declared here as a pydantic model, so the OpenAPI schema at `/openapi.json` and this file
agree by construction. Audio is always 24 kHz mono.

HTTP
----
`POST /v1/audio/speech` (`SpeechRequest`) -> audio bytes, streamed by chunked transfer as frames
  are generated (the first 80 ms frame is sent as soon as it exists). Formats: `wav` (16-bit,
  header sizes set to 0xFFFFFFFF because the length is unknown while streaming), `pcm` (raw
  signed 16-bit little-endian, as OpenAI's), `flac`, `mp3`, `opus` (Ogg), `aac` (ADTS).
  `voice` may be one of OpenAI's names (alloy, ash, ..., cedar), mapped by `--voice-map`;
  `speed` (0.25-4.0) time-scales without a pitch change; `instructions` is ignored (CSM takes
  none). Response headers: `X-Fastcsm-Seed` (the seed used), `X-Fastcsm-Sample-Rate`.
  With `stream_format: "sse"` the same bytes come as OpenAI's server-sent events instead:
  `data: {"type": "speech.audio.delta", "audio": "<base64>"}` per chunk, then
  `data: {"type": "speech.audio.done", "usage": {...}}`. With `timestamps: true` as well, each
  written word of the text (as written: "10:30pm," not "ten thirty p m") comes as
  `data: {"type": "speech.audio.word", "word": "10:30pm,", "start": 1.2, "end": 1.75}` (seconds
  into the audio, after `speed`) once its piece's audio has been sent, and `speech.audio.done`
  repeats them all as `timestamps`. `stream_format: "json"` answers one JSON object once the line
  is spoken, Kokoro-FastAPI's captioned shape: `{"audio": "<base64 of the whole file>",
  "audio_format": "mp3", "sample_rate": 24000, "timestamps": [{"word", "start_time", "end_time"}]}`.
`GET /v1/voices` -> `VoiceList`; `GET /v1/voices/{name}` -> `VoiceInfo`;
`POST /v1/voices` (multipart form: `name`, `text`, `speaker`, `overwrite`, file `audio`) -> `VoiceInfo`;
`DELETE /v1/voices/{name}` -> `VoiceDeleted`. `GET /v1/voices` also lists the voice map (`aliases`).
`POST /v1/audio/voices` (OpenAI's multipart: `name`, file `audio_sample`, `consent`; plus fastcsm's
  required `text`, the transcript, and optional `speaker`) -> `AudioVoice`; `GET /v1/audio/voices`
  -> `AudioVoiceList`: OpenAI's custom-voice API over the same voice store.
`GET /v1/models` -> `ModelList` (OpenAI-style, the short `--model-name`); `GET /v1/models/{model}`
  -> `ModelInfo`; `GET /v1/info` -> `ServerInfo` (limits, formats).
`GET /healthz` -> `Health`; `GET /readyz` -> `Ready` (503 until the model is loaded);
`GET /metrics` -> Prometheus text.
Errors are `ErrorResponse` (OpenAI's shape) with a 4xx status that says what to fix:
400 bad input, 401 missing/bad API key (checked before anything else on /v1, unknown routes
included), 403 cross-site request, 404 unknown voice/route, 408 body too slow, 409 voice exists
(or exists but its file is damaged: overwrite or delete it), 413 body or upload too large, 503
busy (with `Retry-After` seconds) or not ready.
With API keys configured every `/v1/*` route needs `Authorization: Bearer <key>`; the WebSocket
takes the key the same way or as `?api_key=<key>` (browsers cannot set WebSocket headers; the
server takes it out of the query string before anything is logged).
Requests that change state (POST, DELETE) and WebSocket handshakes whose `Origin` header is
present and not allowed get 403: allowed are the server's own page, pages on loopback, and the
origins given with `--cors-origin`. Bodies: 413 above the route's limit (speech and voice
uploads: `max_upload_bytes`; other routes 64 KiB), 408 when the body is not in within
`--body-timeout-s`. Numbers are JSON numbers (`true` is not 1; NaN is refused); text must hold
something speakable (a letter, digit or symbol) and no control characters.

WebSocket `/v1/conversations`
----------------------------
Text messages are JSON objects with a `type`; binary messages are audio (the server's speech,
the client's microphone: see Listening below). After the server's
`ready`, the client sends `ClientMessage`s:

    configure   pin voices at the head of the conversation, pick the PCM format and defaults
    add_turn    a turn of the other party: speaker id, text, optionally their audio
    speak       speak a line (as a speaker id or a registered voice); one at a time: a `speak`
                while an utterance is in flight (queued, prefilling or running) is refused with
                an `error` event (code `busy`) and the utterance in flight goes on. A
                `speak` the server cannot queue (all streams taken, the queue full) is an
                `error` event, code `busy`, too, and leaves no line open: send it again later.
                With `more: true` the line streams in (an LLM writing it): its text so far,
                continued by `append_text` messages
    append_text `{"type": "append_text", "text": "...", "more": true|false}`: the next fragment
                of that line, appended as is; `more: false` completes it
    interrupt   stop the current utterance now (barge-in): it ends with `done` (reason
                `interrupted`) within one frame, whether it was queued, prefilling or running
    reset       forget the conversation: its turns and the voices pinned by speaking (keeps the
                configuration, and pins its voices again)

(a message of another `type` gets an `error` event that names these) and receives
`ServerMessage`s: `ready`, `configured`, `turn_added`, `started`, `first_audio`, `done`,
`context_dropped`, `voice_unpinned`, `error`, `word`, `user_speech_started`, `user_speech_stopped`,
`user_transcript_partial`, `user_turn`, `assistant_text` and `assistant_reply` (assistant mode,
below); between `started` and `done` come binary messages, one per 80 ms frame (1920 samples), raw
PCM in the configured format (`pcm_s16le` by default, or `pcm_f32le`). With `timestamps: true` in
the `speak`, each written word of the line (as written, not its spoken form) comes as a `word`
event, `{"type": "word", "utterance": 0, "word": "10:30pm,", "start": 1.2, "end": 1.75}` (seconds
into the line's audio), once its piece has ended: after every binary message holding its audio,
before `done`. An interrupted line's `done.text` holds the written words the client received audio
of (those of its `word` events, and the words of the cut piece whose audio had begun, placed at the
line's speaking rate), timestamps or not; only those words join the conversation.
After `interrupt`, no binary message of that utterance follows the `done` (reason `interrupted`).
A socket that closes ends its utterance the same way (its slot is freed before the next frame
step). The spoken line (with the audio generated for it, cut where it was
interrupted) becomes part of the conversation, so the next line continues from it; the server
keeps the conversation's KV cache, so the next `speak` prefills only the rows added since
(`done.prefill_rows` / `done.reused_rows` report it, over every piece of the line that was
submitted, interrupted or not; a piece still queued counts 0). A line that fails (its prefill,
or the frame step) gets an `error` event (code `internal`) and then its `done` with reason
`error`, whose `error` field repeats the message; a failed prefill's message says how many of its
prompt rows went in, and `done.prefill_rows` counts them. So does a streamed line whose later
piece cannot be spoken (code `bad_request`, or `busy` when its first piece finds the queue full):
once a `speak` is accepted, every `error` event with its `id` is followed by its `done`; a
`speak` refused outright gets the `error` event alone. When the 2048-row window is full the
oldest turns are dropped whole, a `context_dropped` event says how many, and the rest is
prefilled again.

Voices: a `speak` in a registered voice that is not pinned pins it at the head of the
conversation once the line is heard (its first frame generated); a `speak` that fails, or ends
before any audio, pins nothing. When the pinned voices and a piece of the line do not fit the
window together, the oldest pinned voices other than the line's own are unpinned, each with a
`voice_unpinned` event, until the piece fits (a piece that does not fit even alone is an `error`
event, code `bad_request`); `reset` goes back to the configured voices and `configure` sets the
pins anew. No sequence of voices can leave a conversation that only answers errors.

A line is spoken in pieces (`fastcsm.speech.planner.streamed_pieces`): its sentences, and inside a long
sentence a cut after a clause (, ; : or a dash) once the piece has 40 characters. Each piece is
one generation that sees the pieces before it with their audio, and the audio runs on from one
piece to the next without a seam, as `POST /v1/audio/speech` does with long text. A line that
streams in (`speak` with `more: true`, then `append_text`) starts generating as soon as its first
piece is complete (a sentence once the next fragment begins after it; a clause once its next word
has begun) and goes on piece by piece as the text arrives: with the same seed, its codes and
audio are exactly those of a `speak` of the whole line. `started` comes when the first piece is
submitted; `first_audio.ms` counts from the message that completed the first piece; `done` comes
once the last piece (after `more: false`) has ended, or at `interrupt`, at any point (even before
the first piece was complete). An `append_text` with no line open for it is an `error` event.

Counting frames: `started.first_piece_max_frames` is the frame bound of the first piece alone
(`max_frames` is the same number under its old name), while `done.frames` (and `done.audio_ms`)
count the whole line, every one of its `done.pieces`: a line of three sentences may send three
times the first piece's bound. Each piece's bound is `max_audio_length_ms` lowered to what its
text can plausibly take (3 s + 150 ms a character), in 80 ms frames.

Listening: with `"input_audio": {"sample_rate": 16000}` in `configure` (any rate from 8 to 48 kHz;
optionally `"language"`) the client streams the user's microphone as binary messages of
little-endian 16-bit mono PCM at that rate, in chunks of 20-100 ms as it records (the server
needs speech recognition, `--asr-model`: without it the `configure` is an `error` event). The
server finds the user's turns with Silero VAD (`--turn-silence-ms` of silence ends one,
`--max-turn-s` cuts one) and sends `user_speech_started {at_ms}`, then `user_speech_stopped {at_ms,
cut}`, then, once the turn is transcribed, `turn_added` (with its `text`) and `user_turn {text,
speaker, audio_ms, frames, cut, added}`: the turn (its Mimi codes, encoded while the user spoke,
and its transcript) has joined the conversation as `user_speaker` (default 1), exactly as an
`add_turn` with that audio and text would, so the next line hears the user's voice. A turn in
which nothing was recognised is reported (`added: false`) and not added. With `barge_in` (on by
default) the user starting to speak interrupts the line in flight exactly as `interrupt` does.
A turn is transcribed early: when the user pauses (the turn's padding of silence has passed),
the turn so far is transcribed at once, so that if the pause ends the turn its transcript is
ready, or under way, when `user_speech_stopped` comes (the same text as transcribing it then,
since the audio is the same; `--no-transcribe-early` turns this off). Each such transcript that
is ready before the turn stops comes as `user_transcript_partial {text}`: the turn so far, a
live transcript (the user may go on; the `user_turn` has the final text). With pocketsphinx, a
stream's later turns are also decoded as they are spoken (`--transcribe-live`, on by default),
so a pause's transcript is ready ~0.1 s after it; the turn takes the pause's whole decode if
that is done when the turn ends, else the live one. In assistant mode with `--preemptive-reply`,
the model is asked as soon as such a transcript is ready, before the silence has ended the turn:
if the pause ends it, that reply is the answer (sooner by what of the model's time the silence
covered); if the user goes on, the request is closed.
Audio before such a `configure`, a rate outside 8-48 kHz, an odd byte count, a chunk over 5 s,
audio more than 2 s ahead of real time, or more than 4 turns waiting for their transcript are
each an `error` event; the chunk is dropped and the session goes on. `reset` and `configure` drop
the turn being heard and those being transcribed. `add_turn` with `audio` and no `text` is
transcribed (an `error` event without speech recognition); its `turn_added.text` says what was heard.

A streamed line is bounded (the server's settings; `fastcsm serve --help` lists them): a line
that gets no text for `line_idle_timeout_s` seconds (default 30; empty fragments bring no text)
is ended with an `error` event (code `timeout`) and its `done` (reason `deadline`, whatever was
complete having been spoken); a line takes at most `max_line_fragments` `append_text` messages
(default 8192): the one past it ends the line with an `error` event (code `bad_request`) and its
`done` (reason `error`); and a line holds at most `max_line_chars` characters (default 4096): a
fragment past it is refused with an `error` event and the line stays open, to be completed.

Assistant mode (`configure {"assistant": true, "user_speaker": 0, "assistant_voice": ...}`, on a
server started with `--llm-url` and `--llm-model`; without them, or with an unknown
`assistant_voice`, the `configure` is an `error` event and the configuration stays): every
`add_turn` whose `speaker` is `user_speaker` is answered. Its text goes to the language model with
the conversation's history (`--system-prompt` first), and the reply is spoken as a streamed line,
exactly as a client's `speak` with `more: true` and `append_text`: the first piece as soon as the
model completed it (`started`, `first_audio`, audio, `done` as for any line). Before each piece's
first frame comes an `assistant_text` event with its words (markdown, code, emoji and stage
directions removed; the reply bounded at `--max-reply-chars`); after the line's `done`,
`assistant_reply` says why it ended and what the history keeps of it. `interrupt` (optionally with
`heard_ms`, the audio the client played), or the next user turn arriving mid-reply, closes the
model's stream and stops the line: the model's history keeps the written words whose audio was
sent (the line's `done.text`), or with `heard_ms` those begun in that much audio (of the cut
piece, in proportion to its audio played), and a dash; the conversation's CSM context keeps the
line as `done` says, before the user's new turn. A model that cannot be reached, answers an error
status, is silent past `--llm-timeout-s` or breaks off gives an `error` event (codes `llm_*`): the
pieces completed before are spoken, the conversation goes on, and the next user turn is answered.
`reset` also forgets the model's history.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AllowInfNan, BaseModel, ConfigDict, Field, PlainValidator, Strict, WithJsonSchema

from ..bounds import MAX_AUDIO_LENGTH_MS, SEED, SPEAKER, TEMPERATURE, TOPK, Bound
from ..engine.engine import EndReason
from ..listen.listener import MAX_RATE as MAX_INPUT_RATE, MIN_RATE as MIN_INPUT_RATE
from ..speech.lexicon import MAX_REQUEST_ENTRIES, MAX_RESPELLING_CHARS, MAX_WORD_CHARS
from ..speech.normalize import NORMALIZE_BY_DEFAULT

SAMPLE_RATE = 24_000
FRAME_SAMPLES = 1920  # one Mimi frame, 80 ms
PCM_FORMATS = ("pcm_s16le", "pcm_f32le")
# JSON numbers only: `true` is not 1, "1" is not 1, and NaN or infinity is no number at all.
Int = Annotated[int, Strict()]
Number = Annotated[float, Strict(), AllowInfNan(False)]
MAX_SPEAKER = SPEAKER.high  # the largest speaker id, however it is given (`speaker`, or `voice` as "7")


def bounded(bound: Bound, nullable: bool = False):
    """A field taking `bound`'s values (fastcsm.bounds), refused in the library's own words; its
    schema states the same limits. `nullable`: null too (the default applies)."""
    def check(value):
        return None if nullable and value is None else bound.check(value)

    schema = bound.json_schema()
    return Annotated[int | float | None, PlainValidator(check),
                     WithJsonSchema({"anyOf": [schema, {"type": "null"}]} if nullable else schema)]


Temperature, TopK, Seed = bounded(TEMPERATURE), bounded(TOPK), bounded(SEED, nullable=True)
Speaker, MaxAudioLength = bounded(SPEAKER), bounded(MAX_AUDIO_LENGTH_MS, nullable=True)
# A request's own pronunciations (fastcsm.speech.lexicon): word -> respelling, added to the server's --lexicon.
LexiconEntries = Annotated[
    dict[Annotated[str, Field(min_length=1, max_length=MAX_WORD_CHARS)],
         Annotated[str, Field(min_length=1, max_length=MAX_RESPELLING_CHARS)]],
    Field(max_length=MAX_REQUEST_ENTRIES)]
NORMALIZE_HELP = ("read written forms as spoken ones (numbers, dates, money, units, URLs, e-mail, abbreviations) "
                  "and apply the lexicon; false speaks the text exactly as given")
LEXICON_HELP = ('whole-word respellings for this request, e.g. {"Nguyen": "Win", "SQL": "sequel"}, added to the '
                "server's --lexicon (these win); a lower-case word matches any case, one with capitals only itself")


class _Strict(BaseModel):
    """Unknown fields are errors (a misspelt option must not be silently ignored)."""

    model_config = ConfigDict(extra="forbid")


# -- errors ---------------------------------------------------------------------------------------

class ErrorBody(BaseModel):
    message: str = Field(description="what was wrong and what to do about it")
    type: str = Field(description="invalid_request_error, authentication_error, not_found_error, "
                                  "conflict_error, request_too_large, server_busy, server_error")
    param: str | None = Field(None, description="the offending field, when there is one")
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every error, in the shape OpenAI's API uses (so its clients show the message)."""

    error: ErrorBody


# -- speech ---------------------------------------------------------------------------------------

class VoiceRef(_Strict):
    """OpenAI's custom-voice object form of `voice`."""

    id: str = Field(min_length=1, max_length=64)


class ContextTurn(_Strict):
    """An earlier turn of the conversation, oldest first."""

    speaker: Speaker = Field(description="speaker id of the turn")
    text: str = Field(min_length=1, description="what was said")
    audio: str | None = Field(None, description="base64 of an audio file (WAV, FLAC, OGG, MP3; any rate) of the "
                                                "turn; gives that speaker its voice")


class SpeechRequest(_Strict):
    """OpenAI's speech request, plus fastcsm's own fields (which `openai` clients pass via `extra_body`)."""

    model: str = Field("csm-1b", max_length=256,
                       description="any id is accepted (OpenAI clients send tts-1 or gpt-4o-mini-tts); the server "
                                   "speaks with the model it loaded, whose id GET /v1/models lists")
    input: str = Field(min_length=1, description="the text to speak (limit: `ServerInfo.max_input_chars`)")
    voice: str | VoiceRef = Field(
        description='a registered voice name (see GET /v1/voices), one of OpenAI\'s voice names ("alloy", ...: '
                    "the server's voice map says what each stands for; a registered voice of that name wins), "
                    'or a bare speaker id such as "0" (the model\'s own voice for that id, no prompt)')
    response_format: Literal["wav", "pcm", "flac", "mp3", "opus", "aac"] = Field(
        "mp3", description="pcm is raw signed 16-bit little-endian, 24 kHz mono; aac is ADTS")
    speed: Number = Field(1.0, ge=0.25, le=4.0,
                          description="time-scale of the audio without a pitch change (FFmpeg's atempo), "
                                      "0.25 to 4.0; 1.0 leaves the audio untouched")
    instructions: str | None = Field(None, max_length=4096,
                                     description="accepted for compatibility and ignored: CSM takes no style "
                                                 "instructions (its voice comes from `voice` and `context`)")
    stream_format: Literal["audio", "sse", "json"] = Field(
        "audio", description="audio: the encoded audio itself; sse: server-sent events, `speech.audio.delta` "
                             "(base64 of the next bytes of the encoded audio) then `speech.audio.done`; json "
                             "(fastcsm): one object once spoken, `audio` (base64), `audio_format`, `sample_rate` and "
                             "`timestamps` (each written word's `start_time` and `end_time`)")
    # fastcsm
    speaker: bounded(SPEAKER, nullable=True) = Field(None,
                                description="speaker id of the line (default: the voice's own id, or `voice` itself)")
    context: list[ContextTurn] = Field(default_factory=list, max_length=1024,
                                       description="earlier turns, oldest first (at most the server's "
                                                   "max_context_turns)")
    seed: Seed = Field(None, description="sampling seed, for a reproducible take")
    temperature: Temperature = Field(TEMPERATURE.default, description="0 is greedy")
    topk: TopK = Field(TOPK.default, description="sample from the k likeliest codes; 0 is all")
    max_audio_length_ms: MaxAudioLength = Field(
        None, description="longest audio to generate for each piece of the text (at most "
                                "`ServerInfo.max_audio_length_ms`, the default), lowered to what the piece's "
                                "text can plausibly take, 3 s + 150 ms a character")
    normalize: bool = Field(NORMALIZE_BY_DEFAULT, description=NORMALIZE_HELP)
    lexicon: LexiconEntries | None = Field(None, description=LEXICON_HELP)
    timestamps: bool = Field(False, description="with stream_format sse: a `speech.audio.word` event for each "
                                                "written word (its start and end in seconds) once its audio is sent")


class WordTimestamp(BaseModel):
    """A written word and its span in the audio (Kokoro-FastAPI's names)."""

    word: str
    start_time: float
    end_time: float


class CaptionedSpeech(BaseModel):
    """`POST /v1/audio/speech` with `stream_format: "json"`."""

    audio: str = Field(description="base64 of the whole encoded audio")
    audio_format: str
    sample_rate: int
    timestamps: list[WordTimestamp]


# -- voices ---------------------------------------------------------------------------------------

class VoiceInfo(BaseModel):
    object: Literal["voice"] = "voice"
    name: str
    speaker: int
    text: str = Field(description="transcript of the reference recording")
    duration_ms: int
    created: int | None = Field(None, description="unix time")


class VoiceAlias(BaseModel):
    """A name of the voice map (OpenAI's voice names by default) and what it stands for."""

    name: str
    speaker: int | None = Field(None, description="the speaker id it speaks as, when it maps to one")
    voice: str | None = Field(None, description="the registered voice it maps to, when it maps to one")
    shadowed: bool = Field(False, description="a registered voice of the same name exists and wins")


class VoiceList(BaseModel):
    object: Literal["list"] = "list"
    data: list[VoiceInfo]
    broken: list[str] = Field(default_factory=list,
                              description="names whose voice file is damaged (say, cut short): upload again with "
                                          "overwrite=true, or delete them")
    aliases: list[VoiceAlias] = Field(default_factory=list,
                                      description="names accepted as `voice` besides the registered voices: "
                                                  "OpenAI's voice names, mapped by the server's --voice-map")


class AudioVoice(BaseModel):
    """OpenAI's custom voice object (`POST /v1/audio/voices`); `id` is the fastcsm voice name."""

    object: Literal["audio.voice"] = "audio.voice"
    id: str
    name: str
    created_at: int | None = Field(None, description="unix time")
    text: str | None = Field(None, description="fastcsm: the transcript stored with the voice (given, or recognised)")


class AudioVoiceList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AudioVoice]


class VoiceDeleted(BaseModel):
    object: Literal["voice.deleted"] = "voice.deleted"
    name: str
    deleted: bool = True


# -- service --------------------------------------------------------------------------------------

class ModelInfo(BaseModel):
    id: str = Field(description="the short name of the loaded model (`--model-name`)")
    object: Literal["model"] = "model"
    created: int = Field(description="unix time: when the checkpoint was written, else when the server started")
    owned_by: str = "fastcsm"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelInfo]


class OptionBounds(BaseModel):
    """A speaking option's default and the values it accepts (fastcsm.bounds): what a form shows."""

    default: float | int | None
    minimum: float | int
    maximum: float | int | None


def option_bounds() -> dict[str, OptionBounds]:
    return {b.name: OptionBounds(default=b.default, minimum=b.low, maximum=b.high) for b in (TEMPERATURE, TOPK)}


class ServerInfo(BaseModel):
    """What a client needs to know before it speaks: audio layout, formats, limits and defaults."""

    model: str
    sample_rate: int = SAMPLE_RATE
    frame_samples: int = FRAME_SAMPLES
    frame_ms: int = 80
    speech_formats: list[str]
    pcm_formats: list[str] = list(PCM_FORMATS)
    max_input_chars: int
    max_audio_length_ms: int
    max_upload_bytes: int
    max_voice_audio_s: float
    auth_required: bool
    slots: int
    options: dict[str, OptionBounds] = Field(default_factory=option_bounds,
                                             description="the sampling options' defaults and limits")


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Ready(BaseModel):
    ready: bool
    slots: int = 0
    free_slots: int = 0
    queued: int = 0
    loading: str | None = Field(None, description="while not ready: what start-up is doing, e.g. "
                                                  "\"building step batch 8 top-64 (5/14, 120 s so far)\"")


# -- WebSocket: client -> server ------------------------------------------------------------------

class InputAudio(_Strict):
    """The user's microphone stream: binary messages of little-endian 16-bit mono PCM."""

    sample_rate: Int = Field(ge=MIN_INPUT_RATE, le=MAX_INPUT_RATE, description="samples per second of the PCM")
    language: str | None = Field(None, min_length=2, max_length=8, description="what the user speaks (ISO 639-1, "
                                                                               "e.g. en); left out, the recogniser "
                                                                               "decides")


class Configure(_Strict):
    """Session settings; send before the first turn (sending it later resets the conversation)."""

    type: Literal["configure"] = "configure"
    voices: list[str] = Field(default_factory=list, max_length=8,
                              description="registered voices pinned at the head of the conversation, never "
                                          "dropped with the turns (only unpinned, with a `voice_unpinned` event, "
                                          "when a line does not fit beside them); each speaks under its own "
                                          "speaker id")
    audio_format: Literal["pcm_s16le", "pcm_f32le"] = "pcm_s16le"
    temperature: Temperature = TEMPERATURE.default
    topk: TopK = TOPK.default
    max_audio_length_ms: MaxAudioLength = None
    input_audio: InputAudio | None = Field(None, description="the user's microphone audio streams in as binary "
                                                             "messages of 16-bit mono PCM at this rate (needs the "
                                                             "server's speech recognition, --asr-model)")
    user_speaker: Int = Field(1, ge=0, le=MAX_SPEAKER, description="the user's speaker id: the turns heard from "
                                                                   "input_audio join under it, and in assistant mode "
                                                                   "its `add_turn`s are answered")
    barge_in: bool = Field(True, description="the user starting to speak interrupts the line being spoken, as "
                                             "`interrupt` does")
    assistant: bool = Field(False, description="answer each user turn with the server's language model (--llm-url), "
                                               "spoken as a streamed line; refused when the server has none")
    assistant_voice: str | None = Field(None, max_length=64, description="assistant mode: the voice of the replies "
                                                                        "(a registered voice, or a bare id like \"0\")")
    assistant_speaker: Int = Field(0, ge=0, le=MAX_SPEAKER, description="assistant mode: the replies' speaker id "
                                                                        "when `assistant_voice` is not given")


class AddTurn(_Strict):
    """A turn of the other party (or any speaker), appended to the conversation."""

    type: Literal["add_turn"] = "add_turn"
    speaker: Speaker
    text: str | None = Field(None, min_length=1, description="what was said; left out, the server's speech "
                                                              "recognition transcribes `audio`")
    audio: str | None = Field(None, description="base64 of an audio file (WAV, FLAC, OGG, MP3; any rate)")


class Speak(_Strict):
    """Speak a line. `voice` (a registered name or a bare id like "1") or `speaker` picks who speaks."""

    type: Literal["speak"] = "speak"
    text: str = Field(min_length=1)
    speaker: bounded(SPEAKER, nullable=True) = None
    voice: str | None = Field(None, max_length=64)
    id: str | None = Field(None, max_length=128, description="echoed in this utterance's events")
    seed: Seed = None
    temperature: bounded(TEMPERATURE, nullable=True) = None
    topk: bounded(TOPK, nullable=True) = None
    max_audio_length_ms: MaxAudioLength = Field(None, description="longest audio of each piece of the line")
    more: bool = Field(False, description="the line goes on: more of its text follows in `append_text` messages "
                                          "(as an LLM writes it); speaking starts once its first piece is complete")
    normalize: bool = Field(NORMALIZE_BY_DEFAULT, description=NORMALIZE_HELP)
    lexicon: LexiconEntries | None = Field(None, description=LEXICON_HELP)
    timestamps: bool = Field(False, description="send a `word` event for each written word of the line (its start "
                                                "and end in the line's audio) after the audio holding it")


class AppendText(_Strict):
    """More text of the line being spoken (after a `speak` with `more: true`)."""

    type: Literal["append_text"] = "append_text"
    text: str = Field("", description="the next fragment, appended as is (include its spaces)")
    more: bool = Field(description="false: the line is complete (its last piece is spoken, then `done`)")


class Interrupt(_Strict):
    type: Literal["interrupt"] = "interrupt"
    heard_ms: Number | None = Field(None, ge=0, description="assistant mode: how much of the reply's audio the "
                                                              "client played; the history keeps the words of that "
                                                              "much (default: of every frame sent)")


class Reset(_Strict):
    type: Literal["reset"] = "reset"


ClientMessage = Annotated[Configure | AddTurn | Speak | AppendText | Interrupt | Reset, Field(discriminator="type")]


# -- WebSocket: server -> client ------------------------------------------------------------------

class ReadyEvent(BaseModel):
    type: Literal["ready"] = "ready"
    sample_rate: int = SAMPLE_RATE
    frame_samples: int = FRAME_SAMPLES
    audio_format: str = "pcm_s16le"
    max_rows: int = Field(description="the context window, in rows")


class ConfiguredEvent(BaseModel):
    type: Literal["configured"] = "configured"
    voices: list[str]
    audio_format: str
    pinned_rows: int
    input_audio: InputAudio | None = Field(None, description="the microphone stream the server now listens to")


class TurnAdded(BaseModel):
    type: Literal["turn_added"] = "turn_added"
    index: int = Field(description="position of the turn in the conversation")
    speaker: int
    rows: int
    conversation_rows: int
    text: str | None = Field(None, description="the turn's text when speech recognition made it")


class UserSpeechStarted(BaseModel):
    type: Literal["user_speech_started"] = "user_speech_started"
    at_ms: float = Field(description="where the user's turn starts in the input audio (ms from its first sample)")


class UserSpeechStopped(BaseModel):
    type: Literal["user_speech_stopped"] = "user_speech_stopped"
    at_ms: float = Field(description="where the turn ends in the input audio")
    cut: bool = Field(False, description="the turn reached the server's max_turn_s and was cut there (the speech "
                                         "after it starts the next turn)")


class UserTranscriptPartial(BaseModel):
    """The user's turn so far, transcribed at a pause before the turn stopped (it may go on)."""

    type: Literal["user_transcript_partial"] = "user_transcript_partial"
    text: str = Field(description="the recogniser's text of the turn up to the pause")


class UserTurn(BaseModel):
    """A turn heard from the input audio, transcribed; with text it has joined the conversation
    (a `turn_added` came just before), with none (nothing recognised) it has not."""

    type: Literal["user_turn"] = "user_turn"
    text: str
    speaker: int
    audio_ms: float = Field(description="the turn's audio")
    frames: int = Field(description="its Mimi frames (80 ms each) in the conversation")
    cut: bool = Field(False, description="cut at max_turn_s")
    added: bool = Field(description="the turn joined the conversation (false: no words were recognised)")


class Started(BaseModel):
    type: Literal["started"] = "started"
    id: str | None
    utterance: int = Field(description="counts utterances in this session from 0")
    speaker: int
    prompt_rows: int = Field(description="prompt rows of the first piece")
    first_piece_max_frames: int = Field(
        description="frame bound of the line's first piece only (each later piece has its own bound, lowered to its "
                    "text); `done.frames` counts every piece of the line, so it may exceed this")
    max_frames: int = Field(description="the same as `first_piece_max_frames`, under its old name, for clients "
                                        "written before it", deprecated=True)


class FirstAudio(BaseModel):
    type: Literal["first_audio"] = "first_audio"
    id: str | None
    utterance: int
    ms: float = Field(description="from the message that completed the line's first piece (the `speak`, or the "
                                  "`append_text` that finished it) to the first frame leaving the server")


class Done(BaseModel):
    type: Literal["done"] = "done"
    id: str | None
    utterance: int
    reason: Literal["end", "max_length", "interrupted", "deadline", "error"]
    frames: int = Field(description="frames sent for the whole line, over all its `pieces` (80 ms each); not "
                                    "bounded by `started.first_piece_max_frames`, which bounds the first piece")
    audio_ms: int = Field(description="`frames` in milliseconds of audio")
    prefill_rows: int = Field(description="prompt rows this utterance prefilled, over every piece started, "
                                          "interrupted or not (a failed prefill: the rows that went in before it "
                                          "failed; a piece still queued: 0)")
    reused_rows: int = Field(description="prompt rows taken from the session's KV cache (every piece started)")
    pieces: int = Field(0, description="pieces of the line that were started")
    error: str | None = Field(None, description="why the line stopped, when reason is error or deadline (the "
                                                "message of the error event sent just before; a deadline is the "
                                                "request's, or a streamed line's idle timeout)")
    text: str = Field("", description="the written words of the line whose audio was sent (an interrupted line: "
                                      "those begun before the cut), as the conversation keeps it")


def done_reason(end: EndReason) -> str:
    """`done.reason` for the end of a line's last stream: the engine's reason by its name, but a
    cancelled stream was interrupted (by `interrupt`, a new `speak`, or the socket closing)."""
    return "interrupted" if end is EndReason.CANCELLED else end.value


class WordEvent(BaseModel):
    type: Literal["word"] = "word"
    id: str | None
    utterance: int
    word: str = Field(description="a word as written in the line (a rule's match, \"40–60 °C\", is one word)")
    start: float = Field(description="seconds into the line's audio")
    end: float


class ContextDropped(BaseModel):
    type: Literal["context_dropped"] = "context_dropped"
    dropped_turns: int
    dropped_rows: int
    remaining_rows: int = Field(description="conversation rows kept; they are prefilled again")


class VoiceUnpinned(BaseModel):
    """A pinned voice left the head of the conversation: with it, a piece of the line did not fit."""

    type: Literal["voice_unpinned"] = "voice_unpinned"
    voice: str
    rows: int = Field(description="the rows it held")
    pinned_rows: int = Field(description="rows of the voices still pinned")


class AssistantText(BaseModel):
    """A piece of the assistant's reply, sent as its audio starts (its first frame follows)."""

    type: Literal["assistant_text"] = "assistant_text"
    utterance: int = Field(description="the reply's utterance (as in `started` and `done`)")
    piece: int = Field(description="the piece's position in the reply, from 0")
    text: str = Field(description="the words spoken, after the speakable filter")


class AssistantReply(BaseModel):
    """The assistant's reply has ended (after its line's `done`): what the history keeps of it."""

    type: Literal["assistant_reply"] = "assistant_reply"
    utterance: int | None = Field(description="the reply's utterance; None when nothing was spoken")
    reason: Literal["stop", "length", "interrupted", "error"] = Field(
        description="stop: the model finished; length: the reply bound (--max-reply-chars) or the model's token limit "
                    "cut it; interrupted: barge-in (interrupt, or the next user turn); error: the model or the line "
                    "failed (an `error` event said why)")
    text: str = Field(description="what the model will see of this reply: the pieces heard, and of an interrupted "
                                  "piece the words its frames cover, then a dash")
    first_token_ms: float | None = Field(description="from the user turn to the model's first token (negative when "
                                                     "the reply was asked at the user's pause, preemptive_reply, "
                                                     "and began before the turn ended)")
    first_piece_ms: float | None = Field(description="from the user turn to the first piece complete")
    first_audio_ms: float | None = Field(description="from the user turn to the reply's first frame leaving the server")


def error_code(status: int) -> str:
    """The `error` event's code for a refusal worded as an HTTP status."""
    return {401: "unauthorized", 404: "not_found", 409: "busy", 503: "busy"}.get(
        status, "bad_request" if status < 500 else "internal")


class ErrorEvent(BaseModel):
    type: Literal["error"] = "error"
    message: str
    code: str = Field(description="bad_request, not_found, busy, unauthorized, timeout (a streamed line got no "
                                  "text in time), internal; assistant mode: llm_unreachable, llm_error (the model's "
                                  "server answered an error status), llm_timeout, llm_stopped (the reply broke off)")
    id: str | None = None


ServerMessage = Annotated[
    ReadyEvent | ConfiguredEvent | TurnAdded | Started | FirstAudio | Done | ContextDropped | VoiceUnpinned
    | ErrorEvent | WordEvent | UserSpeechStarted | UserSpeechStopped | UserTranscriptPartial | UserTurn | AssistantText
    | AssistantReply,
    Field(discriminator="type"),
]
