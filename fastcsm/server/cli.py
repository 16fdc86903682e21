"""`fastcsm serve` (also `python -m fastcsm.server`): its flags and what runs them.

The flags, their `FASTCSM_*` variables and their checks all come from the table in settings.py;
a flag given on the command line wins over its variable.
"""

from __future__ import annotations

import argparse

from ..errors import EXIT_MODEL, CliError
from .settings import add_arguments, settings_from_args

SERVE_EPILOG = """\
environment: every flag can be set as FASTCSM_<NAME> (upper case, '-' as '_'; shown in [brackets]), e.g.
  FASTCSM_MODEL=~/models/csm-1b FASTCSM_SLOTS=32 FASTCSM_API_KEYS=key1,key2 fastcsm serve
flags win over the environment.

examples:
  fastcsm serve --model ~/models/csm-1b --slots 32
  fastcsm serve --host 0.0.0.0 --api-key "$KEY" --allowed-hosts tts.example.com --cors-origin https://app.example.com
  (an empty key, e.g. $KEY unset, is an error; a non-loopback --host without a key prints a warning;
   requests by a name other than loopback's, an IP address or this machine's need --allowed-hosts)

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
                       epilog=SERVE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
                       usage="%(prog)s [FLAG ...]   (%(prog)s --help lists them)")
    add_arguments(p)
    p.set_defaults(func=run_serve)


def run_serve(args) -> int:
    import logging

    try:
        import uvicorn

        from .app import create_app
    except ImportError as e:
        missing = f"the server needs its extra packages ({e.name} is missing)"
        raise CliError(f"{missing}: pip install 'fastcsm[server]'") from e
    try:
        settings = settings_from_args(args)
    except ValueError as e:
        raise CliError(str(e)) from e
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
    from ..generator import load_generator
    from ..watermark import Watermarker, WatermarkUnavailable

    try:  # before the (slow) model load
        watermarker = Watermarker.load(resolve_device_dtype(settings.device)[0]) if settings.watermark else None
    except (WatermarkUnavailable, ValueError) as e:
        raise CliError(str(e), EXIT_MODEL) from e
    try:
        generator = load_generator(settings.model, settings.device, settings.dtype, settings.tokenizer,
                                   settings.codec, settings.quantize)
    except CheckpointError as e:
        raise CliError(str(e), EXIT_MODEL) from e
    generator.watermarker = watermarker
    from .limits import uvicorn_config
    from .settings import security_warnings

    for warning in security_warnings(settings):
        logging.getLogger("fastcsm").warning("fastcsm: %s", warning)
    app = create_app(settings, generator=generator)
    uvicorn.Server(uvicorn_config(app, settings)).run()
    return 0
