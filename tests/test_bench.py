"""The benchmark runs end to end on CPU and reports every figure it promises."""

import itertools
import json
import math
import re

import pytest

from fastcsm import bench
from fastcsm.model.config import preset


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
    out = capsys.readouterr().out.strip().splitlines()
    printed = json.loads(out[-1])
    assert printed == json.loads(json.dumps(result))
    table = "\n".join(out[:-1])
    assert "real-time factor = generation time / audio duration" in table
    for mode in ("none", "int8"):
        for batch in (1, 2):
            ms = printed["modes"][mode]["batches"][str(batch)]["ms_per_step"]
            assert re.search(rf"^{mode}\s+{batch}\s+{ms:.2f}\s", table, re.M), table
    assert re.search(r"fastcsm is [\d.]+x (faster|slower) \(none\)", table)
    assert "Warning" not in table and "[transformers]" not in table

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
            assert agrees(r["real_time_factor"], 3, lambda m: m / frame_ms, (ms, 3))
            if abs(ms - frame_ms) > 5e-4:  # (decided on the unrounded time)
                assert r["realtime_streams"] == (batch if ms <= frame_ms else 0)
            assert {"startup_s", "first_step_ms"} <= set(r)
        ms1 = mode["batches"]["1"]["ms_per_step"]
        # generation time / audio duration, from the printed figure
        assert agrees(mode["real_time_factor_batch1"], 3, lambda m: m / frame_ms, (ms1, 12))
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


def test_fastcsm_bench_command(tmp_path, capsys):
    """`fastcsm bench` with --plot: the table, the JSON last, and a PNG of the sweep."""
    pytest.importorskip("matplotlib")
    from fastcsm.cli import main

    plot = tmp_path / "bench.png"
    assert main(["bench", "--preset", "tiny", "--batch", "1,2", "--steps", "1", "--voice-seconds", "0.5",
                 "--no-peer", "--threads", "1", "--plot", str(plot)]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(printed["modes"]) == {"none"} and set(printed["modes"]["none"]["batches"]) == {"1", "2"}
    assert printed["plot"] == str(plot) and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["bench", "--plot", str(tmp_path / "bench.jpg")]) == 2
    assert "--plot writes a PNG image" in capsys.readouterr().err


def test_ratios_are_worded_as_faster_or_slower():
    assert bench.ratio_words(2.53) == "2.5x faster" and bench.ratio_words(0.2) == "5.0x slower"
    assert bench.ratio_words(1.0) == "1.0x faster"


@pytest.fixture
def profile_step(monkeypatch):
    """benchmarks/profile_step.py, imported as a module (it imports count_ops beside it)."""
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "benchmarks"))
    import profile_step

    return profile_step


@pytest.mark.slow
def test_profile_step_reports_kernels_per_frame_on_cpu(profile_step, capsys):
    """The GPU profile script runs on the CPU (the tiny preset, eager): one JSON line with the wall
    time a frame, its ops (the CPU's kernels), their time, the gaps, and the top ops with the fastcsm
    lines that called them. Nothing here depends on how fast the machine is."""
    result = profile_step.main(["--device", "cpu", "--batch", "1,2", "--steps", "1", "--profile-steps", "1",
                                "--top", "6"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
    assert result["preset"] == "tiny" and result["path"] == {"candidates": 64, "nucleus": False, "greedy": False,
                                                             "sampled": True}
    assert [(r["mode"], r["batch"]) for r in result["runs"]] == [("eager", 1), ("eager", 2)]
    for run in result["runs"]:
        assert "error" not in run and "note" not in run, run
        assert run["wall_ms"] > 0 and run["busy_ms"] > 0 and run["kernels"] > 10
        assert run["gaps_ms"] == pytest.approx(run["wall_ms"] - run["busy_ms"], abs=2e-3)
        # The tiny preset: 4 backbone and 4 decoder layers, 32 codebooks; at least one op a layer pass.
        assert run["kernels_per_frame"] > 4 + 4 * 31
        assert len(run["top"]) == 6
        assert [t["us_per_frame"] for t in run["top"]] == sorted((t["us_per_frame"] for t in run["top"]), reverse=True)
        for t in run["top"]:
            assert t["name"].startswith("aten::") and t["per_frame"] > 0 and t["mean_us"] > 0
            assert sum(t["where"].values()) > 0 and all(w.startswith("fastcsm/") for w in t["where"])
    # The same ops a frame at any batch (the step's code does not depend on it).
    assert result["runs"][0]["kernels_per_frame"] == result["runs"][1]["kernels_per_frame"]


def test_profile_step_groups_cuda_kernels_and_their_launchers(profile_step):
    """The CUDA side of the table, on profiler events built by hand (there is no GPU here): kernels
    are grouped by name with count and time per frame, syncs are left out, and each kernel is put
    down to the top-level op and the fastcsm line that launched it."""
    from torch.autograd import DeviceType
    from torch.autograd.profiler_util import FunctionEvent

    def event(name, start, end, device=DeviceType.CPU, parent=None):
        e = FunctionEvent(id=0, name=name, thread=0, start_us=start, end_us=end, device_type=device)
        if parent is not None:
            e.set_cpu_parent(parent)
        return e

    def frame(t):  # one frame: a linear (its mm launches one gemm) and a topk (two kernels)
        line = event("fastcsm/model/network.py(88): forward", t, t + 50)
        linear = event("aten::linear", t, t + 20, parent=line)
        mm = event("aten::mm", t + 1, t + 19, parent=linear)
        mm.append_kernel("gemm", 0, 6.0)
        pick = event("fastcsm/engine/sampling.py(171): pick", t + 29, t + 41)
        topk = event("aten::topk", t + 30, t + 40, parent=pick)
        topk.append_kernel("radix", 0, 2.0)
        topk.append_kernel("sort", 0, 1.0)
        gpu = [event("gemm", t + 2, t + 8, DeviceType.CUDA), event("radix", t + 31, t + 33, DeviceType.CUDA),
               event("sort", t + 33, t + 34, DeviceType.CUDA), event("Stream Sync", t + 40, t + 90, DeviceType.CUDA)]
        return [line, linear, mm, topk, *gpu]

    events = frame(0) + frame(100)
    table = profile_step.kernel_table(events, events, cuda=True, frames=2, top=2)
    assert table["kernels_per_frame"] == 3 and table["kernels"] == 3 and table["busy_ms"] == 0.009
    assert table["top"] == [
        {"name": "gemm", "per_frame": 1, "us_per_frame": 6.0, "mean_us": 6.0, "ops": {"aten::linear": 2},
         "where": {"fastcsm/model/network.py(88): forward": 2}},
        {"name": "radix", "per_frame": 1, "us_per_frame": 2.0, "mean_us": 2.0, "ops": {"aten::topk": 2},
         "where": {"fastcsm/engine/sampling.py(171): pick": 2}},
    ]
    replays = [e for e in events if e.device_type == DeviceType.CUDA]  # kernels no op launched (a graph replay)
    assert "ops" not in profile_step.kernel_table(replays, replays, cuda=True, frames=2, top=1)["top"][0]
