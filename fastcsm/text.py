"""Splitting long text into pieces that one CSM generation speaks well.

CSM speaks a line of a few sentences reliably; much longer lines drift, loop or run out of the
2048-row window. `split_text` cuts text at sentence boundaries, packs whole sentences into
pieces of at most `max_chars` characters, and cuts a sentence that is longer than that at
clause boundaries (, ; : and dashes), then between words. Words are never cut, so a piece may
exceed `max_chars` only when one word does.

Text that already fits in one piece comes back unchanged (not even whitespace is touched), so
short lines produce exactly the prompt the reference implementation builds.
"""

from __future__ import annotations

import re

DEFAULT_MAX_CHARS = 200

# A sentence ends at . ! ? … (or CJK full stops), optionally followed by closing quotes or
# brackets, then whitespace. Paragraph breaks end a sentence too.
_SENTENCE_END = re.compile(r"(?<=[.!?…。！？])[\"'”’)\]]*\s+|\n\s*\n")
_CLAUSE_END = re.compile(r"(?<=[,;:])\s+|\s+(?=[—–-]\s)|(?<=[—–])(?!\d)\s*")  # not in a range: 40–60
# Words after which a full stop does not end the sentence.
_ABBREVIATIONS = {
    "mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "mt", "vs", "etc", "e.g", "i.e", "no", "fig", "approx",
    "inc", "ltd", "co", "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep", "sept", "oct", "nov", "dec",
}


def _squash(text: str) -> str:
    return " ".join(text.split())


def sentences(text: str) -> list[str]:
    """Split `text` into sentences (whitespace inside each squashed to single spaces)."""
    out: list[str] = []
    start = 0
    pending = ""
    for m in _SENTENCE_END.finditer(text):
        piece = text[start:m.start()] + m.group(0).strip()  # keep closing quotes with their sentence
        start = m.end()
        words = piece.split()
        last = words[-1].rstrip(".").lower() if words else ""
        is_initial = len(last) == 1 and last.isalpha()
        if "\n" not in m.group(0) and (last in _ABBREVIATIONS or is_initial):
            pending += piece + " "
            continue
        out.append(_squash(pending + piece))
        pending = ""
    tail = _squash(pending + text[start:])
    if tail:
        out.append(tail)
    return [s for s in out if s]


def _split_long(sentence: str, max_chars: int) -> list[str]:
    """Cut one sentence longer than `max_chars` at clause boundaries, then between words."""
    clauses = [c for c in (_squash(c) for c in _CLAUSE_END.split(sentence)) if c]
    parts: list[str] = []
    for clause in clauses:
        if len(clause) <= max_chars:
            parts.append(clause)
            continue
        line = ""
        for word in clause.split():
            if line and len(line) + 1 + len(word) > max_chars:
                parts.append(line)
                line = word
            else:
                line = f"{line} {word}" if line else word
        if line:
            parts.append(line)
    return _pack(parts, max_chars)


def _pack(parts: list[str], max_chars: int) -> list[str]:
    """Join consecutive parts with spaces while the result stays within `max_chars`."""
    out: list[str] = []
    for p in parts:
        if out and len(out[-1]) + 1 + len(p) <= max_chars:
            out[-1] = f"{out[-1]} {p}"
        else:
            out.append(p)
    return out


def split_text(text: str, max_chars: int = DEFAULT_MAX_CHARS) -> list[str]:
    """Pieces of `text`, each at most `max_chars` characters unless a single word is longer.

    Returns `[text]` unchanged when it already fits.
    """
    if isinstance(max_chars, bool) or not isinstance(max_chars, int) or max_chars < 1:
        raise ValueError(f"max_chars must be a positive integer, got {max_chars!r}")
    if len(text) <= max_chars:
        return [text]
    pieces: list[str] = []
    for s in sentences(text):
        pieces.extend([s] if len(s) <= max_chars else _split_long(s, max_chars))
    return _pack(pieces, max_chars)


# -- text that streams in -------------------------------------------------------------------------

MIN_CLAUSE_CHARS = 40  # inside a sentence, a clause ends a piece once the piece is at least this long


def speech_pieces(text: str, final: bool = True, min_clause_chars: int = MIN_CLAUSE_CHARS) -> list[str]:
    """The pieces a line is spoken in, one generation each: its sentences, and inside a sentence a
    cut after a clause (`,` `;` `:` or a dash) once the piece holds `min_clause_chars` characters.

    With `final=False` (more text may follow) only the pieces that are certainly complete come
    back: a sentence once whitespace (or more text) follows its end, a clause once its next word
    has begun. Whatever is appended later, those pieces stay the same: the pieces of a line given
    in fragments are always a prefix of the pieces of the whole line, so a line that streams in is
    spoken exactly as the whole line would be. Whitespace inside a piece is squashed to one space.
    """
    sents = sentences(text)
    if not final and sents:
        # The last sentence is complete only if text appended now would start a new one.
        probe = sentences(text + "x")
        if len(probe) <= len(sents) or probe[len(sents) - 1] != sents[-1]:
            head = [p for s in sents[:-1] for p in _clause_pieces(s, True, min_clause_chars)]
            return head + _clause_pieces(sents[-1], False, min_clause_chars)
    return [p for s in sents for p in _clause_pieces(s, True, min_clause_chars)]


def _clause_pieces(sentence: str, complete: bool, min_chars: int) -> list[str]:
    """`sentence` (squashed) cut after clauses, greedily from the left; a cut counts once a word
    follows it. An incomplete sentence keeps its uncut rest back."""
    out, start = [], 0
    for m in _CLAUSE_END.finditer(sentence):
        if m.end() >= len(sentence):
            break  # nothing follows yet: not a confirmed cut
        piece = sentence[start:m.start()].strip()
        if len(piece) >= min_chars:
            out.append(piece)
            start = m.end()
    rest = sentence[start:].strip()
    if complete and rest:
        out.append(rest)
    return out
