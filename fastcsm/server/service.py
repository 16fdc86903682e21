"""What the routes call: the loaded model, the scheduler, the voice store, and prompt building.

Everything here checks its input and raises `ApiError` (status + message) for what a client
got wrong; nothing here knows about HTTP requests or sockets. Building a prompt can mean
decoding and encoding audio, so routes run it in a worker thread, never in the event loop.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
import threading
import unicodedata

import torch

from ..assistant.llm import LanguageModel, LLMConfig
from ..audio import SAMPLE_RATE, AudioError, read_audio, resample
from ..bounds import SPEAKER
from ..engine.engine import Engine, Request
from ..listen.asr import SAMPLE_RATE as ASR_RATE, AsrBusy, AsrError, AsrPool, UnknownLanguage, load_transcriber
from ..model.prompt import Prompt, Segment, check_text, segment_rows
from ..speech.lexicon import Lexicon, LexiconError
from ..speech.line import Line
from ..speech.normalize import NORMALIZE_BY_DEFAULT
from ..speech.planner import PlannedPiece, requested_frames
from ..speech.speech import SpeakOptions
from ..speech.voices import (
    Voice,
    VoiceError,
    VoiceExists,
    VoiceNotFound,
    VoiceStore,
    check_name,
    check_new_name,
    is_speaker_id,
)
from ..speech.watermark import resolve_watermark
from .protocol import MAX_SPEAKER, SpeechRequest, VoiceAlias, VoiceInfo, VoiceRef
from .scheduler import Scheduler, Stream, WatermarkedStream
from .settings import Settings, parse_voice_map

log = logging.getLogger("fastcsm")
LIST_VOICES_HINT = ("list the registered voices with GET /v1/voices, or give one of OpenAI's voice names "
                    '(alloy, ash, ...) or a bare speaker id such as "0"')
MAX_AUDIO_RATE = 192_000  # uploads and context audio: above it a header is lying or wasteful
MAX_AUDIO_CHANNELS = 8


class ApiError(Exception):
    """A request the server refuses: `status` (4xx), a message that says what to fix."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 retry_after: int | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.retry_after = status, message, type, param, retry_after


class BrokenVoice(ApiError):
    """A voice name whose file exists but cannot be read (cut short by a crash, say)."""

    def __init__(self, name: str, param: str = "voice"):
        super().__init__(409, f"the voice {name!r} is damaged (its file cannot be read): upload it again with "
                              "overwrite=true, or delete it", "conflict_error", param=param)


def voice_info(name: str, voice: Voice) -> VoiceInfo:
    return VoiceInfo(name=name, speaker=voice.speaker, text=voice.text, duration_ms=voice.duration_ms(),
                     created=voice.meta.get("created"))


def configure_logging(level: str) -> None:
    """fastcsm's log at `level`, one line a message on stderr unless something (the CLI, a host
    such as Ray Serve) already handles it."""
    log.setLevel(level.upper())
    if not log.hasHandlers():
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("fastcsm: %(message)s"))
        log.addHandler(handler)


def load_generator_for(s):
    """The generator that `s` (a `Settings`, or a command's arguments with the same names) asks for:
    the watermark loaded first (before the slow model load), then the model, then torch's threads
    set for the machine and the model. Raises `CheckpointError`, `WatermarkUnavailable` or ValueError."""
    from .. import threads
    from ..generator import load_generator
    from ..model.checkpoints import resolve_device_dtype
    from ..speech.watermark import Watermarker

    watermarker = Watermarker.load(resolve_device_dtype(s.device)[0]) if s.watermark else None
    generator = load_generator(s.model, s.device, s.dtype, s.tokenizer, s.codec, s.quantize)
    generator.watermarker = watermarker
    threads.apply(s.threads, generator.cfg.param_count())
    return generator


def start_engine(gen, s: Settings, progress=None, runner=None) -> Engine:
    """The engine `s` asks for over `gen`'s model, every step variant built (compiled: from the
    compile cache where it has them; `progress` hears of each build). `runner` (its step and
    prefill) replaces the one the settings' compile flags would build."""
    compile = "auto" if s.compile is None else s.compile
    compiled = {} if runner is not None else {"compile": compile, "compile_cache": s.compile_cache}
    engine = Engine(gen.model, max_slots=s.slots, codec=gen.codec, prefill_chunk=s.prefill_chunk, runner=runner,
                    **compiled)
    if engine.cuda_graphs or engine.runner.compiled or engine.runner.auto:
        took = engine.warmup(progress)
        if engine.cuda_graphs or engine.runner.compiled:
            log.info("fastcsm: compiled / captured every batch bucket in %.1f s", took)
    return engine


def bootstrap(s: Settings, generator=None, runner=None, progress=None):
    """What every service runs on, from its settings: fastcsm's log level, the generator
    (`generator`, else the one `s` names, with torch's threads and the watermark) and the engine
    over it (`runner`: its step and prefill, else what `s` asks for). `progress` hears what
    start-up is doing. Returns (generator, engine)."""
    configure_logging(s.log_level)
    gen = generator if generator is not None else load_generator_for(s)
    if s.watermark and gen.watermarker is None:
        gen.watermarker = resolve_watermark(True, gen.device)
    if progress is not None:
        progress("building the engine")
    return gen, start_engine(gen, s, progress, runner)


class Service:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.store = VoiceStore(settings.voices_dir)
        self.voice_map = parse_voice_map(settings.voice_map)
        self.lexicon = settings.check_lexicon() or Lexicon({})
        self.generator = None
        self.scheduler: Scheduler | None = None
        self.load_error: str | None = None
        self.loading: str | None = "loading the model"  # what start-up is doing, for /readyz
        self._voices: dict[str, tuple[int, Voice]] = {}  # name -> (mtime_ns, voice)
        self._lock = threading.Lock()
        self.llm_config = LLMConfig.from_settings(settings)  # None: no --llm-url, no assistant mode
        self._llm: LanguageModel | None = None
        self.asr = None  # a fastcsm.listen.asr.AsrPool once `asr_model` is loaded
        self.asr_error: str | None = None
        self._vad = None  # Silero's detector, loaded by the first conversation that listens

    # -- life cycle -----------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.scheduler is not None

    def load(self, generator=None, runner=None) -> None:
        """Load the model (or take `generator`), build the engine (over `runner`, if given) and
        start the scheduler, whose thread shares the GIL with the event loop (`threads.share_gil`)."""
        from .. import threads

        s = self.settings
        self.load_asr()
        try:
            gen, engine = bootstrap(s, generator, runner, progress=lambda p: setattr(self, "loading", str(p)))
        except Exception as e:
            self.loading = None
            self.load_error = f"{type(e).__name__}: {e}"
            raise
        self.generator, self.loading = gen, None
        threads.share_gil()
        self.scheduler = Scheduler(engine, max_queue=s.max_queue, timeout_s=s.request_timeout_s)
        log.info("fastcsm: %s loaded on %s, %d slots", s.model, gen.device, s.slots)

    def load_asr(self) -> None:
        """The recogniser `asr_model` names, on the server's device; a failure is kept in
        `asr_error` (and said by every route that needs it), never fatal to speaking."""
        s = self.settings
        if not s.asr_model or self.asr is not None:
            return
        try:
            self.asr = AsrPool(load_transcriber(s.asr_model, s.device, threads=s.threads), max_waiting=s.max_queue)
            log.info("fastcsm: speech recognition by %s", self.asr.name)
        except AsrError as e:
            self.asr_error = str(e)
            log.error("fastcsm: speech recognition is off: %s", e)

    def close(self) -> None:
        if self.scheduler is not None:
            self.scheduler.close()
        if self.asr is not None:
            self.asr.close()

    def need_asr(self, param: str | None = None):
        """The recogniser; 400 when none is configured, 503 while it loads or if it failed to."""
        if self.asr is not None:
            return self.asr
        if not self.settings.asr_model:
            raise ApiError(400, "this server has no speech recognition: start it with --asr-model (e.g. small, or "
                                'pocketsphinx; pip install "fastcsm[asr]")', param=param)
        if self.asr_error:
            raise ApiError(503, f"speech recognition failed to load: {self.asr_error}", "server_error")
        raise ApiError(503, "speech recognition is still loading; retry shortly", "server_busy", retry_after=5)

    def listener(self, rate: int, language: str | None):
        """A `Listener` for one microphone stream at `rate` (400 without speech recognition):
        turns cut by the server's settings, encoded by the model's codec, transcribed by its
        recogniser (on the recogniser's thread: see `AsrPool.submit`)."""
        from ..listen.listener import Listener, ListenError
        from ..listen.vad import SileroVad, TurnConfig, VadError

        asr, gen = self.need_asr("input_audio"), self.need_ready()
        with self._lock:
            if self._vad is None:
                try:
                    self._vad = SileroVad()
                except VadError as e:
                    raise ApiError(503, str(e), "server_error") from None
        s = self.settings
        try:
            return Listener(self._vad, rate, codec=gen.codec, transcriber=asr.transcriber, language=language,
                            config=TurnConfig(end_silence_ms=s.turn_silence_ms, max_turn_s=s.max_turn_s),
                            live=s.transcribe_live)
        except ListenError as e:
            raise ApiError(400, str(e), param="input_audio") from None

    def transcribe_upload(self, data: bytes, language: str | None, prompt: str | None):
        """`POST /v1/audio/transcriptions`: decode the upload (400 if it is not audio), transcribe it."""
        if not data:
            raise ApiError(400, "file: the audio is empty", param="file")
        try:
            audio = read_audio(data, ASR_RATE, max_duration_s=self.settings.max_transcription_s,
                               max_sample_rate=MAX_AUDIO_RATE, max_channels=MAX_AUDIO_CHANNELS)
        except AudioError as e:
            msg = re.sub(r"Error opening <[^>]*>: ", "", str(e)).replace("<BytesIO>", "file")
            raise ApiError(400, f"{msg} (send WAV, FLAC, OGG or MP3; at most {self.settings.max_transcription_s:g} s)",
                           param="file") from None
        return self.transcribe(audio.numpy(), language, prompt)

    def transcribe(self, audio, language: str | None = None, prompt: str | None = None, param: str = "file"):
        """The `Transcript` of 16 kHz mono audio (called from a worker thread, it waits on the
        recogniser's own thread)."""
        asr = self.need_asr(param)
        try:
            return asr.transcribe(audio, language, prompt).result()
        except AsrBusy as e:
            raise ApiError(503, str(e), "server_busy", retry_after=2) from None
        except UnknownLanguage as e:
            raise ApiError(400, str(e), param="language") from None
        except AsrError as e:
            raise ApiError(400, str(e), param=param) from None

    def language_model(self) -> LanguageModel:
        """The one client of --llm-url every assistant conversation shares (made on first use, on
        the serving event loop); 400 when the server has none."""
        if self.llm_config is None:
            raise ApiError(400, "assistant mode needs a language model, and this server has none: start it with "
                                "--llm-url URL --llm-model NAME (an OpenAI-compatible chat API)", param="assistant")
        if self._llm is None:
            self._llm = LanguageModel(self.llm_config)
        return self._llm

    async def close_language_model(self) -> None:
        """Close the model client's connections (at shutdown)."""
        if self._llm is not None:
            llm, self._llm = self._llm, None
            await llm.close()

    def need_ready(self):
        if not self.ready:
            why = f" (loading failed: {self.load_error})" if self.load_error else ""
            raise ApiError(503, f"the model is not loaded yet{why}; retry shortly", "server_busy", retry_after=5)
        return self.generator

    @property
    def cfg(self):
        return self.generator.cfg

    # -- voices ---------------------------------------------------------------------------------

    def voice(self, name: str) -> Voice:
        """A registered voice (cached while its file is unchanged); 400 if there is none (also
        when it is removed while being read)."""
        unknown = ApiError(400, f"unknown voice {name!r}: {LIST_VOICES_HINT}", param="voice")
        try:
            check_name(name)
            path = self.store.path(name)
            mtime = path.stat().st_mtime_ns
        except (VoiceError, OSError):
            raise unknown from None
        with self._lock:
            hit = self._voices.get(name)
            if hit is not None and hit[0] == mtime:
                return hit[1]
        try:
            voice = Voice.load(path)
        except VoiceNotFound:
            raise unknown from None
        except VoiceError:  # its message names the file's path: the client hears the name only
            raise BrokenVoice(name) from None
        with self._lock:
            self._voices[name] = (mtime, voice)
        return voice

    def registered(self, name: str) -> bool:
        try:
            return name in self.store
        except VoiceError:
            return False

    def lookup(self, name: str) -> Voice | int:
        """A voice by name: a registered voice, else the voice map's entry (a speaker id, or the
        registered voice it names); 400 if neither knows it."""
        target = self.voice_map.get(name)
        if target is None or self.registered(name):
            return self.voice(name)
        if isinstance(target, int):
            return target
        try:
            return self.voice(target)
        except ApiError:
            raise ApiError(400, f"voice {name!r} maps to the voice {target!r}, which is not registered: register it "
                                "or change the server's --voice-map", param="voice") from None

    def aliases(self) -> list[VoiceAlias]:
        return [VoiceAlias(name=name, speaker=target if isinstance(target, int) else None,
                           voice=target if isinstance(target, str) else None, shadowed=self.registered(name))
                for name, target in self.voice_map.items()]

    def voice_rows(self, voice: Voice, speaker: int | None = None) -> Prompt:
        """The prompt rows that carry `voice` (under `speaker`, default its own id)."""
        try:
            return segment_rows(voice.segment(speaker), self.generator.tokenizer, self.cfg)
        except ValueError as e:
            raise ApiError(400, f"voice {voice.name or ''!r} cannot be used with this model: {e}",
                           param="voice") from None

    def list_voices(self) -> tuple[list[VoiceInfo], list[str]]:
        """The readable voices, and the names whose file is damaged."""
        out, broken = [], []
        for name in self.store.names():
            try:
                out.append(voice_info(name, self.voice(name)))
            except BrokenVoice:
                broken.append(name)
            except ApiError:
                continue  # gone since the listing
        return out, broken

    def create_voice(self, name: str, text: str | None, speaker: int, audio: bytes, filename: str | None,
                     overwrite: bool, **meta) -> VoiceInfo:
        """Encode and store a voice; without `text` the recogniser transcribes the recording once
        (400 if the server has none) and the transcript is stored and returned with the voice."""
        gen = self.need_ready()
        try:
            check_new_name(name)
        except VoiceError as e:
            raise ApiError(400, str(e), param="name") from None
        exists = f"a voice named {name!r} already exists; delete it first or pass overwrite=true"
        if not overwrite and name in self.store:  # early; the store's create-if-absent is the real check
            raise ApiError(409, exists, "conflict_error", param="name")
        try:
            SPEAKER.check(speaker)
        except ValueError as e:
            raise ApiError(400, str(e), param="speaker") from None
        if text is not None and not text.strip():
            raise ApiError(400, "text is empty: give the transcript of the recording", param="text")
        if text is None:
            self.need_asr("text")  # before any decoding: without a recogniser the transcript is required
        else:
            text = self.check_input(text, "text")
        wav = self._read_audio(audio, "audio")
        if text is None:
            text = self.transcribe(resample(wav.numpy(), SAMPLE_RATE, ASR_RATE), param="audio").text
            if not text.strip():
                raise ApiError(400, "no speech was recognised in the recording: send its transcript as `text`",
                               param="audio")
            meta["transcribed_by"] = self.asr.name
            text = self.check_input(text, "text")
        try:
            voice = Voice.from_audio(gen.codec, wav, text, speaker, source=(filename or "upload")[:256], **meta)
        except (VoiceError, AudioError, ValueError) as e:
            raise ApiError(400, str(e), param="audio") from None
        try:
            self.store.add(voice, name, overwrite=overwrite)
        except VoiceExists:
            raise ApiError(409, exists, "conflict_error", param="name") from None
        with self._lock:
            self._voices.pop(name, None)
        return voice_info(name, voice)

    def delete_voice(self, name: str) -> None:
        try:
            check_name(name)
            self.store.remove(name)
        except VoiceError:
            raise ApiError(404, f"no voice named {name!r}: {LIST_VOICES_HINT}", "not_found_error",
                           param="name") from None
        with self._lock:
            self._voices.pop(name, None)

    def _read_audio(self, data: bytes, what: str) -> torch.Tensor:
        if not data:
            raise ApiError(400, f"{what}: the audio is empty", param=what)
        try:
            return read_audio(data, max_duration_s=self.settings.max_voice_audio_s, max_sample_rate=MAX_AUDIO_RATE,
                              max_channels=MAX_AUDIO_CHANNELS)
        except AudioError as e:
            msg = re.sub(r"Error opening <[^>]*>: ", "", str(e)).replace("<bytes>", what).replace("<BytesIO>", what)
            raise ApiError(400, f"{msg} (at most {self.settings.max_voice_audio_s:g} s)", param=what) from None

    def audio_b64(self, text: str, what: str) -> torch.Tensor:
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, f"{what} must be base64 of an audio file (WAV, FLAC, OGG, MP3)", param=what) from None
        return self._read_audio(data, what)

    # -- utterances -----------------------------------------------------------------------------

    def resolve_speaker(self, voice: str | VoiceRef | None, speaker: int | None) -> tuple[int, Voice | None]:
        """`voice` is a registered name, a name of the voice map (OpenAI's) or a bare id ("0");
        `speaker` overrides the id."""
        name = voice.id if isinstance(voice, VoiceRef) else voice
        if name is None:
            return (speaker or 0), None
        if is_speaker_id(name):
            if len(name.lstrip("0")) > 7 or int(name) > MAX_SPEAKER:  # (length first: int() of 10**6 digits)
                raise ApiError(400, f"speaker id {name} is above {MAX_SPEAKER}", param="voice")
            return (int(name) if speaker is None else speaker), None
        v = self.lookup(name)
        if isinstance(v, int):
            return (v if speaker is None else speaker), None
        return (v.speaker if speaker is None else speaker), v

    def options(self, max_audio_length_ms: float | None, temperature: float, topk: int,
                normalize: bool = NORMALIZE_BY_DEFAULT, lexicon: dict | None = None,
                param: str = "max_audio_length_ms") -> SpeakOptions:
        """How one line is spoken: sampled as asked, each piece bounded by the request's bound (by
        default the server's limit; 400 above it) lowered by the length guard of its text, read
        normalised (unless `normalize` is false) with the server's lexicon and the request's."""
        limit = self.settings.max_audio_length_ms
        try:
            words = self.lexicon.updated(lexicon)
        except LexiconError as e:
            raise ApiError(400, str(e), param="lexicon") from None
        try:
            options = SpeakOptions(max_audio_length_ms=limit if max_audio_length_ms is None else max_audio_length_ms,
                                   temperature=temperature, topk=topk, normalize=normalize, lexicon=words or None)
            requested_frames(options.max_audio_length_ms, self.cfg.frame_ms, limit)
        except (TypeError, ValueError) as e:
            raise ApiError(400, str(e), param=param) from None
        return options

    def check_input(self, text: str, param: str = "input") -> str:
        limit = self.settings.max_input_chars
        if len(text) > limit:
            raise ApiError(400, f"{param} has {len(text)} characters; this server speaks at most {limit} "
                                "at a time: split the text into several requests", param=param)
        bad = next((c for c in text if unicodedata.category(c) == "Cc" and c not in "\t\n\r"), None)
        if bad is not None:
            raise ApiError(400, f"{param} holds the control character U+{ord(bad):04X}; send plain text", param=param)
        if "\ufffd" in text:
            raise ApiError(400, f"{param} holds U+FFFD, the mark of text that was not valid UTF-8; send UTF-8",
                           param=param)
        if not any(unicodedata.category(c)[0] in "LNS" for c in text):
            raise ApiError(400, f"{param} has nothing to speak (no letter, digit or symbol)", param=param)
        try:
            return check_text(text)
        except (TypeError, ValueError) as e:
            raise ApiError(400, str(e), param=param) from None

    def next_piece(self, line: Line, param: str = "input") -> PlannedPiece | None:
        """The line's next piece (None: none now), after the pieces spoken so far; 400 (on
        `param`) for one that cannot be spoken (too long for the window, say)."""
        try:
            return line.next()
        except ValueError as e:  # ContextTooLong
            raise ApiError(400, str(e), param=param) from None

    def speech_line(self, req: SpeechRequest) -> Line:
        """A checked `POST /v1/audio/speech` (runs in a worker thread: it may encode audio)."""
        gen = self.need_ready()
        text = self.check_input(req.input)
        if len(req.context) > self.settings.max_context_turns:
            raise ApiError(400, f"context has {len(req.context)} turns; at most {self.settings.max_context_turns}",
                           param="context")
        speaker, voice = self.resolve_speaker(req.voice, req.speaker)
        options = self.options(req.max_audio_length_ms, req.temperature, req.topk, req.normalize,
                               req.lexicon)  # before any audio is encoded
        encode = gen.codec.encode_waveform
        pinned = [self.voice_rows(voice, speaker)] if voice is not None else []
        history = []
        for i, turn in enumerate(req.context):
            what = f"context[{i}].audio"
            try:
                self.check_input(turn.text, f"context[{i}].text")
                audio = self.audio_b64(turn.audio, what) if turn.audio is not None else None
                history.append(segment_rows(Segment(turn.speaker, turn.text, audio=audio), gen.tokenizer, self.cfg,
                                            encode))
            except (AudioError, ValueError) as e:
                raise ApiError(400, f"context[{i}]: {e}", param=f"context[{i}]") from None
        try:
            return Line(text, speaker, pinned, history, gen.tokenizer, self.cfg, options, req.seed,
                        limit_ms=self.settings.max_audio_length_ms)
        except ValueError as e:  # ContextTooLong too
            raise ApiError(400, str(e), param="input") from None

    def submit(self, request: Request, follow_on: bool = False) -> Stream:
        """Queue an utterance; 503 (with Retry-After) when the waiting queue is full. A
        `follow_on` (the next piece of a response already streaming) goes ahead of the queue."""
        from .scheduler import Busy, Closed

        self.need_ready()
        try:
            stream = self.scheduler.submit(request, priority=follow_on)
            if self.generator.watermarker is not None:  # the mark needs whole utterances
                stream = WatermarkedStream(stream, self.generator.watermarker, self.generator.codec.sample_rate)
            return stream
        except Busy as e:
            raise ApiError(503, str(e), "server_busy", retry_after=e.retry_after) from None
        except Closed as e:
            raise ApiError(503, str(e), "server_busy", retry_after=5) from None
