"""One name per idea: every command's --help, read as a user reads it, names each option the same
way, with the same variable, as the other commands, the HTTP and WebSocket fields and Python."""

import argparse
import dataclasses
import inspect
import re

import pytest

from fastcsm.cli import build_parser, main

# Spellings of one idea: at most one of each group may be shown by any --help.
SYNONYMS = [
    {"--max-ms", "--max-audio-length-ms", "--max-length-ms"},
    {"--force", "--overwrite", "--replace"},
    {"--mode", "--quantize"},
    {"--voices", "--voices-dir"},
    {"--threads", "--num-threads", "--jobs"},
]
DEVICE_CHOICES = "cpu, cuda, cuda:1, mps"


def commands() -> dict[str, argparse.ArgumentParser]:
    """Every runnable command's parser, by its words ("speak", "voices add", ...)."""
    found = {}

    def walk(parser, words):
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs and words:
            found[" ".join(words)] = parser
        for action in subs:
            for name, child in action.choices.items():
                walk(child, [*words, name])

    walk(build_parser(), [])
    return found


def help_text(words: str, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        main([*words.split(), "--help"])
    assert exc.value.code == 0
    return capsys.readouterr().out


def options(text: str) -> dict[str, str]:
    """Each long option shown in a --help, with the text of its entry (help and variable)."""
    entries, current = {}, None
    for line in text.splitlines():
        m = re.match(r"\s{2}(?:-\w, )?(--[\w-]+)(?:, --[\w-]+)?", line)
        if m:
            current = m.group(1)
            entries[current] = line[m.end():]
        elif current and line.startswith(" " * 8):
            entries[current] += " " + line.strip()
        elif not line.strip() or not line.startswith(" "):
            current = None
    return {flag: " ".join(entry.split()) for flag, entry in entries.items()}


def test_every_command_names_each_idea_once(capsys):
    shown = {words: options(help_text(words, capsys)) for words in commands()}
    assert {"speak", "voices add", "voices list", "voices remove", "serve", "bench", "quantize"} <= set(shown)
    variables: dict[str, set[str]] = {}
    flags_of_variable: dict[str, set[str]] = {}
    for words, opts in shown.items():
        for flag, entry in opts.items():
            for var in re.findall(r"\[(FASTCSM_\w+)\]", entry):
                variables.setdefault(flag, set()).add(var)
                flags_of_variable.setdefault(var, set()).add(flag)
        for group in SYNONYMS:
            assert len(group & set(opts)) <= 1, f"`fastcsm {words}` shows {sorted(group & set(opts))}: one idea"
    all_flags = set().union(*(set(o) for o in shown.values()))
    for group in SYNONYMS:
        assert len(group & all_flags) <= 1, f"the commands spell one idea as {sorted(group & all_flags)}"
    assert all(len(v) == 1 for v in variables.values()), {f: v for f, v in variables.items() if len(v) > 1}
    assert all(len(f) == 1 for f in flags_of_variable.values()), \
        {v: f for v, f in flags_of_variable.items() if len(f) > 1}
    # An option that reads a variable reads it in every command that has the option.
    for words, opts in shown.items():
        for flag in set(opts) & set(variables):
            if flag in ("--quantize", "--model"):  # bench's and quantize's own meanings (a list; a directory)
                continue
            assert f"[{next(iter(variables[flag]))}]" in opts[flag], f"`fastcsm {words}` {flag} ignores its variable"
    for words, opts in shown.items():
        if "--device" in opts:
            assert DEVICE_CHOICES in opts["--device"], f"`fastcsm {words}` --device lists other devices"
            assert "--threads" in opts, f"`fastcsm {words}` runs torch without --threads"
    assert variables["--voices-dir"] == {"FASTCSM_VOICES_DIR"} and variables["--threads"] == {"FASTCSM_THREADS"}


def test_the_same_names_in_python_and_over_http():
    """The CLI's names are the library's and the protocol's: max_audio_length_ms, overwrite, quantize."""
    from fastcsm.generator import Generator
    from fastcsm.server.protocol import Speak, SpeechRequest
    from fastcsm.server.service import Service
    from fastcsm.speech.speech import SpeakOptions
    from fastcsm.speech.voices import VoiceStore

    speak = commands()["speak"]
    dests = {a.dest for a in speak._actions}
    sampling = {"seed", "temperature", "topk", "max_audio_length_ms"}
    assert sampling <= dests
    assert sampling - {"seed"} <= {f.name for f in dataclasses.fields(SpeakOptions)}
    assert sampling <= set(SpeechRequest.model_fields) and sampling <= set(Speak.model_fields)
    add = commands()["voices add"]
    assert "overwrite" in {a.dest for a in add._actions}
    assert "overwrite" in inspect.signature(VoiceStore.add).parameters
    assert "overwrite" in inspect.signature(Service.create_voice).parameters
    assert "quantize" in {a.dest for a in commands()["quantize"]._actions}
    assert "quantize" in inspect.signature(Generator.from_pretrained).parameters


def test_old_spellings_still_parse_hidden(capsys):
    parse = build_parser().parse_args
    assert parse(["speak", "hi", "--max-ms", "240"]).max_audio_length_ms == 240
    assert parse(["speak", "hi"]).max_audio_length_ms is None  # the table's default (or its variable) then
    assert parse(["voices", "add", "a", "--audio", "x", "--text", "t", "--force"]).overwrite is True
    assert parse(["voices", "add", "a", "--audio", "x", "--text", "t"]).overwrite is False
    assert parse(["quantize", "a", "b", "--mode", "fp8"]).quantize == "fp8"
    assert parse(["quantize", "a", "b"]).quantize == "int8"
    text = help_text("speak", capsys) + help_text("voices add", capsys) + help_text("quantize", capsys)
    assert not {"--max-ms", "--force", "--mode"} & set(re.findall(r"--[\w-]+", text))


def test_serve_help_starts_with_a_usage(capsys):
    first = help_text("serve", capsys).splitlines()[0]
    assert first.startswith("usage: fastcsm serve [--model PATH_OR_ID]") and "--help lists" not in first


def test_voices_folder_variable_and_its_older_name(tmp_path, monkeypatch, capsys):
    from fastcsm.speech.voices import voice_dir

    monkeypatch.delenv("FASTCSM_VOICES_DIR", raising=False)
    monkeypatch.setenv("FASTCSM_VOICES", str(tmp_path / "old"))
    assert voice_dir() == tmp_path / "old"
    assert main(["voices", "list"]) == 0 and str(tmp_path / "old") in capsys.readouterr().out
    monkeypatch.setenv("FASTCSM_VOICES_DIR", str(tmp_path / "new"))
    assert voice_dir() == tmp_path / "new"
    assert main(["voices", "list"]) == 0 and str(tmp_path / "new") in capsys.readouterr().out
    monkeypatch.setenv("FASTCSM_THREADS", "-1")
    assert main(["voices", "add", "a", "--audio", "x", "--text", "t"]) == 2
    assert "FASTCSM_THREADS" in capsys.readouterr().err


def test_speak_takes_the_servers_length_bound_from_its_variable(monkeypatch):
    from fastcsm.cli import _check_speak_args

    monkeypatch.setenv("FASTCSM_MAX_AUDIO_LENGTH_MS", "2400")
    args = build_parser().parse_args(["speak", "hi"])
    _check_speak_args(args)
    assert args.max_audio_length_ms == 2400
    args = build_parser().parse_args(["speak", "hi", "--max-audio-length-ms", "800"])
    _check_speak_args(args)
    assert args.max_audio_length_ms == 800
