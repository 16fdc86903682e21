"""The FastAPI application: routes, authentication, limits, errors, metrics.

`create_app(settings)` returns an app that loads the model in the background when it starts
(`/readyz` says when it is ready) and owns one `Service` (model, scheduler, voices). Routes
check their input and turn every mistake into an `ErrorResponse` with a 4xx status; audio
streams by chunked transfer straight from the scheduler's frames.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import secrets
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Depends, FastAPI, File, Form, Request, UploadFile, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from fastapi_offline import FastAPIOffline
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..bounds import SPEAKER
from ..speech.line import Line
from . import protocol as P, transcriptions as T
from .audio_out import available_formats, encoder
from .conversation import Conversation
from .limits import (
    API_KEY_SCOPE,
    Guard,
    error_response,
    install_redaction,
    invalid_fields,
    json_values,
    max_speech_values,
)
from .metrics import render_metrics
from .scheduler import End
from .service import ApiError, BrokenVoice, Service
from .settings import Settings
from .words import LineWords

log = logging.getLogger("fastcsm")
VOICE_NAME = "letters, digits, '.', '_' or '-'; not digits alone (those are speaker ids)"
ERRORS = {400: {"model": P.ErrorResponse}, 401: {"model": P.ErrorResponse}, 403: {"model": P.ErrorResponse},
          408: {"model": P.ErrorResponse}, 413: {"model": P.ErrorResponse}, 503: {"model": P.ErrorResponse}}


def _validation_message(errors: list) -> tuple[str, str | None]:
    if any(e.get("type") == "json_invalid" for e in errors):
        return "the request body is not valid JSON; send a JSON object (Content-Type: application/json)", None
    return invalid_fields(errors, skip=("body", "query", "path", "form"),
                          hints={"response_format": f"this server encodes {', '.join(available_formats())}"})


def create_app(settings: Settings | None = None, generator=None, runner=None) -> FastAPI:
    """The app. `generator` (a loaded `Generator`) skips loading `settings.model`; `runner` (a
    `fastcsm.engine.runner.Runner`) is the engine's step and prefill instead of the one `settings` build."""
    settings = settings or Settings.from_env()
    keys = settings.check_keys()  # an empty key is an error, never "no authentication"
    install_redaction(keys)
    service = Service(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        leftovers = service.store.remove_stale_temps()
        if leftovers:
            log.info("fastcsm: removed %d unfinished voice writes from %s", len(leftovers), service.store.root)
        loading = asyncio.get_running_loop().run_in_executor(None, _load, service, generator, runner)
        app.state.loading = loading
        try:
            yield
        finally:
            await service.close_language_model()
            service.close()

    # /docs (Swagger UI) loads its script and style from fastapi-offline's copy under /docs-assets, never
    # from a CDN, so the API's documentation works with no internet. No /redoc: ReDoc fetches its logo
    # from its vendor's site whatever it is given.
    app = FastAPIOffline(title="fastcsm", version=_version(), lifespan=lifespan, static_url="/docs-assets",
                         redoc_url=None,
                         description="Fast, streaming speech with Sesame's CSM: an OpenAI-compatible speech API, "
                                     "voices, and live conversations over a WebSocket.")
    app.state.service = service
    app.state.settings = settings
    if settings.cors_origins:
        exposed = ["X-Fastcsm-Seed", "X-Fastcsm-Sample-Rate", "X-Fastcsm-Pieces", "X-Fastcsm-Context-Dropped",
                   "Retry-After"]
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"],
                           allow_headers=["*"], expose_headers=exposed)
    app.add_middleware(Guard, settings=settings)  # outermost: limits, Origin, keys out of the query
    formats = available_formats()
    model = P.ModelInfo(id=settings.served_model_name, created=_created(settings.model))

    # -- errors ---------------------------------------------------------------------------------

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return error_response(exc.status, exc.message, exc.type, exc.param, exc.retry_after)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        message, param = _validation_message(exc.errors())
        return error_response(400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        if request.url.path.startswith("/v1") and not check_key(bearer(request.headers)):
            return error_response(401, "missing or invalid API key: send `Authorization: Bearer <key>`")
        message = exc.detail if isinstance(exc.detail, str) else "error"
        if exc.status_code == 404 and message == "Not Found":
            message = f"no route {request.url.path}; see /docs for the API"
        return error_response(exc.status_code, message)

    @app.exception_handler(Exception)
    async def _internal(request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return error_response(500, "internal error; the server log has the details", "server_error")

    # -- auth -----------------------------------------------------------------------------------

    encoded_keys = [k.encode() for k in keys]

    def check_key(given: bytes | None) -> bool:
        # Bytes: compare_digest refuses non-ASCII str, and a header may hold any byte.
        return not keys or (given is not None and any(secrets.compare_digest(given, k) for k in encoded_keys))

    def bearer(headers) -> bytes | None:
        header = headers.get("authorization", "")
        # Header values arrive decoded as latin-1: encoding them back gives the bytes sent.
        return header[7:].strip().encode("latin-1") if header[:7].lower() == "bearer " else None

    async def auth(request: Request) -> None:
        if not check_key(bearer(request.headers)):
            raise ApiError(401, "missing or invalid API key: send `Authorization: Bearer <key>`",
                           "authentication_error")

    v1 = [Depends(auth)]

    # -- service --------------------------------------------------------------------------------

    @app.get("/healthz", response_model=P.Health, tags=["service"])
    async def healthz():
        return P.Health()

    app.head("/healthz", include_in_schema=False)(healthz)  # load balancers probe with HEAD

    @app.get("/readyz", response_model=P.Ready, responses={503: {"model": P.Ready}}, tags=["service"])
    async def readyz():
        if not service.ready:
            body = P.Ready(ready=False, loading=service.loading).model_dump()
            return JSONResponse(body, status_code=503, headers={"Retry-After": "5"})
        s = service.scheduler
        return P.Ready(ready=True, slots=s.slots, free_slots=s.engine.free_slots, queued=s.queued)

    @app.get("/metrics", response_class=PlainTextResponse, tags=["service"])
    async def metrics():
        return PlainTextResponse(render_metrics(service), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", response_model=P.ModelList, dependencies=v1, responses=ERRORS, tags=["service"])
    async def models():
        return P.ModelList(data=[model])

    @app.get("/v1/models/{name:path}", response_model=P.ModelInfo, dependencies=v1,
             responses={**ERRORS, 404: {"model": P.ErrorResponse}}, tags=["service"])
    async def get_model(name: str):
        if name != model.id:
            raise ApiError(404, f"no model {name!r}: this server serves {model.id!r}", "not_found_error",
                           param="model")
        return model

    @app.get("/v1/info", response_model=P.ServerInfo, dependencies=v1, responses=ERRORS, tags=["service"])
    async def info():
        return P.ServerInfo(model=model.id, speech_formats=formats, max_input_chars=settings.max_input_chars,
                            max_audio_length_ms=settings.max_audio_length_ms, max_upload_bytes=settings.max_body_bytes,
                            max_voice_audio_s=settings.max_voice_audio_s, auth_required=bool(keys),
                            slots=settings.slots)

    # -- speech ---------------------------------------------------------------------------------

    max_json_values = max_speech_values(settings)

    def parse_speech(body: bytes) -> P.SpeechRequest:
        """The request, parsed and checked in a worker thread. Its cost is bounded before parsing:
        a body holds at most `max_json_values` values (the commas and brackets counted, at memchr
        speed), so a body of millions of tiny values or unknown keys is refused at once."""
        values = json_values(body)
        if values > max_json_values:
            raise ApiError(400, f"the request holds too many JSON values ({values}, at most {max_json_values}): "
                                "a speech request is a few fields, its context and their audio")
        try:
            data = json.loads(body)
        except (ValueError, RecursionError):
            raise ApiError(400, "the request body is not valid JSON; send a JSON object "
                                "(Content-Type: application/json)") from None
        if not isinstance(data, dict):
            raise ApiError(400, "the request body must be a JSON object (see /docs for its fields)")
        unknown = sorted(data.keys() - P.SpeechRequest.model_fields.keys())
        if unknown:
            raise ApiError(400, f"{', '.join(map(repr, unknown[:3]))}: unknown field (see /docs for the accepted "
                                "fields)", param=unknown[0][:64])
        context = data.get("context")
        if isinstance(context, list) and len(context) > settings.max_context_turns:
            raise ApiError(400, f"context has {len(context)} turns; at most {settings.max_context_turns}",
                           param="context")
        try:
            return P.SpeechRequest.model_validate(data)
        except ValidationError as e:
            message, param = _validation_message(e.errors(include_url=False))
            raise ApiError(400, message, param=param) from None

    @app.post("/v1/audio/speech", dependencies=v1, tags=["speech"], response_class=StreamingResponse,
              responses={**ERRORS, 200: {"content": {t: {} for t in ("audio/mpeg", "audio/wav", "audio/flac",
                                                                      "audio/ogg", "audio/aac", "audio/pcm")},
                                         "description": "the audio, streamed as it is generated"}},
              openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                  "schema": {"$ref": "#/components/schemas/SpeechRequest"}}}}})
    async def speech(request: Request):
        """Speak `input` (OpenAI's `audio.speech.create`, plus fastcsm's fields)."""
        req = await run_in_threadpool(parse_speech, await request.body())
        if req.timestamps and req.stream_format == "audio":
            raise ApiError(400, 'timestamps need stream_format "sse" (word events) or "json" (one object with the '
                                "audio and its timestamps)", param="timestamps")
        if req.response_format not in formats:
            raise ApiError(400, f"response_format {req.response_format!r} is not available on this server; "
                                f"choose one of {', '.join(formats)}", param="response_format")
        service.need_ready()

        def first_piece():  # building rows may encode audio: off the event loop
            line = service.speech_line(req)
            return line, service.next_piece(line)

        line, first = await run_in_threadpool(first_piece)
        stream = service.submit(first.request)
        enc = encoder(req.response_format, P.SAMPLE_RATE, speed=req.speed)
        headers = {"X-Fastcsm-Seed": str(line.seed), "X-Fastcsm-Sample-Rate": str(P.SAMPLE_RATE),
                   "X-Fastcsm-Pieces": str(len(line.texts)), "Cache-Control": "no-store"}
        if first.dropped_context:
            headers["X-Fastcsm-Context-Dropped"] = str(len(first.dropped_context))
        words = LineWords(P.SAMPLE_RATE, req.speed) if req.timestamps or req.stream_format == "json" else None
        body = _audio(service, line, stream, enc, words)
        if req.stream_format == "sse":
            return StreamingResponse(_sse(body, line, words), media_type="text/event-stream", headers=headers)
        if req.stream_format == "json":
            return await _captioned(body, req.response_format, words, headers)
        return StreamingResponse(body, media_type=enc.media_type, headers=headers)

    # -- voices ---------------------------------------------------------------------------------

    @app.get("/v1/voices", response_model=P.VoiceList, dependencies=v1, responses=ERRORS, tags=["voices"])
    async def list_voices():
        voices, broken = await run_in_threadpool(service.list_voices)
        return P.VoiceList(data=voices, broken=broken, aliases=await run_in_threadpool(service.aliases))

    @app.get("/v1/voices/{name}", response_model=P.VoiceInfo, dependencies=v1,
             responses={**ERRORS, 404: {"model": P.ErrorResponse}, 409: {"model": P.ErrorResponse}}, tags=["voices"])
    async def get_voice(name: str):
        try:
            voice = await run_in_threadpool(service.voice, name)
        except BrokenVoice as e:
            e.param = "name"
            raise
        except ApiError:
            raise ApiError(404, f"no voice named {name!r}; list them with GET /v1/voices", "not_found_error",
                           param="name") from None
        from .service import voice_info

        return voice_info(name, voice)

    @app.post("/v1/voices", response_model=P.VoiceInfo, status_code=201, dependencies=v1,
              responses={**ERRORS, 409: {"model": P.ErrorResponse}}, tags=["voices"])
    async def create_voice(name: str = Form(..., max_length=64, description=VOICE_NAME),
                           text: str | None = Form(None, description="what is said in the recording; left out, "
                                                                     "the server's speech recognition transcribes it"),
                           audio: UploadFile = File(..., description="the recording: WAV, FLAC, OGG or MP3, any rate"),
                           speaker: int = Form(SPEAKER.default, ge=SPEAKER.low, le=SPEAKER.high),
                           overwrite: bool = Form(False)):
        """Register a voice: the recording is encoded once and stored as Mimi codes, with its
        transcript (given, or made once by the server's speech recognition)."""
        data = await audio.read()
        return await run_in_threadpool(service.create_voice, name, text, speaker, data, audio.filename, overwrite)

    @app.delete("/v1/voices/{name}", response_model=P.VoiceDeleted, dependencies=v1,
                responses={**ERRORS, 404: {"model": P.ErrorResponse}}, tags=["voices"])
    async def delete_voice(name: str):
        await run_in_threadpool(service.delete_voice, name)
        return P.VoiceDeleted(name=name)

    @app.post("/v1/audio/voices", response_model=P.AudioVoice, status_code=201, dependencies=v1,
              responses={**ERRORS, 409: {"model": P.ErrorResponse}}, tags=["voices"])
    async def create_audio_voice(name: str = Form(..., max_length=64, description=VOICE_NAME),
                                 audio_sample: UploadFile = File(..., description="the recording: WAV, FLAC, OGG or "
                                                                                  "MP3, any rate"),
                                 consent: str | None = Form(None, max_length=256,
                                                            description="OpenAI's consent id; kept with the voice"),
                                 text: str | None = Form(None, description="fastcsm: what is said in audio_sample; "
                                                                           "left out, speech recognition transcribes "
                                                                           "it (--asr-model)"),
                                 speaker: int = Form(SPEAKER.default, ge=SPEAKER.low, le=SPEAKER.high)):
        """OpenAI's custom-voice upload, over fastcsm's voice store (the voice's id is its name)."""
        if (text is None or not text.strip()) and not settings.asr_model:
            raise ApiError(400, "text: fastcsm needs the transcript of audio_sample (this server has no speech "
                                "recognition; start it with --asr-model): send it as the form field `text`",
                           param="text")
        data = await audio_sample.read()
        meta = {"consent": consent} if consent else {}
        info = await run_in_threadpool(service.create_voice, name, text, speaker, data, audio_sample.filename, False,
                                       **meta)
        return _audio_voice(info)

    @app.get("/v1/audio/voices", response_model=P.AudioVoiceList, dependencies=v1, responses=ERRORS,
             tags=["voices"])
    async def list_audio_voices():
        voices, _ = await run_in_threadpool(service.list_voices)
        return P.AudioVoiceList(data=[_audio_voice(v) for v in voices])

    # -- transcription --------------------------------------------------------------------------

    @app.post("/v1/audio/transcriptions", dependencies=v1, tags=["transcription"],
              responses={**ERRORS, 200: {"content": {"application/json": {"schema": {"anyOf": [
                  {"$ref": "#/components/schemas/Transcription"},
                  {"$ref": "#/components/schemas/TranscriptionVerbose"}]}},
                  "text/plain": {}, "application/x-subrip": {}, "text/vtt": {}}}})
    async def transcriptions(file: UploadFile = File(..., description="the recording: WAV, FLAC, OGG or MP3, any "
                                                                      "rate"),
                             model: str = Form(..., max_length=256, description="any name (whisper-1 too): the "
                                                                                "server's --asr-model transcribes"),
                             language: str | None = Form(None, max_length=16, description="ISO 639-1, e.g. en"),
                             prompt: str | None = Form(None, max_length=4096, description="text the speech "
                                                                                          "continues"),
                             response_format: str = Form("json", description=", ".join(T.RESPONSE_FORMATS)),
                             temperature: float = Form(0.0, ge=0.0, le=1.0, description="accepted; decoding is "
                                                                                        "greedy"),
                             timestamp_granularities: list[str] = Form([], alias="timestamp_granularities[]",
                                                                       description="segment, word (with "
                                                                                   "verbose_json)")):
        """OpenAI's `audio.transcriptions.create`, by the server's speech recognition (`--asr-model`)."""
        if response_format not in T.RESPONSE_FORMATS:
            raise ApiError(400, f"response_format {response_format!r} is not one of {', '.join(T.RESPONSE_FORMATS)}",
                           param="response_format")
        bad = [g for g in timestamp_granularities if g not in T.GRANULARITIES]
        if bad:
            raise ApiError(400, f"timestamp_granularities: {bad[0]!r} is not one of {', '.join(T.GRANULARITIES)}",
                           param="timestamp_granularities")
        if timestamp_granularities and response_format != "verbose_json":
            raise ApiError(400, "timestamp_granularities needs response_format=verbose_json",
                           param="timestamp_granularities")
        service.need_asr("model")
        data = await file.read()
        transcript = await run_in_threadpool(service.transcribe_upload, data, language or None, prompt)
        body, media_type = T.render(transcript, response_format, timestamp_granularities)
        if isinstance(body, dict):
            return JSONResponse(body)
        return PlainTextResponse(body, media_type=media_type)

    # -- conversations --------------------------------------------------------------------------

    @app.websocket("/v1/conversations")
    async def conversation(ws: WebSocket):
        token = bearer(ws.headers)
        if token is None and API_KEY_SCOPE in ws.scope:  # ?api_key=, taken out of the logged query string
            token = ws.scope[API_KEY_SCOPE].encode()
        await ws.accept()
        if not check_key(token):
            await ws.send_text(P.ErrorEvent(message="missing or invalid API key: send `Authorization: Bearer <key>` "
                                                    "or ?api_key=<key>", code="unauthorized").model_dump_json())
            await ws.close(code=4401)
            return
        if not service.ready:
            await ws.send_text(P.ErrorEvent(message="the model is not loaded yet; retry shortly",
                                            code="busy").model_dump_json())
            await ws.close(code=1013)
            return
        await Conversation(ws, service).run()

    _mount_page(app)
    _document_speech_request(app)
    return app


def _document_speech_request(app: FastAPI) -> None:
    """The speech route parses its body itself (off the event loop, with bounded cost), so its
    schema is added to the OpenAPI components by hand."""
    generate = app.openapi

    def openapi():
        if app.openapi_schema is None:
            schema = generate()
            model = P.SpeechRequest.model_json_schema(ref_template="#/components/schemas/{model}")
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for name, definition in model.pop("$defs", {}).items():
                components.setdefault(name, definition)
            components["SpeechRequest"] = model
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi


class SpeechFailed(RuntimeError):
    """Generation stopped before the end of the text (a failed prefill or step, the deadline): the
    response is broken off without its last chunk, never finished as if the audio were whole."""


async def _audio(service: Service, line: Line, stream, enc, words: LineWords | None = None):
    """The response body: the line's pieces (the first already submitted as `stream`), their
    encoded frames as they come; the slot is freed if the client leaves. With `words`, each
    piece's word times (a list of `WordTime`) follow its audio. A stream that fails
    raises `SpeechFailed`, so the client sees a broken-off response (its status went out with the
    first byte), not a shorter file that looks complete."""
    n = len(line.texts)
    try:
        if head := enc.start():
            yield head
        while True:
            if words is not None:
                words.start(line.in_flight.text.spoken.words)
            while not isinstance(item := await stream.next(), End):
                line.add(item.codes)
                if item.pcm is not None:
                    if words is not None:
                        words.audio(item.pcm)
                    if data := enc.write(item.pcm):
                        yield data
            line.end(stream.end.reason)
            if not stream.end.reason.complete:
                raise SpeechFailed(f"speech stopped in piece {len(line.pieces)} of {n}: {stream.end.reason}: "
                                   f"{stream.end.message}")
            if words is not None:
                yield words.done()
            index = len(line.pieces)
            try:
                if (planned := service.next_piece(line)) is None:
                    break
                stream = service.submit(planned.request, follow_on=True)
            except ApiError as e:
                raise SpeechFailed(f"speech stopped before piece {index + 1} of {n}: {e.message}") from None
        if tail := enc.finish():
            yield tail
    finally:
        if stream.end is None:  # the client went away (or the server is stopping): free the slot
            stream.cancel()


async def _sse(audio, line: Line, words: LineWords | None):
    """The audio as OpenAI's speech events: deltas of base64 audio, then done with the usage; with
    `words`, a `speech.audio.word` event per written word after its piece's audio."""
    try:
        async for data in audio:
            if isinstance(data, list):
                for w in data:
                    yield _event({"type": "speech.audio.word", "word": w.text, "start": w.start, "end": w.end})
            else:
                yield _event({"type": "speech.audio.delta", "audio": base64.b64encode(data).decode()})
        rows = line.text_rows
        done = {"type": "speech.audio.done",
                "usage": {"input_tokens": rows, "output_tokens": line.frames, "total_tokens": rows + line.frames}}
        if words is not None:
            done["timestamps"] = [_timestamp(w).model_dump() for w in words.words]
        yield _event(done)
    finally:
        await audio.aclose()


def _event(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"


def _timestamp(w) -> P.WordTimestamp:
    return P.WordTimestamp(word=w.text, start_time=w.start, end_time=w.end)


async def _captioned(audio, audio_format: str, words: LineWords, headers: dict) -> JSONResponse:
    """`stream_format: "json"`: the whole line, then one object with its audio and word times. A
    line that fails is a 500 (nothing was sent yet)."""
    chunks = []
    try:
        async for data in audio:
            if not isinstance(data, list):
                chunks.append(data)
    except SpeechFailed as e:
        log.warning("%s", e)
        return error_response(500, str(e), "server_error")
    finally:
        await audio.aclose()
    body = P.CaptionedSpeech(audio=base64.b64encode(b"".join(chunks)).decode(), audio_format=audio_format,
                             sample_rate=P.SAMPLE_RATE, timestamps=[_timestamp(w) for w in words.words])
    return JSONResponse(body.model_dump(), headers=headers)


def _audio_voice(info: P.VoiceInfo) -> P.AudioVoice:
    return P.AudioVoice(id=info.name, name=info.name, created_at=info.created, text=info.text)


def _created(model: str) -> int:
    """When the checkpoint was written (a local directory or file), else now."""
    import os
    import time

    try:
        return int(os.stat(os.path.expanduser(model)).st_mtime)
    except OSError:
        return int(time.time())


def _load(service: Service, generator, runner) -> None:
    try:
        service.load(generator, runner)
    except Exception:
        log.exception("fastcsm: loading the model failed")


def _version() -> str:
    from ..version import __version__

    return __version__


def _mount_page(app: FastAPI) -> None:
    """The browser page at `/` and its files beside it (package data in fastcsm/server/static),
    one route per file so that every other path keeps the API's own 404 and 405 answers."""
    static = Path(__file__).parent / "static"
    if not (static / "index.html").is_file():
        return
    from fastapi.responses import FileResponse

    def serve(path: Path):
        async def page():
            return FileResponse(path, headers={"Cache-Control": "no-cache"})
        return page

    app.get("/", include_in_schema=False)(serve(static / "index.html"))
    for path in sorted(static.iterdir()):
        if path.is_file():
            app.get(f"/{path.name}", include_in_schema=False)(serve(path))
