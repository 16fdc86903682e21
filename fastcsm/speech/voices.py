"""Voices: a speaker id, a reference recording and its transcript, saved as Mimi codes.

CSM clones a voice from context: a segment of that speaker's audio with its words, placed
before the line to speak. A `Voice` keeps that segment already encoded (codes [frames, K] plus
the transcript), so cloning never re-encodes audio. On disk a voice is one small safetensors
file (about 2 KB a second of audio): the codes as a tensor, the rest as string metadata.

Named voices live in a directory: `$FASTCSM_VOICES_DIR` if set, else `~/.cache/fastcsm/voices`.
Names are plain words (letters, digits, `.`, `_`, `-`), so a name can never reach outside it,
and a new voice's name is never digits alone (those are speaker ids).
`load_voice` accepts a name or the path of a voice file.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..model.prompt import Segment, check_speaker, check_text

VOICE_DIR_ENV = "FASTCSM_VOICES_DIR"  # as `--voices-dir`; FASTCSM_VOICES, its older name, is read too
SUFFIX = ".safetensors"
FORMAT = "fastcsm-voice"
VERSION = 1
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
TEMP_SUFFIX = ".tmp"
# What `Voice.save` writes before moving it into place: `.NAME.safetensors.RANDOM.tmp`.
_TEMP = re.compile(rf"\.{_NAME.pattern}{re.escape(SUFFIX)}\.[A-Za-z0-9_]+{re.escape(TEMP_SUFFIX)}")
STALE_TEMP_S = 600.0  # a temporary file this old is a crash's leftover (see `remove_stale_temps`)


class VoiceError(ValueError):
    """A voice name, file or store operation that cannot be honoured."""


class VoiceNotFound(VoiceError):
    """No voice of that name or path: never there, or removed (a moment ago, perhaps)."""


class VoiceExists(VoiceError):
    """`VoiceStore.add` without overwrite, for a name that is taken (by a readable file or not)."""


@dataclass
class Voice:
    """A voice prompt: `speaker` says `text` in the recording whose Mimi codes are `codes`."""

    speaker: int
    text: str
    codes: torch.Tensor  # [frames, K] int64
    name: str | None = None
    meta: dict = field(default_factory=dict)  # free-form: source file, creation time, ...

    def __post_init__(self):
        check_speaker(self.speaker)
        check_text(self.text)
        if not isinstance(self.codes, torch.Tensor) or self.codes.ndim != 2 or self.codes.shape[0] == 0:
            raise VoiceError("a voice's codes must be a non-empty tensor [frames, codebooks]")
        if self.codes.is_floating_point():
            raise VoiceError(f"a voice's codes must be integers, got {self.codes.dtype}")
        self.codes = self.codes.long().cpu()

    @property
    def frames(self) -> int:
        return self.codes.shape[0]

    def duration_ms(self, frame_ms: int = 80) -> int:
        return self.frames * frame_ms

    def segment(self, speaker: int | None = None) -> Segment:
        """The context segment that carries this voice (optionally for another speaker id)."""
        return Segment(self.speaker if speaker is None else check_speaker(speaker), self.text, codes=self.codes)

    def save(self, path: str | os.PathLike, overwrite: bool = True) -> Path:
        """Write the voice to `path` (a `.safetensors` file), atomically: a reader sees the old
        file or the new one, never a part. Without `overwrite`, creating it is atomic too (one
        writer of many wins; the others get `VoiceExists`), across processes.
        """
        path = Path(path)
        tmp = self._write_temp(path)
        try:
            if overwrite:
                os.replace(tmp, path)
            else:
                try:
                    os.link(tmp, path)  # fails if the name exists, whoever made it
                except FileExistsError:
                    raise VoiceExists(f"a voice file {path.name!r} already exists") from None
                except OSError:  # a filesystem without hard links: exclusive create, then the bytes
                    with open(path, "xb") as out, open(tmp, "rb") as src:
                        out.write(src.read())
        except FileExistsError:
            raise VoiceExists(f"a voice file {path.name!r} already exists") from None
        finally:
            if tmp.exists():
                tmp.unlink()
        return path

    def _write_temp(self, path: Path) -> Path:
        """The voice in a temporary file of its own beside `path` (a unique name: concurrent
        writers never share one; a leading dot and no `.safetensors` suffix keep it out of lists)."""
        import tempfile

        from safetensors.torch import save_file

        metadata = {
            "format": FORMAT,
            "version": str(VERSION),
            "speaker": str(self.speaker),
            "text": self.text,
            "name": self.name or "",
            "meta": json.dumps(self.meta),
        }
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
        os.close(fd)
        os.chmod(tmp, 0o644)  # as a plain new file would be (mkstemp makes it private)
        try:
            save_file({"codes": self.codes.contiguous()}, tmp, metadata=metadata)
        except BaseException:
            os.unlink(tmp)
            raise
        return Path(tmp)

    @staticmethod
    def load(path: str | os.PathLike) -> Voice:
        path = Path(path).expanduser()
        try:
            metadata, codes = _read_voice_file(path)
        except (FileNotFoundError, IsADirectoryError):  # also one removed since a caller's check
            raise VoiceNotFound(f"no voice file at {path}") from None
        except Exception as e:  # not safetensors, truncated, unreadable
            raise VoiceError(f"{path} is not a readable fastcsm voice file ({e})") from None
        if metadata.get("format") != FORMAT or codes is None:
            raise VoiceError(f"{path} is a safetensors file but not a fastcsm voice (no voice metadata or codes)")
        if int(metadata.get("version", "0")) > VERSION:
            raise VoiceError(f"{path} was written by a newer fastcsm (voice format {metadata['version']}); upgrade")
        try:
            return Voice(
                speaker=int(metadata["speaker"]),
                text=metadata["text"],
                codes=codes,
                name=metadata.get("name") or None,
                meta=json.loads(metadata.get("meta") or "{}"),
            )
        except (KeyError, ValueError, TypeError) as e:
            raise VoiceError(f"{path} holds a damaged voice: {e}") from None

    @staticmethod
    def from_audio(codec, audio: torch.Tensor, text: str, speaker: int = 0, name: str | None = None,
                   **meta) -> Voice:
        """Encode a 24 kHz mono waveform [samples] with `codec` (`encode_waveform`)."""
        codes = codec.encode_waveform(audio)
        return Voice(speaker, text, codes, name, {"created": int(time.time()), **meta})


_MAX_HEADER = 1 << 20  # a voice's safetensors header: one tensor's entry and the metadata (its transcript)


def _read_voice_file(path: Path) -> tuple[dict, torch.Tensor | None]:
    """A safetensors file's metadata, and its `codes` if the metadata is a voice's. The file is
    opened once and read through that handle, so a file removed or replaced meanwhile is read
    whole (the one opened) or not found, never half one and half the other; the header is read
    first, so a file that is no voice (a model's weights, say) is not read further."""
    from safetensors.torch import load

    with open(path, "rb") as f:
        size = f.read(8)
        n = int.from_bytes(size, "little")
        if len(size) < 8 or n > _MAX_HEADER:
            raise ValueError("no safetensors header")
        header = f.read(n)
        metadata = json.loads(header).get("__metadata__") or {}
        if metadata.get("format") != FORMAT:
            return metadata, None
        return metadata, load(size + header + f.read()).get("codes")


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise VoiceError(
            f"invalid voice name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


def is_speaker_id(name: str) -> bool:
    """Whether a voice as given (`"0"`, `"007"`) is a bare speaker id, read before any voice name."""
    return name.isascii() and name.isdigit()


def check_new_name(name: str) -> str:
    """A name to save a voice under: `check_name`'s rules, and not digits alone, which a
    request reads as a speaker id before any voice name (so "007" would never be this voice)."""
    check_name(name)
    if is_speaker_id(name):
        raise VoiceError(f"invalid voice name {name!r}: digits alone already mean that speaker id; "
                         "give the voice a name with a letter in it")
    return name


def voice_dir() -> Path:
    """Where named voices live: `$FASTCSM_VOICES_DIR` (or `$FASTCSM_VOICES`), else `~/.cache/fastcsm/voices`."""
    env = os.environ.get(VOICE_DIR_ENV) or os.environ.get("FASTCSM_VOICES")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fastcsm" / "voices"


class VoiceStore:
    """A directory of named voices (`<name>.safetensors`)."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root).expanduser() if root is not None else voice_dir()

    def path(self, name: str) -> Path:
        return self.root / f"{check_name(name)}{SUFFIX}"

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name[: -len(SUFFIX)] for p in self.root.glob(f"*{SUFFIX}")
                      if _NAME.fullmatch(p.name[: -len(SUFFIX)]))

    def __contains__(self, name: str) -> bool:
        return self.path(name).is_file()

    def add(self, voice: Voice, name: str, overwrite: bool = False) -> Path:
        """Save `voice` as `name`. Without `overwrite` a taken name raises `VoiceExists`, and of
        concurrent adds of one name (threads or processes) exactly one succeeds."""
        path = self.path(check_new_name(name))
        if path.exists() and not overwrite:
            raise VoiceExists(f"a voice named {name!r} already exists; remove it first or overwrite it")
        self.root.mkdir(parents=True, exist_ok=True)
        voice.name = name
        try:
            return voice.save(path, overwrite=overwrite)
        except VoiceExists:
            raise VoiceExists(f"a voice named {name!r} already exists; remove it first or overwrite it") from None

    def get(self, name: str) -> Voice:
        try:
            return Voice.load(self.path(name))
        except VoiceNotFound:
            known = ", ".join(self.names()) or "none"
            raise VoiceNotFound(f"no voice named {name!r} in {self.root} (known: {known})") from None

    def remove(self, name: str) -> Path:
        """Remove `name`; of concurrent removes of one voice exactly one succeeds, the others
        get `VoiceNotFound` (there is no check before the unlink that could go stale)."""
        path = self.path(name)
        try:
            path.unlink()
        except (FileNotFoundError, IsADirectoryError):
            raise VoiceNotFound(f"no voice named {name!r} in {self.root}") from None
        return path


    def remove_stale_temps(self, older_than_s: float = STALE_TEMP_S) -> list[str]:
        """Remove the temporary files of writes that never finished (a process killed while
        saving), and return their names. Only those last written `older_than_s` ago: a save
        writes its file in one go and moves it into place within a second, and another process
        (a second server on this directory, `fastcsm voices add`) may be saving right now, so age,
        not existence, tells a leftover; it needs no lock that every writer would have to take.
        """
        if not self.root.is_dir():
            return []
        removed, cutoff = [], time.time() - older_than_s
        with os.scandir(self.root) as entries:
            for entry in entries:
                try:
                    if (_TEMP.fullmatch(entry.name) and entry.is_file(follow_symlinks=False)
                            and entry.stat(follow_symlinks=False).st_mtime < cutoff):
                        os.unlink(entry.path)
                        removed.append(entry.name)
                except OSError:  # gone meanwhile (another process cleaning), or not ours to remove
                    continue
        return sorted(removed)


def load_voice(name_or_path: str | os.PathLike, store: VoiceStore | None = None) -> Voice:
    """A voice by file path (anything with a `/` or the `.safetensors` suffix, or an existing
    file) or else by name in `store` (the default voice directory)."""
    s = os.fspath(name_or_path)
    looks_like_path = os.sep in s or "/" in s or s.endswith(SUFFIX) or s.startswith("~")
    if looks_like_path or (Path(s).is_file() and not _NAME.fullmatch(s)):
        return Voice.load(s)
    return (store or VoiceStore()).get(s)
