"""Server settings: one dataclass, filled from flags, `FASTCSM_*` environment variables, or code.

Every field has an environment variable named `FASTCSM_<FIELD>` (upper case); `fastcsm serve`
flags override them. Lists (API keys, CORS origins) are comma-separated. An empty API key (say
`FASTCSM_API_KEYS="$KEY"` with `$KEY` unset) is an error, never a server without authentication.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field


@dataclass
class Settings:
    # The model
    model: str = "sesame/csm-1b"  # checkpoint directory or hub repo id
    tokenizer: str | None = None  # tokenizer.json when the checkpoint has none
    codec: str | None = None  # Mimi checkpoint when the CSM checkpoint carries none
    device: str | None = None  # default: cuda if available, else cpu
    dtype: str | None = None  # fp32, bf16, fp16 (default: bf16 on cuda, fp32 on cpu)
    quantize: str | None = None  # none, int8, fp8: 8-bit linears (default: the checkpoint's precision)
    compile: bool = False  # torch.compile the frame step (minutes of warm-up)
    threads: int = 0  # torch CPU threads; 0 keeps torch's default (small models on CPU: try 1)
    model_name: str | None = None  # the id /v1/models lists (default: the checkpoint's directory or repo name)
    watermark: bool = False  # mark all audio with Sesame's SilentCipher watermark (fastcsm[watermark])
    # Listening
    host: str = "127.0.0.1"
    port: int = 8000
    # Capacity
    slots: int = 16  # concurrent streams generated in one batch
    max_queue: int = 64  # requests that may wait for a slot; beyond that: 503 + Retry-After
    request_timeout_s: float = 300.0  # deadline of one request, queueing included
    prefill_chunk: int = 512  # prompt rows prefilled per engine step
    # Security and limits
    api_keys: list[str] = field(default_factory=list)  # empty: no authentication
    cors_origins: list[str] = field(default_factory=list)  # origins allowed to call from a browser
    max_body_bytes: int = 16 << 20  # speech (context audio) and voice-upload bodies; other routes: 64 KiB
    max_input_chars: int = 4096  # text of one line
    max_audio_length_ms: int = 90_000  # longest utterance (and the default bound)
    max_voice_audio_s: float = 60.0  # reference recordings, context audio
    max_context_turns: int = 64  # turns in one speech request's `context`
    # Slow or greedy clients
    header_timeout_s: float = 10.0  # a request's head (line and headers) must arrive within this
    body_timeout_s: float = 60.0  # a request's whole body must arrive within this
    keep_alive_s: float = 5.0  # an idle keep-alive connection is closed after this
    max_connections: int = 1000  # open connections (WebSockets included); more get 503
    voices_dir: str | None = None  # default: $FASTCSM_VOICES or ~/.cache/fastcsm/voices
    voice_map: str | None = None  # "alloy=0,coral=myvoice" or a file of such lines: OpenAI voice names
    log_level: str = "info"

    @classmethod
    def from_env(cls, environ=None, **overrides) -> Settings:
        """Defaults, then `FASTCSM_<FIELD>` variables, then `overrides` (those not None)."""
        environ = os.environ if environ is None else environ
        values = {}
        for f in dataclasses.fields(cls):
            raw = environ.get(f"FASTCSM_{f.name.upper()}")
            if raw is not None and (raw != "" or f.name == "api_keys"):
                values[f.name] = _parse(f, raw)
        if "voices_dir" not in values and environ.get("FASTCSM_VOICES"):
            values["voices_dir"] = environ["FASTCSM_VOICES"]
        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = cls(**values)
        settings.check_keys()
        return settings

    def check_keys(self) -> list[str]:
        """The API keys, refusing an empty one: `--api-key "$KEY"` with `$KEY` unset must not
        start a server without authentication."""
        if any(not isinstance(k, str) or not k.strip() for k in self.api_keys):
            raise ValueError("an API key is empty (is the variable holding it unset?): give a non-empty key, "
                             "or no --api-key / FASTCSM_API_KEYS at all for a server without authentication")
        return list(self.api_keys)

    @property
    def served_model_name(self) -> str:
        """The model's short id (never a server path): `model_name`, else the last part of `model`."""
        if self.model_name:
            return self.model_name
        return os.path.basename(os.path.normpath(os.path.expanduser(self.model))) or "csm"


LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")


def is_loopback(host: str) -> bool:
    import ipaddress

    if host in LOOPBACK_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


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


def _parse(f: dataclasses.Field, raw: str):
    kind = str(f.type)
    try:
        if kind.startswith("list"):
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
        raise ValueError(f"FASTCSM_{f.name.upper()}={raw!r} is not a valid {kind}") from None
    return raw
