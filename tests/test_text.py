"""Splitting long text: sentences first, then clauses, then words; never inside a word."""

import pytest

from fastcsm.speech.text import sentences, split_text


def test_short_text_is_returned_untouched():
    text = "  Hello,   there!  "
    assert split_text(text, 200) == [text]


def test_sentences_respect_abbreviations_quotes_and_paragraphs():
    text = 'Mr. Smith met Dr. J. Doe. She said "hello there." Then left!\n\nNew paragraph without a stop\nsame one.'
    assert sentences(text) == [
        "Mr. Smith met Dr. J. Doe.",
        'She said "hello there."',
        "Then left!",
        "New paragraph without a stop same one.",
    ]


def test_pieces_pack_whole_sentences_up_to_the_limit():
    text = "One two. Three four five. Six. Seven eight nine ten eleven."
    pieces = split_text(text, 26)
    assert pieces == ["One two. Three four five.", "Six. Seven eight nine ten", "eleven."]
    assert " ".join(pieces).split() == text.split(), "no word is lost, added or cut"


def test_long_sentence_splits_at_clauses_then_words():
    text = "First clause here, second clause there; third part: and a final clause that is long enough."
    pieces = split_text(text, 40)
    assert pieces[0] == "First clause here, second clause there;"
    assert all(len(p) <= 40 for p in pieces)
    assert " ".join(pieces).split() == text.split()


def test_a_word_longer_than_the_limit_stays_whole():
    word = "x" * 50
    assert split_text(f"short {word} end.", 20) == ["short", word, "end."]


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_bad_limits_are_refused(bad):
    with pytest.raises(ValueError, match="max_chars"):
        split_text("Some text.", bad)
