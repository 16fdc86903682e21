"""The `fastcsm` command: `speak` a line to a WAV file, manage `voices`.

Each subcommand is one `add_<name>(subparsers)` function that declares its arguments and sets
`func` to the function that runs it; `COMMANDS` lists them, so a new subcommand (`serve`,
`bench`) is one more function appended there.

Errors a user can cause end in one line on stderr and an exit code, never a traceback (the
codes are in errors.py). Set FASTCSM_DEBUG=1 to see tracebacks for every error.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

from .errors import EXIT_INTERRUPTED, EXIT_MODEL, EXIT_OK, CliError
from .normalize import DEFAULT_LANGUAGE

DEFAULT_MODEL = "sesame/csm-1b"
log = logging.getLogger("fastcsm")


# -- shared arguments ---------------------------------------------------------------------------

def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default=os.environ.get("FASTCSM_MODEL", DEFAULT_MODEL), metavar="PATH_OR_ID",
                   help="a checkpoint directory or hub repo id (default: $FASTCSM_MODEL or %(default)s). "
                        "sesame/csm-1b is gated: accept its terms on huggingface.co and run "
                        "`huggingface-cli login`, or point this at a downloaded directory")
    g.add_argument("--tokenizer", metavar="PATH", help="tokenizer.json (or its directory) if the checkpoint has none")
    g.add_argument("--codec", metavar="PATH_OR_ID",
                   help="a Mimi checkpoint (e.g. kyutai/mimi) for checkpoints that carry no codec")
    g.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: cuda if available, else cpu)")
    g.add_argument("--dtype", choices=["fp32", "bf16", "fp16"],
                   help="weights precision (default: bf16 on cuda, fp32 on cpu)")
    g.add_argument("--quantize", choices=["none", "int8", "fp8"],
                   help="8-bit linears, quantized while loading: int8 (any device), fp8 (GPUs of compute "
                        "capability 8.9+); --dtype is then the embeddings' and activations' precision "
                        "(default: the checkpoint's own, full precision unless written by `fastcsm quantize`)")


def _add_voices_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--voices-dir", metavar="DIR",
                   help="where named voices live (default: $FASTCSM_VOICES or ~/.cache/fastcsm/voices)")


def _voice_store(args):
    from .voices import VoiceStore

    return VoiceStore(args.voices_dir)


def _load_generator(args):
    from .checkpoints import CheckpointError
    from .generator import load_generator

    try:
        return load_generator(args.model, args.device, args.dtype, args.tokenizer, args.codec, args.quantize)
    except CheckpointError as e:
        raise CliError(str(e), EXIT_MODEL) from e


def _load_watermarker(args):
    from .checkpoints import resolve_device_dtype
    from .watermark import Watermarker, WatermarkUnavailable

    try:
        device = resolve_device_dtype(args.device)[0]
    except ValueError as e:
        raise CliError(f"could not load the model {args.model!r}: {e}", EXIT_MODEL) from e
    try:
        return Watermarker.load(device)
    except WatermarkUnavailable as e:
        raise CliError(str(e), EXIT_MODEL) from e


# -- speak --------------------------------------------------------------------------------------

SPEAK_EPILOG = """\
examples:
  fastcsm speak "Hello from fastcsm." -o hello.wav
  fastcsm speak "Same voice as before." --voice alice -o line.wav
  fastcsm speak "Cloned from a sample." --voice-audio ref.wav --voice-text "What ref.wav says." -o out.wav
  fastcsm speak "Nice to meet you." --context conversation.json --speaker 1 -o reply.wav
  echo "Read from stdin." | fastcsm speak - --stream -o out.wav

A conversation file (--context) is a JSON list of turns, oldest first; audio paths are relative
to the file:
  [{"speaker": 0, "text": "Hi, how are you?", "audio": "turn1.wav"},
   {"speaker": 1, "text": "Fine, thanks."}]
"""


def add_speak(sub) -> None:
    p = sub.add_parser("speak", help="speak a line of text into an audio file",
                       description="Speak TEXT with CSM and write 24 kHz audio (WAV or FLAC).",
                       epilog=SPEAK_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("text", metavar="TEXT", help="the words to speak ('-' reads them from stdin)")
    p.add_argument("-o", "--output", default="out.wav", metavar="FILE",
                   help="where to write the audio, .wav or .flac (default: %(default)s)")
    g = p.add_argument_group("voice and conversation")
    g.add_argument("--voice", metavar="NAME_OR_FILE", help="a saved voice (see `fastcsm voices`) or voice file")
    g.add_argument("--voice-audio", metavar="FILE", help="clone the voice of this recording (needs --voice-text)")
    g.add_argument("--voice-text", metavar="TEXT", help="what is said in --voice-audio")
    g.add_argument("--speaker", type=int, metavar="ID", help="speaker id of the line (default: the voice's, else 0)")
    g.add_argument("--context", metavar="JSON", help="earlier turns of the conversation (see below)")
    _add_voices_dir(g)
    g = p.add_argument_group("sampling and length")
    g.add_argument("--seed", type=int, metavar="N", help="random seed, for a reproducible take")
    g.add_argument("--temperature", type=float, default=0.9, metavar="T",
                   help="sampling temperature; 0 is greedy (default: %(default)s)")
    g.add_argument("--topk", type=int, default=50, metavar="K",
                   help="sample from the k likeliest codes; 0 is all (default: %(default)s)")
    g.add_argument("--max-ms", type=float, default=90_000, metavar="MS",
                   help="longest audio for each generated piece, in ms (default: %(default)g); a bound derived "
                        "from the text's length applies as well")
    g.add_argument("--max-piece-chars", type=int, default=200, metavar="N",
                   help="split longer text at sentence and clause boundaries, pieces of at most N characters "
                        "(default: %(default)s; 0 never splits)")
    g = p.add_argument_group("saying the text")
    g.add_argument("--no-normalize", dest="normalize", action="store_false",
                   help="speak the text exactly as given: no reading of numbers, dates, money, units, URLs or "
                        "abbreviations as words, no lexicon")
    g.add_argument("--language", default=DEFAULT_LANGUAGE, metavar="CODE",
                   help="the language numbers are read in, one of num2words' codes (de, fr, es, ...); rules for "
                        "dates, money, units and the like are English only (default: %(default)s)")
    g.add_argument("--lexicon", metavar="FILE", default=os.environ.get("FASTCSM_LEXICON") or None,
                   help="pronunciation lexicon: word<TAB>respelling lines, or a .json object of word -> respelling "
                        "[FASTCSM_LEXICON]")
    g = p.add_argument_group("output")
    g.add_argument("--captions", metavar="FILE",
                   help="also write the time of each word as captions, .srt or .vtt")
    g.add_argument("--stream", action="store_true",
                   help="write the file as audio arrives and report the time to first audio")
    g.add_argument("--chunk-ms", type=int, default=320, metavar="MS",
                   help="with --stream, audio after the first frame is written in chunks of this length "
                        "(default: %(default)s)")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    g.add_argument("--watermark", action="store_true",
                   help="mark the audio with Sesame's SilentCipher watermark, as its reference generator does "
                        "(off by default; needs pip install \"fastcsm[watermark]\")")
    _add_model_args(p)
    p.set_defaults(func=run_speak)


def _read_text(args) -> str:
    text = sys.stdin.read() if args.text == "-" else args.text
    if not text.strip():
        raise CliError("the text to speak is empty: pass the words as TEXT (or '-' and pipe them in)")
    return text


def _check_speak_args(args) -> None:
    from .config import preset
    from .context import ContextTooLong, check_fits

    cfg = preset("csm-1b")  # before loading: every CSM checkpoint has 80 ms frames and a 2048-row window
    if not math.isfinite(args.max_ms) or args.max_ms < cfg.frame_ms:
        raise CliError(f"--max-ms {args.max_ms:g} is too short: one audio frame takes {cfg.frame_ms} ms")
    try:  # audio alone, before any text: the loaded model's window checks the whole prompt
        check_fits(0, int(args.max_ms // cfg.frame_ms), cfg.max_seq_len, cfg.frame_ms, "even an empty prompt",
                   "lower --max-ms")
    except ContextTooLong as e:
        raise CliError(f"--max-ms {args.max_ms:g} cannot be honoured: {e}") from e
    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise CliError(f"--temperature must be a number >= 0, got {args.temperature:g}")
    if args.captions and Path(args.captions).suffix.lower() not in (".srt", ".vtt"):
        raise CliError(f"--captions {args.captions}: give a file ending in .srt or .vtt")
    if args.topk < 0:
        raise CliError(f"--topk must be >= 0, got {args.topk}")
    if args.max_piece_chars < 0:
        raise CliError(f"--max-piece-chars must be >= 0, got {args.max_piece_chars}")
    if args.chunk_ms < cfg.frame_ms:
        raise CliError(f"--chunk-ms must be at least one frame ({cfg.frame_ms} ms), got {args.chunk_ms}")
    if args.speaker is not None and args.speaker < 0:
        raise CliError(f"--speaker must be a non-negative integer, got {args.speaker}")
    if (args.voice_audio is None) != (args.voice_text is None):
        raise CliError("--voice-audio and --voice-text go together: the recording and what it says")
    if args.voice and args.voice_audio:
        raise CliError("give either --voice or --voice-audio/--voice-text, not both")
    from .audio import WRITE_FORMATS

    if Path(args.output).suffix.lower() not in WRITE_FORMATS:
        raise CliError(f"cannot write {args.output!r}: the output must end in one of {sorted(WRITE_FORMATS)}")
    parent = Path(args.output).expanduser().resolve().parent
    if not parent.is_dir():
        raise CliError(f"cannot write {args.output!r}: the directory {parent} does not exist")


def _load_voice_arg(args):
    """The --voice file/name (before the model loads: a typo should not cost a model load)."""
    if not args.voice:
        return None
    from .voices import VoiceError, load_voice

    try:
        return load_voice(args.voice, _voice_store(args))
    except VoiceError as e:
        raise CliError(str(e)) from e


def _read_context(path: str) -> list[dict]:
    """Turns from a conversation file, checked; audio paths made absolute."""
    p = Path(path).expanduser()
    try:
        data = json.loads(p.read_text())
    except OSError as e:
        raise CliError(f"cannot read the context file {path}: {e.strerror or e}") from e
    except json.JSONDecodeError as e:
        raise CliError(f"the context file {path} is not valid JSON: {e}") from e
    if isinstance(data, dict) and "segments" in data:
        data = data["segments"]
    if not isinstance(data, list):
        raise CliError(f"the context file {path} must hold a list of turns like "
                       '[{"speaker": 0, "text": "...", "audio": "turn.wav"}]')
    turns = []
    for i, t in enumerate(data):
        where = f"{path}: turn {i}"
        if not isinstance(t, dict) or "text" not in t or "speaker" not in t:
            raise CliError(f"{where} needs at least \"speaker\" and \"text\"")
        unknown = set(t) - {"speaker", "text", "audio"}
        if unknown:
            raise CliError(f"{where} has unknown keys {sorted(unknown)} (known: speaker, text, audio)")
        if isinstance(t["speaker"], bool) or not isinstance(t["speaker"], int) or t["speaker"] < 0:
            raise CliError(f"{where}: speaker must be a non-negative integer, got {t['speaker']!r}")
        if not isinstance(t["text"], str) or not t["text"].strip():
            raise CliError(f"{where}: text must be a non-empty string")
        audio = t.get("audio")
        if audio is not None:
            if not isinstance(audio, str):
                raise CliError(f"{where}: audio must be a file path")
            audio = str((p.parent / audio).expanduser())
        turns.append({"speaker": t["speaker"], "text": t["text"], "audio": audio})
    return turns


def _context_segments(turns: list[dict]):
    from .audio import AudioError, read_audio
    from .prompt import Segment

    segments = []
    for t in turns:
        audio = None
        if t["audio"] is not None:
            try:
                audio = read_audio(t["audio"])
            except AudioError as e:
                raise CliError(f"context audio: {e}") from e
        segments.append(Segment(t["speaker"], t["text"], audio=audio))
    return segments


def _read_voice_audio(args):
    from .audio import AudioError, read_audio

    try:
        return read_audio(args.voice_audio)
    except AudioError as e:
        raise CliError(f"--voice-audio: {e}") from e


def _clone_voice(gen, audio, args):
    from .voices import Voice

    try:
        return Voice.from_audio(gen.codec, audio, args.voice_text, args.speaker or 0, source=str(args.voice_audio))
    except ValueError as e:
        raise CliError(f"--voice-audio: {e}") from e


class _AudioWriter:
    """Appends float chunks to a 16-bit WAV/FLAC file (soundfile fixes the header on close)."""

    def __init__(self, path: str, sample_rate: int):
        import soundfile as sf

        from .audio import WRITE_FORMATS

        fmt, subtype = WRITE_FORMATS[Path(path).suffix.lower()]
        try:
            self.file = sf.SoundFile(path, "w", samplerate=sample_rate, channels=1, format=fmt, subtype=subtype)
        except (RuntimeError, OSError) as e:
            raise CliError(f"cannot write {path}: {e}") from e
        self.samples = 0

    def write(self, chunk) -> None:
        x = chunk.clamp(-1, 1).numpy()
        self.file.write(x)
        self.samples += x.shape[0]

    def close(self) -> None:
        self.file.close()


def run_speak(args) -> int:
    from .context import ContextTooLong
    from .lexicon import LexiconError, load_lexicon
    from .normalize import check_language
    from .speech import SpeakOptions

    text = _read_text(args)
    _check_speak_args(args)
    try:
        lexicon = load_lexicon(args.lexicon)
        check_language(args.language)
    except LexiconError as e:
        raise CliError(f"--lexicon: {e}") from e
    except ValueError as e:
        raise CliError(f"--language: {e}") from e
    # Everything the user gave is read and checked before the (slow) model load.
    voice = _load_voice_arg(args)
    context = _context_segments(_read_context(args.context)) if args.context else []
    voice_audio = _read_voice_audio(args) if args.voice_audio else None
    t_load = time.perf_counter()
    watermarker = _load_watermarker(args) if args.watermark else None
    gen = _load_generator(args)
    gen.watermarker = watermarker
    load_s = time.perf_counter() - t_load
    if voice_audio is not None:
        voice = _clone_voice(gen, voice_audio, args)
    # Without --stream the file is written at the end; chunks of 2 s only drive the progress bar.
    chunk_frames = max(1, args.chunk_ms // gen.cfg.frame_ms) if args.stream else 25

    t0 = time.perf_counter()
    try:
        options = SpeakOptions(max_audio_length_ms=args.max_ms, temperature=args.temperature, topk=args.topk,
                               max_piece_chars=args.max_piece_chars or None, normalize=args.normalize,
                               language=args.language, lexicon=lexicon)
        stream = gen.stream(text, args.speaker, context, voice=voice, seed=args.seed, options=options,
                            chunk_frames=chunk_frames)
    except (ContextTooLong, ValueError, TypeError) as e:
        raise CliError(str(e)) from e

    out = Path(args.output).expanduser()
    tmp = out if args.stream else out.with_name(f".{out.name}.{os.getpid()}.partial{out.suffix}")
    writer = _AudioWriter(str(tmp), stream.sample_rate)
    first_ms = None
    bar = _progress(args.quiet, stream.num_pieces)
    try:
        with stream:
            for chunk in stream:
                if first_ms is None:
                    first_ms = (time.perf_counter() - t0) * 1000
                    if args.stream:
                        print(f"time to first audio: {first_ms:.0f} ms", flush=True)
                writer.write(chunk)
                if bar is not None:
                    bar.update(stream.frames - bar.n)
                    bar.set_postfix_str(f"piece {len(stream.pieces)}/{stream.num_pieces}", refresh=False)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    finally:
        if bar is not None:
            bar.close()
    writer.close()
    if tmp != out:
        os.replace(tmp, out)
    if args.captions:
        _write_captions(Path(args.captions).expanduser(), stream.words)
    total_s = time.perf_counter() - t0
    audio_s = writer.samples / stream.sample_rate
    if writer.samples == 0:
        print(f"warning: the model ended at once and produced no audio; {out} is empty", file=sys.stderr)
    speed = f", {audio_s / total_s:.2f}x real time" if total_s > 0 else ""
    print(f"wrote {out}: {audio_s:.2f} s of audio ({stream.frames} frames, {len(stream.pieces)} piece(s)) "
          f"in {total_s:.2f} s{speed}; model loaded in {load_s:.1f} s")
    return EXIT_OK


def _write_captions(path: Path, words) -> None:
    from .timestamps import CAPTION_FORMATS

    try:
        path.write_text(CAPTION_FORMATS[path.suffix.lower()](words), encoding="utf-8")
    except OSError as e:
        raise CliError(f"cannot write the captions {path}: {e}") from e
    print(f"wrote {path}: {len(words)} words")


def _progress(quiet: bool, pieces: int):
    """A frame counter on stderr for long generations (shown after 2 s, only on a terminal)."""
    if quiet or not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(unit="frame", desc="speaking", delay=2.0, file=sys.stderr, leave=False)


# -- voices -------------------------------------------------------------------------------------

VOICES_EPILOG = """\
examples:
  fastcsm voices add alice --audio alice.wav --text "What alice.wav says."
  fastcsm voices list
  fastcsm speak "Hi, it's Alice." --voice alice -o hi.wav
  fastcsm voices remove alice
"""


def add_voices(sub) -> None:
    p = sub.add_parser("voices", help="save, list and remove voices for cloning",
                       description="A voice is a short recording (5-20 s is plenty), its transcript and a "
                                   "speaker id, stored encoded so speaking in it costs no re-encoding.",
                       epilog=VOICES_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    vsub = p.add_subparsers(dest="voices_command", required=True, metavar="ACTION")

    a = vsub.add_parser("add", help="encode a recording and save it as a named voice")
    a.add_argument("name", help="letters, digits, '.', '_' or '-', not digits alone (those are speaker ids)")
    a.add_argument("--audio", required=True, metavar="FILE", help="the recording (WAV, FLAC, OGG; any rate)")
    a.add_argument("--text", help="what is said in the recording (left out: --asr-model transcribes it)")
    a.add_argument("--asr-model", default=os.environ.get("FASTCSM_ASR_MODEL"), metavar="NAME_OR_PATH",
                   help="speech recognition for a recording without --text: a faster-whisper model (small, a hub "
                        "repo or a directory, from the cache) or pocketsphinx [FASTCSM_ASR_MODEL]")
    a.add_argument("--speaker", type=int, default=0, metavar="ID", help="speaker id (default: %(default)s)")
    a.add_argument("--force", action="store_true", help="replace a voice of the same name")
    _add_voices_dir(a)
    g = a.add_argument_group("codec")
    g.add_argument("--model", default=os.environ.get("FASTCSM_MODEL", DEFAULT_MODEL), metavar="PATH_OR_ID",
                   help="the CSM checkpoint whose codec encodes the audio (default: %(default)s)")
    g.add_argument("--codec", metavar="PATH_OR_ID", help="a Mimi checkpoint to use instead of the model's")
    g.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    a.set_defaults(func=run_voices_add)

    ls = vsub.add_parser("list", help="list saved voices")
    _add_voices_dir(ls)
    ls.set_defaults(func=run_voices_list)

    rm = vsub.add_parser("remove", help="delete a saved voice")
    rm.add_argument("name")
    _add_voices_dir(rm)
    rm.set_defaults(func=run_voices_remove)


def _load_codec_only(args):
    """The codec, without the CSM weights: from --codec, else from the model checkpoint."""
    from .checkpoints import CheckpointError, resolve
    from .codec import load_codec

    source = args.codec or args.model
    try:
        root = Path(source).expanduser() if Path(source).expanduser().exists() else resolve(source)
        return load_codec(root, args.device)
    except (CheckpointError, OSError, ValueError) as e:
        hint = "" if args.codec else " (if this checkpoint carries no codec, pass --codec kyutai/mimi)"
        raise CliError(f"could not load a codec from {source!r}: {e}{hint}", EXIT_MODEL) from e


def run_voices_add(args) -> int:
    from .audio import AudioError, read_audio
    from .voices import Voice, VoiceError, check_new_name

    store = _voice_store(args)
    try:
        check_new_name(args.name)
        if args.name in store and not args.force:
            raise VoiceError(f"a voice named {args.name!r} already exists; pass --force to replace it")
        if args.speaker < 0:
            raise VoiceError(f"--speaker must be a non-negative integer, got {args.speaker}")
        if args.text is not None and not args.text.strip():
            raise VoiceError("--text is empty: give the transcript of the recording")
        if args.text is None and not args.asr_model:
            raise VoiceError("give the transcript of the recording with --text, or --asr-model to transcribe it "
                             '(e.g. --asr-model small; pip install "fastcsm[asr]")')
        audio = read_audio(args.audio)
    except (VoiceError, AudioError) as e:
        raise CliError(str(e)) from e
    meta = {}
    if args.text is None:
        args.text, meta["transcribed_by"] = _transcribe(audio, args.asr_model, args.device), args.asr_model
        print(f"heard: {args.text}")
    codec = _load_codec_only(args)
    try:
        voice = Voice.from_audio(codec, audio, args.text, args.speaker, source=str(args.audio), **meta)
        path = store.add(voice, args.name, overwrite=args.force)
    except (VoiceError, AudioError, ValueError) as e:
        raise CliError(str(e)) from e
    print(f"saved voice {args.name!r} ({voice.duration_ms() / 1000:.1f} s, speaker {voice.speaker}) to {path}")
    return EXIT_OK


def _transcribe(audio, model: str, device: str | None) -> str:
    """The text of a 24 kHz recording, by the recogniser `model` names."""
    from .audio import SAMPLE_RATE, resample
    from .listen.asr import SAMPLE_RATE as ASR_RATE, AsrError, load_transcriber

    try:
        text = load_transcriber(model, device).transcribe(resample(audio.numpy(), SAMPLE_RATE, ASR_RATE)).text
    except AsrError as e:
        raise CliError(str(e), EXIT_MODEL) from e
    if not text.strip():
        raise CliError("no speech was recognised in the recording: give its transcript with --text")
    return text


def run_voices_list(args) -> int:
    from .voices import Voice, VoiceError

    store = _voice_store(args)
    names = store.names()
    if not names:
        print(f"no voices in {store.root} (add one with `fastcsm voices add NAME --audio FILE --text TEXT`)")
        return EXIT_OK
    for name in names:
        try:
            v = Voice.load(store.path(name))
            text = v.text if len(v.text) <= 50 else v.text[:47] + "..."
            print(f"{name}\tspeaker {v.speaker}\t{v.duration_ms() / 1000:.1f} s\t{text}")
        except VoiceError as e:
            print(f"{name}\t(unreadable: {e})")
    return EXIT_OK


def run_voices_remove(args) -> int:
    from .voices import VoiceError

    try:
        path = _voice_store(args).remove(args.name)
    except VoiceError as e:
        raise CliError(str(e)) from e
    print(f"removed voice {args.name!r} ({path})")
    return EXIT_OK


# -- the command --------------------------------------------------------------------------------

def add_serve(sub) -> None:
    from .server.cli import add_serve as add

    add(sub)


def add_wyoming(sub) -> None:
    try:
        from .integrations.wyoming import add_wyoming as add
    except ImportError:  # the wyoming extra is missing: the command says so when run
        p = sub.add_parser("wyoming",
                           help='a Wyoming TTS service for Home Assistant (pip install "fastcsm[wyoming]")')
        p.set_defaults(func=_no_wyoming)
        return
    add(sub)


def _no_wyoming(args) -> int:
    raise CliError('fastcsm wyoming needs the wyoming package: pip install "fastcsm[wyoming]"')


def add_bench(sub) -> None:
    from . import bench

    p = sub.add_parser("bench", help="measure frame time, time to first audio and the peer on random weights",
                       description=bench.__doc__.split("\n\n")[0])
    bench.add_arguments(p)
    p.set_defaults(func=run_bench)


def run_bench(args) -> int:
    from . import bench

    bench.run(args)
    return EXIT_OK


def add_quantize(sub) -> None:
    p = sub.add_parser("quantize", help="write an 8-bit copy of a checkpoint that loads directly",
                       description="Write IN's weights with every linear in 8 bits (per-output-channel scales), "
                                   "in IN's own format and names, config.json marked; tokenizer and codec are "
                                   "copied. `fastcsm speak --model OUT` then loads it in 8 bits, reading about "
                                   "a quarter of the fp32 bytes.")
    p.add_argument("input", metavar="IN", help="checkpoint directory or hub repo id")
    p.add_argument("output", metavar="OUT", help="new (or empty) directory to write")
    p.add_argument("--mode", default="int8", help="int8 (default) or fp8")
    p.set_defaults(func=run_quantize)


def run_quantize(args) -> int:
    from .checkpoints import CheckpointError, write_quantized

    if args.mode not in ("int8", "fp8"):
        raise CliError(f"--mode must be int8 or fp8, got {args.mode!r}")
    t = time.perf_counter()
    try:
        out = write_quantized(args.input, args.output, args.mode)
    except (CheckpointError, OSError) as e:
        raise CliError(f"could not quantize {args.input!r}: {e}", EXIT_MODEL) from e
    size = sum(f.stat().st_size for f in out.iterdir() if f.suffix == ".safetensors")
    print(f"wrote {out} ({size / 1e9:.2f} GB, {args.mode}) in {time.perf_counter() - t:.1f} s")
    return EXIT_OK


def add_compile(sub) -> None:
    from .server.settings import add_arguments

    p = sub.add_parser("compile", help="compile the step for every batch bucket into the compile cache, ahead of "
                                       "`fastcsm serve --compile`",
                       description="Build what `fastcsm serve --compile` with the same model flags and --slots "
                                   "would compile at start-up (the frame step, once for every batch bucket, and "
                                   "prefill), and keep it in the compile cache, e.g. while building an image or "
                                   "in an init container. Servers and Ray replicas given the same cache "
                                   "directory then load it instead of compiling.")
    add_arguments(p, names=("model", "tokenizer", "codec", "device", "dtype", "quantize", "compile_cache", "slots"))
    p.set_defaults(func=run_compile)


def run_compile(args) -> int:
    from .checkpoints import CheckpointError
    from .generator import load_generator
    from .server.service import start_engine
    from .server.settings import settings_from_args

    try:
        s = settings_from_args(args, compile=True)
    except ValueError as e:
        raise CliError(str(e)) from e
    try:
        generator = load_generator(s.model, s.device, s.dtype, s.tokenizer, s.codec, s.quantize)
    except CheckpointError as e:
        raise CliError(str(e), EXIT_MODEL) from e
    log.setLevel(logging.INFO)  # the progress lines
    t = time.perf_counter()
    engine = start_engine(generator, s)
    print(f"compiled the step for batches {', '.join(map(str, engine.buckets))} on {engine.device} in "
          f"{time.perf_counter() - t:.1f} s; cache: {engine.runner.cache_entry}")
    return EXIT_OK


COMMANDS = [add_speak, add_voices, add_serve, add_wyoming, add_bench, add_quantize, add_compile]


def build_parser(commands=None) -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="fastcsm",
        description="Fast, streaming speech with Sesame's CSM.",
        epilog='start with: fastcsm speak "Hello there." -o hello.wav   (fastcsm COMMAND --help for more)',
    )
    parser.add_argument("--version", action="version", version=f"fastcsm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in commands or COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = bool(os.environ.get("FASTCSM_DEBUG"))
    # The library's warnings (context dropped, a piece that never ended) as one line each.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("fastcsm: %(message)s"))
    log.addHandler(handler)
    try:
        return args.func(args) or EXIT_OK
    except CliError as e:
        if debug:
            raise
        print(f"fastcsm: error: {' '.join(str(e).split())}", file=sys.stderr)  # one line, whatever the cause said
        return e.code
    except KeyboardInterrupt:
        print("fastcsm: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        log.removeHandler(handler)


if __name__ == "__main__":
    sys.exit(main())
