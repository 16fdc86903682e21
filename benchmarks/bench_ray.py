"""What Ray Serve's path costs: `fastcsm.integrations.ray` behind Serve's proxy against one `fastcsm serve`.

In one run, on loopback, with the same checkpoint (the tiny random one by default) and the same
client as `bench_server.py`:

1. a single `fastcsm serve` process (one torch thread on CPU);
2. a local Ray cluster (`--cpus` CPUs) running `fastcsm.integrations.ray` with each of `--replicas` replica
   counts (one torch thread each), requests through Serve's HTTP proxy.

The single server stays up throughout. Sequential one-frame requests go to it and to Serve's
proxy in interleaved pairs (the difference is what the proxy adds to a request and to its first
audio, with the machine's other load weighing on both alike); then, for each, a bounded sweep
of concurrent real-time streams (lateness p50/p99/max against an 80 ms jitter buffer, time to
first audio, which replica served each stream). Every Ray process it starts is stopped at the end.

    python benchmarks/bench_ray.py                                   # CPU, tiny checkpoint
    python benchmarks/bench_ray.py --streams 1,8,32 --replicas 2 --seconds 3

Prints one line per level on stderr and one JSON object on the last line of stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import bench_server as B  # noqa: E402  (the client and the lateness measure)


def fastcsm_root() -> str:
    import fastcsm

    return str(Path(fastcsm.__file__).resolve().parent.parent)


def start_single(model: str, args) -> tuple[subprocess.Popen, str]:
    """`fastcsm serve`, exactly as a user runs it."""
    port = B.free_port()
    cmd = [sys.executable, "-m", "fastcsm", "serve", "--model", model, "--device", args.device,
           "--slots", str(args.slots), "--max-queue", str(4 * args.slots), "--port", str(port),
           "--max-audio-length-ms", str(int(args.seconds * 1000) + 80), "--request-timeout-s", "600",
           "--voices-dir", tempfile.mkdtemp(), "--log-level", "warning"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [fastcsm_root(), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        B.wait_ready(url, args.startup_timeout, proc)
    except Exception:
        proc.kill()
        raise
    return proc, url


def deploy_ray(model: str, args, replicas: int, port: int) -> str:
    from ray import serve

    from fastcsm.integrations.ray import build_app

    serve.run(build_app(model=model, device=args.device, replicas=replicas, threads=args.threads or 0,
                        num_cpus=args.cpus / replicas if args.device == "cpu" else 1, slots=args.slots,
                        max_queue=4 * args.slots, max_audio_length_ms=int(args.seconds * 1000) + 80,
                        request_timeout_s=600, voices_dir=tempfile.mkdtemp(), log_level="warning"),
              name="fastcsm", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    B.wait_ready(url, args.startup_timeout)
    return url


def one_request(http, url: str, seed: int) -> tuple[float, float]:
    """One one-frame request: (first audio byte, whole response) in ms."""
    body = {"input": "Hi.", "voice": "0", "response_format": "pcm", "max_audio_length_ms": 80, "seed": seed}
    t0 = time.perf_counter()
    with http.stream("POST", url + "/v1/audio/speech", json=body) as r:
        r.raise_for_status()
        t1 = None
        for _ in r.iter_raw():
            t1 = t1 or time.perf_counter()
    return 1000 * (t1 - t0), 1000 * (time.perf_counter() - t0)


def paired_requests(single: str, ray_url: str, n: int) -> dict:
    """n pairs of sequential one-frame requests, one to each server back to back, so that the
    machine's other load weighs on both alike: the median of the differences is what the proxy
    hop adds per request and to the first audio byte."""
    import httpx

    times: dict[str, list[tuple[float, float]]] = {"single": [], "ray": []}
    with httpx.Client(timeout=60) as http:
        for i in range(n):
            order = [("single", single), ("ray", ray_url)]
            for name, url in order if i % 2 else order[::-1]:
                times[name].append(one_request(http, url, i))
    out = {"pairs": n}
    for name, pairs in times.items():
        out[f"{name}_first_byte_ms_p50"] = round(statistics.median(f for f, _ in pairs), 1)
        out[f"{name}_total_ms_p50"] = round(statistics.median(t for _, t in pairs), 1)
    out["added_first_byte_ms_p50"] = round(statistics.median(
        r[0] - s[0] for s, r in zip(times["single"], times["ray"], strict=True)), 1)
    out["added_total_ms_p50"] = round(statistics.median(
        r[1] - s[1] for s, r in zip(times["single"], times["ray"], strict=True)), 1)
    return out


def sweep(url: str, label: str, args) -> dict:
    asyncio.run(B.run_level(url, 1, min(args.seconds, 1.0), args.buffer_ms / 1000))  # warm-up
    out = {"sweep": [], "realtime_streams": 0}
    t_start = time.perf_counter()
    for n in [int(x) for x in args.streams.split(",")]:
        if time.perf_counter() - t_start > args.budget_s:
            B.log(f"{label}: time budget of {args.budget_s:g} s spent; stopping the sweep")
            break
        level = asyncio.run(B.run_level(url, n, args.seconds, args.buffer_ms / 1000))
        out["sweep"].append(level)
        B.log(f"{label:>16}: {n:3d} streams {'held' if level['held'] else 'NOT held'}; lateness p50 "
              f"{level['lateness_ms_p50']} p99 {level['lateness_ms_p99']} max {level['lateness_ms_max']} ms; "
              f"TTFA p50 {level['ttfa_ms_p50']} p99 {level['ttfa_ms_p99']} ms"
              + (f"; per replica {level['per_replica']}" if "per_replica" in level else ""))
        if not level["held"]:
            break
        out["realtime_streams"] = n
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="a checkpoint directory (default: a tiny random one written to a temp dir)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--replicas", default="1,2", help="Ray replica counts to measure, in order")
    p.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    p.add_argument("--streams", default="1,4,8,16,32", help="concurrencies to try, in order")
    p.add_argument("--slots", type=int, default=32, help="engine slots of each server")
    p.add_argument("--seconds", type=float, default=2.0, help="audio per stream")
    p.add_argument("--buffer-ms", type=float, default=80.0, help="client jitter buffer before playback starts")
    p.add_argument("--requests", type=int, default=30, help="pairs of sequential one-frame requests")
    p.add_argument("--threads", type=int, default=None, help="torch threads per server (default: 1 on CPU)")
    p.add_argument("--budget-s", type=float, default=60.0, help="stop each sweep after this long")
    p.add_argument("--startup-timeout", type=float, default=300.0)
    args = p.parse_args(argv)
    if args.threads is None:
        args.threads = 1 if args.device == "cpu" else 0
    model = args.model
    if model is None:
        from fastcsm.testing import write_hf_checkpoint

        model = tempfile.mkdtemp(prefix="fastcsm-bench-ray-")
        write_hf_checkpoint(model, seed=0)

    results: dict = {}
    load_before = os.getloadavg()[0]
    proc, single = start_single(model, args)  # up for the whole run: every Ray figure is paired with it
    import ray
    from ray import serve

    try:
        results["single"] = sweep(single, "fastcsm serve", args)
        port = B.free_port()
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": fastcsm_root(), "OMP_NUM_THREADS": str(args.threads or 1)}})
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            for replicas in [int(x) for x in args.replicas.split(",")]:
                t0 = time.perf_counter()
                url = deploy_ray(model, args, replicas, port)
                label = f"ray {replicas} replica" + ("s" if replicas > 1 else "")
                B.log(f"{label}: deployed in {time.perf_counter() - t0:.1f} s")
                paired = paired_requests(single, url, args.requests)
                B.log(f"{label:>16}: the proxy adds {paired['added_total_ms_p50']} ms per one-frame request "
                      f"and {paired['added_first_byte_ms_p50']} ms to its first byte (p50 of {args.requests} pairs)")
                results[f"ray_{replicas}"] = {"paired_with_single": paired, **sweep(url, label, args)}
                serve.delete("fastcsm")
        finally:
            serve.shutdown()
            ray.shutdown()
    finally:
        B.stop(proc)

    base = results["single"]["sweep"]
    for key, r in results.items():
        if key != "single" and r["sweep"] and base:
            r["added_ttfa_ms_p50_at_1_stream"] = round(r["sweep"][0]["ttfa_ms_p50"] - base[0]["ttfa_ms_p50"], 1)
    print(json.dumps({
        "benchmark": "ray_serve_vs_single_server",
        "model": args.model or "tiny-checkpoint",
        "device": args.device,
        "cpu_count": os.cpu_count(),
        "ray_cpus": args.cpus,
        # Other work on the machine skews every figure: compare servers only within one run.
        "loadavg_1min_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "ray_version": ray.__version__,
        "threads_per_server": args.threads,
        "seconds_per_stream": args.seconds,
        "buffer_ms": args.buffer_ms,
        "slots": args.slots,
        **results,
    }))


if __name__ == "__main__":
    main()
