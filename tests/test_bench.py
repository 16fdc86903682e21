"""The benchmark runs end to end on CPU and reports every figure it promises."""

import itertools
import json
import math

import pytest

from fastcsm import bench
from fastcsm.config import preset


def agrees(value, decimals, f, *inputs) -> bool:
    """`value` (rounded to `decimals` places) is `f` of `inputs`, each an `(x, decimals)` as the bench
    printed it: true anywhere in the box the inputs' rounding leaves (f is monotonic in each)."""
    corners = itertools.product(*[(x - 0.5 * 10 ** -d, x + 0.5 * 10 ** -d) for x, d in inputs])
    outs = [f(*c) for c in corners]
    return min(outs) - 0.5 * 10 ** -decimals - 1e-9 <= value <= max(outs) + 0.5 * 10 ** -decimals + 1e-9


def test_bench_reports_json(capsys):
    """Every promised figure is there, finite and non-negative, and the derived ones agree with
    their inputs. Nothing depends on how fast this machine is right now (a loaded machine may take
    hundreds of ms a step, which rounds the tiny model's GB/s to 0.0)."""
    pytest.importorskip("transformers")
    result = bench.main(["--preset", "tiny", "--batch", "1,2", "--steps", "2", "--voice-seconds", "1",
                         "--peer-frames", "2", "--threads", "1"])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == json.loads(json.dumps(result))

    def numbers(d):
        for v in d.values():
            if isinstance(v, dict):
                yield from numbers(v)
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                yield v

    assert all(math.isfinite(v) and v >= 0 for v in numbers(printed))
    frame_ms, weights = preset("tiny").frame_ms, printed["weight_bytes_per_frame"]
    assert weights == bench.weight_bytes_per_frame(preset("tiny"), 4)
    bw, floor_ms = printed["copy_bandwidth_gbps"], printed["floor_ms_per_frame"]
    if bw >= 0.1:
        assert agrees(floor_ms, 3, lambda g: weights / (g * 1e9) * 1000, (bw, 1))
    assert set(printed["batches"]) == {"1", "2"}
    for b, r in printed["batches"].items():
        ms, batch = r["ms_per_step"], int(b)
        assert ms > 0 and r["ms_per_step_p90"] > 0
        assert agrees(r["frames_per_s"], 1, lambda m, n=batch: 1000 * n / m, (ms, 3))
        assert agrees(r["gbps"], 1, lambda m: weights / (m / 1000) / 1e9, (ms, 3))
        assert agrees(r["fraction_of_floor"], 3, lambda f, m: f / m, (floor_ms, 3), (ms, 3))
        if abs(ms - frame_ms) > 5e-4:  # (decided on the unrounded time)
            assert r["realtime_streams"] == (batch if ms <= frame_ms else 0)
        assert {"startup_s", "first_step_ms"} <= set(r)
    ms1 = printed["batches"]["1"]["ms_per_step"]
    assert agrees(printed["realtime_factor_batch1"], 2, lambda m: frame_ms / m, (ms1, 12))  # from the printed figure
    assert printed["realtime_streams_sustained"] == max(
        [int(b) for b, r in printed["batches"].items() if r["ms_per_step"] <= frame_ms], default=0)
    ttfa = printed["ttfa_ms"]
    assert ttfa["prompt_rows"] == 12 + 21 and ttfa["voice_seconds"] == 1 and ttfa.keys() >= {"cold", "prefix_reused"}
    peer = printed["peer_transformers"]
    assert peer["frames"] == 2 and peer["ms_per_frame"] > 0
    assert agrees(peer["speedup_batch1"], 2, lambda p: p / ms1, (peer["ms_per_frame"], 12))


def test_weight_bytes_of_csm_1b_match_design():
    """docs/design.md: ~1.95 GB backbone + 31 x 0.22 GB decoder, about 8.8 GB a frame in bf16."""
    gb = bench.weight_bytes_per_frame(preset("csm-1b"), 2) / 1e9
    assert 8.0 < gb < 9.5


def test_fastcsm_bench_command(capsys):
    from fastcsm.cli import main

    assert main(["bench", "--preset", "tiny", "--batch", "1", "--steps", "1", "--voice-seconds", "0.5",
                 "--no-peer", "--threads", "1"]) == 0
    assert set(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["batches"]) == {"1"}
