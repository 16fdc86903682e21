"""The benchmark runs end to end on CPU and reports every figure it promises."""

import json

import pytest

from fastcsm import bench
from fastcsm.config import preset


def test_bench_reports_json(capsys):
    """Full precision and int8 side by side in one JSON line, each with its own floor, time to
    first audio and (int8) accuracy against full precision."""
    pytest.importorskip("transformers")
    result = bench.main(["--preset", "tiny", "--batch", "1,2", "--steps", "2", "--voice-seconds", "1",
                         "--peer-frames", "2", "--threads", "1", "--quantize", "none,int8", "--accuracy-frames", "3"])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == json.loads(json.dumps(result))
    assert printed["copy_bandwidth_gbps"] > 0
    modes = printed["modes"]
    assert list(modes) == ["none", "int8"]
    for mode in modes.values():
        for b in ("1", "2"):
            r = mode["batches"][b]
            assert r["ms_per_step"] > 0 and r["gbps"] > 0 and 0 < r["fraction_of_floor"] < 1
        assert mode["ttfa_ms"]["cold"] > 0 and mode["ttfa_ms"]["prefix_reused"] > 0
        assert mode["ttfa_ms"]["prompt_rows"] == 12 + 21
    assert modes["int8"]["weight_bytes_per_frame"] < 0.6 * modes["none"]["weight_bytes_per_frame"]
    assert modes["int8"]["weight_bytes"] < modes["none"]["weight_bytes"]
    assert set(modes["int8"]["ms_ratio_to_none"]) == {"1", "2"}
    acc = modes["int8"]["accuracy"]
    assert acc["frames"] == 12 + 3 and len(acc["top1"]) == len(acc["rel_rms"]) == 32
    assert acc["codebook0_top1"] > 0.9 and acc["decoder_rel_rms_max"] < 0.1
    assert "accuracy" not in modes["none"]
    peer = printed["peer_transformers"]
    assert peer["frames"] == 2 and peer["speedup_batch1"]["none"] > 0 and peer["speedup_batch1"]["int8"] > 0


def test_weight_bytes_of_csm_1b_match_design():
    """DESIGN.md: ~1.95 GB backbone + 31 x 0.22 GB decoder, about 8.8 GB a frame in bf16."""
    gb = bench.weight_bytes_per_frame(preset("csm-1b"), 2) / 1e9
    assert 8.0 < gb < 9.5
    int8 = bench.weight_bytes_per_frame(preset("csm-1b"), 2, 1) / 1e9  # linears in 8 bits + fp32 scales
    assert 0.5 * gb < int8 < 0.52 * gb


def test_fastcsm_bench_command(capsys):
    from fastcsm.cli import main

    assert main(["bench", "--preset", "tiny", "--batch", "1", "--steps", "1", "--voice-seconds", "0.5",
                 "--no-peer", "--threads", "1"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["modes"]["none"]["batches"]["1"]["ms_per_step"] > 0
