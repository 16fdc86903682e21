"""Normalisation: written forms read as spoken ones, words mapped back, and no input that breaks it."""

import pytest
from hypothesis import given, settings, strategies as st

from fastcsm.speech.lexicon import Lexicon
from fastcsm.speech.normalize import normalize, verbatim

# (written, spoken): real-world strings, each with the form a person reads aloud.
CASES = [
    ('I have 3 apples.', 'I have three apples.'),
    ('There are 1,234 people.', 'There are one thousand two hundred and thirty-four people.'),
    ('It weighs 0.5 kg.', 'It weighs zero point five kilograms.'),
    ('Pi is about 3.14159.', 'Pi is about three point one four one five nine.'),
    ('The temperature is -5 degrees.', 'The temperature is minus five degrees.'),
    ('She finished 1st.', 'She finished first.'),
    ('He came in 22nd place.', 'He came in twenty-second place.'),
    ('The 3rd time.', 'The third time.'),
    ('Her 101st birthday.', 'Her one hundred and first birthday.'),
    ('The 1990s were great.', 'The nineteen nineties were great.'),
    ("Back in the '80s.", 'Back in the eighties.'),
    ('The 60s.', 'The sixties.'),
    ('In 1984 things changed.', 'In nineteen eighty-four things changed.'),
    ('Built in 1066.', 'Built in ten sixty-six.'),
    ('Since 2008 we have grown.', 'Since two thousand eight we have grown.'),
    ('Born in 2000.', 'Born in two thousand.'),
    ('By 2050, maybe.', 'By twenty fifty, maybe.'),
    ('It was 2024.', 'It was two thousand and twenty-four.'),
    ('The year 1999 ended.', 'The year nineteen ninety-nine ended.'),
    ('44 BC was a bad year.', 'forty-four BC was a bad year.'),
    ('Meet me at 3:30.', 'Meet me at three thirty.'),
    ('The train leaves at 14:45.', 'The train leaves at fourteen forty-five.'),
    ('Wake up at 7am.', 'Wake up at seven a m.'),
    ('Lunch at 12:00 p.m. sharp', 'Lunch at twelve p m sharp'),
    ('It is 9:05 AM now.', 'It is nine oh five a m now.'),
    ('The meeting is at 10:00.', "The meeting is at ten o'clock."),
    ('Meet at 10:30pm. Then go.', 'Meet at ten thirty p m. Then go.'),
    ('On 2024-03-15 we launch.', 'On March fifteenth, twenty twenty-four we launch.'),
    ('Due 12/25/2023.', 'Due December twenty-fifth, twenty twenty-three.'),
    ('From 25/12/2023 onwards.', 'From December twenty-fifth, twenty twenty-three onwards.'),
    ('Born on March 15, 1984.', 'Born on March fifteenth, nineteen eighty-four.'),
    ('On Jan. 5 we met.', 'On January fifth we met.'),
    ('On 4 July 1776 it began.', 'On the fourth of July, seventeen seventy-six it began.'),
    ('The 1st of May.', 'The first of May.'),
    ('It costs $5.', 'It costs five dollars.'),
    ('It costs $3.50.', 'It costs three dollars and fifty cents.'),
    ('It costs $1.', 'It costs one dollar.'),
    ('Only $0.99 today.', 'Only ninety-nine cents today.'),
    ('A $2.5 million deal.', 'A two point five million dollars deal.'),
    ('They raised $10M.', 'They raised ten million dollars.'),
    ('Pay €20 now.', 'Pay twenty euros now.'),
    ('That is £3.75 please.', 'That is three pounds and seventy-five pence please.'),
    ('Tickets cost ¥1000.', 'Tickets cost one thousand yen.'),
    ('Send 50 USD.', 'Send fifty dollars.'),
    ('Send USD 50.', 'Send fifty dollars.'),
    ('Prices rose 12%.', 'Prices rose twelve percent.'),
    ('Interest is 3.5%.', 'Interest is three point five percent.'),
    ('Up 40–60% this year.', 'Up forty to sixty percent this year.'),
    ('Set it to 40–60 °C.', 'Set it to forty to sixty degrees Celsius.'),
    ('Bake at 180°C.', 'Bake at one hundred and eighty degrees Celsius.'),
    ('It is 72°F outside.', 'It is seventy-two degrees Fahrenheit outside.'),
    ('Turn 90° left.', 'Turn ninety degrees left.'),
    ('Run 5 km today.', 'Run five kilometers today.'),
    ('He is 6 ft tall.', 'He is six feet tall.'),
    ('Drive at 60 mph.', 'Drive at sixty miles per hour.'),
    ('The file is 2.5 GB.', 'The file is two point five gigabytes.'),
    ('A 3 GHz CPU.', 'A three gigahertz CPU.'),
    ('Wait 250 ms.', 'Wait two hundred and fifty milliseconds.'),
    ('Lift 20 kg.', 'Lift twenty kilograms.'),
    ('Drink 500 ml of water.', 'Drink five hundred milliliters of water.'),
    ('It weighs 1 kg.', 'It weighs one kilogram.'),
    ('Call (555) 123-4567.', 'Call five five five, one two three, four five six seven.'),
    ('Call 555-123-4567 now.', 'Call five five five, one two three, four five six seven now.'),
    ('Dial +1 555 123 4567.', 'Dial plus one, five five five, one two three, four five six seven.'),
    ('Ring +44 20 7946 0958 today.', 'Ring plus four four, two zero, seven nine four six, zero nine five eight today.'),
    ('My extension is 555-0199.', 'My extension is five five five, zero one nine nine.'),
    ('Visit https://www.example.com.', 'Visit w w w dot example dot com.'),
    ('Go to example.com/docs now.', 'Go to example dot com slash docs now.'),
    ('See www.python.org for more.', 'See w w w dot python dot org for more.'),
    ('Read https://github.com/sesame/csm.', 'Read github dot com slash sesame slash csm.'),
    ('Email me at jane.doe@example.com.', 'Email me at jane dot doe at example dot com.'),
    ('Write to support@fastcsm.dev today.', 'Write to support at fastcsm dot dev today.'),
    ('Dr. Smith is here.', 'Doctor Smith is here.'),
    ('Mr. Brown and Mrs. Green.', 'Mister Brown and Missus Green.'),
    ('Ms. Lee called.', 'Miz Lee called.'),
    ('Prof. Xavier teaches.', 'Professor Xavier teaches.'),
    ('He lives on Main St.', 'He lives on Main Street.'),
    ('Visit St. Louis soon.', 'Visit Saint Louis soon.'),
    ('Martin Luther King Jr. spoke.', 'Martin Luther King Junior spoke.'),
    ('Apples, pears, etc.', 'Apples, pears, et cetera.'),
    ('Fruit, e.g. apples.', 'Fruit, for example apples.'),
    ('One thing, i.e. this one.', 'One thing, that is this one.'),
    ('Cats vs. dogs.', 'Cats versus dogs.'),
    ('It is approx. 5 meters.', 'It is approximately five meters.'),
    ('R&D is costly.', 'R and D is costly.'),
    ('Salt & pepper.', 'Salt and pepper.'),
    ('2 + 2 = 4.', 'two plus two equals four.'),
    ('Page #1 of the list.', 'Page number one of the list.'),
    ('It is 3x faster.', 'It is three times faster.'),
    ('We have 5k users.', 'We have five thousand users.'),
    ('Half is 1/2.', 'Half is one half.'),
    ('Three quarters is 3/4.', 'Three quarters is three quarters.'),
    ('Pages 10-20 are missing.', 'Pages ten to twenty are missing.'),
    ('From 1990-1995 it grew.', 'From nineteen ninety to nineteen ninety-five it grew.'),
    ('The score was 3-2.', 'The score was three to two.'),
    ('A 10-day trip.', 'A ten-day trip.'),
    ('Version 3.11 is out.', 'Version three point one one is out.'),
    ('It has 42 parts.', 'It has forty-two parts.'),
    ('Over 1000000 views.', 'Over one million views.'),
    ('Account 12345678901234567890 is closed.',
     'Account ' + 'one two three four five six seven eight nine zero ' * 2 + 'is closed.'),
    ('Zero is 0.', 'Zero is zero.'),
    ('The answer is 42!', 'The answer is forty-two!'),
    ('Nothing to change here.', 'Nothing to change here.'),
    ('Hello, world.', 'Hello, world.'),
    ('Apollo 11 landed.', 'Apollo eleven landed.'),
    ('COVID-19 spread.', 'COVID-nineteen spread.'),
    ("I'm 25 years old.", "I'm twenty-five years old."),
    ('It takes 2-3 hours.', 'It takes two to three hours.'),
    ('Lower it by 0.25.', 'Lower it by zero point two five.'),
    ('He scored 99.9 points.', 'He scored ninety-nine point nine points.'),
    ('It costs $1,250,000.', 'It costs one million two hundred and fifty thousand dollars.'),
    ('Gen Z likes it.', 'Gen Z likes it.'),
    ('Plan B works.', 'Plan B works.'),
    ('Section 3.2.1 explains it.', 'Section three point two point one explains it.'),
    ('Ping 192.168.1.1 first.',
     'Ping one hundred and ninety-two dot one hundred and sixty-eight dot one dot one first.'),
    ('Install v2.0.1 today.', 'Install version two point zero point one today.'),
    ('Agent 007 is back.', 'Agent zero zero seven is back.'),
    ('In 2024-25 we grew.', 'In twenty twenty-four to twenty-five we grew.'),
    ('See No. 5 and Fig. 3.', 'See number five and figure three.'),
    ('We expect ~5 people.', 'We expect about five people.'),
    ('It is 5:00.', "It is five o'clock."),
    ('Revenue hit 3.5M.', 'Revenue hit three point five million.'),
    ('Room 101 is empty.', 'Room one hundred and one is empty.'),
]


@pytest.mark.parametrize("written, spoken", CASES, ids=[c[0] for c in CASES])
def test_written_forms_are_read_as_spoken(written, spoken):
    assert normalize(written).text == spoken


def test_the_table_is_large():
    assert len(CASES) >= 100


@pytest.mark.parametrize("written, spoken", CASES, ids=[c[0] for c in CASES])
def test_spoken_text_is_a_fixed_point(written, spoken):
    assert normalize(spoken).text == spoken


def test_text_no_rule_touches_comes_back_unchanged_whitespace_included():
    text = "  Hello,\tworld.\n\nHow  are you? "
    assert normalize(text).text == text


def test_a_rule_spanning_several_words_stays_one_word():
    words = normalize("Set it to 40–60 °C, please.").words
    assert [w.text for w in words] == ["Set", "it", "to", "40–60 °C,", "please."]
    assert words[3].spoken == "forty to sixty degrees Celsius,"


def test_words_map_back_to_the_written_text():
    text = "On 2024-03-15 pay $3.50 — or call (555) 123-4567!"
    spoken = normalize(text)
    assert all(text[w.start:w.end] == w.text for w in spoken.words)
    assert " ".join(w.text for w in spoken.words) == " ".join(text.split())
    assert " ".join(w.spoken for w in spoken.words) == " ".join(spoken.text.split())


def test_punctuation_alone_joins_the_word_before():
    assert [w.text for w in normalize("Wait — what?").words] == ["Wait —", "what?"]


def test_other_languages_read_numbers_in_their_own_words():
    assert normalize("Es kostet 21 Euro.", "de").text == "Es kostet einundzwanzig Euro."
    assert normalize("Il a 3 chats.", "fr").text == "Il a trois chats."
    with pytest.raises(ValueError, match="num2words"):
        normalize("1", "klingon")


def test_verbatim_keeps_the_text_and_has_a_word_per_token():
    spoken = verbatim("It costs $3.50 now.")
    assert spoken.text == "It costs $3.50 now."
    assert [w.spoken for w in spoken.words] == ["It", "costs", "$3.50", "now."]


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_never_raises_and_maps_every_word(text):
    spoken = normalize(text)
    assert isinstance(spoken.text, str)
    assert all(text[w.start:w.end] == w.text for w in spoken.words)
    assert [w.start for w in spoken.words] == sorted(w.start for w in spoken.words)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from("0123456789 ,.-–/:$€£%°Ckmh@#&+x'apstndrMBe")))
def test_never_raises_on_number_soup(text):
    normalize(text, lexicon=Lexicon({"km": "kay em"}))
