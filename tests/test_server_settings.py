"""`fastcsm serve` configuration: one table gives the flags, the FASTCSM_* variables and the checks."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest

from fastcsm.cli import build_parser, main
from fastcsm.server.settings import Settings, env_name, settings_from_args


def test_environment_then_flags():
    env = {"FASTCSM_SLOTS": "24", "FASTCSM_API_KEYS": "a, b,,", "FASTCSM_COMPILE": "yes",
           "FASTCSM_MAX_VOICE_AUDIO_S": "12.5", "FASTCSM_VOICES": "/tmp/v", "FASTCSM_CORS_ORIGINS": ""}
    s = Settings.from_env(env)
    assert (s.slots, s.api_keys, s.compile, s.max_voice_audio_s, s.voices_dir) == (24, ["a", "b"], True, 12.5, "/tmp/v")
    assert s.cors_origins == []
    assert Settings.from_env(env, slots=4, api_keys=None).slots == 4
    assert Settings.from_env({"FASTCSM_VOICES": "/tmp/v", "FASTCSM_VOICES_DIR": "/tmp/w"}).voices_dir == "/tmp/w"
    assert Settings.from_env({"FASTCSM_LOG_LEVEL": "DEBUG", "FASTCSM_DTYPE": "BF16"}).log_level == "debug"
    with pytest.raises(ValueError, match="FASTCSM_SLOTS='many' is not a valid int"):
        Settings.from_env({"FASTCSM_SLOTS": "many"})
    with pytest.raises(ValueError, match="FASTCSM_COMPILE"):
        Settings.from_env({"FASTCSM_COMPILE": "maybe"})


def test_flags(monkeypatch):
    monkeypatch.setenv("FASTCSM_PORT", "9000")
    monkeypatch.setenv("FASTCSM_SLOTS", "8")
    monkeypatch.setenv("FASTCSM_COMPILE", "1")
    args = build_parser().parse_args(["serve", "--slots", "2", "--api-key", "k1", "--api-key", "k2",
                                      "--cors-origin", "https://a.example", "--no-compile",
                                      "--max-context-turns", "3"])
    s = settings_from_args(args)
    assert (s.port, s.slots, s.api_keys, s.cors_origins) == (9000, 2, ["k1", "k2"], ["https://a.example"])
    assert (s.compile, s.max_context_turns) == (False, 3)


def test_every_setting_has_a_flag_a_variable_and_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["serve", "--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for f in dataclasses.fields(Settings):
        spec = f.metadata["spec"]
        assert spec.flag_of(f.name) in out and f"[{env_name(f.name)}]" in out, f.name
        assert spec.help.split(" (")[0].split(";")[0] in out, f.name
    assert "(default: 16)" in out and "(default: 16 MiB)" in out


REFUSED = [  # (flags, the same as Settings fields, what the one message says)
    (["--slots", "0"], {"slots": 0}, "slots must be at least 1 (--slots, FASTCSM_SLOTS), got 0"),
    (["--max-queue", "-1"], {"max_queue": -1}, "max_queue must be at least 0"),
    (["--port", "70000"], {"port": 70000}, "port must be at most 65535"),
    (["--request-timeout-s", "nan"], {"request_timeout_s": float("nan")}, "request_timeout_s must be a finite number"),
    (["--keep-alive-s", "0"], {"keep_alive_s": 0.0}, "keep_alive_s must be at least 0.1"),
    (["--max-body-bytes", "10"], {"max_body_bytes": 10}, "max_body_bytes must be at least 1024"),
    (["--max-audio-length-ms", "40"], {"max_audio_length_ms": 40}, "between one frame (80 ms)"),
    (["--max-audio-length-ms", "200000"], {"max_audio_length_ms": 200_000}, "2048-row window holds (163840 ms)"),
    (["--cors-origin", "https://app.example/"], {"cors_origins": ["https://app.example/"]}, "no trailing slash"),
    (["--api-key", " "], {"api_keys": [" "]}, "API key is empty"),
    (["--voice-map", "alloy"], {"voice_map": "alloy"}, "neither name=target entries nor a readable file"),
    (["--allowed-hosts", "tts.example:8000"], {"allowed_hosts": ["tts.example:8000"]}, "no scheme, port or path"),
    (["--allowed-hosts", "https://tts.example"], {"allowed_hosts": ["https://tts.example"]}, "(--allowed-hosts, "
                                                                                           "FASTCSM_ALLOWED_HOSTS)"),
]


@pytest.mark.parametrize("flags, fields, message", REFUSED, ids=[r[0][0] for r in REFUSED])
def test_settings_refuse_what_the_command_refuses_with_the_same_message(flags, fields, message, capsys):
    with pytest.raises(ValueError) as e:
        Settings(**fields)
    assert message in str(e.value)
    assert main(["serve", *flags, "--model", "/no/such/checkpoint"]) == 2
    err = capsys.readouterr().err
    assert err == f"fastcsm: error: {' '.join(str(e.value).split())}\n"
    from fastcsm.server.app import create_app

    with pytest.raises(ValueError) as again:
        create_app(Settings(**{**dataclasses.asdict(Settings()), **fields}))
    assert str(again.value) == str(e.value)


def test_allowed_hosts_from_flags_and_variable_and_what_they_allow(monkeypatch):
    import socket

    from fastcsm.server.limits import HostNames

    monkeypatch.setenv("FASTCSM_ALLOWED_HOSTS", "a.example, *.b.example")
    assert Settings.from_env().allowed_hosts == ["a.example", "*.b.example"]
    args = build_parser().parse_args(["serve", "--allowed-hosts", "c.example,d.example", "--allowed-hosts", "e."])
    assert settings_from_args(args).allowed_hosts == ["c.example", "d.example", "e."]

    everywhere = HostNames(Settings(host="0.0.0.0"))  # the default: no names configured
    for host in ("localhost:8000", "127.0.0.1", "127.8.9.1:1", "[::1]:8000", "10.1.2.3:8000", "[fe80::1]:80",
                 socket.gethostname(), f"{socket.gethostname().upper()}:8000", None):
        assert everywhere.allows(host), host
    for host in ("evil.example:8000", "localhost.evil.example", "", "[::1", "a.example",
                 "evil.example@127.0.0.1", "127.0.0.1/x", "127.0.0.1:80:80"):
        assert not everywhere.allows(host), host
    named = HostNames(Settings(host="tts.lan", allowed_hosts=["a.example", "*.b.example", "e."]))
    for host in ("tts.lan:8000", "A.Example.:80", "x.b.example", "x.y.b.example", "e:1"):
        assert named.allows(host), host
    for host in ("b.example", "xb.example", "a.example.evil"):
        assert not named.allows(host), host
    assert HostNames(Settings(allowed_hosts=["*"])).allows("evil.example:8000")


def test_settings_check_types_given_in_code():
    for fields, message in [({"slots": "4"}, "slots must be an integer"), ({"compile": 1}, "compile must be a bool"),
                            ({"api_keys": "k"}, "api_keys must be a list of strings"),
                            ({"slots": True}, "slots must be an integer"), ({"dtype": "fp64"}, "one of fp32, bf16")]:
        with pytest.raises(ValueError, match=message):
            Settings(**fields)
    assert Settings(request_timeout_s=5, model_name=None).request_timeout_s == 5  # an int is a number


def test_refusals_and_load_failures_end_in_one_line(capsys):
    assert main(["serve", "--slots", "0"]) == 2
    assert capsys.readouterr().err == "fastcsm: error: slots must be at least 1 (--slots, FASTCSM_SLOTS), got 0\n"
    assert main(["serve", "--model", "/no/such/checkpoint", "--port", "0"]) == 3
    assert "could not load the model" in capsys.readouterr().err


@pytest.mark.slow
def test_both_entry_points_behave_the_same():
    """`python -m fastcsm serve` (what the `fastcsm` script runs) and `python -m fastcsm.server`:
    one parser, one error path, one exit code."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    env.pop("FASTCSM_DEBUG", None)
    commands = [[sys.executable, "-m", "fastcsm", "serve"], [sys.executable, "-m", "fastcsm.server"]]
    for argv, error in ((["--slots", "0"], "fastcsm: error: slots must be at least 1"),
                        (["--slots", "two"], "fastcsm serve: error: argument --slots: invalid int value: 'two'")):
        runs = [subprocess.run([*cmd, *argv], env=env, capture_output=True, text=True, timeout=120)
                for cmd in commands]
        for run in runs:
            assert run.returncode == 2 and run.stdout == "", run.stderr
            assert run.stderr.splitlines()[-1].startswith(error) and len(run.stderr.splitlines()) <= 2, run.stderr
            assert run.stderr == runs[0].stderr
