"""A pronunciation lexicon: whole-word respellings applied to the spoken text.

    Nguyen	Win
    SQL	sequel
    gif	jif

An entry is a word and how to say it, written as the model should read it. Entries apply after
normalisation (`normalize.py`), to whole words of the spoken text: a word is matched where it is
neither preceded nor followed by a letter, digit or underscore, so "SQL" matches in "SQL," and
"(SQL)" but not in "MySQL".

Case: an entry written all in lower case matches the word in any case ("gif" matches gif, GIF
and Gif); an entry with a capital letter matches only that exact spelling ("SQL" leaves "sql"
alone). Where both kinds of entry match a word, the exact one wins.

Files: JSON (`.json`), one object of word -> respelling; or text (any other name), one entry a
line, the word and its respelling separated by a tab (or by spaces: the first space ends the
word), blank lines and lines starting with `#` ignored. Words are single tokens (no spaces);
a word listed twice is an error, as is anything else malformed, naming the file and line.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Mapping
from pathlib import Path

_WORD = re.compile(r"\w+")
MAX_WORD_CHARS = 64
MAX_RESPELLING_CHARS = 256
MAX_FILE_ENTRIES = 100_000
MAX_REQUEST_ENTRIES = 256  # a lexicon sent with one request


class LexiconError(ValueError):
    """A lexicon that cannot be used, and why."""


def _check_entry(word, said, where: str) -> tuple[str, str]:
    if not isinstance(word, str) or not isinstance(said, str):
        raise LexiconError(f"{where}: a lexicon entry maps a word to its respelling, both strings; got "
                           f"{word!r}: {said!r}")
    if not word or any(c.isspace() for c in word) or len(word) > MAX_WORD_CHARS:
        raise LexiconError(f"{where}: {word!r} is not a word: give one token of 1 to {MAX_WORD_CHARS} characters, "
                           "without spaces")
    said = said.strip()
    if not said or len(said) > MAX_RESPELLING_CHARS:
        raise LexiconError(f"{where}: the respelling of {word!r} must hold 1 to {MAX_RESPELLING_CHARS} characters")
    bad = next((c for c in word + said if unicodedata.category(c) == "Cc"), None)
    if bad is not None:
        raise LexiconError(f"{where}: the entry for {word!r} holds the control character U+{ord(bad):04X}")
    return word, " ".join(said.split())


class Lexicon:
    """Checked entries and the one pattern that finds them (see the module's docstring)."""

    def __init__(self, entries: Mapping[str, str], source: str = "lexicon", limit: int = MAX_FILE_ENTRIES):
        if not isinstance(entries, Mapping):
            raise LexiconError(f"{source} must be an object of word -> respelling, got {type(entries).__name__}")
        if len(entries) > limit:
            raise LexiconError(f"{source} has {len(entries)} entries; at most {limit}")
        checked = dict(_check_entry(w, s, f"{source}[{w!r}]") for w, s in entries.items())
        self._index(checked, {w.lower() for w in checked if not _WORD.fullmatch(w)})

    def _index(self, checked: dict[str, str], odd: set[str]) -> None:
        self.entries = checked
        self._exact = {w: s for w, s in checked.items() if w != w.lower()}
        self._any = {w: s for w, s in checked.items() if w == w.lower()}
        # A word of letters and digits matches exactly a run of \w: one dictionary look-up a run.
        # Only the few words with other characters ("C++", "AT&T") need a pattern of their own,
        # tried first (the longest first) so that "C++" wins over "C".
        self._odd = odd
        alternatives = [r"(?<!\w)(?:" + "|".join(map(re.escape, sorted(odd, key=len, reverse=True))) + r")(?!\w)"]
        self._pattern = re.compile("|".join([*alternatives[:bool(odd)], r"\w+"]), re.IGNORECASE) if checked else None

    def __len__(self) -> int:
        return len(self.entries)

    def __eq__(self, other) -> bool:
        return isinstance(other, Lexicon) and self.entries == other.entries

    def __hash__(self) -> int:
        return hash(tuple(sorted(self.entries.items())))

    def __repr__(self) -> str:
        return f"Lexicon({len(self)} entries)"

    def say(self, word: str) -> str | None:
        """The respelling of `word`, or None (exact-case entries first, then lower-case ones)."""
        return self._exact.get(word) or self._any.get(word.lower())

    def apply(self, text: str) -> str:
        """`text` with every whole word that has an entry respelled."""
        if self._pattern is None:
            return text
        return self._pattern.sub(lambda m: self.say(m.group(0)) or m.group(0), text)

    def updated(self, entries: Mapping[str, str] | None, source: str = "lexicon") -> Lexicon:
        """This lexicon with `entries` (say, one request's: at most MAX_REQUEST_ENTRIES, checked)
        added; theirs win for the same word. Only the new entries are checked and indexed."""
        if not entries:
            return self
        extra = Lexicon(entries, source, MAX_REQUEST_ENTRIES)
        merged = Lexicon.__new__(Lexicon)
        merged._index({**self.entries, **extra.entries}, self._odd | extra._odd)
        return merged

    @staticmethod
    def from_file(path: str | Path) -> Lexicon:
        """A JSON (`.json`) or tab-separated text file; `LexiconError` says what is wrong and where."""
        path = Path(path).expanduser()
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise LexiconError(f"cannot read the lexicon {path}: {e}") from None
        if path.suffix.lower() == ".json":
            try:
                entries = json.loads(text)
            except json.JSONDecodeError as e:
                raise LexiconError(f"{path}: not valid JSON ({e}); a JSON lexicon is one object of "
                                   'word -> respelling, e.g. {"Nguyen": "Win"}') from None
            return Lexicon(entries, str(path))
        entries: dict[str, str] = {}
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            word, _, said = line.strip().partition("\t") if "\t" in line else line.strip().partition(" ")
            where = f"{path}:{n}"
            if not said.strip():
                raise LexiconError(f"{where}: {line.strip()!r} has no respelling: write the word, a tab, then how "
                                   "to say it")
            word, said = _check_entry(word.strip(), said, where)
            if word in entries:
                raise LexiconError(f"{where}: {word!r} is listed twice")
            entries[word] = said
        return Lexicon(entries, str(path))


def load_lexicon(path: str | Path | None) -> Lexicon | None:
    return None if path is None or str(path) == "" else Lexicon.from_file(path)
