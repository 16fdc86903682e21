"""The `fastcsm` command on a tiny random checkpoint: files it writes, and its error paths."""

import json
import re

import numpy as np
import pytest
import soundfile as sf
import torch

from fastcsm.cli import build_parser, main
from fastcsm.errors import EXIT_MODEL, EXIT_USAGE

FRAME = 1920


def speak(tmp_path, model, *extra, text="Hello from the command line.", out="out.wav"):
    path = tmp_path / out
    argv = ["speak", text, "-o", str(path), "--model", str(model), "--device", "cpu", "--seed", "1",
            "--max-audio-length-ms", "240", "-q", "--voices-dir", str(tmp_path / "voices"), *extra]
    return main(argv), path


def written_frames(stdout: str) -> int:
    return int(re.search(r"\((\d+) frames", stdout).group(1))


def test_speak_writes_a_24khz_wav_of_whole_frames(tmp_path, tiny_csm_dir, capsys):
    rc, path = speak(tmp_path, tiny_csm_dir)
    out = capsys.readouterr().out
    assert rc == 0
    info = sf.info(str(path))
    assert (info.samplerate, info.channels, info.subtype) == (24_000, 1, "PCM_16")
    frames = written_frames(out)
    assert 1 <= frames <= 3 and info.frames == frames * FRAME
    assert "time to first audio" not in out

    rc, streamed = speak(tmp_path, tiny_csm_dir, "--stream", "--chunk-ms", "80", out="streamed.wav")
    out = capsys.readouterr().out
    assert rc == 0 and re.search(r"time to first audio: \d+ ms", out)
    a, _ = sf.read(str(path), dtype="int16")
    b, _ = sf.read(str(streamed), dtype="int16")
    assert a.shape == b.shape and np.abs(a.astype(int) - b.astype(int)).max() <= 1, "same seed, same audio"


def test_voices_add_list_speak_remove(tmp_path, tiny_csm_dir, capsys):
    ref = tmp_path / "ref.wav"
    sf.write(str(ref), 0.1 * np.sin(np.arange(48_000) / 30.0), 48_000)  # 1 s at 48 kHz: resampled to 24 kHz
    vdir = str(tmp_path / "voices")
    rc = main(["voices", "add", "alice", "--audio", str(ref), "--text", "A sine wave.", "--speaker", "2",
               "--model", str(tiny_csm_dir), "--device", "cpu", "--voices-dir", vdir])
    assert rc == 0 and "saved voice 'alice'" in capsys.readouterr().out
    assert main(["voices", "list", "--voices-dir", vdir]) == 0
    assert re.search(r"alice\tspeaker 2\t1\.0 s\tA sine wave\.", capsys.readouterr().out)

    context = tmp_path / "conversation.json"
    context.write_text(json.dumps([{"speaker": 1, "text": "How are you?", "audio": "ref.wav"},
                                   {"speaker": 2, "text": "Fine."}]))
    rc, path = speak(tmp_path, tiny_csm_dir, "--voice", "alice", "--context", str(context))
    assert rc == 0 and sf.info(str(path)).frames % FRAME == 0
    capsys.readouterr()

    assert main(["voices", "remove", "alice", "--voices-dir", vdir]) == 0
    assert main(["voices", "remove", "alice", "--voices-dir", vdir]) == EXIT_USAGE
    assert "no voice named 'alice'" in capsys.readouterr().err


def test_voices_add_refuses_digit_only_names(tmp_path, capsys):
    """Refused before the codec loads (there is none here): digits alone name a speaker id."""
    rc = main(["voices", "add", "007", "--audio", str(tmp_path / "ref.wav"), "--text", "Hi.",
               "--model", str(tmp_path / "no-such-model"), "--voices-dir", str(tmp_path / "voices")])
    check_error(capsys, rc, EXIT_USAGE, "invalid voice name '007': digits alone already mean that speaker id")
    assert not (tmp_path / "voices").exists()


def check_error(capsys, rc, code, message):
    err = capsys.readouterr().err
    assert rc == code, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("fastcsm: error:")]
    assert len(lines) == 1 and re.search(message, lines[0]), err


def test_missing_model(tmp_path, capsys):
    rc, _ = speak(tmp_path, tmp_path / "no-such-model")
    check_error(capsys, rc, EXIT_MODEL, "could not load the model .*neither an existing directory")
    (tmp_path / "empty").mkdir()
    rc, _ = speak(tmp_path, tmp_path / "empty")
    check_error(capsys, rc, EXIT_MODEL, "no CSM weights")


def test_unreadable_voice_file(tmp_path, tiny_csm_dir, capsys):
    bad = tmp_path / "voice.safetensors"
    bad.write_bytes(b"\x00garbage")
    rc, _ = speak(tmp_path, tiny_csm_dir, "--voice", str(bad))
    check_error(capsys, rc, EXIT_USAGE, "not a readable fastcsm voice file")
    rc, _ = speak(tmp_path, tiny_csm_dir, "--voice", str(tmp_path / "missing.safetensors"))
    check_error(capsys, rc, EXIT_USAGE, "no voice file at")
    rc, _ = speak(tmp_path, tiny_csm_dir, "--voice", "..")
    check_error(capsys, rc, EXIT_USAGE, "invalid voice name")
    (tmp_path / "noise.wav").write_bytes(b"RIFF not really")
    rc, _ = speak(tmp_path, tiny_csm_dir, "--voice-audio", str(tmp_path / "noise.wav"), "--voice-text", "x")
    check_error(capsys, rc, EXIT_USAGE, "--voice-audio: .*could not read audio")


@pytest.mark.parametrize("text", ["", "   \n"])
def test_empty_text(tmp_path, tiny_csm_dir, capsys, text):
    rc, _ = speak(tmp_path, tiny_csm_dir, text=text)
    check_error(capsys, rc, EXIT_USAGE, "text to speak is empty")


@pytest.mark.parametrize("args, message", [
    (["--max-audio-length-ms", "0"], "--max-audio-length-ms: max_audio_length_ms must be a finite number > 0"),
    (["--max-audio-length-ms", "40"], "--max-audio-length-ms: max_audio_length_ms=40 is shorter than one 80 ms frame"),
    (["--max-ms", "nan"], "must be a finite number > 0, got nan"),
    (["--max-audio-length-ms", "1e9"], "max_audio_length_ms=1e\\+09 is above the limit of 163840 ms"),
    (["--chunk-ms", "10"], "--chunk-ms must be at least one frame"),
    (["--temperature", "-1"], "--temperature: temperature must be a finite number from 0 to 10"),
    (["--topk", "3000"], "--topk: topk must be an integer from 0 to 2048"),
    (["--speaker", "-1"], "--speaker: speaker must be an integer from 0 to 1000000"),
    (["--voice-audio", "x.wav"], "go together"),
    (["--max-piece-chars", "-5"], "--max-piece-chars"),
])
def test_impossible_arguments(tmp_path, tiny_csm_dir, capsys, args, message):
    rc, _ = speak(tmp_path, tiny_csm_dir, *args)
    check_error(capsys, rc, EXIT_USAGE, message)


def test_a_line_too_long_for_the_window(tmp_path, tiny_csm_dir, capsys):
    rc, path = speak(tmp_path, tiny_csm_dir, "--max-piece-chars", "0", text="word " * 500)
    check_error(capsys, rc, EXIT_USAGE, "more than the 2048-row context window")
    assert not path.exists(), "nothing is written when speaking fails"


def test_bad_context_files(tmp_path, tiny_csm_dir, capsys):
    ctx = tmp_path / "c.json"
    for content, message in [("{not json", "not valid JSON"), ('{"a": 1}', "must hold a list of turns"),
                             ('[{"text": "hi"}]', 'needs at least "speaker" and "text"'),
                             ('[{"speaker": 0, "text": "hi", "audio": "missing.wav"}]',
                              "context audio: .*no such file")]:
        ctx.write_text(content)
        rc, _ = speak(tmp_path, tiny_csm_dir, "--context", str(ctx))
        check_error(capsys, rc, EXIT_USAGE, message)


def test_help_and_structure(capsys):
    with pytest.raises(SystemExit) as e:
        main(["speak", "--help"])
    assert e.value.code == 0
    help_text = capsys.readouterr().out
    for flag in ["--voice", "--voice-audio", "--voice-text", "--speaker", "--context", "--model", "--tokenizer",
                 "--device", "--dtype", "--seed", "--temperature", "--topk", "--max-audio-length-ms", "--stream",
                 "--threads", "--format", "examples:"]:
        assert flag in help_text
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == EXIT_USAGE

    def add_hello(sub):  # a new subcommand is one function
        sub.add_parser("hello").set_defaults(func=lambda args: 0)

    from fastcsm.cli import COMMANDS

    args = build_parser([*COMMANDS, add_hello]).parse_args(["hello"])
    assert args.func(args) == 0


def test_a_checkpoint_without_a_codec_is_refused_in_one_place(tmp_path, capsys):
    """`speak`, `serve` and the server's loader all say the same: pass --codec."""
    from safetensors.torch import save_file

    from fastcsm import bench
    from fastcsm.model import checkpoints
    from fastcsm.model.config import tiny_config
    from fastcsm.server.service import Service
    from fastcsm.server.settings import Settings
    from fastcsm.testing import write_tokenizer

    cfg = tiny_config()
    root = tmp_path / "sesame"  # Sesame's own format carries no Mimi
    root.mkdir()
    state = checkpoints.to_sesame_state_dict(bench.random_model(cfg, "cpu", torch.float32).state_dict(), cfg)
    save_file({k: v.contiguous() for k, v in state.items()}, root / "model.safetensors")
    flavors = {"backbone_flavor": "tiny-backbone", "decoder_flavor": "tiny-decoder"}
    (root / "config.json").write_text(json.dumps(flavors))
    write_tokenizer(root)
    message = f"the model {str(root)!r} carries no audio codec: pass --codec kyutai/mimi"
    rc, _ = speak(tmp_path, root)
    check_error(capsys, rc, EXIT_MODEL, re.escape(message))
    check_error(capsys, main(["serve", "--model", str(root), "--device", "cpu", "--port", "0"]), EXIT_MODEL,
                re.escape(message))
    service = Service(Settings(model=str(root), device="cpu", voices_dir=str(tmp_path / "voices")))
    with pytest.raises(checkpoints.CheckpointError, match=re.escape(message)):
        service.load()
    assert message in service.load_error


def test_compile_refuses_bad_settings_and_missing_models(tmp_path, capsys):
    assert main(["compile", "--model", str(tmp_path), "--device", "cpu", "--slots", "0"]) == EXIT_USAGE
    assert "slots must be at least 1 (--slots, FASTCSM_SLOTS)" in capsys.readouterr().err
    assert main(["compile", "--model", str(tmp_path / "none"), "--device", "cpu"]) == EXIT_MODEL


@pytest.mark.slow
def test_compile_fills_the_cache_and_says_where(tmp_path, tiny_csm_dir, capsys):
    cache = tmp_path / "cache"
    rc = main(["compile", "--model", str(tiny_csm_dir), "--device", "cpu", "--slots", "1", "--compile-cache",
               str(cache)])
    out = capsys.readouterr().out
    assert rc == 0 and "batches 1 on cpu" in out  # one bucket: each is a C++ build of minutes on a CPU
    entry = out.strip().rsplit("cache: ", 1)[1]
    assert entry.startswith(str(cache)) and any((cache / entry.rsplit("/", 1)[1] / "inductor").rglob("*"))
    assert (cache / entry.rsplit("/", 1)[1] / "built.json").is_file()  # what a later serve compiles from


def test_the_output_extension_picks_the_encoder(tmp_path, tiny_csm_dir, capsys):
    """-o x.mp3 / x.ogg go through the server's encoders: the files decode to the frames written."""
    av = pytest.importorskip("av")
    from fastcsm.server.audio_out import available_formats

    for name, codec in [("out.mp3", "mp3"), ("out.ogg", "opus")]:
        if (codec if codec != "opus" else "opus") not in available_formats():
            continue
        rc, path = speak(tmp_path, tiny_csm_dir, out=name)
        out = capsys.readouterr().out
        assert rc == 0, out
        with av.open(str(path)) as container:
            stream = container.streams.audio[0]
            assert stream.codec_context.name.startswith(codec)
            seconds = sum(f.samples for f in container.decode(stream)) / stream.rate
        assert abs(seconds - written_frames(out) * 0.08) < 0.06, (name, seconds)  # encoder padding at most
        assert not list(tmp_path.glob(".*partial*")), "no temporary file left behind"
    rc, _ = speak(tmp_path, tiny_csm_dir, out="out.xyz")
    check_error(capsys, rc, EXIT_USAGE, r"cannot tell the format of .*out\.xyz.* or pass --format")


def test_dash_writes_the_audio_alone_to_stdout(tmp_path, tiny_csm_dir, capsysbinary):
    """-o - puts nothing but the audio on stdout (a streamed WAV, or raw PCM with --format pcm);
    the report goes to stderr. Same seed, same samples as the file."""
    rc, path = speak(tmp_path, tiny_csm_dir)
    assert rc == 0
    want, _ = sf.read(str(path), dtype="int16")
    capsysbinary.readouterr()
    for fmt, header in (("wav", 44), ("pcm", 0)):
        rc = main(["speak", "Hello from the command line.", "-o", "-", "--format", fmt, "--model", str(tiny_csm_dir),
                   "--device", "cpu", "--seed", "1", "--max-audio-length-ms", "240", "-q"])
        got = capsysbinary.readouterr()
        assert rc == 0, got.err
        assert b"wrote stdout" in got.err and b"time to first audio" in got.err
        assert got.out[:4] == (b"RIFF" if fmt == "wav" else got.out[:4])
        samples = np.frombuffer(got.out[header:], "<i2")
        diff = np.abs(samples.astype(int) - want.astype(int)).max()
        assert samples.shape == want.shape and diff <= 2, diff  # soundfile scales by 32768, the encoders by 32767


def test_progress_without_a_terminal_is_a_line_per_piece(tmp_path, tiny_csm_dir, capsys):
    text = "First piece here. Second piece there."
    rc, _ = speak(tmp_path, tiny_csm_dir, "--max-piece-chars", "20", text=text)  # speak() passes -q
    assert rc == 0 and "piece 1/2 done" not in capsys.readouterr().err
    argv = ["speak", text, "-o", str(tmp_path / "p.wav"), "--model", str(tiny_csm_dir), "--device", "cpu",
            "--seed", "1", "--max-audio-length-ms", "240", "--max-piece-chars", "20"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if " done (" in line]
    assert [re.match(r"fastcsm: piece (\d/\d) done", line).group(1) for line in lines] == ["1/2", "2/2"], lines
    assert all("real-time factor" in line for line in lines) and "s left" in lines[0]
    assert re.search(r"real-time factor [\d.]+ \(generation time / audio duration; below 1 is faster", captured.out)


def test_progress_on_a_terminal_counts_pieces_audio_and_time_left():
    import io
    import time
    from types import SimpleNamespace

    from fastcsm.cli import Progress

    piece = lambda text, frames, ended: SimpleNamespace(text=text, frames=frames, max_frames=100,  # noqa: E731
                                                        ended=ended)
    stream = SimpleNamespace(pieces=[piece("a" * 50, 50, True), piece("b" * 50, 10, False)], num_pieces=3)
    out = io.StringIO()
    progress = Progress(stream, 150, 0.08, time.perf_counter() - 3.0, out=out, terminal=True)
    progress.update(60 * 0.08)
    line = out.getvalue()
    # 4.8 s of audio in ~3 s; the pieces done speak 4 s for 50 characters, so 100 characters remain
    # at that pace (8 s, of which 0.8 s are made): 7.2 s of audio still to come at RTF ~0.62.
    assert line.startswith("\rspeaking: piece 1/3 done, 4.8 s of audio in 3.") and "real-time factor 0.6" in line
    assert re.search(r"about (4|5) s left", line), line
    progress.close(4.8, True)
    assert out.getvalue().endswith("\r" + " " * len(line.strip("\r")) + "\r")


def test_serve_checks_the_port_before_the_model(tmp_path, capsys):
    import socket

    from fastcsm.server.cli import listen, page_url

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        rc = main(["serve", "--model", str(tmp_path / "no-such-model"), "--port", str(port)])
        check_error(capsys, rc, EXIT_USAGE, f"port {port} on 127.0.0.1 is already in use .*--port 0")
    with listen("127.0.0.1", 0) as sock:
        assert sock.getsockname()[1] > 0
    assert page_url("0.0.0.0", 8000) == "http://127.0.0.1:8000/" and page_url("::1", 9) == "http://[::1]:9/"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_a_missing_gpu_is_named_by_its_flag(tmp_path, tiny_csm_dir, capsys):
    for argv in (["speak", "hi", "--model", str(tiny_csm_dir), "--device", "cuda", "-o", str(tmp_path / "x.wav")],
                 ["serve", "--model", str(tiny_csm_dir), "--device", "cuda", "--port", "0"]):
        check_error(capsys, main(argv), EXIT_USAGE, r"--device cuda: PyTorch sees no CUDA GPU; pass --device cpu")
