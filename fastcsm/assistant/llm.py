"""A language model behind an OpenAI-compatible chat endpoint, as cancellable text streams.

`LanguageModel(config).reply(messages)` sends a streamed chat completion through the official
`openai` SDK (`AsyncOpenAI`, no retries: a voice cannot wait for them) and returns a `Reply`,
which async-iterates the text deltas as they arrive. Everything awaits on the event loop, so a
slow model holds up only the turn that asked it.

The faults a caller must tell apart come as `LLMError`s, each with a message to show a user:
- `LLMUnreachable`: no connection (wrong URL, server down);
- `LLMStatusError`: the server answered an HTTP error (`status`: 401 bad key, 404 unknown model, ...);
- `LLMTimeout`: no first token within `first_token_timeout_s`, or a silence between two tokens
  longer than `stall_timeout_s`;
- `LLMStopped`: the reply broke off (connection dropped, an error event, no finish reason).

`Reply.cancel()` (barge-in) closes the HTTP response, so the connection is closed, not left in
the pool half read; the model server sees the client go and can stop generating.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass


class LLMError(Exception):
    """The language model could not give (the rest of) a reply; the message says why."""


class LLMUnreachable(LLMError):
    pass


class LLMStatusError(LLMError):
    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


class LLMTimeout(LLMError):
    pass


class LLMStopped(LLMError):
    pass


@dataclass(frozen=True)
class LLMConfig:
    """Where the model is and how long it may take."""

    url: str  # the API's base URL, e.g. http://127.0.0.1:8080/v1
    model: str  # the name the server knows it by
    api_key: str | None = None  # sent as a bearer token; None: a placeholder (local servers ignore it)
    system_prompt: str = ""  # the text itself (see `load_system_prompt` for @FILE)
    first_token_timeout_s: float = 10.0  # from the request to the first token
    stall_timeout_s: float = 10.0  # the longest silence between two tokens
    connect_timeout_s: float = 5.0
    max_tokens: int | None = None  # the model's own bound on a reply (None: the server's default)
    temperature: float | None = None

    def __post_init__(self):
        if not isinstance(self.url, str) or not self.url.startswith(("http://", "https://")):
            raise ValueError(f"the language model's URL must start with http:// or https://, got {self.url!r}")
        if not isinstance(self.model, str) or not self.model.strip():
            raise ValueError("the language model's name must be given (the id its server lists at /v1/models)")
        for name in ("first_token_timeout_s", "stall_timeout_s", "connect_timeout_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")


    @classmethod
    def from_settings(cls, settings) -> LLMConfig | None:
        """The model a server's `Settings` name (`--llm-url` and the rest), or None without one."""
        if not settings.llm_url:
            return None
        return cls(url=settings.llm_url, model=settings.llm_model, api_key=settings.llm_api_key,
                   system_prompt=load_system_prompt(settings.system_prompt),
                   first_token_timeout_s=settings.llm_timeout_s, stall_timeout_s=settings.llm_timeout_s)


def load_system_prompt(spec: str | None) -> str:
    """The system prompt `spec` stands for: the text itself, or with a leading @ a file's text."""
    if not spec:
        return ""
    if not spec.startswith("@"):
        return spec
    path = os.path.expanduser(spec[1:])
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"system prompt file {path!r} cannot be read ({e}); give the text itself, "
                         "or @ and a readable UTF-8 file") from None


class LanguageModel:
    """One client (one connection pool) for every conversation of a server."""

    def __init__(self, config: LLMConfig):
        import openai  # here, not at import: settings check a system prompt without the SDK

        self.config = config
        self.client = openai.AsyncOpenAI(
            base_url=config.url, api_key=config.api_key or "none", max_retries=0,
            timeout=openai.Timeout(config.first_token_timeout_s, connect=config.connect_timeout_s,
                                  read=max(config.first_token_timeout_s, config.stall_timeout_s)))

    def reply(self, messages: list[dict]) -> Reply:
        """Start a streamed reply to `messages` (OpenAI chat messages) now; iterate it for text."""
        extra = {k: v for k, v in (("max_tokens", self.config.max_tokens),
                                   ("temperature", self.config.temperature)) if v is not None}
        opening = self.client.chat.completions.create(
            model=self.config.model, messages=messages, stream=True, **extra)
        return Reply(opening, self.config)

    async def close(self) -> None:
        await self.client.close()


class Reply:
    """A reply as it streams in: `async for delta in reply` gives text; `cancel()` ends it.

    `text` is everything received so far, `finish_reason` the model's ("stop", "length", ...)
    once it finished, `first_token_at` the `time.perf_counter()` of the first text."""

    def __init__(self, opening, config: LLMConfig):
        self.config = config
        self.text = ""
        self.finish_reason: str | None = None
        self.started_at = time.perf_counter()
        self.first_token_at: float | None = None
        self.cancelled = False
        self._open = asyncio.ensure_future(opening)  # the request goes out now, not on first iteration
        self._stream = None  # the SDK's AsyncStream, once the response began
        self._chunks = None
        self._done = False

    def __aiter__(self):
        return self

    async def __anext__(self) -> str:
        while not self._done:
            if self.cancelled:
                break
            try:
                first = self.first_token_at is None
                deadline = self.started_at + self.config.first_token_timeout_s if first else \
                    time.perf_counter() + self.config.stall_timeout_s
                try:
                    async with asyncio.timeout(deadline - time.perf_counter()):
                        chunk = await self._next_chunk()
                except TimeoutError:
                    raise LLMTimeout(self._silence(first)) from None
            except LLMError as e:
                await self._close()
                if self.cancelled or (self.finish_reason and isinstance(e, LLMStopped)):
                    break  # closed under us by `cancel()`, or dropped after the model had finished
                raise
            except BaseException:  # the iterating task was cancelled: the response goes with it
                await self._close()
                raise
            if chunk is None:
                await self._close()
                if self.finish_reason is None and not self.cancelled:
                    raise LLMStopped("the language model's reply broke off (the stream ended without finishing)")
                break
            if not chunk.choices:
                continue
            choice = chunk.choices[0]
            self.finish_reason = choice.finish_reason or self.finish_reason
            delta = choice.delta.content if choice.delta is not None else None
            if delta:
                if self.first_token_at is None:
                    self.first_token_at = time.perf_counter()
                self.text += delta
                return delta
        raise StopAsyncIteration

    async def _next_chunk(self):
        """The next chunk, or None at the end of the stream; SDK and transport errors as `LLMError`s."""
        import openai

        where = self.config.url
        try:
            if self._stream is None:
                self._stream = await self._open
                self._chunks = self._stream.__aiter__()
            return await self._chunks.__anext__()
        except StopAsyncIteration:
            return None
        except asyncio.CancelledError:
            if self.cancelled and not asyncio.current_task().cancelling():
                return None  # `cancel()` abandoned the request this was waiting for
            raise
        except openai.APITimeoutError:
            raise LLMTimeout(self._silence(self.first_token_at is None)) from None
        except openai.APIConnectionError as e:
            if self._stream is None:
                raise LLMUnreachable(f"cannot reach the language model at {where} ({e.__cause__ or e})") from None
            raise LLMStopped(f"the language model's reply broke off ({e.__cause__ or e})") from None
        except openai.APIStatusError as e:
            raise LLMStatusError(f"the language model at {where} answered {e.status_code}: {_message(e)}",
                                 e.status_code) from None
        except openai.APIError as e:
            raise LLMStopped(f"the language model's reply broke off: {_message(e)}") from None
        except Exception as e:
            if not type(e).__module__.startswith("httpx"):
                raise
            # An SDK that lets its HTTP library's errors through while streaming.
            if "Timeout" in type(e).__name__:
                raise LLMTimeout(self._silence(self.first_token_at is None)) from None
            raise LLMStopped(f"the language model's reply broke off ({type(e).__name__}: {e})") from None

    def _silence(self, first: bool) -> str:
        if first:
            return (f"the language model at {self.config.url} sent no reply within "
                    f"{self.config.first_token_timeout_s:g} s")
        return f"the language model at {self.config.url} went silent for more than {self.config.stall_timeout_s:g} s"

    async def cancel(self) -> None:
        """Stop the reply now: the request is abandoned or the response closed (its connection
        with it). Iteration then ends; cancelling twice, or after the end, does nothing."""
        self.cancelled = True
        await self._close()

    async def _close(self) -> None:
        self._done = True
        if not self._open.done():
            self._open.cancel()
            try:
                await self._open
            except BaseException:  # noqa: BLE001 - whatever the abandoned request ended with
                pass
        elif self._stream is None and not self._open.cancelled() and self._open.exception() is None:
            self._stream = self._open.result()
        if self._stream is not None:
            await self._stream.close()


def _message(e) -> str:
    """The server's own words in an SDK error (`openai.APIError`)."""
    body = e.body if isinstance(e.body, dict) else {}
    inner = body.get("error") if isinstance(body.get("error"), dict) else body
    return str(inner.get("message") or e.message)
