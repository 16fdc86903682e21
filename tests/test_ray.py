"""fastcsm on Ray Serve (`fastcsm.integrations.ray`): arguments, and a real local cluster with two replicas.

The cluster tests start a tiny Ray cluster (2 CPUs, two replicas of the tiny random model on
one torch thread each) behind Serve's proxy on a free loopback port, and take about a minute:
they run with FASTCSM_SLOW_TESTS=1 (which `.ci/run` sets). Every Ray process they start is
stopped at the end of the module.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import io
import json
import os
import signal
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf

pytest.importorskip("ray.serve", reason="Ray Serve is not installed: pip install 'fastcsm[ray]'")
from server_harness import free_port, tiny_checkpoint  # noqa: E402
from websockets.exceptions import ConnectionClosed  # noqa: E402
from websockets.sync.client import connect  # noqa: E402

from fastcsm.integrations.ray import REPLICA_HEADER, build_app, parse_args  # noqa: E402

CLUSTER: dict[str, str] = {}
SLOW = pytest.mark.skipif(not os.environ.get("FASTCSM_SLOW_TESTS"),
                          reason="starts a Ray cluster with two replicas (~1 min on 2 CPUs); set FASTCSM_SLOW_TESTS=1")


# -- arguments ------------------------------------------------------------------------------------

def test_arguments_as_serve_cli_passes_them():
    settings, dep = parse_args({"model": "/m", "device": "cpu", "slots": "8", "api_keys": "a,b", "compile": "true",
                                "replicas": "2", "num_cpus": "0.5"}, environ={})
    assert (settings.model, settings.slots, settings.api_keys, settings.compile) == ("/m", 8, ["a", "b"], True)
    opts = dep.options(settings)
    assert opts["num_replicas"] == 2 and "autoscaling_config" not in opts
    assert opts["ray_actor_options"] == {"num_cpus": 0.5, "num_gpus": 0.0}
    assert opts["max_ongoing_requests"] == 8 + settings.max_queue


def test_autoscaling_target_follows_the_slots_and_cuda_takes_a_gpu_per_replica():
    settings, dep = parse_args({"model": "m", "device": "cuda", "slots": 64, "min_replicas": "1",
                                "max_replicas": "4"}, environ={})
    opts = dep.options(settings)
    assert opts["num_replicas"] == "auto" and opts["ray_actor_options"]["num_gpus"] == 1.0
    scaling = opts["autoscaling_config"]
    assert (scaling["min_replicas"], scaling["max_replicas"], scaling["target_ongoing_requests"]) == (1, 4, 48)
    _, dep = parse_args({"slots": 1, "max_replicas": 2, "target_ongoing_requests": "3"}, environ={})
    assert dep.options(settings)["autoscaling_config"]["target_ongoing_requests"] == 3


def test_environment_gives_defaults_and_arguments_win():
    settings, _ = parse_args({"voices_dir": "/shared/voices"},
                             environ={"FASTCSM_SLOTS": "12", "FASTCSM_VOICES": "/elsewhere"})
    assert settings.slots == 12 and settings.voices_dir == "/shared/voices"


@pytest.mark.parametrize("args, message", [
    ({"modle": "x"}, "unknown argument(s) modle"),
    ({"port": "9000"}, "http_options.port"),
    ({"replicas": "2", "max_replicas": "3"}, "either replicas="),
    ({"replicas": "two"}, "replicas='two' is not a valid int"),
    ({"replicas": 0}, "replicas must be at least 1"),
    ({"min_replicas": 3, "max_replicas": 2}, "min_replicas <= max_replicas"),
    ({"slots": "0"}, "slots must be at least 1"),
    ({"slots": "many"}, "FASTCSM_SLOTS='many' is not a valid int"),
])
def test_bad_arguments_are_refused_with_the_reason(args, message):
    with pytest.raises(ValueError) as e:
        parse_args(args, environ={})
    assert message in str(e.value)


def test_health_check_fails_once_the_scheduler_thread_is_gone():
    from types import SimpleNamespace

    from fastcsm.integrations.ray import FastCSM
    from fastcsm.server.app import create_app
    from fastcsm.server.settings import Settings

    fastapi_app = create_app(Settings(model=str(tiny_checkpoint()), device="cpu", slots=2,
                                      voices_dir=tempfile.mkdtemp()))
    replica = SimpleNamespace(_fastapi=fastapi_app)
    FastCSM.check_health(replica)  # still loading: healthy
    service = fastapi_app.state.service
    service.load()
    FastCSM.check_health(replica)
    service.close()  # the scheduler thread ends
    with pytest.raises(RuntimeError, match="scheduler thread has stopped"):
        FastCSM.check_health(replica)


@pytest.mark.parametrize("name", ["serve.yaml", "rayservice.yaml"])
def test_deployment_files_are_valid_serve_configs_with_valid_arguments(name):
    import yaml
    from ray.serve.schema import ServeDeploySchema

    docs = list(yaml.safe_load_all((Path(__file__).parent.parent / "deploy" / "ray" / name).read_text()))
    config = yaml.safe_load(docs[0]["spec"]["serveConfigV2"]) if docs[0].get("kind") == "RayService" else docs[0]
    app = ServeDeploySchema.model_validate(config).applications[0]
    assert app.import_path == "fastcsm.integrations.ray:app"
    settings, dep = parse_args(app.args, environ={})
    opts = dep.options(settings)
    assert opts["ray_actor_options"]["num_gpus"] == 1.0 and opts["autoscaling_config"]["max_replicas"] >= 2
    assert opts["autoscaling_config"]["target_ongoing_requests"] == 48  # 3/4 of 64 slots


# -- a real cluster ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray import serve

    import fastcsm

    port, metrics_port = free_port(), free_port()
    voices = tempfile.mkdtemp(prefix="fastcsm-ray-voices-")
    root = str(Path(fastcsm.__file__).resolve().parent.parent)  # this tree, for the replicas too
    # The dashboard serves Ray's state API (replica PIDs); the metrics port is what Prometheus scrapes.
    ray.init(num_cpus=2, num_gpus=0, include_dashboard=True, dashboard_port=free_port(),
             _metrics_export_port=metrics_port, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": root, "OMP_NUM_THREADS": "1"}})
    CLUSTER["metrics"] = f"http://127.0.0.1:{metrics_port}/metrics"
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(model=str(tiny_checkpoint()), device="cpu", replicas=2, threads=1, num_cpus=0.5,
                            slots=8, voices_dir=voices, max_audio_length_ms=30_000),
                  name="fastcsm", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def speech(url: str, seed: int, voice: str = "0", ms: int = 320) -> httpx.Response:
    return httpx.post(url + "/v1/audio/speech", timeout=60,
                      json={"input": "Hello there.", "voice": voice, "response_format": "pcm",
                            "max_audio_length_ms": ms, "seed": seed})


def spread(url: str, n: int, replicas: int = 1, **kw) -> list[httpx.Response]:
    """n speech requests at once (so the router spreads them over the replicas), again until
    at least `replicas` replicas answered (Serve picks replicas at random: a few rounds at most)."""
    out = []
    for _ in range(5):
        with concurrent.futures.ThreadPoolExecutor(n) as pool:
            out += pool.map(lambda i: speech(url, i, **kw), range(n))
        if len({r.headers.get(REPLICA_HEADER) for r in out}) >= replicas:
            break
    return out


def replica_pids() -> dict[str, int]:
    """Replica id -> PID of its worker process, from Ray's state API."""
    from ray.util.state import list_actors

    actors = list_actors(filters=[("state", "=", "ALIVE"), ("class_name", "=", "ServeReplica:fastcsm:fastcsm")])
    return {a.name.rsplit("#", 1)[-1]: a.pid for a in actors}


def wav_bytes(seconds: float = 1.0) -> bytes:
    t = np.arange(int(24_000 * seconds)) / 24_000
    buf = io.BytesIO()
    sf.write(buf, (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 24_000, format="WAV")
    return buf.getvalue()


def ws(url: str):
    return connect(url.replace("http", "ws") + "/v1/conversations", open_timeout=30)


def recv_json(conn, timeout=30) -> dict:
    while True:
        msg = conn.recv(timeout=timeout)
        if isinstance(msg, str):
            return json.loads(msg)


def speak(conn, text: str) -> dict:
    conn.send(json.dumps({"type": "speak", "text": text, "voice": "0", "max_audio_length_ms": 240}))
    while True:
        event = recv_json(conn)
        if event["type"] in ("done", "error"):
            return event


@SLOW
def test_both_replicas_serve_speech(cluster):
    responses = spread(cluster, 8, replicas=2)
    assert all(r.status_code == 200 and len(r.content) == 4 * 1920 * 2 for r in responses)
    per_replica = Counter(r.headers[REPLICA_HEADER] for r in responses)
    print("speech requests per replica:", dict(per_replica))
    assert set(per_replica) == set(replica_pids()) and len(per_replica) == 2


@SLOW
def test_a_voice_uploaded_through_one_replica_is_used_by_every_replica(cluster):
    r = httpx.post(cluster + "/v1/voices", data={"name": "shared", "text": "A test tone.", "speaker": "1"},
                   files={"audio": ("tone.wav", wav_bytes(), "audio/wav")}, timeout=60)
    assert r.status_code == 201, r.text
    uploaded_on = r.headers[REPLICA_HEADER]
    used = spread(cluster, 8, replicas=2, voice="shared")
    assert all(u.status_code == 200 for u in used), [u.text for u in used if u.status_code != 200]
    landed = Counter(u.headers[REPLICA_HEADER] for u in used)
    print(f"voice uploaded on {uploaded_on}; used on {dict(landed)}")
    assert len(landed) == 2  # the replica that did not store it reads it too
    # Uploading it again through any replica is a conflict: create-if-absent holds fleet-wide.
    again = httpx.post(cluster + "/v1/voices", data={"name": "shared", "text": "Again."},
                       files={"audio": ("tone.wav", wav_bytes(), "audio/wav")}, timeout=60)
    assert again.status_code == 409
    assert httpx.delete(cluster + "/v1/voices/shared", timeout=30).status_code == 200
    gone = spread(cluster, 8, replicas=2, voice="shared")
    assert all(g.status_code == 400 and "unknown voice" in g.text for g in gone)
    assert len({g.headers[REPLICA_HEADER] for g in gone}) == 2


@SLOW
def test_a_conversation_keeps_its_kv_on_its_replica(cluster):
    with ws(cluster) as conn:
        assert recv_json(conn)["type"] == "ready"
        reused = []
        for heard, line in [("Hi, how are you?", "Fine, thanks."), ("And today?", "Busy.")]:
            conn.send(json.dumps({"type": "add_turn", "speaker": 1, "text": heard}))
            assert recv_json(conn)["type"] == "turn_added"
            done = speak(conn, line)
            assert done["type"] == "done", done
            reused.append(done["reused_rows"])
    assert reused[0] == 0 and reused[1] > 0


@SLOW
def test_the_fleets_active_streams_and_queue_depth_reach_rays_metrics_export(cluster):
    replicas = set(replica_pids())
    deadline = time.monotonic() + 90  # replicas push every 2 s; Ray exports every few seconds
    while time.monotonic() < deadline:
        try:
            text = httpx.get(CLUSTER["metrics"], timeout=10).text
        except httpx.HTTPError:
            text = ""
        gauges = ("ray_fastcsm_active_streams{", "ray_fastcsm_queue_depth{")
        series = {(line.split("{", 1)[0], line.split('replica="', 1)[1].split('"', 1)[0])
                  for line in text.splitlines() if line.startswith(gauges) and 'replica="' in line}
        if series == {(name, r) for name in ("ray_fastcsm_active_streams", "ray_fastcsm_queue_depth")
                      for r in replicas}:
            return
        time.sleep(2)
    pytest.fail(f"per-replica fastcsm gauges missing from Ray's metrics export: {sorted(series)} for {replicas}")


@SLOW
def test_killing_a_replica_closes_its_conversations_ends_its_streams_and_ray_replaces_it(cluster):
    before = replica_pids()
    assert len(before) == 2
    # Conversations until one or more sit on each replica (the proxy spreads new connections).
    conns, stack = {}, contextlib.ExitStack()
    for _ in range(8):
        conn = stack.enter_context(ws(cluster))
        assert recv_json(conn)["type"] == "ready"
        conn.send(json.dumps({"type": "add_turn", "speaker": 1, "text": "Hello?"}))
        assert recv_json(conn)["type"] == "turn_added"
        conns.setdefault(conn.response.headers[REPLICA_HEADER], []).append(conn)
        if len(conns) == 2:
            break
    assert len(conns) == 2, "every conversation landed on one replica"
    victim = next(iter(conns))
    survivor = next(r for r in conns if r != victim)
    for conn in conns[victim] + conns[survivor]:
        assert speak(conn, "Before.")["type"] == "done"

    # A long HTTP stream on the victim: it must end with an error the client sees, not hang.
    client = httpx.Client(timeout=60)
    stream, stream_on = None, None
    for seed in range(12):
        req = client.build_request("POST", cluster + "/v1/audio/speech",
                                   json={"input": "A long line.", "voice": "0", "response_format": "pcm",
                                         "max_audio_length_ms": 30_000, "seed": seed})
        resp = client.send(req, stream=True)
        if resp.headers.get(REPLICA_HEADER) == victim:
            stream, stream_on = resp, victim
            break
        resp.close()
    chunks = stream.iter_raw()
    next(chunks)

    os.kill(before[victim], signal.SIGKILL)
    t0 = time.monotonic()

    with pytest.raises(httpx.HTTPError) as broken:  # the stream breaks off (30 s of audio never comes)
        for _ in chunks:
            pass
    print(f"stream on {stream_on} ended after {time.monotonic() - t0:.2f} s with {broken.value!r}")
    for conn in conns[victim]:
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                conn.recv(timeout=30)
        print(f"conversation on the killed replica closed after {time.monotonic() - t0:.2f} s: "
              f"{closed.value.rcvd!r}")
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1012
        assert "reconnect" in closed.value.rcvd.reason
    # The conversations on the other replica carry on with their KV.
    for conn in conns[survivor]:
        done = speak(conn, "After.")
        assert done["type"] == "done" and done["reused_rows"] > 0
    stack.close()
    # New requests succeed while Ray replaces the replica...
    assert all(r.status_code == 200 for r in spread(cluster, 4))
    # ...and Ray brings the fleet back to two replicas.
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        now = replica_pids()
        if len(now) == 2 and victim not in now:
            break
        time.sleep(1)
    print(f"replica {victim} replaced by {set(now) - set(before)} after {time.monotonic() - t0:.1f} s")
    assert len(now) == 2 and victim not in now
    deadline = time.monotonic() + 60
    seen = set()
    while time.monotonic() < deadline and seen != set(now):
        seen |= {r.headers[REPLICA_HEADER] for r in spread(cluster, 6, replicas=2) if r.status_code == 200}
    assert seen == set(now)
    client.close()


def test_replicas_share_one_compile_cache(tmp_path, monkeypatch):
    """The driver resolves the compile cache, so every replica (and node, given a shared volume)
    loads and fills the same one, compiling or looking for a finished build (compile unset)."""
    monkeypatch.delenv("FASTCSM_COMPILE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    settings, _ = parse_args({"model": "/m", "compile": "true"}, environ={})
    assert settings.compile_cache == str(tmp_path / "fastcsm" / "compile")
    settings, _ = parse_args({"model": "/m", "compile": True, "compile_cache": "~/shared/compile"}, environ={})
    assert settings.compile_cache == os.path.expanduser("~/shared/compile")
    # Unset, replicas compile when that cache holds a finished build: the driver's cache all the same.
    assert parse_args({"model": "/m"}, environ={})[0].compile_cache == str(tmp_path / "fastcsm" / "compile")
    assert parse_args({"model": "/m", "compile": False}, environ={})[0].compile_cache is None
