"""Server settings, declared once: the fields of `Settings` are the table.

Each field says its type, default, help, group and checks (`setting(...)`); from that one table
come the `fastcsm serve` flags (`add_arguments`), the `FASTCSM_<FIELD>` environment variables
(`Settings.from_env`) and the checks `Settings` itself runs, so `create_app(Settings(slots=0))`
refuses what `fastcsm serve --slots 0` refuses, with the same message. Flags override variables;
lists (API keys, CORS origins, allowed hosts) are comma-separated in a variable. An empty API key
(say `FASTCSM_API_KEYS="$KEY"` with `$KEY` unset) is an error, never a server without
authentication.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from typing import Self

from ..bounds import MAX_AUDIO_LENGTH_MS
from ..listen.vad import END_SILENCE_MS, MAX_TURN_S, TurnConfig


@dataclass(frozen=True)
class Spec:
    """What the table says of one setting, besides its name, type and default."""

    help: str
    group: str
    metavar: str | None = None
    choices: tuple[str, ...] | None = None
    at_least: float | None = None
    at_most: float | None = None
    flag: str | None = None  # default: --<name with dashes>
    shown: str | None = None  # the default as help prints it (default: the value itself)
    env_fallback: str | None = None  # an older variable read when FASTCSM_<NAME> is unset

    def flag_of(self, name: str) -> str:
        return self.flag or "--" + name.replace("_", "-")


def setting(default, help: str, group: str, **spec):
    """One row of the table: a dataclass field carrying its `Spec`."""
    meta = {"spec": Spec(help, group, **spec)}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


class Table:
    """A dataclass whose fields are `setting(...)` rows (`Settings`; `fastcsm wyoming` has its own
    limits): building one checks every row, `from_env` reads the rows' `FASTCSM_<FIELD>` variables."""

    def __post_init__(self):
        for f in dataclasses.fields(self):
            _check(f, getattr(self, f.name))

    @classmethod
    def from_env(cls, environ=None, **overrides) -> Self:
        """Defaults, then `FASTCSM_<FIELD>` variables, then `overrides` (those not None)."""
        environ = os.environ if environ is None else environ
        values = {}
        for f in dataclasses.fields(cls):
            value = _from_environ(f, environ)
            if value is not None:
                values[f.name] = value
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


@dataclass
class Settings(Table):
    """Everything `fastcsm serve` can be told, checked when built (see the module's docstring)."""

    model: str = setting("sesame/csm-1b", "checkpoint directory or hub repo id", "model", metavar="PATH_OR_ID")
    tokenizer: str | None = setting(None, "tokenizer.json (or its directory) if the checkpoint has none", "model",
                                    metavar="PATH")
    codec: str | None = setting(None, "a Mimi checkpoint (e.g. kyutai/mimi) for checkpoints that carry no codec",
                                "model", metavar="PATH_OR_ID")
    device: str | None = setting(None, "cpu, cuda, cuda:1, mps (default: cuda if available, else cpu)", "model")
    dtype: str | None = setting(None, "weights precision (default: bf16 on cuda, fp32 on cpu)", "model",
                                choices=("fp32", "bf16", "fp16"))
    quantize: str | None = setting(None, "8-bit linears (int8 anywhere, fp8 on GPUs of compute capability 8.9+), "
                                         "quantized while loading (default: the checkpoint's own precision)",
                                   "model", choices=("none", "int8", "fp8"))
    compile: bool | None = setting(None, "torch.compile the frame step and prefill (one compile for every batch "
                                          "bucket, kept in --compile-cache): faster frames after minutes of warm-up "
                                          "on the first start, seconds from the cache; unset: compiled when the "
                                          "cache holds a finished build for this model, device and --slots (from "
                                          "`fastcsm compile` or an earlier --compile start), else eager",
                                   "model", shown="auto")
    compile_cache: str | None = setting(None, "where compiled code is kept and shared by every process and Ray "
                                              "replica (default: ~/.cache/fastcsm/compile; fill it ahead with "
                                              "`fastcsm compile`)", "model", metavar="DIR")
    threads: int = setting(0, "torch CPU threads; 0 chooses: one for a small model, else every core this "
                              "process may use, idle threads sleeping (fastcsm/threads.py)", "model", metavar="N",
                           at_least=0)
    model_name: str | None = setting(None, "the model id GET /v1/models lists (default: the checkpoint "
                                           "directory's or repo's name)", "model", metavar="NAME")
    watermark: bool = setting(False, "mark all audio with Sesame's SilentCipher watermark, as its reference "
                                     "generator does; audio then comes a piece at a time "
                                     '(pip install "fastcsm[watermark]")', "model")
    host: str = setting("127.0.0.1", "interface to bind (0.0.0.0 for every interface)", "listening")
    port: int = setting(8000, "TCP port (0: any free port)", "listening", at_least=0, at_most=65535)
    log_level: str = setting("info", "how much the server logs", "listening",
                             choices=("critical", "error", "warning", "info", "debug"))
    slots: int = setting(16, "streams generated together in one batch", "capacity", metavar="N", at_least=1)
    max_queue: int = setting(64, "requests that may wait for a slot; more get 503 with Retry-After", "capacity",
                             metavar="N", at_least=0)
    request_timeout_s: float = setting(300.0, "deadline of a request, waiting included", "capacity", metavar="S",
                                       at_least=0.1)
    prefill_chunk: int = setting(512, "prompt rows prefilled per engine step", "capacity", metavar="ROWS",
                                 at_least=1)
    api_keys: list[str] = setting([], "require `Authorization: Bearer KEY` on /v1 (repeat for several keys; "
                                      "FASTCSM_API_KEYS takes a comma-separated list; none: no authentication)",
                                  "security and limits", metavar="KEY", flag="--api-key")
    cors_origins: list[str] = setting([], "a browser origin allowed to call the API, e.g. https://app.example.com "
                                          "(repeatable)", "security and limits", metavar="ORIGIN",
                                      flag="--cors-origin")
    allowed_hosts: list[str] = setting([], "a name clients reach the server by (the Host header), e.g. "
                                           "tts.example.com or *.example.com; repeatable or comma-separated. "
                                           "Loopback names, IP addresses, the --host name and this machine's "
                                           "name are always allowed: behind --host 0.0.0.0 add the names "
                                           "clients use, or * for any (a proxy that checks Host itself). Other "
                                           "names get 400, so a web page whose name was rebound to this "
                                           "address (DNS rebinding) can use nothing",
                                       "security and limits", metavar="HOST",
                                       shown="loopback names, IP addresses, --host, this machine's name")
    max_body_bytes: int = setting(16 << 20, "largest speech body (context audio) or voice upload; other routes "
                                            "take 64 KiB", "security and limits", metavar="N", at_least=1024,
                                  shown="16 MiB")
    max_input_chars: int = setting(4096, "longest text to speak at once", "security and limits", metavar="N",
                                   at_least=1)
    max_audio_length_ms: int = setting(MAX_AUDIO_LENGTH_MS.default,
                                       "longest utterance, and the bound when a request gives none "
                                       "(between one frame and what CSM's window holds)",
                                       "security and limits", metavar="MS")
    max_voice_audio_s: float = setting(60.0, "longest reference or context recording", "security and limits",
                                       metavar="S", at_least=0.1)
    max_context_turns: int = setting(64, "turns in one speech request's context", "security and limits",
                                     metavar="N", at_least=0)
    header_timeout_s: float = setting(10.0, "a request's line and headers must arrive within S seconds, else the "
                                            "connection is closed", "slow clients", metavar="S", at_least=0.1)
    body_timeout_s: float = setting(60.0, "a request's whole body must arrive within S seconds, else 408",
                                    "slow clients", metavar="S", at_least=0.1)
    keep_alive_s: float = setting(5.0, "idle keep-alive connections close after S seconds", "slow clients",
                                  metavar="S", at_least=0.1)
    max_connections: int = setting(1000, "open connections, WebSockets included; beyond it requests get 503",
                                   "slow clients", metavar="N", at_least=1)
    line_idle_timeout_s: float = setting(30.0, "a conversation's line that streams in (speak with more: true) and "
                                               "gets no text for S seconds is ended (error code timeout, done with "
                                               "reason deadline)", "slow clients", metavar="S", at_least=0.1)
    max_line_fragments: int = setting(8192, "append_text messages one line of a conversation may take; the one "
                                            "past it ends the line with an error", "security and limits",
                                      metavar="N", at_least=1)
    max_line_chars: int = setting(4096, "longest line of a conversation, its streamed fragments together; a "
                                        "fragment past it is refused and the line stays open",
                                  "security and limits", metavar="N", at_least=1)
    max_messages_per_s: int = setting(500, "messages one conversation socket has handled a second (a burst of "
                                           "a fifth of a second's passes at once); faster ones wait unread, so "
                                           "a flood cannot take the CPU from other streams", "security and limits",
                                      metavar="N", at_least=1)
    max_refusals_per_s: int = setting(100, "refused requests (4xx: a wrong Host, key, route or body) one client "
                                           "address is answered a second, after a burst of a fifth of a second's; "
                                           "the rest wait for their answer, so a flood of bad requests cannot "
                                           "take the CPU from other streams", "security and limits",
                                      metavar="N", at_least=1)
    lexicon: str | None = setting(None, "pronunciation lexicon: a file of word<TAB>respelling lines, or a .json "
                                        "object of word -> respelling (see README, \"Saying the text right\")",
                                  "speech", metavar="FILE")
    asr_model: str | None = setting(None, "speech recognition: a faster-whisper model (tiny, base, small, large-v3, "
                                          "a hub repo or a local CTranslate2 directory; loaded offline from the "
                                          "cache) or pocketsphinx (English, built in); it serves POST "
                                          "/v1/audio/transcriptions and voices uploaded without a transcript "
                                          '(pip install "fastcsm[asr]")', "speech recognition",
                                    metavar="NAME_OR_PATH")
    max_transcription_s: float = setting(600.0, "longest recording POST /v1/audio/transcriptions takes",
                                         "speech recognition", metavar="S", at_least=1.0)
    turn_silence_ms: int = setting(TurnConfig.end_silence_ms, "silence that ends the user's spoken turn",
                                   "speech recognition", metavar="MS", at_least=END_SILENCE_MS[0],
                                   at_most=END_SILENCE_MS[1])
    max_turn_s: float = setting(TurnConfig.max_turn_s, "longest spoken turn of a user; a longer one is cut there",
                                "speech recognition", metavar="S", at_least=MAX_TURN_S[0], at_most=MAX_TURN_S[1])
    transcribe_early: bool = setting(True, "transcribe a spoken turn as soon as the user pauses, so its transcript "
                                           "is ready or under way when the pause ends the turn (the cost: one "
                                           "transcription more for each pause the user speaks past)",
                                     "speech recognition")
    transcribe_live: bool = setting(True, "with a recogniser that can (pocketsphinx), also decode a spoken turn "
                                          "while the user speaks, from the stream's second turn: the turn takes "
                                          "the whole decode begun at the pause if it is done when the turn ends, "
                                          "else the live one, ready ~0.1 s after the pause",
                                    "speech recognition")
    voices_dir: str | None = setting(None, "where voices live (default: ~/.cache/fastcsm/voices)",
                                     "voices", metavar="DIR", env_fallback="FASTCSM_VOICES")
    voice_map: str | None = setting(None, "what OpenAI's voice names stand for: name=target entries, e.g. "
                                          "alloy=0,echo=1,coral=myvoice (a speaker id or a registered voice), or a "
                                          "file of such lines; names left out keep the default (alloy=0, ash=1, "
                                          "ballad=2, coral=3, echo=4, fable=5, nova=6, onyx=7, sage=8, shimmer=9, "
                                          "verse=10, marin=11, cedar=12); a registered voice of the same name wins",
                                    "OpenAI compatibility", metavar="MAP")
    llm_url: str | None = setting(None, "an OpenAI-compatible chat API's base URL (vLLM, llama.cpp's server, Ollama, "
                                        "SGLang, OpenAI), e.g. http://127.0.0.1:8080/v1: the language model an "
                                        "assistant conversation answers with", "assistant", metavar="URL")
    llm_model: str | None = setting(None, "the language model's name at --llm-url (an id its /v1/models lists)",
                                    "assistant", metavar="NAME")
    llm_api_key: str | None = setting(None, "the bearer key --llm-url wants (none for most local servers)",
                                      "assistant", metavar="KEY")
    system_prompt: str | None = setting(None, "the assistant's instructions: the text, or @FILE", "assistant",
                                        metavar="TEXT|@FILE")
    llm_timeout_s: float = setting(10.0, "the model's first token, and each next one, must come within S seconds, "
                                         "else the turn ends with an error", "assistant", metavar="S", at_least=0.1)
    max_reply_chars: int = setting(1000, "a spoken reply ends at the first sentence end after N characters",
                                   "assistant", metavar="N", at_least=1)
    preemptive_reply: bool = setting(False, "ask the model as soon as a spoken turn's transcript is ready at the "
                                            "user's pause, before the silence has ended the turn; the reply is "
                                            "spoken if the pause ends it, dropped if the user goes on (the cost: "
                                            "a model request for each pause spoken past)", "assistant")

    def __post_init__(self):
        """Every check of the table, then those between settings: a `ValueError` naming the setting,
        its flag and its variable."""
        super().__post_init__()
        self.check_keys()
        for origin in self.cors_origins:
            if origin != "*" and not _ORIGIN.fullmatch(origin):
                raise _refuse("cors_origins", "be origins such as https://app.example.com: scheme://host[:port], "
                                              "no path, no trailing slash (or * for any)", origin)
        self.allowed_hosts = [h.strip() for x in self.allowed_hosts for h in x.split(",") if h.strip()]
        for name in self.allowed_hosts:
            if not _HOST.fullmatch(name) and ip_address(name) is None:
                raise _refuse("allowed_hosts", "be host names such as tts.example.com or *.example.com: no "
                                               "scheme, port or path (or * for any)", name)
        from ..model.config import preset

        cfg = preset("csm-1b")  # every CSM checkpoint: 80 ms frames, a 2048-row window
        window_ms = cfg.max_seq_len * cfg.frame_ms
        if not cfg.frame_ms <= self.max_audio_length_ms <= window_ms:
            raise _refuse("max_audio_length_ms", f"be between one frame ({cfg.frame_ms} ms) and what CSM's "
                                                 f"{cfg.max_seq_len}-row window holds ({window_ms} ms)",
                          self.max_audio_length_ms)
        parse_voice_map(self.voice_map)
        self.check_lexicon()
        self.check_llm()

    def check_keys(self) -> list[str]:
        """The API keys, refusing an empty one: `--api-key "$KEY"` with `$KEY` unset must not
        start a server without authentication."""
        if any(not isinstance(k, str) or not k.strip() for k in self.api_keys):
            raise ValueError("an API key is empty (is the variable holding it unset?): give a non-empty key, "
                             "or no --api-key / FASTCSM_API_KEYS at all for a server without authentication")
        return list(self.api_keys)

    def check_lexicon(self):
        """The `lexicon` file, loaded (None without one); a bad file is refused naming the setting."""
        from ..speech.lexicon import LexiconError, load_lexicon

        try:
            return load_lexicon(self.lexicon)
        except LexiconError as e:
            raise _refuse("lexicon", f"be a readable lexicon file ({e})", self.lexicon) from None

    def check_llm(self) -> None:
        """The language model settings: a URL with a model name, a key that is not empty, a
        readable system prompt file."""
        if self.llm_url is not None and not re.match(r"https?://[^/\s]+", self.llm_url):
            raise _refuse("llm_url", "be an http:// or https:// URL such as http://127.0.0.1:8080/v1", self.llm_url)
        if self.llm_url and not (self.llm_model or "").strip():
            raise _refuse("llm_model", "name the model served at --llm-url (an id its /v1/models lists)",
                          self.llm_model)
        if self.llm_api_key is not None and not self.llm_api_key.strip():
            raise _refuse("llm_api_key", "not be empty (is the variable holding it unset?)", self.llm_api_key)
        from ..assistant.llm import load_system_prompt

        try:
            load_system_prompt(self.system_prompt)
        except ValueError as e:
            raise _refuse("system_prompt", f"be the text itself, or @ and a readable UTF-8 file ({e})",
                          self.system_prompt) from None

    @property
    def served_model_name(self) -> str:
        """The model's short id (never a server path): `model_name`, else the last part of `model`."""
        if self.model_name:
            return self.model_name
        return os.path.basename(os.path.normpath(os.path.expanduser(self.model))) or "csm"


_ORIGIN = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^/\s?#]+")
_HOST = re.compile(r"\*|(\*\.)?[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*\.?")


def env_name(name: str) -> str:
    return f"FASTCSM_{name.upper()}"


def _refuse(name: str, must: str, value, spec: Spec | None = None) -> ValueError:
    """The one form of a refusal, naming the setting by its field, its flag and its variable
    (`spec`: the row's, when not one of `Settings`)."""
    flag = (spec or Settings.__dataclass_fields__[name].metadata["spec"]).flag_of(name)
    return ValueError(f"{name} must {must} ({flag}, {env_name(name)}), got {value!r}")


def _kind(f: dataclasses.Field) -> tuple[str, bool]:
    """The table's type of `f` ("str", "int", "float", "bool" or "list") and whether None is allowed."""
    kind = str(f.type)
    optional = kind.endswith(" | None")
    kind = kind.removesuffix(" | None")
    return ("list" if kind.startswith("list") else kind), optional


def _check(f: dataclasses.Field, value) -> None:
    spec, (kind, optional) = f.metadata["spec"], _kind(f)
    if value is None and optional:
        return
    numbers = {"int": (int,), "float": (int, float)}
    if kind == "list":
        ok = isinstance(value, list) and all(isinstance(x, str) for x in value)
    elif kind in numbers:
        ok = isinstance(value, numbers[kind]) and not isinstance(value, bool) and math.isfinite(value)
    else:
        ok = isinstance(value, {"str": str, "bool": bool}[kind])
    if not ok:
        want = {"list": "a list of strings", "int": "an integer", "float": "a finite number"}.get(kind, f"a {kind}")
        raise _refuse(f.name, f"be {want}", value, spec)
    if spec.choices and value not in spec.choices:
        raise _refuse(f.name, f"be one of {', '.join(spec.choices)}", value, spec)
    if spec.at_least is not None and value < spec.at_least:
        raise _refuse(f.name, f"be at least {spec.at_least:g}", value, spec)
    if spec.at_most is not None and value > spec.at_most:
        raise _refuse(f.name, f"be at most {spec.at_most:g}", value, spec)


LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")


def ip_address(host: str):
    """`host` as an IP address (IPv6 with or without brackets), or None for a name."""
    import ipaddress

    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def is_loopback(host: str) -> bool:
    ip = ip_address(host)
    return host in LOOPBACK_HOSTS or (ip is not None and ip.is_loopback)


def security_warnings(settings: Settings) -> list[str]:
    """What a careful operator should hear before the server listens."""
    out = []
    if not settings.api_keys and not is_loopback(settings.host):
        out.append(f"listening on {settings.host}, beyond this machine, without an API key: anyone who can reach "
                   "the port can use the model and change the voices; set --api-key (or FASTCSM_API_KEYS)")
    return out


# OpenAI's built-in voices. By default each is one of CSM's speaker ids, in OpenAI's order; without
# a recording a speaker id is the model's own voice for it. `--voice-map` changes any of them (to
# another id or to a registered voice), adds other names, and a registered voice of the same name wins.
OPENAI_VOICES = ("alloy", "ash", "ballad", "coral", "echo", "fable", "nova", "onyx", "sage", "shimmer", "verse",
                 "marin", "cedar")
DEFAULT_VOICE_MAP: dict[str, int | str] = {name: i for i, name in enumerate(OPENAI_VOICES)}


def parse_voice_map(spec: str | None) -> dict[str, int | str]:
    """The default table updated by `spec`: `name=target` entries separated by commas or lines
    (`#` starts a comment), or the path of a file of them; a target is a speaker id or a voice name."""
    table = dict(DEFAULT_VOICE_MAP)
    if not spec or not spec.strip():
        return table
    text = spec
    if "=" not in spec:
        path = os.path.expanduser(spec.strip())
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise ValueError(f"voice map {spec!r} is neither name=target entries nor a readable file ({e})") from None
    for raw in re.split(r"[,\n]", text):
        entry = raw.split("#", 1)[0].strip()
        if not entry:
            continue
        name, sep, target = (x.strip() for x in entry.partition("="))
        if not sep or not name or not target:
            raise ValueError(f"voice map entry {entry!r} is not name=target (e.g. alloy=0 or coral=myvoice)")
        if not _VOICE_NAME.fullmatch(name) or not _VOICE_NAME.fullmatch(target):
            raise ValueError(f"voice map entry {entry!r}: names are 1-64 letters, digits, '.', '_' or '-'")
        if name.isdigit():
            raise ValueError(f"voice map entry {entry!r}: a bare number already means that speaker id")
        table[name] = int(target) if target.isdigit() and len(target) <= 7 else target
    return table


_VOICE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def _from_environ(f: dataclasses.Field, environ):
    """The field's variable (or the older one it falls back to), parsed; None when unset or empty."""
    fallback = f.metadata["spec"].env_fallback
    raw = environ.get(env_name(f.name))
    if not raw and fallback and environ.get(fallback):
        raw = environ[fallback]
    if raw is None or (raw == "" and f.name != "api_keys"):
        return None
    return _parse(f, raw)


def _parse(f: dataclasses.Field, raw: str):
    """A variable's text as the field's type (checks of range and choice are `Settings`')."""
    kind, _ = _kind(f)
    try:
        if kind == "list":
            items = [x for x in (x.strip() for x in raw.split(",")) if x]
            if f.name == "api_keys" and not items:  # set, but to nothing: an error, never "no auth"
                return [""]
            return items
        if kind == "bool":
            if raw.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise ValueError(raw)
            return raw.lower() in ("1", "true", "yes", "on")
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
    except ValueError:
        raise ValueError(f"{env_name(f.name)}={raw!r} is not a valid {kind}") from None
    return raw.lower() if f.metadata["spec"].choices else raw  # FASTCSM_LOG_LEVEL=INFO is info


def add_arguments(parser: argparse.ArgumentParser, groups: tuple[str, ...] | None = None,
                  table: type[Table] = Settings, names: tuple[str, ...] | None = None) -> None:
    """A flag for every setting of `table` (of `groups` and `names`, default all), in argument groups
    named as the table's. Every flag defaults to None, so that `settings_from_args` (or
    `values_from_args`) lets the environment fill the rest."""
    made = {}
    for f in dataclasses.fields(table):
        spec, (kind, _) = f.metadata["spec"], _kind(f)
        if (groups is not None and spec.group not in groups) or (names is not None and f.name not in names):
            continue
        group = made.get(spec.group) or made.setdefault(spec.group, parser.add_argument_group(spec.group))
        shown = spec.shown or (f.default if kind not in ("list", "bool") else None)
        text = spec.help + (f" (default: {shown})" if shown is not None else "") + f" [{env_name(f.name)}]"
        kwargs = {"dest": f.name, "default": None, "help": text}
        if kind == "bool":
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs.update(metavar=spec.metavar, choices=spec.choices)
            if kind == "list":
                kwargs["action"] = "append"
            elif kind in ("int", "float"):
                kwargs["type"] = {"int": int, "float": float}[kind]
        group.add_argument(spec.flag_of(f.name), **kwargs)


def settings_from_args(args: argparse.Namespace, table: type[Table] = Settings, **overrides) -> Table:
    """`table` (default `Settings`) from parsed flags (those given) over the `FASTCSM_*` variables;
    `overrides` win."""
    given = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(table)}
    return table.from_env(**{**given, **overrides})


def values_from_args(args: argparse.Namespace, names: tuple[str, ...], environ=None) -> dict:
    """Some settings alone (a command that is not the server): each from its flag if given, else
    its variable, else the table's default, with the table's checks. Settings not in `names` are
    neither read nor checked, so a server's variables cannot break `fastcsm speak`."""
    environ = os.environ if environ is None else environ
    fields = {f.name: f for f in dataclasses.fields(Settings)}
    values = {}
    for name in names:
        f = fields[name]
        value = getattr(args, name, None)
        if value is None:
            value = _from_environ(f, environ)
        if value is None:
            value = f.default_factory() if f.default is dataclasses.MISSING else f.default
        _check(f, value)
        values[name] = value
    return values
