"""`fastcsm serve`: its arguments (`add_serve`) and what runs them (`run_serve`).

Every flag has a `FASTCSM_*` environment variable; a flag given on the command line wins.
"""

from __future__ import annotations

import argparse
import sys

SERVE_EPILOG = """\
environment: every flag can be set as FASTCSM_<NAME> (upper case, '-' as '_'), e.g.
  FASTCSM_MODEL=~/models/csm-1b FASTCSM_SLOTS=32 FASTCSM_API_KEYS=key1,key2 fastcsm serve
flags win over the environment.

examples:
  fastcsm serve --model ~/models/csm-1b --slots 32
  fastcsm serve --host 0.0.0.0 --api-key "$KEY" --cors-origin https://app.example.com
  (an empty key, e.g. $KEY unset, is an error; a non-loopback --host without a key prints a warning)

then:
  curl -N localhost:8000/v1/audio/speech -H 'Content-Type: application/json' \\
       -d '{"model": "csm-1b", "input": "Hello there.", "voice": "0", "response_format": "wav"}' -o hello.wav
  open http://localhost:8000/ for the browser page; API docs at /docs.
"""


def add_serve(sub) -> None:
    p = sub.add_parser("serve", help="serve the speech API, live conversations and the browser page",
                       description="Load CSM once and serve many streams at once: an OpenAI-compatible "
                                   "POST /v1/audio/speech, voices at /v1/voices, live conversations at "
                                   "WS /v1/conversations, /healthz, /readyz and Prometheus /metrics.",
                       epilog=SERVE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model", metavar="PATH_OR_ID", help="checkpoint directory or hub repo id (default: sesame/csm-1b)")
    g.add_argument("--tokenizer", metavar="PATH", help="tokenizer.json (or its directory) if the checkpoint has none")
    g.add_argument("--codec", metavar="PATH_OR_ID", help="a Mimi checkpoint for checkpoints that carry no codec")
    g.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda if available, else cpu)")
    g.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="weights precision (default: bf16 on cuda)")
    g.add_argument("--quantize", choices=["none", "int8", "fp8"],
                   help="8-bit linears (int8 anywhere, fp8 on GPUs of compute capability 8.9+), quantized "
                        "while loading (default: the checkpoint's own precision)")
    g.add_argument("--compile", action="store_const", const=True,
                   help="torch.compile the frame step: faster frames after minutes of warm-up")
    g.add_argument("--threads", type=int, metavar="N",
                   help="torch CPU threads (default: torch's choice; on CPU, small models run best with 1)")
    g.add_argument("--model-name", metavar="NAME",
                   help="the model id GET /v1/models lists (default: the checkpoint directory's or repo's name)")
    g.add_argument("--watermark", action="store_const", const=True,
                   help="mark all audio with Sesame's SilentCipher watermark, as its reference generator does; "
                        "audio then comes a piece at a time (off by default; pip install \"fastcsm[watermark]\")")
    g = p.add_argument_group("listening")
    g.add_argument("--host", help="interface to bind (default: 127.0.0.1; 0.0.0.0 for every interface)")
    g.add_argument("--port", type=int, help="TCP port (default: 8000)")
    g.add_argument("--log-level", choices=["critical", "error", "warning", "info", "debug"], help="(default: info)")
    g = p.add_argument_group("capacity")
    g.add_argument("--slots", type=int, metavar="N", help="streams generated together in one batch (default: 16)")
    g.add_argument("--max-queue", type=int, metavar="N",
                   help="requests that may wait for a slot; more get 503 with Retry-After (default: 64)")
    g.add_argument("--request-timeout-s", type=float, metavar="S",
                   help="deadline of a request, waiting included (default: 300)")
    g.add_argument("--prefill-chunk", type=int, metavar="ROWS", help="prompt rows prefilled per step (default: 512)")
    g = p.add_argument_group("security and limits")
    g.add_argument("--api-key", dest="api_keys", action="append", metavar="KEY",
                   help="require `Authorization: Bearer KEY` on /v1 (repeat for several keys; "
                        "FASTCSM_API_KEYS takes a comma-separated list)")
    g.add_argument("--cors-origin", dest="cors_origins", action="append", metavar="ORIGIN",
                   help="a browser origin allowed to call the API, e.g. https://app.example.com (repeatable)")
    g.add_argument("--max-body-bytes", type=int, metavar="N",
                   help="largest speech body (context audio) or voice upload; other routes take 64 KiB "
                        "(default: 16 MiB)")
    g.add_argument("--max-input-chars", type=int, metavar="N", help="longest text to speak at once (default: 4096)")
    g.add_argument("--max-audio-length-ms", type=int, metavar="MS",
                   help="longest utterance, and the bound when a request gives none (default: 90000)")
    g.add_argument("--max-voice-audio-s", type=float, metavar="S",
                   help="longest reference or context recording (default: 60)")
    g = p.add_argument_group("slow clients")
    g.add_argument("--header-timeout-s", type=float, metavar="S",
                   help="a request's line and headers must arrive within S seconds, else the connection is "
                        "closed (default: 10)")
    g.add_argument("--body-timeout-s", type=float, metavar="S",
                   help="a request's whole body must arrive within S seconds, else 408 (default: 60)")
    g.add_argument("--keep-alive-s", type=float, metavar="S", help="idle keep-alive connections close after S "
                                                                  "seconds (default: 5)")
    g.add_argument("--max-connections", type=int, metavar="N",
                   help="open connections, WebSockets included; beyond it requests get 503 (default: 1000)")
    g = p.add_argument_group("voices")
    g.add_argument("--voices-dir", metavar="DIR", help="where voices live (default: $FASTCSM_VOICES or "
                                                        "~/.cache/fastcsm/voices)")
    g = p.add_argument_group("OpenAI compatibility")
    g.add_argument("--voice-map", metavar="MAP",
                   help="what OpenAI's voice names stand for: name=target entries, e.g. "
                        "alloy=0,echo=1,coral=myvoice (a speaker id or a registered voice), or a file of such lines; "
                        "names left out keep the default (alloy=0, ash=1, ballad=2, coral=3, echo=4, fable=5, "
                        "nova=6, onyx=7, sage=8, shimmer=9, verse=10, marin=11, cedar=12); a registered voice of "
                        "the same name wins")
    p.set_defaults(func=run_serve)


def settings_from_args(args):
    from .settings import Settings

    names = ["model", "tokenizer", "codec", "device", "dtype", "quantize", "compile", "threads", "host", "port",
             "log_level", "slots", "max_queue", "request_timeout_s", "prefill_chunk", "api_keys", "cors_origins",
             "max_body_bytes",
             "max_input_chars", "max_audio_length_ms", "max_voice_audio_s", "voices_dir", "header_timeout_s",
             "body_timeout_s", "keep_alive_s", "max_connections", "watermark", "model_name", "voice_map"]
    return Settings.from_env(**{n: getattr(args, n, None) for n in names})


def run_serve(args) -> int:
    import logging

    from ..cli import CliError

    try:
        import uvicorn

        from .app import create_app
    except ImportError as e:
        missing = f"the server needs its extra packages ({e.name} is missing)"
        raise CliError(f"{missing}: pip install 'fastcsm[server]'") from e
    try:
        from .settings import parse_voice_map

        settings = settings_from_args(args)
        parse_voice_map(settings.voice_map)
    except ValueError as e:
        raise CliError(str(e)) from e
    for name, low in (("slots", 1), ("max_queue", 0), ("port", 0), ("max_input_chars", 1),
                      ("max_audio_length_ms", 80), ("prefill_chunk", 1), ("max_body_bytes", 1024), ("threads", 0),
                      ("header_timeout_s", 0.1), ("body_timeout_s", 0.1), ("keep_alive_s", 0.1),
                      ("max_connections", 1)):
        if not getattr(settings, name) >= low:
            raise CliError(f"--{name.replace('_', '-')} (FASTCSM_{name.upper()}) must be at least {low}")
    logging.getLogger("fastcsm").setLevel(settings.log_level.upper())
    if not logging.getLogger("fastcsm").handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
        logging.getLogger("fastcsm").addHandler(handler)
    if settings.threads:
        import torch

        torch.set_num_threads(settings.threads)
    # Load before listening: a model that cannot load ends the command with its reason.
    from ..checkpoints import CheckpointError, resolve_device_dtype
    from ..cli import EXIT_MODEL
    from ..generator import Generator
    from ..watermark import Watermarker, WatermarkUnavailable

    try:  # before the (slow) model load
        watermarker = Watermarker.load(resolve_device_dtype(settings.device)[0]) if settings.watermark else None
    except (WatermarkUnavailable, ValueError) as e:
        raise CliError(str(e), EXIT_MODEL) from e
    try:
        generator = Generator.from_pretrained(settings.model, device=settings.device, dtype=settings.dtype,
                                              tokenizer=settings.tokenizer, codec=settings.codec or "auto",
                                              quantize=settings.quantize)
    except (CheckpointError, OSError, ValueError) as e:
        raise CliError(f"could not load the model {settings.model!r}: {e}", EXIT_MODEL) from e
    generator.watermarker = watermarker
    if generator.codec is None:
        raise CliError(f"the model {settings.model!r} carries no audio codec: pass --codec kyutai/mimi "
                       "(or a directory holding Mimi weights)", EXIT_MODEL)
    from .limits import uvicorn_config
    from .settings import security_warnings

    for warning in security_warnings(settings):
        logging.getLogger("fastcsm").warning("fastcsm: %s", warning)
    app = create_app(settings, generator=generator)
    uvicorn.Server(uvicorn_config(app, settings)).run()
    return 0


def main(argv=None) -> int:
    """`python -m fastcsm.server` runs `serve` alone."""
    parser = argparse.ArgumentParser(prog="fastcsm")
    add_serve(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)
