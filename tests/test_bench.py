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
    """Full precision and int8 side by side in one JSON line, each with its own floor, time to
    first audio and (int8) accuracy against full precision. Every promised figure is there, finite
    and non-negative, and the derived ones agree with their inputs. Nothing depends on how fast this
    machine is right now (a loaded machine may take hundreds of ms a step, which rounds the tiny
    model's GB/s to 0.0)."""
    pytest.importorskip("transformers")
    result = bench.main(["--preset", "tiny", "--batch", "1,2", "--steps", "2", "--voice-seconds", "1",
                         "--peer-frames", "2", "--threads", "1", "--quantize", "none,int8", "--accuracy-frames", "3"])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == json.loads(json.dumps(result))

    def numbers(d):
        for v in d.values():
            if isinstance(v, dict):
                yield from numbers(v)
            elif isinstance(v, list):
                yield from numbers(dict(enumerate(v)))
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                yield v

    assert all(math.isfinite(v) and v >= 0 for v in numbers(printed))
    cfg = preset("tiny")
    frame_ms, bw = cfg.frame_ms, printed["copy_bandwidth_gbps"]
    modes = printed["modes"]
    assert list(modes) == ["none", "int8"]
    assert modes["none"]["weight_bytes_per_frame"] == bench.weight_bytes_per_frame(cfg, 4)
    assert modes["int8"]["weight_bytes_per_frame"] == bench.weight_bytes_per_frame(cfg, 4, 1)
    assert modes["int8"]["weight_bytes"] < modes["none"]["weight_bytes"]
    for name, mode in modes.items():
        assert mode["quantize"] == name
        weights, floor_ms = mode["weight_bytes_per_frame"], mode["floor_ms_per_frame"]
        if bw >= 0.1:
            assert agrees(floor_ms, 3, lambda g, w=weights: w / (g * 1e9) * 1000, (bw, 1))
        assert set(mode["batches"]) == {"1", "2"}
        for b, r in mode["batches"].items():
            ms, batch = r["ms_per_step"], int(b)
            assert ms > 0 and r["ms_per_step_p90"] > 0
            assert agrees(r["frames_per_s"], 1, lambda m, n=batch: 1000 * n / m, (ms, 3))
            assert agrees(r["gbps"], 3, lambda m, w=weights: w / (m / 1000) / 1e9, (ms, 3))
            assert agrees(r["fraction_of_floor"], 3, lambda f, m: f / m, (floor_ms, 3), (ms, 3))
            if abs(ms - frame_ms) > 5e-4:  # (decided on the unrounded time)
                assert r["realtime_streams"] == (batch if ms <= frame_ms else 0)
            assert {"startup_s", "first_step_ms"} <= set(r)
        ms1 = mode["batches"]["1"]["ms_per_step"]
        assert agrees(mode["realtime_factor_batch1"], 2, lambda m: frame_ms / m, (ms1, 12))  # from the printed figure
        assert mode["realtime_streams_sustained"] == max(
            [int(b) for b, r in mode["batches"].items() if r["ms_per_step"] <= frame_ms], default=0)
        ttfa = mode["ttfa_ms"]
        assert ttfa["prompt_rows"] == 12 + 21 and ttfa["voice_seconds"] == 1
        assert ttfa.keys() >= {"cold", "prefix_reused"}
    int8, none = modes["int8"], modes["none"]
    for b, ratio in int8["ms_ratio_to_none"].items():
        assert agrees(ratio, 3, lambda q, f: q / f, (int8["batches"][b]["ms_per_step"], 3),
                      (none["batches"][b]["ms_per_step"], 3))
    assert set(int8["ms_ratio_to_none"]) == {"1", "2"}
    acc = int8["accuracy"]
    assert acc["frames"] == 12 + 3 and len(acc["top1"]) == len(acc["rel_rms"]) == 32
    assert all(0 <= t <= 1 for t in acc["top1"])
    assert acc["codebook0_top1"] > 0.9 and acc["decoder_rel_rms_max"] < 0.1
    assert "accuracy" not in none
    peer = printed["peer_transformers"]
    assert peer["frames"] == 2 and peer["ms_per_frame"] > 0
    for name, mode in modes.items():
        ms1 = mode["batches"]["1"]["ms_per_step"]
        assert agrees(peer["speedup_batch1"][name], 2, lambda p, m=ms1: p / m, (peer["ms_per_frame"], 12))


def test_weight_bytes_of_csm_1b_match_design():
    """docs/design.md: ~1.95 GB backbone + 31 x 0.22 GB decoder, about 8.8 GB a frame in bf16."""
    gb = bench.weight_bytes_per_frame(preset("csm-1b"), 2) / 1e9
    assert 8.0 < gb < 9.5
    int8 = bench.weight_bytes_per_frame(preset("csm-1b"), 2, 1) / 1e9  # linears in 8 bits + fp32 scales
    assert 0.5 * gb < int8 < 0.52 * gb


def test_fastcsm_bench_command(capsys):
    from fastcsm.cli import main

    assert main(["bench", "--preset", "tiny", "--batch", "1", "--steps", "1", "--voice-seconds", "0.5",
                 "--no-peer", "--threads", "1"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(printed["modes"]) == {"none"} and set(printed["modes"]["none"]["batches"]) == {"1"}
