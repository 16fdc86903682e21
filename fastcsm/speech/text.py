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


_WHITESPACE = re.compile(r"\s+")
_CLOSERS = "\"'”’)]"  # what may stand between a sentence's last mark and the whitespace after it


def _one_run(m: re.Match) -> str:
    breaks = m.group(0).count("\n")
    return "\n\n" if breaks > 1 else "\n" if breaks else " "


def _squash(text: str) -> str:
    return " ".join(text.split())


def _join(a: str, b: str) -> str:
    """`_squash(a + " " + b)` of two squashed texts."""
    return f"{a} {b}" if a and b else a or b


def sentences(text: str) -> list[str]:
    """Split `text` into sentences (whitespace inside each squashed to single spaces)."""
    out: list[str] = []
    start = 0
    pending = ""
    for m in _SENTENCE_END.finditer(text):
        piece = text[start:m.start()] + m.group(0).strip()  # keep closing quotes with their sentence
        start = m.end()
        if not _ends_sentence(piece, m):
            pending += piece + " "
            continue
        out.append(_squash(pending + piece))
        pending = ""
    tail = _squash(pending + text[start:])
    if tail:
        out.append(tail)
    return [s for s in out if s]


def _ends_sentence(piece: str, end: re.Match) -> bool:
    """Whether the sentence end `end`, after `piece`, ends a sentence: not after an abbreviation
    or an initial ("Dr.", "J."), unless it is a line break."""
    words = piece.rsplit(None, 1)
    last = words[-1].rstrip(".").lower() if words else ""
    return "\n" in end.group(0) or not (last in _ABBREVIATIONS or (len(last) == 1 and last.isalpha()))


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
    return LinePieces(min_clause_chars).add(text, final)


class LinePieces:
    """`speech_pieces` of a line whose text arrives in fragments, worked out as it arrives: after
    each `add(fragment, final)`, `pieces` is `speech_pieces(all the text so far, final)`.

    Complete pieces never change, so an `add` goes on from where the last one left off: the text
    after the last settled sentence end is kept (`_tail`, whitespace runs shortened to their line
    breaks), sentence ends are searched for from the closing quotes and spaces that ended it before
    the fragment, the unfinished sentence is kept squashed up to its last word (the part that ran
    on past abbreviations in `_head`, the tail's in `_flat`), and clause cuts are searched for from
    the last place the previous `add` could not yet decide. So an `add` examines the fragment and a
    few characters around it, however long the line before it; `examined` counts them (a sentence
    that ends examines its own text once more, to squash it).
    """

    def __init__(self, min_clause_chars: int = MIN_CLAUSE_CHARS):
        self.min_chars = min_clause_chars
        self.pieces: list[str] = []
        self.length = 0  # characters added
        self.final = False
        self.examined = 0  # characters looked at by the searches, over every `add`
        self._tail = ""  # the text after the last settled sentence end
        self._seek = 0  # in `_tail`: where its closing quotes and whitespace at the end begin
        self._flat, self._flat_at = "", 0  # `_tail[:_flat_at]` squashed, up to its last whitespace run
        self._head = ""  # the unfinished sentence before `_tail` (text that ended on abbreviations), squashed
        self._cut = 0  # in the unfinished sentence (squashed), where its next clause piece starts
        self._resume = 0  # ... and where the search for clause cuts goes on
        self._said = False  # the unfinished sentence is complete and its pieces are out

    def add(self, fragment: str, final: bool) -> list[str]:
        """Append `fragment`; `final` says the line is complete. Returns `pieces`."""
        if self.final:
            raise ValueError("the line is complete: nothing can be appended to it")
        self.length += len(fragment)
        self.final = final
        if not fragment and not final:
            return self.pieces  # nothing changed
        # A whitespace run counts only by its line breaks (none, one, two or more: a paragraph),
        # so it is kept as " ", "\n" or "\n\n": a flood of spaces leaves the tail short.
        end = self._tail[-2:]
        keep = len(self._tail) - len(end) + len(end.rstrip())
        new = self._tail[keep:] + fragment
        new, runs = _WHITESPACE.subn(_one_run, new)
        self.examined += len(new)
        tail = self._tail[:keep] + new
        if runs:  # the squashed text grows up to the last whitespace run
            self._flat_to(tail, max(tail.rfind(" ", keep), tail.rfind("\n", keep)))
        # Sentence ends can begin only where the tail's closing quotes and spaces began, or after.
        matches = list(_SENTENCE_END.finditer(tail, min(self._seek, keep)))
        self.examined += len(tail) - min(self._seek, keep)
        start, said = 0, False
        for i, m in enumerate(matches):
            piece = tail[start:m.start()] + m.group(0).strip()  # keep closing quotes with their sentence
            ends = _ends_sentence(piece, m)
            # A sentence end with only whitespace after it may still grow, unless the line is complete.
            if not final and i + 1 == len(matches) and (m.end() == len(tail) or tail[m.end():].isspace()):
                said = ends  # complete all the same: text appended now starts the next sentence
                break
            start = m.end()
            self.examined += len(piece)
            if ends:
                self._clauses(_join(self._head, _squash(piece)), complete=True)
                self._head, self._cut, self._resume, self._said = "", 0, 0, False
            else:
                self._head = _join(self._head, _squash(piece))
        if start:
            tail = tail[start:]
            self._flat, self._flat_at = "", 0
            self._flat_to(tail, max(tail.rfind(" "), tail.rfind("\n")))
        self._tail = tail
        seek = len(tail)
        while seek > 0 and (tail[seek - 1] in _CLOSERS or tail[seek - 1].isspace()):
            seek -= 1  # (a run of closing quotes is rare; whitespace runs are short)
        self._seek = seek
        self._clauses(_join(self._head, _join(self._flat, tail[self._flat_at:].strip())), complete=final or said)
        self._said = said
        return self.pieces

    def _flat_to(self, tail: str, at: int) -> None:
        """Squash the tail up to `at` (in its last whitespace run)."""
        if at > self._flat_at:
            self.examined += at - self._flat_at
            self._flat = _join(self._flat, _squash(tail[self._flat_at:at]))
            self._flat_at = at

    def _clauses(self, sentence: str, complete: bool) -> None:
        """The pieces of the unfinished sentence from its last cut on: cut after clauses, greedily
        from the left; a cut counts once a word follows it. An incomplete sentence keeps its uncut
        rest back."""
        if self._said:
            return
        start = self._cut
        begin = max(start, self._resume)
        resume = len(sentence) - 2  # (a cut before " -" waits for the space after the dash)
        for m in _CLAUSE_END.finditer(sentence, begin):
            if m.end() == start:
                continue  # the empty cut (after a dash) that the last piece ended at
            if m.end() >= len(sentence):
                resume = min(resume, m.start())
                break  # nothing follows yet: not a confirmed cut
            piece = sentence[start:m.start()].strip()
            if len(piece) >= self.min_chars:
                self.pieces.append(piece)
                start = m.end()
        self.examined += len(sentence) - begin
        self._cut, self._resume = start, max(start, resume)
        if complete and (rest := sentence[start:].strip()):
            self.pieces.append(rest)
