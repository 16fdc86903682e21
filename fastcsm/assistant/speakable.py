"""Model output made fit to speak, as it streams: `Speakable.feed(delta)` returns clean text.

Language models write for screens. What a voice should not read aloud goes, by these rules:

- Markdown: headers, list bullets and numbers, block quotes and horizontal rules lose their
  marks; a header or list item that ends without punctuation gets a full stop, so that it is
  spoken as a sentence of its own. `**strong**`, `*emphasis*`, `__x__`, `_x_` and `~~x~~` keep
  their words and lose their marks. A link `[text](url)` is its text; an image `![alt](url)` is
  dropped. A table row is its cells joined by commas, ending in a full stop; its separator row
  is dropped.
- Code: a fenced block (``` or ~~~) is skipped and nothing is said in its place (a voice
  assistant should not read code; its system prompt should ask for none). Inline code keeps
  its text and loses its backticks: it is usually a name inside a sentence.
- Emoji (pictographs, dingbats, flags, skin tones, joiners and variation selectors) are dropped.
- Stage directions are dropped: `[anything]` that is not a link (`[pause]`, `[1]`), and
  `*...*`, `_..._` or `(...)` spans of at most `STAGE_MAX_WORDS` words one of which is a sound or
  gesture (`*laughs*`, `(sighs)`, `*clears throat*`, `(in a whisper)`, see `STAGE_WORDS`). Other
  parentheses are spoken.
- Whitespace left by what was dropped is squashed, and no space is left before punctuation.

Streaming: the filter holds back only what it cannot decide yet: the start of a line until its
marks are known, a table row until its end, a code block, and from a span's opening mark
(`*`, `_`, `[`, `(`, a backtick) until it closes, at most `HOLD_MAX_CHARS` characters
(`LINK_MAX_CHARS` for a link; then the mark was not a span's and is dropped). Spaces are held
until the next word, so that none is left before punctuation or doubled around a dropped span.
Plain text comes out as soon as it arrives, and the output is the same however the text is cut
into deltas (tested at every cut, for replies made of words, marks and spans).

Length: with `max_chars`, once that many characters have come out the reply ends at the next
sentence end (`.`, `!`, `?` or `…` then whitespace); if the sentence runs `overrun_chars` past the
bound it is cut after its last whole word. `full` is then set: the caller may stop the model.
"""

from __future__ import annotations

import re

HOLD_MAX_CHARS = 120  # the longest stage direction or inline code waited for
LINK_MAX_CHARS = 2048  # the longest link or image waited for (URLs are long)
STAGE_MAX_WORDS = 8
# Sounds and gestures (base forms; -s, -es, -ed, -ing are recognised) and manner words.
_STAGE_TEXT = """
    laugh laughter chuckle giggle snicker snort sigh smile grin smirk beam pause cough sniff sniffle gasp
    whisper nod shrug wink yawn groan moan sob cry weep throat breath breathe inhale exhale hum gulp scoff
    blush frown clap mumble mutter hiccup sneeze grunt whistle shout yell scream applause chortle cackle
    squeal stammer stutter
    softly quietly excitedly sarcastically nervously warmly cheerfully sadly happily playfully gently
    dramatically thoughtfully hesitantly teasingly wistfully laughingly
"""
STAGE_WORDS = frozenset(_STAGE_TEXT.split())
_PUNCT_AFTER = set(".,!?;:)…")
_EMOJI = ("\U0001F000-\U0001FAFF\u2600-\u27BF\u2300-\u23FF\u2B00-\u2BFF\u200D\uFE0E\uFE0F\u20E3"
          "\U000E0020-\U000E007F\u3030\u303D\u3297\u3299")
_EMOJI_RE = re.compile(f"[{_EMOJI}]+")
_SPECIAL = re.compile(f"[`*_~\\[!(\\n{_EMOJI}]")
_MARKS = set("#-*+_>|~`0123456789.) \t")  # what a line may open with before its marks are known
_FENCE = re.compile(r" {0,3}(```|~~~)")
_RULE = re.compile(r" {0,3}([-*_])( *\1){2,} *")
_HEADER = re.compile(r" {0,3}#{1,6}(?: +|$)")
_ITEM = re.compile(r" *(?:[-*+]|\d{1,9}[.)]) +")
_QUOTE = re.compile(r" {0,3}(?:> ?)+")
_SENTENCE_END = re.compile(r"[.!?…][\"'”’)\]]*(?=\s)")
_SPACE_BEFORE_PUNCT = re.compile(r"[ \t]+(?=[.,!?;:…)])|(?<=[ \t])[ \t]+")
_MARK_BEFORE_PUNCT = re.compile(r"[,;:]+(?=[.,!?;:…])")
_CELL_RULE = re.compile(r" *:?-+:? *")


def is_stage_direction(words: str) -> bool:
    """Whether a span's text reads as a sound or gesture (see `STAGE_WORDS`)."""
    parts = [w.strip(".,!?;:'\"").lower() for w in words.split()]
    if not parts or len(parts) > STAGE_MAX_WORDS:
        return False
    return any(_stem_in(w) for w in parts)


def _stem_in(w: str) -> bool:
    if w in STAGE_WORDS:
        return True
    for suffix, add in (("s", ""), ("es", ""), ("ed", ""), ("ed", "e"), ("ing", ""), ("ing", "e"), ("d", "")):
        if w.endswith(suffix) and w[:-len(suffix)] + add in STAGE_WORDS:
            return True
    return w.endswith("ing") and len(w) > 5 and w[-4] == w[-5] and w[:-4] in STAGE_WORDS  # sobbing, nodding


class Speakable:
    """The speakable-text filter of one reply (see the module docstring for its rules)."""

    def __init__(self, max_chars: int | None = None, overrun_chars: int = 200):
        if max_chars is not None and (isinstance(max_chars, bool) or not isinstance(max_chars, int)
                                      or max_chars < 1):
            raise ValueError(f"max_chars must be a positive integer or None, got {max_chars!r}")
        self.max_chars = max_chars
        self.overrun_chars = overrun_chars
        self.text = ""  # everything emitted
        self.full = False  # the length bound ended the reply
        self._pending = ""  # input not yet decided
        self._kind: str | None = None  # the current line's: None (its start is undecided), text, header, item,
        # table, skip (a rule or fence line), code (inside a fenced block)
        self._fence = ""  # the open code fence's mark
        self._line_out = ""  # what the current line emitted (for the full stop of headers and items)
        self._space = False  # whitespace held before a dropped span, emitted before the next word
        self._mark = ""  # a trailing , ; or : held, for punctuation that a dropped span may bring after it
        self._word = ""  # past the length bound: the word not yet known to be whole

    @property
    def spaced(self) -> bool:
        """Whether whitespace, held back, follows `text`: what a sentence splitter needs to know
        that a sentence at the end of `text` is complete."""
        return self._space

    def feed(self, delta: str) -> str:
        """The clean text that `delta` completes (possibly empty)."""
        if self.full:
            return ""
        self._pending += delta
        return self._run(final=False)

    def finish(self) -> str:
        """The text still held back, at the end of the reply."""
        if self.full:
            return ""
        out = self._run(final=True)
        self._pending = ""
        return out

    # -- the scanner ------------------------------------------------------------------------------

    def _run(self, final: bool) -> str:
        start = len(self.text)
        while self._pending and not self.full:
            if not (self._line_start(final) if self._kind is None else self._line_body(final)):
                break
        if final and not self.full:
            self._end_line(final_newline=False)
            self._out(self._mark, final=True)
            self._mark = ""
        return self.text[start:]

    def _line_start(self, final: bool) -> bool:
        """Decide the kind of the line that `_pending` starts; False when more text is needed."""
        p = self._pending
        nl = p.find("\n")
        line = p if nl < 0 else p[:nl]
        if self._fence:  # inside a code block: whole lines, skipped, until the closing fence
            if nl < 0 and not final:
                return False
            if line.strip().startswith(self._fence):
                self._fence = ""
            self._pending = "" if nl < 0 else p[nl + 1:]
            return True
        if nl < 0 and not final and all(c in _MARKS for c in line):
            return False  # "-", "1", "**", "```": its marks are not known yet
        if m := _FENCE.match(line):
            self._fence, self._kind = m.group(1), "skip"
        elif _RULE.fullmatch(line):
            self._kind = "skip"
        elif line.lstrip().startswith("|"):
            self._kind = "table"
            return True
        else:
            self._kind = "text"
            for kind, rx in (("header", _HEADER), ("item", _ITEM), ("text", _QUOTE)):
                if m := rx.match(line):
                    self._kind = kind
                    p = p[m.end():]
                    break
            p = p.lstrip(" \t")
        self._pending = p if self._kind != "skip" else p[len(line):]
        return True

    def _line_body(self, final: bool) -> bool:
        """Emit what can be decided of the current line; False when more text is needed."""
        p = self._pending
        if self._kind == "skip":
            nl = p.find("\n")
            self._pending = "" if nl < 0 else p[nl:]
            if nl >= 0:
                self._end_line()
            return nl >= 0
        if self._kind == "table":
            nl = p.find("\n")
            if nl < 0 and not final:
                return False
            row, self._pending = (p, "") if nl < 0 else (p[:nl], p[nl:])
            cells = [c.strip() for c in row.strip().strip("|").split("|")]
            if not all(_CELL_RULE.fullmatch(c) for c in cells):
                self._emit(", ".join(_clean_inline(c) for c in cells if c.strip()))
                self._kind = "item"  # a row ends in a full stop like an item
            if nl >= 0:
                self._end_line()
            return nl >= 0
        m = _SPECIAL.search(p)
        if m is None:
            self._emit(p)
            self._pending = ""
            return False
        if m.start():
            self._emit(p[:m.start()])
            self._pending = p = p[m.start():]
        return self._special(p, final)

    def _special(self, p: str, final: bool) -> bool:
        """`p` starts with a special character: handle what it opens, or wait for more."""
        c = p[0]
        if c == "\n":
            self._pending = p
            self._end_line()
            return True
        if m := _EMOJI_RE.match(p):
            self._pending = p[m.end():]
            return True
        line_end = p.find("\n")
        line = p if line_end < 0 else p[:line_end]
        more = line_end < 0 and not final and len(line) < HOLD_MAX_CHARS  # the span may still close
        if c in "*_~":
            run = len(line) - len(line.lstrip(c))
            if run == len(line) and more:
                return False
            # After a word a mark closes a span or is inside a word; only after a space does one open.
            glued = bool(self.text) and not self._space and not self.text[-1].isspace() \
                and self.text[-1] not in "([\"'“‘"
            if c == "_" and run == 1 and glued and line[1:2].isalnum():
                self._emit("_")  # inside a word (snake_case)
                self._pending = p[1:]
                return True
            if run >= 2 or c == "~" or glued or not line[1:2] or line[1:2].isspace():
                self._pending = p[run:]  # bold, strike, a closing mark or a stray one
                return True
            close = line.find(c, 1)
            if close < 0 and more:
                return False
            if close > 0 and is_stage_direction(line[1:close]):
                self._drop(close + 1)
                return True
            self._pending = p[1:]  # emphasis: its words are spoken, its closing mark goes as a stray one
            return True
        if c == "`":
            close = line.find("`", 1)
            if close < 0:
                if more:
                    return False
                self._pending = p[1:]
                return True
            self._emit(line[1:close].strip("`"))
            self._pending = p[close + 1:]
            return True
        wait = line_end < 0 and not final and len(line) < LINK_MAX_CHARS  # a link may still close
        if c == "!":
            if line[1:2] != "[":
                if len(line) == 1 and wait:
                    return False
                self._emit("!")
                self._pending = p[1:]
                return True
            m = re.match(r"!\[[^\]]*\]\([^)]*\)", line)
            if m is None and wait:
                return False
            self._drop(m.end() if m else 2)  # an image, or a "![" that opened none
            return True
        if c == "[":
            m = re.match(r"\[([^\]]*)\]", line)
            if m is None:
                if wait:
                    return False
                self._pending = p[1:]  # a bracket never closed: not a span
                return True
            rest = line[m.end():]
            if not rest and wait:
                return False  # a link's "(" may follow
            if rest.startswith("("):
                close = rest.find(")")
                if close < 0 and wait:
                    return False
                if close >= 0:  # a link: its text stands in its place
                    self._pending = m.group(1) + p[m.end() + close + 1:]
                    return True
            self._drop(m.end())  # [pause], [1]: not spoken
            return True
        # "(": a stage direction, or a parenthesis that is spoken
        close = line.find(")")
        if close < 0 and more:
            return False
        if close > 0 and is_stage_direction(line[1:close]):
            self._drop(close + 1)
            return True
        self._emit("(")
        self._pending = p[1:]
        return True

    def _drop(self, n: int) -> None:
        """Drop the first `n` pending characters (a span), keeping a space before it for later."""
        self._pending = self._pending[n:]
        self._space = True

    def _end_line(self, final_newline: bool = True) -> None:
        said = (self._line_out + self._word + self._mark).rstrip()
        if self._kind in ("header", "item") and said and said[-1] not in ".!?:;,…":
            self._emit(".")
        self._kind, self._line_out = None, ""
        if final_newline:
            self._emit("\n")
            self._pending = self._pending[1:]

    # -- output -----------------------------------------------------------------------------------

    def _emit(self, s: str) -> None:
        """Add clean text to the output: spaces squashed and held, the length bound applied."""
        s = _EMOJI_RE.sub("", s)
        if not s:
            return
        lead, body = s[:len(s) - len(s.lstrip(" \t"))], s.lstrip(" \t")
        if lead:
            self._space = True
        if not body:
            return
        if self._mark and body[0] in _PUNCT_AFTER and body[0] != ")":
            self._mark = ""  # "it, *smiles*, yes": one comma, not two
        prev = (self.text + self._word + self._mark)[-1:]
        space = self._space and body[0] not in _PUNCT_AFTER and body[0] != "\n" and prev and not prev.isspace()
        body = self._mark + (" " if space else "") + body
        self._space, self._mark = False, ""
        tail = len(body) - len(body.rstrip(" \t"))
        if tail:
            body, self._space = body[:len(body) - tail], True
        body = _MARK_BEFORE_PUNCT.sub("", _SPACE_BEFORE_PUNCT.sub("", body))
        if body[-1:] in (",", ";", ":"):
            body, self._mark = body[:-1], body[-1]
        if not self.text and not self._word:
            body = body.lstrip()
        self._out(body)

    def _out(self, s: str, final: bool = False) -> None:
        bound = self.max_chars
        if bound is not None and len(self.text) + len(self._word) + len(s) > bound:
            s, self._word = self._word + s, ""
            past = bound - len(self.text)  # where in `s` the bound falls
            before = self.text[-1:]  # a sentence end just emitted counts once a space follows it
            probe = before + s + self._mark + (" " if self._space else "")
            for m in _SENTENCE_END.finditer(probe):
                if m.end() - len(before) >= past:
                    s, self.full = s[:m.end() - len(before)], True
                    break
            cap = bound + self.overrun_chars - len(self.text)
            if not self.full and len(s) > cap:
                s = s[:cap].rsplit(" ", 1)[0] if " " in s[:cap] else ""
                self.full = True
            elif not self.full and not final and not (self._space or self._mark) and not s[-1:].isspace():
                # Past the bound a word comes out whole, so that a cut at the cap never splits one.
                cut = max(s.rfind(" "), s.rfind("\n"), 0)  # the space stays with the word it leads
                s, self._word = s[:cut], s[cut:]
        self.text += s
        self._line_out += s

def _clean_inline(text: str) -> str:
    """`text` (one line, e.g. a table cell) with its inline marks removed by the same rules."""
    f = Speakable()
    f._kind = "text"
    return (f.feed(text) + f.finish()).strip()
