"""The benchmark runs end to end on CPU and reports every figure it promises."""

import json

import pytest

from fastcsm import bench
from fastcsm.config import preset


def test_bench_reports_json(capsys):
    pytest.importorskip("transformers")
    result = bench.main(["--preset", "tiny", "--batch", "1,2", "--steps", "2", "--voice-seconds", "1",
                         "--peer-frames", "2", "--threads", "1"])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == json.loads(json.dumps(result))
    for b in ("1", "2"):
        r = printed["batches"][b]
        assert r["ms_per_step"] > 0 and r["gbps"] > 0 and 0 < r["fraction_of_floor"] < 1
    assert printed["ttfa_ms"]["cold"] > 0 and printed["ttfa_ms"]["prefix_reused"] > 0
    assert printed["ttfa_ms"]["prompt_rows"] == 12 + 21
    assert printed["peer_transformers"]["frames"] == 2 and printed["peer_transformers"]["speedup_batch1"] > 0


def test_weight_bytes_of_csm_1b_match_design():
    """docs/design.md: ~1.95 GB backbone + 31 x 0.22 GB decoder, about 8.8 GB a frame in bf16."""
    gb = bench.weight_bytes_per_frame(preset("csm-1b"), 2) / 1e9
    assert 8.0 < gb < 9.5


def test_fastcsm_bench_command(capsys):
    from fastcsm.cli import main

    assert main(["bench", "--preset", "tiny", "--batch", "1", "--steps", "1", "--voice-seconds", "0.5",
                 "--no-peer", "--threads", "1"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["batches"]["1"]["ms_per_step"] > 0
