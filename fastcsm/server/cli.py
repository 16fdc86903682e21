"""`fastcsm serve` (also `python -m fastcsm.server`): its flags and what runs them; and the model
load every command shares (`load_generator_for`).

The flags, their `FASTCSM_*` variables and their checks all come from the table in settings.py;
a flag given on the command line wins over its variable. The port is taken before the model
loads, so a busy port costs no model load; with `--port 0` the system picks a free one.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import socket
import sys

from .. import threads
from ..errors import EXIT_INTERRUPTED, EXIT_MODEL, EXIT_OK, CliError
from ..version import __version__
from .settings import add_arguments, settings_from_args, values_from_args

SERVE_EPILOG = """\
environment: every flag can be set as FASTCSM_<NAME> (upper case, '-' as '_'; shown in [brackets]), e.g.
  FASTCSM_MODEL=~/models/csm-1b FASTCSM_SLOTS=32 FASTCSM_API_KEYS=key1,key2 fastcsm serve
flags win over the environment.

examples:
  fastcsm serve --model ~/models/csm-1b --slots 32
  fastcsm serve --host 0.0.0.0 --api-key "$KEY" --allowed-hosts tts.example.com --cors-origin https://app.example.com
  fastcsm serve --port 0          (any free port; the address is printed)
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
                       usage="%(prog)s [--model PATH_OR_ID] [--host HOST] [--port PORT] [--api-key KEY] [FLAG ...]")
    add_arguments(p)
    p.set_defaults(func=run_serve)


def check_device(device: str | None) -> None:
    """Refuse a device this machine lacks, in the command line's words."""
    if not device:
        return
    from ..model.checkpoints import unavailable_device

    try:
        reason = unavailable_device(device)
    except (RuntimeError, ValueError) as e:  # torch.device() refuses the spelling
        raise CliError(f"--device {device!r} is not a device: use cpu, cuda, cuda:N or mps ({e})") from e
    if reason:
        raise CliError(f"--device {device}: {reason}; pass --device cpu (or leave --device out: "
                       "a GPU when there is one, else the CPU)")


def load_generator_for(s):
    """`service.load_generator_for` with the device checked first, its failures said as a command's."""
    from ..model.checkpoints import CheckpointError
    from ..speech.watermark import WatermarkUnavailable
    from .service import load_generator_for

    check_device(s.device)
    try:
        return load_generator_for(s)
    except (CheckpointError, WatermarkUnavailable, ValueError) as e:
        raise CliError(str(e), EXIT_MODEL) from e


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port), before anything slow; a port in use is a usage error."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise CliError(f"cannot listen on --host {host}: {e.strerror}") from e
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: restarts reuse a TIME_WAIT port
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise CliError(f"port {port} on {host} is already in use (another fastcsm serve?): pass --port 0 "
                           "to pick a free one, or another --port") from e
        if e.errno == errno.EACCES:
            raise CliError(f"port {port} needs privileges this user lacks: use a port above 1023 "
                           "(--port 0 picks a free one)") from e
        raise CliError(f"cannot listen on {host} port {port}: {e.strerror or e}") from e
    return sock


def page_url(host: str, port: int) -> str:
    """Where a browser on this machine finds the page (any-interface binds answer on loopback)."""
    shown = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    return f"http://[{shown}]:{port}/" if ":" in shown else f"http://{shown}:{port}/"


def run_serve(args) -> int:
    import logging

    try:
        import uvicorn

        from .app import create_app
        from .service import configure_logging
    except ImportError as e:
        missing = f"the server needs its extra packages ({e.name} is missing)"
        raise CliError(f"{missing}: pip install 'fastcsm[server]'") from e
    try:
        settings = settings_from_args(args)
    except ValueError as e:
        raise CliError(str(e)) from e
    configure_logging(settings.log_level)
    check_device(settings.device)
    sock = listen(settings.host, settings.port)  # before the model: a taken port costs no load
    try:
        # Load before serving: a model that cannot load ends the command with its reason.
        generator = load_generator_for(settings)
        from .limits import uvicorn_config
        from .settings import security_warnings

        for warning in security_warnings(settings):
            logging.getLogger("fastcsm").warning("%s", warning)
        port = sock.getsockname()[1]
        settings.port = port
        url = page_url(settings.host, port)
        print(f"fastcsm: serving at {url} (the browser page; API docs at {url}docs)", file=sys.stderr, flush=True)
        app = create_app(settings, generator=generator)
        uvicorn.Server(uvicorn_config(app, settings)).run(sockets=[sock])
    finally:
        sock.close()
    return 0


# -- running a command ---------------------------------------------------------------------------
# Every command, `fastcsm ...` and `python -m fastcsm.server ...` alike, runs through `run_command`:
# one parser, one way of filling settings from the environment, one line per error.


def command_parser(commands) -> argparse.ArgumentParser:
    """The `fastcsm` parser with the subcommands that `commands` (`add_<name>(subparsers)`) declare."""
    parser = argparse.ArgumentParser(
        prog="fastcsm",
        description="Fast, streaming speech with Sesame's CSM.",
        epilog='start with: fastcsm speak "Hello there." -o hello.wav   (fastcsm COMMAND --help for more)',
    )
    parser.add_argument("--version", action="version", version=f"fastcsm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in commands:
        add(sub)
    return parser


def _resolve_settings(args) -> None:
    """Fill the table's options of this command from their variables and defaults, checked; then
    refuse a device this machine lacks (before anything slow) and set torch's threads."""
    names = getattr(args, "settings", None)
    if not names:
        return
    try:
        values = values_from_args(args, names)
    except ValueError as e:
        raise CliError(str(e)) from e
    for name, value in values.items():
        setattr(args, name, value)
    if "device" in values:
        check_device(args.device)
    if "threads" in values:
        threads.apply(args.threads)  # a model of unknown size; refined once one is loaded


def run_command(build_parser, argv: list[str] | None = None) -> int:
    """Parse `argv` (`build_parser()` builds the parser once the thread pool is quiet) and run the
    command: a user's error ends in one line on stderr and its exit code (FASTCSM_DEBUG=1: traceback)."""
    threads.quiet_pool()  # before torch loads (building the parser may load it)
    args = build_parser().parse_args(argv)
    debug = bool(os.environ.get("FASTCSM_DEBUG"))
    # The library's warnings (context dropped, a piece that never ended) as one line each.
    log = logging.getLogger("fastcsm")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("fastcsm: %(message)s"))
    log.addHandler(handler)
    try:
        _resolve_settings(args)
        return args.func(args) or EXIT_OK
    except CliError as e:
        if debug:
            raise
        print(f"fastcsm: error: {' '.join(str(e).split())}", file=sys.stderr)  # one line, whatever the cause said
        return e.code
    except KeyboardInterrupt:
        print("fastcsm: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        log.removeHandler(handler)


def main(argv: list[str] | None = None) -> int:
    """`python -m fastcsm.server [flags]`: `fastcsm serve [flags]`."""
    return run_command(lambda: command_parser([add_serve]), ["serve", *(sys.argv[1:] if argv is None else argv)])
