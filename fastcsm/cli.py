"""The `fastcsm` command: `speak` a line to an audio file (or stdout), manage `voices`, and more.

Each subcommand is one `add_<name>(subparsers)` function that declares its arguments and sets
`func` to the function that runs it; `COMMANDS` lists them, so a new subcommand (`serve`,
`bench`) is one more function appended there. Options that `fastcsm serve` also has (model,
device, threads, voices folder...) come from its settings table (server/settings.py): the same
flag, `FASTCSM_*` variable, help and checks in every command. Old spellings (`--max-ms`,
`--force`, `quantize --mode`) still parse, hidden from `--help`.

Errors a user can cause end in one line on stderr and an exit code, never a traceback (the
codes are in errors.py). Set FASTCSM_DEBUG=1 to see tracebacks for every error.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from .bounds import SEED, SPEAKER, TEMPERATURE, TOPK
from .errors import EXIT_MODEL, EXIT_OK, CliError
from .speech.normalize import DEFAULT_LANGUAGE

log = logging.getLogger("fastcsm")
RTF_MEANING = "generation time / audio duration; below 1 is faster than real time"


# -- shared arguments ---------------------------------------------------------------------------

MODEL_SETTINGS = ("model", "tokenizer", "codec", "device", "dtype", "quantize", "threads")


def _add_settings(p: argparse.ArgumentParser, names: tuple[str, ...]) -> None:
    """Flags of `fastcsm serve`'s settings table; `main` fills them in from the environment."""
    from .server.settings import add_arguments

    add_arguments(p, names=names)
    p.set_defaults(settings=tuple(names) + tuple(p.get_default("settings") or ()))


def _table_default(name: str):
    from .server.settings import Settings

    return Settings.__dataclass_fields__[name].default


def _alias(p, old: str, dest: str, **kwargs) -> None:
    """An older spelling of an option: still accepted, hidden from --help."""
    p.add_argument(old, dest=dest, help=argparse.SUPPRESS, default=argparse.SUPPRESS, **kwargs)


def _voice_store(args):
    from .speech.voices import VoiceStore

    return VoiceStore(args.voices_dir)


# -- speak --------------------------------------------------------------------------------------

SPEAK_EPILOG = """\
examples:
  fastcsm speak "Hello from fastcsm." -o hello.wav       (also .mp3, .ogg, .opus, .aac, .flac)
  fastcsm speak "Same voice as before." --voice alice -o line.wav
  fastcsm speak "Cloned from a sample." --voice-audio ref.wav --voice-text "What ref.wav says." -o out.wav
  fastcsm speak "Nice to meet you." --context conversation.json --speaker 1 -o reply.wav
  echo "Read from stdin." | fastcsm speak - --stream -o out.wav
  fastcsm speak "Straight to the speakers." -o - | aplay      (or: -o - --format mp3 | ffplay -)

A conversation file (--context) is a JSON list of turns, oldest first; audio paths are relative
to the file:
  [{"speaker": 0, "text": "Hi, how are you?", "audio": "turn1.wav"},
   {"speaker": 1, "text": "Fine, thanks."}]
"""

# -o's extension -> the encoder (server/audio_out.py's names; .ogg holds Opus)
EXTENSIONS = {".wav": "wav", ".flac": "flac", ".mp3": "mp3", ".ogg": "opus", ".opus": "opus", ".aac": "aac",
              ".pcm": "pcm", ".raw": "pcm"}
FORMATS = ("wav", "pcm", "flac", "mp3", "opus", "aac")


def add_speak(sub) -> None:
    p = sub.add_parser("speak", help="speak a line of text into an audio file",
                       description="Speak TEXT with CSM and write 24 kHz mono audio to a file or to stdout.",
                       epilog=SPEAK_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("text", metavar="TEXT", help="the words to speak ('-' reads them from stdin)")
    p.add_argument("-o", "--output", default="out.wav", metavar="FILE",
                   help="where to write the audio; its extension picks the format: "
                        f"{', '.join(EXTENSIONS)}; '-' writes to stdout (default: %(default)s)")
    p.add_argument("--format", choices=FORMATS,
                   help="the audio format, whatever the file's name (default: from -o's extension; wav for '-')")
    g = p.add_argument_group("voice and conversation")
    g.add_argument("--voice", metavar="NAME_OR_FILE", help="a saved voice (see `fastcsm voices`) or voice file")
    g.add_argument("--voice-audio", metavar="FILE", help="clone the voice of this recording (needs --voice-text)")
    g.add_argument("--voice-text", metavar="TEXT", help="what is said in --voice-audio")
    g.add_argument("--speaker", type=int, metavar="ID", help="speaker id of the line (default: the voice's, else 0)")
    g.add_argument("--context", metavar="JSON", help="earlier turns of the conversation (see below)")
    g = p.add_argument_group("sampling and length")
    g.add_argument("--seed", type=int, metavar="N", help="random seed, for a reproducible take")
    g.add_argument("--temperature", type=float, default=TEMPERATURE.default, metavar="T",
                   help=f"sampling temperature, {TEMPERATURE.accepts} (default: %(default)s)")
    g.add_argument("--topk", type=int, default=TOPK.default, metavar="K",
                   help=f"sample from the k likeliest codes, {TOPK.accepts} (default: %(default)s)")
    g.add_argument("--max-audio-length-ms", type=float, metavar="MS",
                   help="longest audio for each generated piece, in ms (default: "
                        f"{_table_default('max_audio_length_ms')}); a bound derived from the text's length applies "
                        "as well [FASTCSM_MAX_AUDIO_LENGTH_MS]")
    _alias(g, "--max-ms", "max_audio_length_ms", type=float)
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
                   help="write the file as audio arrives and report the time to first audio (always so with -o -)")
    g.add_argument("--chunk-ms", type=int, default=320, metavar="MS",
                   help="with --stream or -o -, audio after the first frame is written in chunks of this length "
                        "(default: %(default)s)")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress")
    _add_settings(p, MODEL_SETTINGS + ("watermark", "voices_dir"))
    p.set_defaults(func=run_speak)


def _read_text(args) -> str:
    text = sys.stdin.read() if args.text == "-" else args.text
    if not text.strip():
        raise CliError("the text to speak is empty: pass the words as TEXT (or '-' and pipe them in)")
    return text


def _check_speak_args(args) -> None:
    from .model.config import preset
    from .speech.planner import requested_frames

    cfg = preset("csm-1b")  # before loading: every CSM checkpoint has 80 ms frames and a 2048-row window
    if args.max_audio_length_ms is None:  # the server's bound, from its variable or its default
        from .server.settings import values_from_args

        try:
            args.max_audio_length_ms = values_from_args(args, ("max_audio_length_ms",))["max_audio_length_ms"]
        except ValueError as e:
            raise CliError(str(e)) from e
    # The library's checks and words (bounds.py; the window as the loaded model's checks it).
    for flag, check in [("--max-audio-length-ms",
                         lambda ms: requested_frames(ms, cfg.frame_ms, cfg.max_seq_len * cfg.frame_ms)),
                        ("--temperature", TEMPERATURE.check), ("--topk", TOPK.check), ("--speaker", SPEAKER.check),
                        ("--seed", SEED.check)]:
        value = getattr(args, flag[2:].replace("-", "_"))
        try:
            if value is not None:
                check(value)
        except ValueError as e:
            raise CliError(f"{flag}: {e}") from None
    if args.captions and Path(args.captions).suffix.lower() not in (".srt", ".vtt"):
        raise CliError(f"--captions {args.captions}: give a file ending in .srt or .vtt")
    if args.max_piece_chars < 0:
        raise CliError(f"--max-piece-chars must be >= 0, got {args.max_piece_chars}")
    if args.chunk_ms < cfg.frame_ms:
        raise CliError(f"--chunk-ms must be at least one frame ({cfg.frame_ms} ms), got {args.chunk_ms}")
    if (args.voice_audio is None) != (args.voice_text is None):
        raise CliError("--voice-audio and --voice-text go together: the recording and what it says")
    if args.voice and args.voice_audio:
        raise CliError("give either --voice or --voice-audio/--voice-text, not both")
    args.format = _output_format(args.output, args.format)
    if args.output != "-":
        parent = Path(args.output).expanduser().resolve().parent
        if not parent.is_dir():
            raise CliError(f"cannot write {args.output!r}: the directory {parent} does not exist")


def _output_format(output: str, given: str | None) -> str:
    """The encoder's name: --format, else -o's extension (wav for stdout); refused if this build lacks it."""
    from .server.audio_out import available_formats

    fmt = given or ("wav" if output == "-" else EXTENSIONS.get(Path(output).suffix.lower()))
    if fmt is None:
        raise CliError(f"cannot tell the format of {output!r} from its extension: end it in one of "
                       f"{', '.join(EXTENSIONS)}, or pass --format")
    if fmt not in available_formats():
        raise CliError(f"writing {fmt} needs FFmpeg's encoders through PyAV: pip install \"fastcsm[server]\" "
                       f"(this build writes {', '.join(available_formats())})")
    return fmt


def _load_voice_arg(args):
    """The --voice file/name (before the model loads: a typo should not cost a model load)."""
    if not args.voice:
        return None
    from .speech.voices import VoiceError, load_voice

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
        try:
            SPEAKER.check(t["speaker"])
        except ValueError as e:
            raise CliError(f"{where}: {e}") from None
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
    from .model.prompt import Segment

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
    from .speech.voices import Voice

    try:
        return Voice.from_audio(gen.codec, audio, args.voice_text, args.speaker or 0, source=str(args.voice_audio))
    except ValueError as e:
        raise CliError(f"--voice-audio: {e}") from e


class _FileWriter:
    """Appends float chunks to a 16-bit WAV/FLAC file (soundfile writes the sizes on close)."""

    def __init__(self, path: Path, fmt: str, sample_rate: int):
        import soundfile as sf

        try:
            self.file = sf.SoundFile(str(path), "w", samplerate=sample_rate, channels=1, format=fmt.upper(),
                                     subtype="PCM_16")
        except (RuntimeError, OSError) as e:
            raise CliError(f"cannot write {path}: {e}") from e

    def write(self, x) -> None:
        self.file.write(x)

    def close(self) -> None:
        self.file.close()


class _EncodedWriter:
    """Encodes float chunks with the server's streaming encoders into a file or stdout, flushed
    chunk by chunk so that a player downstream starts at once."""

    def __init__(self, out, fmt: str, sample_rate: int):
        from .server.audio_out import encoder

        self.out, self.encoder = out, encoder(fmt, sample_rate)
        self._send(self.encoder.start())

    def _send(self, data: bytes) -> None:
        if data:
            self.out.write(data)
            self.out.flush()

    def write(self, x) -> None:
        self._send(self.encoder.write(x))

    def close(self) -> None:
        self._send(self.encoder.finish())


class _Output:
    """Where `speak` puts its audio: a file (written beside it, then renamed, unless streaming) or
    stdout. Counts the samples written."""

    def __init__(self, args, sample_rate: int):
        self.samples, self.file = 0, None
        if args.output == "-":
            self.path = self.tmp = None
            self.writer = _EncodedWriter(sys.stdout.buffer, args.format, sample_rate)
            return
        self.path = Path(args.output).expanduser()
        self.tmp = self.path if args.stream else self.path.with_name(f".{self.path.name}.{os.getpid()}.partial")
        if args.format in ("wav", "flac"):  # a finished file carries its length in its header
            self.writer = _FileWriter(self.tmp, args.format, sample_rate)
            return
        try:
            self.file = open(self.tmp, "wb")  # noqa: SIM115 (closed by close())
        except OSError as e:
            raise CliError(f"cannot write {self.tmp}: {e.strerror or e}") from e
        self.writer = _EncodedWriter(self.file, args.format, sample_rate)

    def write(self, chunk) -> None:
        x = chunk.clamp(-1, 1).numpy()
        self.writer.write(x)
        self.samples += x.shape[0]

    def close(self, ok: bool = True) -> None:
        try:
            self.writer.close()
        finally:
            if self.file is not None:
                self.file.close()
        if self.tmp is None:
            return
        if not ok:
            self.tmp.unlink(missing_ok=True)
        elif self.tmp != self.path:
            os.replace(self.tmp, self.path)


def run_speak(args) -> int:
    from .model.context import ContextTooLong
    from .server.cli import load_generator_for
    from .speech.lexicon import LexiconError, load_lexicon
    from .speech.normalize import check_language
    from .speech.speech import SpeakOptions

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
    info = sys.stderr if args.output == "-" else sys.stdout  # stdout then carries the audio alone
    t_load = time.perf_counter()
    gen = load_generator_for(args)
    load_s = time.perf_counter() - t_load
    if voice_audio is not None:
        voice = _clone_voice(gen, voice_audio, args)
    streaming = args.stream or args.output == "-"
    # Written at the end unless streaming; chunks of 2 s then only drive the progress.
    chunk_frames = max(1, args.chunk_ms // gen.cfg.frame_ms) if streaming else 25

    t0 = time.perf_counter()
    try:
        options = SpeakOptions(max_audio_length_ms=args.max_audio_length_ms, temperature=args.temperature,
                               topk=args.topk, max_piece_chars=args.max_piece_chars or None,
                               normalize=args.normalize, language=args.language, lexicon=lexicon)
        stream = gen.stream(text, args.speaker, context, voice=voice, seed=args.seed, options=options,
                            chunk_frames=chunk_frames)
    except (ContextTooLong, ValueError, TypeError) as e:
        raise CliError(str(e)) from e

    out = _Output(args, stream.sample_rate)
    progress = None if args.quiet else Progress(stream, len(text.strip()), gen.cfg.frame_ms / 1000, t0)
    first_ms = None
    finished = False
    try:
        with stream:
            for chunk in stream:
                if first_ms is None:
                    first_ms = (time.perf_counter() - t0) * 1000
                    if streaming:
                        print(f"time to first audio: {first_ms:.0f} ms", file=info, flush=True)
                out.write(chunk)
                if progress is not None:
                    progress.update(out.samples / stream.sample_rate)
        finished = True
    except BaseException:
        out.close(ok=False)
        raise
    finally:
        if progress is not None:
            progress.close(out.samples / stream.sample_rate, finished)
    out.close()
    if args.captions:
        _write_captions(Path(args.captions).expanduser(), stream.words, info)
    total_s = time.perf_counter() - t0
    audio_s = out.samples / stream.sample_rate
    where = out.path or "stdout"
    if out.samples == 0:
        print(f"warning: the model ended at once and produced no audio; {where} is empty", file=sys.stderr)
    rtf = f", real-time factor {total_s / audio_s:.2f} ({RTF_MEANING})" if audio_s > 0 else ""
    print(f"wrote {where}: {audio_s:.2f} s of audio ({stream.frames} frames, {len(stream.pieces)} piece(s)) "
          f"in {total_s:.2f} s{rtf}; model loaded in {load_s:.1f} s", file=info)
    return EXIT_OK


def _write_captions(path: Path, words, info) -> None:
    from .speech.timestamps import CAPTION_FORMATS

    try:
        path.write_text(CAPTION_FORMATS[path.suffix.lower()](words), encoding="utf-8")
    except OSError as e:
        raise CliError(f"cannot write the captions {path}: {e}") from e
    print(f"wrote {path}: {len(words)} words", file=info)


class Progress:
    """How far a long `speak` is, on stderr: on a terminal one line rewritten in place (from 2 s
    on): pieces done of the total, seconds of audio, the real-time factor and the time left;
    otherwise (a log, a pipe) one line as each piece ends.

    The time left is the audio still to come times the real-time factor so far; the audio still
    to come is the text not yet spoken at the pace (seconds a character) of the pieces done, or
    at `PRIOR_S_PER_CHAR` before any is."""

    PRIOR_S_PER_CHAR = 0.07  # CSM speaks about 60-100 ms a character
    DELAY_S, EVERY_S = 2.0, 0.25

    def __init__(self, stream, text_chars: int, frame_s: float, t0: float, out=None, terminal: bool | None = None):
        self.stream, self.chars, self.frame_s, self.t0 = stream, max(1, text_chars), frame_s, t0
        self.out = out or sys.stderr
        self.terminal = self.out.isatty() if terminal is None else terminal
        self.logged = 0  # pieces already reported (not on a terminal)
        self.shown_at = 0.0
        self.width = 0

    def _state(self, audio_s: float, over: bool) -> dict:
        pieces = self.stream.pieces
        ended = [p for p in pieces if over or p.ended or p.frames >= p.max_frames or p is not pieces[-1]]
        done_chars = sum(len(p.text) for p in ended)
        done_audio = sum(p.frames for p in ended) * self.frame_s
        pace = done_audio / done_chars if done_chars and done_audio else self.PRIOR_S_PER_CHAR
        expected = max(audio_s, done_audio + pace * max(0, self.chars - done_chars))
        elapsed = time.perf_counter() - self.t0
        rtf = elapsed / audio_s if audio_s > 0 else None
        left = (expected - audio_s) * rtf if rtf is not None and not over else None
        return {"done": len(ended), "total": self.stream.num_pieces, "audio_s": audio_s, "elapsed": elapsed,
                "rtf": rtf, "left": left}

    @staticmethod
    def _line(s: dict) -> str:
        rtf = f"real-time factor {s['rtf']:.2f}" if s["rtf"] is not None else "real-time factor -"
        left = f", about {s['left']:.0f} s left" if s["left"] is not None else ""
        return f"{s['audio_s']:.1f} s of audio in {s['elapsed']:.1f} s, {rtf}{left}"

    def update(self, audio_s: float, over: bool = False) -> None:
        s = self._state(audio_s, over)
        if not self.terminal:  # a line per piece that ended since the last call
            for i in range(self.logged, s["done"]):
                print(f"fastcsm: piece {i + 1}/{s['total']} done ({self.stream.pieces[i].frames * self.frame_s:.1f}"
                      f" s of audio); so far {self._line(s)}", file=self.out, flush=True)
            self.logged = max(self.logged, s["done"])
            return
        if not over and (s["elapsed"] < self.DELAY_S or s["elapsed"] - self.shown_at < self.EVERY_S):
            return
        self.shown_at = s["elapsed"]
        line = f"speaking: piece {s['done']}/{s['total']} done, {self._line(s)}"
        self.out.write("\r" + line.ljust(self.width))
        self.out.flush()
        self.width = len(line)

    def close(self, audio_s: float, finished: bool) -> None:
        """Report the pieces not yet reported once all are `finished` (not on a terminal), or clear the line."""
        if not self.terminal:
            if finished:
                self.update(audio_s, over=True)
        elif self.width:
            self.out.write("\r" + " " * self.width + "\r")
            self.out.flush()


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
    a.add_argument("--overwrite", action="store_true", help="replace a voice of the same name")
    _alias(a, "--force", "overwrite", action="store_true")
    # The codec that encodes the recording: --codec, else the model checkpoint's own.
    _add_settings(a, ("model", "codec", "device", "threads", "voices_dir"))
    a.set_defaults(func=run_voices_add)

    ls = vsub.add_parser("list", help="list saved voices")
    _add_settings(ls, ("voices_dir",))
    ls.set_defaults(func=run_voices_list)

    rm = vsub.add_parser("remove", help="delete a saved voice")
    rm.add_argument("name")
    _add_settings(rm, ("voices_dir",))
    rm.set_defaults(func=run_voices_remove)


def _load_codec_only(args):
    """The codec, without the CSM weights: from --codec, else from the model checkpoint."""
    from .codec.codec import load_codec
    from .model.checkpoints import CheckpointError, resolve

    source = args.codec or args.model
    try:
        root = Path(source).expanduser() if Path(source).expanduser().exists() else resolve(source)
        return load_codec(root, args.device)
    except (CheckpointError, OSError, ValueError) as e:
        hint = "" if args.codec else " (if this checkpoint carries no codec, pass --codec kyutai/mimi)"
        raise CliError(f"could not load a codec from {source!r}: {e}{hint}", EXIT_MODEL) from e


def run_voices_add(args) -> int:
    from .audio import AudioError, read_audio
    from .speech.voices import Voice, VoiceError, check_new_name

    store = _voice_store(args)
    try:
        check_new_name(args.name)
        if args.name in store and not args.overwrite:
            raise VoiceError(f"a voice named {args.name!r} already exists; pass --overwrite to replace it")
        try:
            SPEAKER.check(args.speaker)
        except ValueError as e:
            raise VoiceError(f"--speaker: {e}") from None
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
        path = store.add(voice, args.name, overwrite=args.overwrite)
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
    from .speech.voices import Voice, VoiceError

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
    from .speech.voices import VoiceError

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
    p.set_defaults(func=run_bench, settings=bench.SETTINGS)


def run_bench(args) -> int:
    from . import bench

    try:
        bench.check_plot_available(args.plot)
    except ValueError as e:
        raise CliError(str(e)) from e
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
    p.add_argument("--quantize", choices=("int8", "fp8"), default="int8",
                   help="8-bit format of the linears: int8 (any device) or fp8 (GPUs of compute capability 8.9+) "
                        "(default: %(default)s)")
    _alias(p, "--mode", "quantize", choices=("int8", "fp8"))
    _add_settings(p, ("threads",))
    p.set_defaults(func=run_quantize)


def run_quantize(args) -> int:
    from .model.checkpoints import CheckpointError, write_quantized

    t = time.perf_counter()
    try:
        out = write_quantized(args.input, args.output, args.quantize)
    except (CheckpointError, OSError) as e:
        raise CliError(f"could not quantize {args.input!r}: {e}", EXIT_MODEL) from e
    size = sum(f.stat().st_size for f in out.iterdir() if f.suffix == ".safetensors")
    print(f"wrote {out} ({size / 1e9:.2f} GB, {args.quantize}) in {time.perf_counter() - t:.1f} s")
    return EXIT_OK


def add_compile(sub) -> None:
    p = sub.add_parser("compile", help="compile the step for every batch bucket into the compile cache, ahead of "
                                       "`fastcsm serve`",
                       description="Build what `fastcsm serve --compile` with the same model flags and --slots "
                                   "would compile at start-up (the frame step, once for every batch bucket, and "
                                   "prefill), and keep it in the compile cache, e.g. while building an image or "
                                   "in an init container. Servers and Ray replicas given the same cache "
                                   "directory then load it instead of compiling, and compile by default: "
                                   "`fastcsm serve` without --compile / --no-compile compiles when the cache "
                                   "holds such a finished build.")
    _add_settings(p, MODEL_SETTINGS + ("compile_cache", "slots"))
    p.set_defaults(func=run_compile)


def run_compile(args) -> int:
    from .server.cli import load_generator_for
    from .server.service import bootstrap
    from .server.settings import settings_from_args

    try:
        # The progress lines; no watermark (nothing is spoken) whatever FASTCSM_WATERMARK says.
        s = settings_from_args(args, compile=True, log_level="info", watermark=False)
    except ValueError as e:
        raise CliError(str(e)) from e
    generator = load_generator_for(s)
    t = time.perf_counter()
    _, engine = bootstrap(s, generator)
    print(f"compiled the step for batches {', '.join(map(str, engine.buckets))} on {engine.device} in "
          f"{time.perf_counter() - t:.1f} s (`fastcsm serve` with the same model flags and --slots {s.slots} now "
          f"starts compiled from it); cache: {engine.runner.cache_entry}")
    return EXIT_OK


COMMANDS = [add_speak, add_voices, add_serve, add_wyoming, add_bench, add_quantize, add_compile]


def build_parser(commands=None) -> argparse.ArgumentParser:
    from .server.cli import command_parser

    return command_parser(commands or COMMANDS)


def main(argv: list[str] | None = None) -> int:
    # The runner and the server's settings load numpy: after `import fastcsm.cli`, which loads nothing heavy.
    from .server.cli import run_command

    return run_command(build_parser, argv)


if __name__ == "__main__":
    sys.exit(main())
