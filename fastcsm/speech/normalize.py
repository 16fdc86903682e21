"""Written text to spoken text, with a map back to the written words.

CSM reads raw text through its Llama tokenizer, so "$3.50", "3/15/2024", "10:30pm" or
"jane@example.com" come out as the model guesses them. `normalize(text, language)` rewrites the
written forms a person would read aloud differently before the text is tokenised:

    numbers         1,234 -> one thousand two hundred and thirty-four; -3.05 -> minus three point zero five
    ordinals        21st -> twenty-first; 1990s -> nineteen nineties; 40-60 -> forty to sixty
    years           1984 -> nineteen eighty-four; in 2024 -> in twenty twenty-four
    dates, times    2024-03-15 -> March fifteenth, twenty twenty-four; 10:30pm -> ten thirty p m
    money, percent  $3.50 -> three dollars and fifty cents; 12.5% -> twelve point five percent
    units           40-60 °C -> forty to sixty degrees Celsius; 5 km -> five kilometers
    phone numbers   (555) 123-4567 -> five five five, one two three, four five six seven
    URLs, e-mail    www.example.com/docs -> w w w dot example dot com slash docs
    abbreviations   Dr. Smith -> Doctor Smith; e.g. -> for example; R&D -> R and D
    versions, codes v2.0.1 -> version two point zero point one; 007 -> zero zero seven; No. 5 -> number five

Number words come from `num2words` (in every language it knows); the rest are rules written here,
for English. In another language only numbers are rewritten (`language` is num2words' code,
"de", "fr", "es", ...).

The result (`Spoken`) holds the spoken text and one `Word` per written word, each with its span
in the written text and its spoken form, so that whatever reports text back (word timings,
captions) names what the user wrote. A rule's match stays one word even when it covers several
("40–60 °C" is one word whose spoken form is "forty to sixty degrees Celsius"); a token of
punctuation alone joins the word before it. Text that no rule touches comes back unchanged, not
even its whitespace, so the prompt is exactly the reference implementation's. Spoken text is a
fixed point (normalising it again changes nothing), and no input makes `normalize` raise.

This module knows nothing of tokenizers, prompts or audio.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from decimal import Decimal

from num2words import CONVERTER_CLASSES, num2words

NORMALIZE_BY_DEFAULT = True  # the one default of every way in (SpeakOptions, HTTP, WebSocket, CLI)
DEFAULT_LANGUAGE = "en"
LANGUAGES = tuple(sorted(CONVERTER_CLASSES))
_MAX_NUMBER_DIGITS = 15  # longer digit strings are read digit by digit (account numbers, not amounts)


@dataclass(frozen=True)
class Word:
    """One written word (or the several a rule read as one) and how it is spoken."""

    text: str  # as written
    start: int  # span in the written text
    end: int
    spoken: str


@dataclass(frozen=True)
class Spoken:
    """The spoken text and its words, in order; `text` is what the tokenizer reads."""

    text: str
    words: tuple[Word, ...]


def check_language(language) -> str:
    if language not in CONVERTER_CLASSES:
        raise ValueError(f"language must be one of num2words' codes ({', '.join(LANGUAGES)}), got {language!r}")
    return language


# -- number words ---------------------------------------------------------------------------------

_DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def _digits(s: str) -> str:
    return " ".join(_DIGITS[int(c)] for c in s if c.isascii() and c.isdigit())


def cardinal(n: int | str) -> str:
    """An integer in English words (without num2words' commas); very long ones, and ones with
    leading zeros, digit by digit."""
    s = str(n).replace(",", "")
    negative = s.startswith("-")
    s = s.lstrip("-")
    spell = len(s.lstrip("0")) > _MAX_NUMBER_DIGITS or (len(s) > 1 and s.startswith("0"))  # "007", "0800"
    words = _digits(s) if spell else num2words(int(s)).replace(",", "")
    return "minus " + words if negative else words


def decimal(s: str) -> str:
    """A decimal "12.05" in words, the fraction digit by digit ("twelve point zero five")."""
    whole, _, frac = s.replace(",", "").partition(".")
    return f"{cardinal(whole or '0')} point {_digits(frac)}"


def number(s: str, lang: str = DEFAULT_LANGUAGE) -> str:
    """A number as written ("1,234", "-3.5") in words; num2words' own reading outside English."""
    if lang != "en":
        value = s.replace(",", "")
        if len(value.strip("-").partition(".")[0].lstrip("0")) > _MAX_NUMBER_DIGITS:
            return " ".join(num2words(int(c), lang=lang) for c in value if c.isdigit())
        return num2words(Decimal(value) if "." in value else int(value), lang=lang).replace(",", "")
    if s.startswith("-"):
        return "minus " + number(s[1:])
    return decimal(s) if "." in s else cardinal(s)


def ordinal(n: int) -> str:
    return num2words(n, to="ordinal").replace(",", "")


def year(n: int) -> str:
    if n % 1000 < 10 and n % 1000 and n >= 2000:  # 2005: "two thousand five", as it is said
        return f"{cardinal(n - n % 1000)} {cardinal(n % 1000)}"
    return num2words(n, to="year").replace(",", "").replace("oh-", "oh ")


def _plural_words(words: str) -> str:
    """"twenty" -> "twenties", "nineteen ninety" -> "nineteen nineties"."""
    if words.endswith("y"):
        return words[:-1] + "ies"
    return words + ("es" if words.endswith("x") else "s")


# -- the rules ------------------------------------------------------------------------------------

_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December"]
_MONTH_OF = {m.lower(): i for i, m in enumerate(_MONTHS, 1)} | {m[:3].lower(): i for i, m in enumerate(_MONTHS, 1)}
_MONTH_OF["sept"] = 9
_MONTH = r"(?:January|February|March|April|May|June|July|August|September|October|November|December|" \
         r"Jan|Feb|Mar|Apr|Jun|Jul|Aug|Sept|Sep|Oct|Nov|Dec)\.?"

# symbol -> (singular, plural, minor singular, minor plural)
_CURRENCY = {
    "$": ("dollar", "dollars", "cent", "cents"), "US$": ("dollar", "dollars", "cent", "cents"),
    "USD": ("dollar", "dollars", "cent", "cents"), "€": ("euro", "euros", "cent", "cents"),
    "EUR": ("euro", "euros", "cent", "cents"), "£": ("pound", "pounds", "penny", "pence"),
    "GBP": ("pound", "pounds", "penny", "pence"), "¥": ("yen", "yen", "sen", "sen"),
    "JPY": ("yen", "yen", "sen", "sen"), "₹": ("rupee", "rupees", "paisa", "paise"),
    "INR": ("rupee", "rupees", "paisa", "paise"), "₩": ("won", "won", "jeon", "jeon"),
    "CHF": ("franc", "francs", "centime", "centimes"), "CAD": ("Canadian dollar", "Canadian dollars", "cent", "cents"),
    "AUD": ("Australian dollar", "Australian dollars", "cent", "cents"),
}
_SCALES = {"k": "thousand", "K": "thousand", "thousand": "thousand", "m": "million", "M": "million",
           "mn": "million", "million": "million", "b": "billion", "B": "billion", "bn": "billion",
           "billion": "billion", "t": "trillion", "T": "trillion", "tn": "trillion", "trillion": "trillion"}

# unit -> (singular, plural); matched case-sensitively after a number
_UNITS = {
    "°C": ("degree Celsius", "degrees Celsius"), "°F": ("degree Fahrenheit", "degrees Fahrenheit"),
    "℃": ("degree Celsius", "degrees Celsius"), "℉": ("degree Fahrenheit", "degrees Fahrenheit"),
    "°": ("degree", "degrees"),
    "km": ("kilometer", "kilometers"), "m": ("meter", "meters"), "cm": ("centimeter", "centimeters"),
    "mm": ("millimeter", "millimeters"), "µm": ("micrometer", "micrometers"), "nm": ("nanometer", "nanometers"),
    "mi": ("mile", "miles"), "ft": ("foot", "feet"), "yd": ("yard", "yards"),
    "kg": ("kilogram", "kilograms"), "g": ("gram", "grams"), "mg": ("milligram", "milligrams"),
    "lb": ("pound", "pounds"), "lbs": ("pound", "pounds"), "oz": ("ounce", "ounces"), "t": ("tonne", "tonnes"),
    "L": ("liter", "liters"), "l": ("liter", "liters"), "ml": ("milliliter", "milliliters"),
    "mL": ("milliliter", "milliliters"), "gal": ("gallon", "gallons"),
    "km/h": ("kilometer per hour", "kilometers per hour"), "kph": ("kilometer per hour", "kilometers per hour"),
    "mph": ("mile per hour", "miles per hour"), "m/s": ("meter per second", "meters per second"),
    "ms": ("millisecond", "milliseconds"), "s": ("second", "seconds"), "sec": ("second", "seconds"),
    "min": ("minute", "minutes"), "h": ("hour", "hours"), "hr": ("hour", "hours"), "hrs": ("hour", "hours"),
    "µs": ("microsecond", "microseconds"), "ns": ("nanosecond", "nanoseconds"),
    "Hz": ("hertz", "hertz"), "kHz": ("kilohertz", "kilohertz"), "MHz": ("megahertz", "megahertz"),
    "GHz": ("gigahertz", "gigahertz"), "W": ("watt", "watts"), "kW": ("kilowatt", "kilowatts"),
    "kWh": ("kilowatt hour", "kilowatt hours"), "MW": ("megawatt", "megawatts"), "V": ("volt", "volts"),
    "mAh": ("milliamp hour", "milliamp hours"), "KB": ("kilobyte", "kilobytes"), "kB": ("kilobyte", "kilobytes"),
    "MB": ("megabyte", "megabytes"), "GB": ("gigabyte", "gigabytes"), "TB": ("terabyte", "terabytes"),
    "Mbps": ("megabit per second", "megabits per second"), "Gbps": ("gigabit per second", "gigabits per second"),
    "dB": ("decibel", "decibels"), "px": ("pixel", "pixels"), "%": ("percent", "percent"),
    "‰": ("per mille", "per mille"),
}
_UNIT_ALT = "|".join(re.escape(u) for u in sorted(_UNITS, key=len, reverse=True))

_TITLES = {"Dr": "Doctor", "Mr": "Mister", "Mrs": "Missus", "Ms": "Miz", "Prof": "Professor", "Rev": "Reverend",
           "Gen": "General", "Capt": "Captain", "Sgt": "Sergeant", "Lt": "Lieutenant", "Col": "Colonel",
           "Gov": "Governor", "Sen": "Senator", "Rep": "Representative", "Hon": "Honorable", "Fr": "Father",
           "St": "Saint", "Mt": "Mount"}
_AFTER = {"Jr": "Junior", "Sr": "Senior", "St": "Street", "Ave": "Avenue", "Rd": "Road", "Blvd": "Boulevard",
          "Ln": "Lane", "Inc": "Incorporated", "Ltd": "Limited", "Corp": "Corporation", "Bros": "Brothers"}
_BEFORE_NUMBER = {"No": "number", "Nos": "numbers", "Fig": "figure", "Figs": "figures", "Vol": "volume",
                  "Ch": "chapter", "Sec": "section", "Eq": "equation", "Art": "article", "p": "page", "pp": "pages",
                  "~": "about", "≈": "about"}
_PHRASES = {"e.g.": "for example", "i.e.": "that is", "etc.": "et cetera", "vs.": "versus", "vs": "versus",
            "approx.": "approximately", "w/": "with", "w/o": "without", "a.k.a.": "also known as",
            "aka": "also known as", "&": "and", "@": "at", "+": "plus", "=": "equals", "×": "times"}

_SYMBOLS_IN_URL = {".": "dot", "/": "slash", "-": "dash", "_": "underscore", ":": "colon", "?": "question mark",
                   "=": "equals", "&": "and", "#": "hash", "@": "at", "~": "tilde", "+": "plus", "%": "percent"}
_TLDS = "com|org|net|io|ai|dev|edu|gov|co|uk|de|fr|app|info|me|tv|us|ca|au|ly|gg|xyz"

_NUM = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"


def _spell(word: str) -> str:
    """A URL or address part: words as they are, digits one by one, symbols named."""
    out = []
    for part in re.split(r"([^A-Za-z0-9])", word):
        if not part:
            continue
        if part in _SYMBOLS_IN_URL:
            out.append(_SYMBOLS_IN_URL[part])
        elif part.isascii() and part.isdigit():
            out.append(_digits(part))
        elif part.lower() == "www":
            out.append("w w w")
        elif part.isascii() and part.isalnum():
            out.append(part)
    return " ".join(out)


_KNOWN_TLD = re.compile(_TLDS, re.IGNORECASE)


def _url(m: re.Match) -> str | None:
    url = m.group(0)
    bare = not re.match(r"(?:https?|ftp)://|www\.", url, re.IGNORECASE)
    if bare and not _KNOWN_TLD.fullmatch(url.split("/", 1)[0].rsplit(".", 1)[-1]):
        return None  # 3.14.15, a.b.c: no address
    return _spell(re.sub(r"^(?:https?|ftp)://", "", url, flags=re.IGNORECASE).rstrip("/"))


def _email(m: re.Match) -> str:
    user, _, domain = m.group(0).partition("@")
    return f"{_spell(user)} at {_spell(domain)}"


def _phone(m: re.Match) -> str:
    groups = re.findall(r"\d+", m.group(0))
    lead = "plus " if m.group(0).startswith("+") else ""
    return lead + ", ".join(_digits(g) for g in groups)


def _ampm(s: str | None) -> str:
    if not s:
        return ""
    return " a m" if s.strip().lower().startswith("a") else " p m"


def _time(m: re.Match) -> str:
    h, mins, secs, suffix = int(m["h"]), int(m["min"]), m["sec"], m["ampm"]
    if h > 24 or mins > 59:
        return m.group(0)
    if mins == 0 and suffix:
        said = cardinal(h)
    elif mins == 0:
        said = f"{cardinal(h)} o'clock" if h <= 12 else f"{cardinal(h)} hundred"
    elif mins < 10:
        said = f"{cardinal(h)} oh {cardinal(mins)}"
    else:
        said = f"{cardinal(h)} {cardinal(mins)}"
    if secs:
        s = int(secs[1:])
        said += f" and {cardinal(s)} second{'s' if s != 1 else ''}"
    return said + _ampm(suffix)


def _hour(m: re.Match) -> str:
    h = int(m["h"])
    return m.group(0) if not 1 <= h <= 12 else cardinal(h) + _ampm(m["ampm"])


def _date(month: int, day: int, yr: str | None) -> str | None:
    if not (1 <= month <= 12 and 1 <= day <= 31):
        return None
    said = f"{_MONTHS[month - 1]} {ordinal(day)}"
    return f"{said}, {year(int(yr))}" if yr else said


def _iso_date(m: re.Match) -> str:
    return _date(int(m["m"]), int(m["d"]), m["y"]) or m.group(0)


def _slash_date(m: re.Match) -> str:
    a, b, y = int(m["a"]), int(m["b"]), m["y"]
    if len(y) == 2:
        y = ("20" if int(y) < 50 else "19") + y
    month, day = (a, b) if a <= 12 else (b, a)  # month first, as written in the US, unless it cannot be
    return _date(month, day, y) or m.group(0)


def _month_day(m: re.Match) -> str:
    said = _date(_MONTH_OF[m["mon"].rstrip(".").lower()], int(m["d"]), m["y"])
    return said or m.group(0)


def _day_month(m: re.Match) -> str:
    month = _MONTH_OF[m["mon"].rstrip(".").lower()]
    if not 1 <= int(m["d"]) <= 31:
        return m.group(0)
    the = "" if m.string[:m.start()].lower().endswith("the ") else "the "
    said = f"{the}{ordinal(int(m['d']))} of {_MONTHS[month - 1]}"
    return f"{said}, {year(int(m['y']))}" if m["y"] else said


def _money(cur: str, amount: str, scale: str | None) -> str:
    one, many, minor, minors = _CURRENCY[cur]
    amount = amount.replace(",", "")
    if scale:
        return f"{number(amount)} {_SCALES[scale.strip()]} {many}"
    whole, _, frac = amount.partition(".")
    units = int(whole or 0)
    said = f"{cardinal(units)} {one if units == 1 else many}"
    if len(frac) > 2:
        return f"{decimal(amount)} {many}"
    cents = int((frac + "0")[:2]) if frac else 0
    if cents:
        cent_words = f"{cardinal(cents)} {minor if cents == 1 else minors}"
        said = cent_words if units == 0 else f"{said} and {cent_words}"
    return said


def _money_rule(m: re.Match) -> str:  # the currency before the amount ($5) or after it (5 EUR)
    return _money(m["cur"], m["amt"], m["scale"])


def _range_or_number(a: str, b: str | None) -> tuple[str, bool]:
    """"40" / "40", "60" in words, and whether the last number is plural."""
    if b is None:
        return number(a), a not in ("1", "1.0")
    return f"{number(a)} to {number(b)}", True


def _with_unit(m: re.Match) -> str:
    said, plural = _range_or_number(m["a"], m["b"])
    one, many = _UNITS[m["unit"]]
    return f"{said} {many if plural else one}"


def _scaled(m: re.Match) -> str:
    return f"{number(m['a'])} {_SCALES[m['scale']]}"


def _number_range(m: re.Match) -> str:
    a, b = m["a"], m["b"]
    if re.fullmatch(r"1[1-9]\d\d|20\d\d", a) and re.fullmatch(r"1[1-9]\d\d|20\d\d|\d\d", b):
        return f"{year(int(a))} to {year(int(b)) if len(b) == 4 else cardinal(b)}"  # 1990-1995, 2024-25
    return f"{number(a)} to {number(b)}"


def _dotted(m: re.Match) -> str:
    """Versions, sections and addresses: 3.2.1 -> three point two point one; 192.168.1.1 with "dot"."""
    parts = m["n"].split(".")
    ip = len(parts) == 4 and all(p.isdigit() and int(p) < 256 for p in parts)
    said = (" dot " if ip else " point ").join(cardinal(p) for p in parts)
    return ("version " if m["v"] else "") + said


def _before_number(m: re.Match) -> str:
    """"No. 5" -> "number 5", "~5" -> "about 5" (the number is read by its own rule)."""
    return _BEFORE_NUMBER[m["t"] or m["s"]] + (" " if m["s"] else "")


def _ordinal(m: re.Match) -> str:
    return ordinal(int(m["n"].replace(",", "")))


def _decade(m: re.Match) -> str:
    digits = m["n"]
    if len(digits) == 2:
        return _plural_words(cardinal(int(digits)))
    return _plural_words(year(int(digits)))


_YEAR_CUES = r"(?:in|since|by|from|of|until|till|before|after|during|circa|around|year|early|late|mid|spring|" \
             r"summer|autumn|fall|winter)"


_YEAR_CUE = re.compile(r"(?<![\w])" + _YEAR_CUES + r"\s$", re.I)


def _year(m: re.Match) -> str:
    era = m.groupdict().get("era")
    return year(int(m["y"])) + (f" {era.replace('.', '').upper()}" if era else "")


def _cued_year(m: re.Match) -> str | None:
    """1000-1099 and 2000-2099 are years after "in", "since", ... (else numbers: "2048 rows")."""
    return _year(m) if _YEAR_CUE.search(m.string[max(0, m.start() - 12):m.start()]) else None


def _fraction(m: re.Match) -> str:
    a, b = int(m["a"]), int(m["b"])
    names = {2: ("half", "halves"), 4: ("quarter", "quarters")}
    if a >= b:  # "24/7", "9/5": no fraction a person would say
        return None
    if b in names:
        return f"{cardinal(a)} {names[b][0] if a == 1 else names[b][1]}"
    den = ordinal(b)
    return f"{cardinal(a)} {den if a == 1 else den + 's'}"


def _title(m: re.Match) -> str:
    return _TITLES[m["t"] or m["u"]]


def _after(m: re.Match) -> str:
    return _AFTER[m["t"]]


def _phrase(m: re.Match) -> str:
    said = _PHRASES[m.group(0)] if m.group(0) in _PHRASES else _PHRASES[m.group(0).lower()]
    return said if m.string[m.start() - 1:m.start()].isspace() or m.start() == 0 else f" {said} "  # R&D


def _number_sign(m: re.Match) -> str:
    return f"number {cardinal(m['n'])}"


def _times(m: re.Match) -> str:
    return f"{number(m['a'])} times"


def _by(m: re.Match) -> str:
    return f"{number(m['a'])} by {number(m['b'])}"


def _negative(m: re.Match) -> str:
    return "minus " + number(m["n"])


def _plain_number(m: re.Match) -> str:
    return number(m.group(0))


_CUR_SYM = r"US\$|[$€£¥₹₩]"
_CUR_CODE = r"USD|EUR|GBP|JPY|INR|CHF|CAD|AUD"
_SCALE = r"(?:\s?(?:thousand|million|billion|trillion)\b|(?:k|K|m|M|mn|b|B|bn|t|T|tn)(?![\w]))"

_TITLE_BARE = "Dr|Mr|Mrs|Ms"  # a title without its full stop only when it cannot be anything else
_TITLE_DOT = "|".join(t for t in _TITLES if t not in _TITLE_BARE.split("|"))
_ERA = r"(?:\s(?P<era>AD|BC|BCE|CE|A\.D\.|B\.C\.))"
_NUMBERS_AROUND = r"(?![\w]|[.,]\d)"  # the number ends here (not "1.5" or "1,000" read in two)

# English rules, tried in this order where matches start at the same place (the earlier wins).
_EN_RULES: list[tuple[re.Pattern, object]] = [(re.compile(p, f), fn) for p, f, fn in [
    (r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}(?![\w@])", 0, _email),
    # A bare host is taken whole at once (atomic: no backtracking through a long a.b.c...);
    # `_url` declines one whose last label is no known top-level domain.
    (r"(?<![\w@])(?:(?:https?|ftp)://[^\s<>\"]+|www\.[^\s<>\"]+|(?<![.-])(?>[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+)"
     r"(?:/[^\s<>\"]*)?)(?<![.,;:!?)\]'\"])(?![\w@])", 0, _url),
    (r"(?<![\w+])(?:\+\d{1,3}[\s.-]?)?(?:\(\d{3}\)\s?|\d{3}[\s.-])\d{3}[\s.-]\d{4}(?![\w])", 0, _phone),
    (r"(?<![\w])\+\d{1,3}(?:[\s.-]\d{2,4}){2,4}(?![\w])", 0, _phone),
    (r"(?<![\w.,-])\d{3}-\d{4}(?![\w]|[.,-]\d)", 0, _phone),
    (r"(?<![\w:.])(?P<h>\d{1,2}):(?P<min>\d{2})(?P<sec>:\d{2})?(?:\s?(?P<ampm>[AaPp]\.?[Mm]\.?(?![\w])))?(?![\w:])",
     0, _time),
    (r"(?<![\w:.])(?P<h>\d{1,2})\s?(?P<ampm>[AaPp]\.?[Mm]\.?)(?![\w])", 0, _hour),
    (r"(?<![\w/.-])(?P<y>\d{4})-(?P<m>\d{2})-(?P<d>\d{2})(?![\w-])", 0, _iso_date),
    (r"(?<![\w/.-])(?P<a>\d{1,2})/(?P<b>\d{1,2})/(?P<y>\d{4}|\d{2})(?![\w/])", 0, _slash_date),
    (r"(?<![\w])(?P<mon>" + _MONTH + r")\s(?P<d>\d{1,2})(?:st|nd|rd|th)?(?:,?\s(?P<y>\d{4}))?(?![\w])", 0,
     _month_day),
    (r"(?<![\w])(?P<d>\d{1,2})(?:st|nd|rd|th)?\s(?:of\s)?(?P<mon>" + _MONTH + r")(?:,?\s(?P<y>\d{4}))?(?![\w])", 0,
     _day_month),
    (r"(?<![\w])(?P<cur>" + _CUR_SYM + "|" + _CUR_CODE + r")\s?(?P<amt>" + _NUM + r")(?P<scale>" + _SCALE +
     r")?(?![\w])", 0, _money_rule),
    (r"(?<![\w.,])(?P<amt>" + _NUM + r")(?P<scale>" + _SCALE + r")?\s?(?P<cur>" + _CUR_CODE + r"|[€£¥₹₩])(?![\w])",
     0, _money_rule),
    (r"(?<![\w.,])'?(?P<n>\d0|1[1-9]\d0|20\d0)'?s(?![\w])", 0, _decade),
    (r"(?<![\w.,])(?P<a>-?" + _NUM + r")(?:(?:\s?[-–—]\s?|\sto\s)(?P<b>" + _NUM + r"))?\s?(?P<unit>" + _UNIT_ALT
     + r")(?![\w])", 0, _with_unit),
    (r"(?<![\w.,])(?P<n>\d{1,3}(?:,\d{3})+|\d+)(?:st|nd|rd|th)(?![\w])", 0, _ordinal),
    (r"(?<![\w.,])(?P<a>" + _NUM + r")\s?[-–—]\s?(?P<b>" + _NUM + r")" + _NUMBERS_AROUND, 0, _number_range),
    (r"(?<![\w.,])(?P<v>v)?(?P<n>\d+(?:\.\d+){2,})(?![\w]|\.\d)", 0, _dotted),
    (r"(?<![\w.])(?:(?P<t>No|Nos|Fig|Figs|Vol|Ch|Sec|Eq|Art|p|pp)\.|(?P<s>[~≈]))(?=\s?\d)", 0,
     _before_number),
    (r"(?<![\w.,])(?P<y>10\d\d|20\d\d)" + _ERA + r"?" + _NUMBERS_AROUND, 0, _cued_year),
    (r"(?<![\w.,])(?P<y>1[1-9]\d\d|[1-9]\d{0,3})" + _ERA + r"(?![\w])", 0, _year),
    (r"(?<![\w.,])(?P<y>1[1-9]\d\d)" + _NUMBERS_AROUND, 0, _year),
    (r"(?<![\w.,/])(?P<a>\d+)/(?P<b>[2-9]|10)(?![\w/]|[.,]\d)", 0, _fraction),
    (r"(?<![\w.,])(?P<a>" + _NUM + r")(?P<scale>k|K|M|bn|B)(?![\w])", 0, _scaled),
    (r"(?<![\w.,])(?P<a>" + _NUM + r")x(?![\w])", 0, _times),
    (r"(?<![\w.,])(?P<a>\d+)\s?[x×]\s?(?P<b>\d+)(?![\w])", 0, _by),
    (r"(?<![\w])#(?P<n>\d+)(?![\w])", 0, _number_sign),
    (r"(?:(?<=\s)|^)[-−](?P<n>" + _NUM + r")" + _NUMBERS_AROUND, 0, _negative),
    (r"(?<![\w.])(?:(?P<u>" + _TITLE_BARE + r")\.?|(?P<t>" + _TITLE_DOT + r")\.)(?=\s[A-Z])", 0, _title),
    (r"(?<=[A-Za-z],\s|[A-Za-z]{2}\s)(?P<t>" + "|".join(_AFTER) + r")\.?(?![\w])", 0, _after),
    (r"(?<![\w.])(?:e\.g\.|i\.e\.|etc\.|vs\.?|approx\.|w/o|w/|a\.k\.a\.|aka)(?![\w])", re.I, _phrase),
    (r"(?<=\w)&(?=\w)|(?<=\s)[&@+=×](?=\s)", 0, _phrase),
    (r"(?<![\w.,])" + _NUM + r"(?![\w])", 0, _plain_number),
]]


# Other languages: numbers only, in num2words' words for the language.
_ANY_NUMBER = re.compile(r"(?<![\w.,])-?" + _NUM + r"(?![\w])")


_SENTENCE_GOES_ON = re.compile(r"\s*$|\s+[\"'“‘(]?[A-Z]")


def _rule_matches(text: str, language: str) -> list[tuple[int, int, str]]:
    """The spans to rewrite, left to right, without overlaps: (start, end, spoken)."""
    found = []
    if language == "en":
        for rank, (pattern, fn) in enumerate(_EN_RULES):
            for m in pattern.finditer(text):
                if m.end() > m.start():
                    found.append((m.start(), rank, m, fn))
    else:
        found = [(m.start(), 0, m, lambda m: number(m.group(0), language)) for m in _ANY_NUMBER.finditer(text)]
    found.sort(key=lambda f: (f[0], f[1]))
    out, end = [], 0
    for start, _, m, fn in found:
        if start < end:
            continue
        said = _safely(fn, m)
        if said is None or said == m.group(0):
            continue
        if (m.group(0).endswith(".") and not said.endswith(".") and fn is not _title
                and _SENTENCE_GOES_ON.match(text, m.end())):
            said += "."  # "at 5 p.m. Then": the abbreviation's full stop also ended the sentence
        out.append((start, m.end(), said))
        end = m.end()
    return out


def _safely(fn, m: re.Match) -> str | None:
    """A rule's reading, or None when the match is not what the rule reads (a day 45, a year 0)."""
    try:
        return fn(m)
    except (ValueError, OverflowError, ArithmeticError, KeyError, IndexError, TypeError, NotImplementedError):
        return None


def _speakable(token: str) -> bool:
    return any(unicodedata.category(c)[0] in "LNS" for c in token)


def normalize(text: str, language: str = DEFAULT_LANGUAGE, lexicon=None) -> Spoken:
    """`text` as it is spoken, with its words mapped back (see the module's docstring); `lexicon`
    (a `Lexicon`) respells whole words of the spoken text afterwards."""
    language = check_language(language)
    rewrites = _rule_matches(text, language)
    tokens = [[m.start(), m.end()] for m in re.finditer(r"\S+", text)]
    # Words: tokens, merged where a rewrite spans several, and punctuation joining the word before.
    words: list[list[int]] = []
    j = 0  # the first rewrite that ends after the token (rewrites are sorted and apart)
    for s, e in tokens:
        while j < len(rewrites) and rewrites[j][1] <= s:
            j += 1
        inside = j < len(rewrites) and rewrites[j][0] < s  # a rewrite began in an earlier token
        if words and (inside or not _speakable(text[s:e])):
            words[-1][1] = e
        else:
            words.append([s, e])
    if len(words) > 1 and not _speakable(text[words[0][0]:words[0][1]]):
        words[1][0] = words[0][0]
        words.pop(0)
    out: list[Word] = []
    i = 0
    for s, e in words:
        parts, at = [], s
        while i < len(rewrites) and rewrites[i][0] < e:
            rs, re_, said = rewrites[i]
            parts += [text[at:rs], said]
            at = re_
            i += 1
        parts.append(text[at:e])
        spoken = "".join(parts)
        if lexicon is not None:
            spoken = lexicon.apply(spoken)
        out.append(Word(text[s:e], s, e, spoken))
    pieces, at = [], 0
    for w in out:
        pieces += [text[at:w.start], w.spoken]
        at = w.end
    pieces.append(text[at:])
    return Spoken("".join(pieces), tuple(out))


def verbatim(text: str) -> Spoken:
    """`text` spoken as given: one word per whitespace-separated token."""
    return Spoken(text, tuple(Word(m.group(0), m.start(), m.end(), m.group(0)) for m in re.finditer(r"\S+", text)))
