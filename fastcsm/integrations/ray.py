"""fastcsm on Ray Serve: every replica is the `fastcsm serve` app over its own engine.

Serve's CLI runs the application builder with `key=value` arguments:

    serve run fastcsm.integrations.ray:app model=~/models/csm-1b replicas=2
    serve run fastcsm.integrations.ray:app model=DIR device=cpu min_replicas=1 max_replicas=4 voices_dir=/shared/voices

and Python calls the same builder:

    from ray import serve
    from fastcsm.integrations.ray import build_app
    serve.run(build_app(model="DIR", device="cpu", replicas=2))

Arguments are every `fastcsm serve` setting (`model`, `device`, `slots`, `voices_dir`,
`api_keys`, ...: the fields of `fastcsm.server.settings.Settings`, with `FASTCSM_*` variables of
the calling process as defaults) plus the deployment's own (`DEPLOYMENT_ARGS`): `replicas`
(a fixed count) or `min_replicas` / `max_replicas` (autoscaling on ongoing requests, with a
target derived from the slot count), `num_cpus` and `num_gpus` per replica (default: one GPU
per replica when the device is CUDA), `target_ongoing_requests`, `max_ongoing_requests`, `name`.

Voices live in one directory that every replica reads and writes (`voices_dir`: on several
machines a shared volume); the voice store writes atomically, so the guarantees of one server
hold across replicas. A WebSocket conversation stays on the replica that accepted it. Each
response carries `X-Fastcsm-Replica` (the replica's id), so a client or a test can see where
it landed. With `compile=true` every replica keeps its compiled step in one directory
(`compile_cache`, default ~/.cache/fastcsm/compile of the calling machine, resolved there; on
several machines a shared volume): a replica started after the cache is filled (by the first
replica, or ahead of time by `fastcsm compile`) loads instead of compiling. Each replica also
exports its active streams and queue depth as Ray metrics
(`ray_fastcsm_active_streams`, `ray_fastcsm_queue_depth`, tagged by replica) on every node's
metrics port, which a Prometheus scraping the Ray cluster sees for the whole fleet.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import threading
from contextlib import asynccontextmanager
from typing import Any

try:
    from ray import serve
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(f"fastcsm.integrations.ray needs Ray Serve ({e.name} is missing): "
                      "pip install 'fastcsm[ray]'") from e

from ..server.settings import Settings

log = logging.getLogger("fastcsm")
# Serve's proxies install `proxy_middlewares` when this is in their environment. A cluster that
# `serve run fastcsm.integrations.ray:app` starts inherits it from here; `ray start` and KubeRay set it themselves.
os.environ.setdefault("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", "fastcsm.integrations.ray:proxy_middlewares")
REPLICA_HEADER = "x-fastcsm-replica"
DEPLOYMENT_ARGS = ("replicas", "min_replicas", "max_replicas", "target_ongoing_requests", "max_ongoing_requests",
                   "num_cpus", "num_gpus", "name")
_SETTINGS = tuple(f.name for f in dataclasses.fields(Settings))
CLOSE_REPLICA_GONE = 1012  # "service restart": reconnect, and send the conversation's turns again
_NOT_HERE = {k: f"Serve's proxy listens instead: set http_options.{k} in the Serve config (default 8000 on "
                f"127.0.0.1 with serve run), or `serve start --http-{k}`" for k in ("host", "port")}


@dataclasses.dataclass
class Deployment:
    """How the replicas are placed and scaled (the part of the arguments that is not `Settings`)."""

    name: str = "fastcsm"
    replicas: int | None = None  # a fixed count; None: autoscaling between min and max
    min_replicas: int = 1
    max_replicas: int = 1
    target_ongoing_requests: float | None = None  # default: 3/4 of the slots
    max_ongoing_requests: int | None = None  # default: slots + max_queue
    num_cpus: float = 1.0
    num_gpus: float | None = None  # default: 1 on CUDA, 0 on CPU

    def options(self, settings: Settings) -> dict[str, Any]:
        """`serve.deployment` options: one engine per replica, so one GPU per replica on CUDA.

        A replica's ongoing requests are its speech streams plus its open conversations. The
        autoscaler aims at `target_ongoing_requests` per replica: 3/4 of the slots, so a new
        replica starts while the busy ones still have free slots (a replica takes a minute or
        more to load csm-1b) and requests rarely wait in an engine queue. Serve sends a replica
        at most `max_ongoing_requests` (slots + engine queue); beyond that requests wait in
        Serve's router instead of getting the engine's 503.
        """
        device = settings.device or ("cuda" if _cuda() else "cpu")
        gpus = self.num_gpus if self.num_gpus is not None else (1.0 if device.startswith("cuda") else 0.0)
        opts: dict[str, Any] = {
            "name": self.name,
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": gpus},
            "max_ongoing_requests": self.max_ongoing_requests or settings.slots + settings.max_queue,
            "health_check_period_s": 5,
            "health_check_timeout_s": 30,
            # A replica leaving (scale-down, redeploy) lets its streams finish for this long; then
            # what is left ends as when a replica dies (conversations get 1012).
            "graceful_shutdown_timeout_s": 30,
        }
        if self.replicas is not None:
            opts["num_replicas"] = self.replicas
        else:
            target = self.target_ongoing_requests or max(1.0, math.floor(0.75 * settings.slots))
            opts["num_replicas"] = "auto"
            opts["autoscaling_config"] = {
                "min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
                "target_ongoing_requests": target,
                "upscale_delay_s": 10, "downscale_delay_s": 300,
            }
        return opts


def parse_args(args: dict[str, Any] | None = None, environ=None) -> tuple[Settings, Deployment]:
    """Settings and deployment from builder arguments: strings as Serve's CLI passes them
    (`slots=32`, `api_keys=a,b`, `compile=true`) or typed values from Python."""
    args = dict(args or {})
    for key, why in _NOT_HERE.items():
        if key in args:
            raise ValueError(f"{key}= does not apply under Ray Serve: {why}")
    unknown = sorted(set(args) - set(_SETTINGS) - set(DEPLOYMENT_ARGS))
    if unknown:
        raise ValueError(f"unknown argument(s) {', '.join(unknown)}; fastcsm.integrations.ray takes the server "
                         f"settings ({', '.join(n for n in _SETTINGS if n not in _NOT_HERE)}) and the deployment's "
                         f"({', '.join(DEPLOYMENT_ARGS)})")
    environ = dict(os.environ if environ is None else environ)
    typed = {}
    for key in _SETTINGS:
        if key not in args:
            continue
        value = args[key]
        if isinstance(value, str):  # parsed as its FASTCSM_* variable would be
            environ[f"FASTCSM_{key.upper()}"] = value
        else:
            typed[key] = value
    if "voices_dir" in args:  # FASTCSM_VOICES must not win over an explicit argument
        environ.pop("FASTCSM_VOICES", None)
    settings = Settings.from_env(environ, **typed)  # checked as `fastcsm serve` checks them
    if settings.voices_dir:
        settings.voices_dir = os.path.abspath(os.path.expanduser(settings.voices_dir))
    if settings.compile is not False:  # one cache that every replica loads (and fills, compiling): the driver's
        from ..engine.compile_cache import default_dir

        settings.compile_cache = os.path.abspath(os.path.expanduser(settings.compile_cache or default_dir()))
    if os.path.isdir(os.path.expanduser(settings.model)):
        settings.model = os.path.abspath(os.path.expanduser(settings.model))

    dep = Deployment()
    conv = {"replicas": int, "min_replicas": int, "max_replicas": int, "max_ongoing_requests": int,
            "target_ongoing_requests": float, "num_cpus": float, "num_gpus": float, "name": str}
    for key in DEPLOYMENT_ARGS:
        if key in args:
            try:
                setattr(dep, key, conv[key](args[key]))
            except (TypeError, ValueError):
                raise ValueError(f"{key}={args[key]!r} is not a valid {conv[key].__name__}") from None
    scaling = "min_replicas" in args or "max_replicas" in args
    if dep.replicas is not None and scaling:
        raise ValueError("give either replicas= (a fixed count) or min_replicas=/max_replicas= (autoscaling)")
    if dep.replicas is None and not scaling:
        dep.replicas = 1
    if dep.replicas is not None and dep.replicas < 1:
        raise ValueError(f"replicas must be at least 1, got {dep.replicas}")
    if scaling:
        if "max_replicas" not in args:
            dep.max_replicas = max(dep.min_replicas, 1)
        if not 0 <= dep.min_replicas <= dep.max_replicas or dep.max_replicas < 1:
            raise ValueError(f"need 0 <= min_replicas <= max_replicas and max_replicas >= 1, got "
                             f"{dep.min_replicas} and {dep.max_replicas}")
    return settings, dep


def build_app(args: dict[str, Any] | None = None, **kwargs):
    """The Serve application: `build_app({"model": DIR, "replicas": "2"})` or `build_app(model=DIR, replicas=2)`."""
    settings, dep = parse_args({**(args or {}), **kwargs})
    return serve.deployment(FastCSM).options(**dep.options(settings)).bind(dataclasses.asdict(settings))


def app(args: dict[str, str]):
    """The builder that `serve run fastcsm.integrations.ray:app key=value ...` and
    `import_path: fastcsm.integrations.ray:app` call."""
    return build_app(args)


@serve.ingress()
class FastCSM:
    """One replica: the fastcsm FastAPI app (speech, voices, conversations, health, metrics) over
    its own engine. It reports ready to Serve only once the model is loaded."""

    def __init__(self, settings: dict[str, Any]):
        self.settings = Settings(**settings)  # the service loads as every other (service.bootstrap)
        context = serve.get_replica_context()
        self.replica = context.replica_id.unique_id if context is not None else f"pid{os.getpid()}"
        self._fastapi = None
        self._stop = threading.Event()

    def __serve_build_asgi_app__(self):
        from ..server.app import create_app

        fastapi_app = create_app(self.settings)
        fastapi_app.add_middleware(ReplicaHeader, replica=self.replica)
        inner = fastapi_app.router.lifespan_context

        @asynccontextmanager
        async def lifespan(a):
            async with inner(a) as state:
                await a.state.loading  # Serve routes nothing here before this returns
                service = a.state.service
                if not service.ready:  # fail the replica's start with the reason; Serve retries it
                    raise RuntimeError(f"fastcsm: the model could not be loaded: {service.load_error}")
                threading.Thread(target=self._export_metrics, args=(service,), name="fastcsm-ray-metrics",
                                 daemon=True).start()
                try:
                    yield state
                finally:
                    self._stop.set()

        fastapi_app.router.lifespan_context = lifespan
        self._fastapi = fastapi_app
        return fastapi_app

    def check_health(self) -> None:
        """Serve's health check: a replica whose model failed or whose scheduler thread died is
        replaced (its conversations close, its streams end)."""
        service = self._fastapi.state.service if self._fastapi is not None else None
        if service is None or not service.ready:
            return  # still starting
        if not service.scheduler.alive:
            raise RuntimeError("fastcsm: the scheduler thread has stopped")

    def _export_metrics(self, service, period_s: float = 2.0) -> None:
        """Active streams and queue depth as Ray gauges (per replica), for the fleet's Prometheus."""
        try:
            from ray.util.metrics import Gauge

            tags = ("replica",)
            gauges = {
                "active": Gauge("fastcsm_active_streams", "requests holding an engine slot", tag_keys=tags),
                "queued": Gauge("fastcsm_queue_depth", "requests waiting for a slot", tag_keys=tags),
                "slots": Gauge("fastcsm_slots", "engine slots of the replica", tag_keys=tags),
            }
        except Exception:  # metrics are an aid: never a reason for a replica to fail
            log.warning("fastcsm: Ray metrics are not available; /metrics per replica still works", exc_info=True)
            return
        tag = {"replica": self.replica}
        while not self._stop.wait(period_s):
            s = service.scheduler
            try:
                gauges["active"].set(s.active, tags=tag)
                gauges["queued"].set(s.queued, tags=tag)
                gauges["slots"].set(s.slots, tags=tag)
            except Exception:
                log.debug("fastcsm: exporting Ray metrics failed", exc_info=True)


class ReplicaHeader:
    """ASGI middleware: every HTTP response and WebSocket handshake names the replica."""

    def __init__(self, app, replica: str):
        self.app, self.header = app, (REPLICA_HEADER.encode(), replica.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)

        async def tagged(message):
            if message["type"] in ("http.response.start", "websocket.accept"):
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, tagged)


class CloseOnReplicaLoss:
    """ASGI middleware for Serve's proxy: a WebSocket whose replica died (the proxy's handler
    ends without closing it) gets close code 1012 and a reason, instead of a dropped connection."""

    REASON = "the fastcsm replica holding this conversation stopped; reconnect and send its turns again"

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "websocket":
            return await self.app(scope, receive, send)
        state = {"accepted": False, "closed": False}

        async def watched_send(message):
            if message["type"] == "websocket.accept":
                state["accepted"] = True
            elif message["type"] == "websocket.close":
                state["closed"] = True
            await send(message)

        async def watched_receive():
            message = await receive()
            if message["type"] == "websocket.disconnect":
                state["closed"] = True
            return message

        try:
            await self.app(scope, watched_receive, watched_send)
        finally:
            if state["accepted"] and not state["closed"]:
                log.warning("fastcsm: a conversation's replica stopped; closing it with %d", CLOSE_REPLICA_GONE)
                try:
                    await send({"type": "websocket.close", "code": CLOSE_REPLICA_GONE, "reason": self.REASON})
                except Exception:  # the client is gone too
                    pass


def proxy_middlewares():
    """`RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=fastcsm.integrations.ray:proxy_middlewares`: what Serve's
    proxies add in front of every request."""
    from starlette.middleware import Middleware

    return [Middleware(CloseOnReplicaLoss)]


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False
