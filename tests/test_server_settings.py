"""`fastcsm serve` configuration: FASTCSM_* variables, flags over them, clear refusals."""

from __future__ import annotations

import pytest

from fastcsm.cli import build_parser, main
from fastcsm.server.cli import settings_from_args
from fastcsm.server.settings import Settings


def test_environment_then_flags():
    env = {"FASTCSM_SLOTS": "24", "FASTCSM_API_KEYS": "a, b,,", "FASTCSM_COMPILE": "yes",
           "FASTCSM_MAX_VOICE_AUDIO_S": "12.5", "FASTCSM_VOICES": "/tmp/v", "FASTCSM_CORS_ORIGINS": ""}
    s = Settings.from_env(env)
    assert (s.slots, s.api_keys, s.compile, s.max_voice_audio_s, s.voices_dir) == (24, ["a", "b"], True, 12.5, "/tmp/v")
    assert s.cors_origins == []
    assert Settings.from_env(env, slots=4, api_keys=None).slots == 4
    with pytest.raises(ValueError, match="FASTCSM_SLOTS='many' is not a valid int"):
        Settings.from_env({"FASTCSM_SLOTS": "many"})
    with pytest.raises(ValueError, match="FASTCSM_COMPILE"):
        Settings.from_env({"FASTCSM_COMPILE": "maybe"})


def test_flags(monkeypatch):
    monkeypatch.setenv("FASTCSM_PORT", "9000")
    monkeypatch.setenv("FASTCSM_SLOTS", "8")
    args = build_parser().parse_args(["serve", "--slots", "2", "--api-key", "k1", "--api-key", "k2",
                                      "--cors-origin", "https://a.example"])
    s = settings_from_args(args)
    assert (s.port, s.slots, s.api_keys, s.cors_origins) == (9000, 2, ["k1", "k2"], ["https://a.example"])


def test_help_and_refusals(capsys):
    with pytest.raises(SystemExit) as e:
        main(["serve", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "FASTCSM_" in out and "--api-key" in out and "--max-queue" in out
    assert main(["serve", "--slots", "0"]) == 2
    assert "--slots (FASTCSM_SLOTS) must be at least 1" in capsys.readouterr().err
    assert main(["serve", "--model", "/no/such/checkpoint"]) == 3
    assert "could not load the model" in capsys.readouterr().err
