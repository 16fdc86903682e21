"""The assistant layer: speakable text, heard-only history, the language model client and the turn
driver, against the stand-in model server over real HTTP with the real `openai` SDK."""

import asyncio
import random
import socket

import pytest

from fastcsm.assistant import (
    Assistant,
    HeardPiece,
    History,
    LanguageModel,
    LLMConfig,
    LLMStatusError,
    LLMStopped,
    LLMTimeout,
    LLMUnreachable,
    PieceCutter,
    Speakable,
    heard_text,
)
from fastcsm.assistant.history import CUT
from fastcsm.assistant.llm import load_system_prompt
from fastcsm.assistant.speakable import is_stage_direction
from fastcsm.speech.text import speech_pieces
from fastcsm.testing_llm import Scripted, StandInLLM, tokens

pytest.importorskip("openai")

# -- speakable text -------------------------------------------------------------------------------

SPEAKABLE = [  # (model output, what is spoken)
    ("Hello there! How are you?", "Hello there! How are you?"),
    ("# Title\nSome **bold** and *italic* text.", "Title.\nSome bold and italic text."),
    ("## Steps:\n- apples\n- pears!\n1. one\n2) two", "Steps:\napples.\npears!\none.\ntwo."),
    ("*laughs* That's funny. (sighs) Okay [pause] then.", "That's funny. Okay then."),
    ("Well, *clears throat*, yes.", "Well, yes."),
    ("Well, *laughs*.", "Well."),
    ("I *really* like __this__ and ~~that~~ one.", "I really like this and that one."),
    ("Use the `print` function.\n```python\nprint('hi')\n```\nDone.", "Use the print function.\n\nDone."),
    ("Code:\n~~~\nx = 1\n~~~", "Code:\n\n"),
    ("See [the docs](https://example.com/a_b?c=1) now. ![a cat](cat.png) Ok.", "See the docs now. Ok."),
    ("Great job 🎉👍🏽! Really ❤️. Flags 🇫🇷 too.", "Great job! Really. Flags too."),
    ("| Name | Age |\n|---|:--:|\n| **Bob** | 3 |\nAfter.", "Name, Age.\n\nBob, 3.\nAfter."),
    ("The meeting (at noon) is fine, snake_case stays.", "The meeting (at noon) is fine, snake_case stays."),
    ("> quoted text\n---\n***\nNext.", "quoted text\n\n\nNext."),
    ("1990 was a year. 3.5 is a number. 42.", "1990 was a year. 3.5 is a number. 42."),
    ("A [1] citation and [an aside] go.", "A citation and go."),
    ("Nodding *nods slowly* and (in a whisper) this.", "Nodding and this."),
    ("An unclosed *star and (paren here", "An unclosed star and (paren here"),
    ("2 * 3 is six; done!", "2 3 is six; done!"),
]


def _outputs(text: str, **kw) -> set[str]:
    """What the filter says of `text` given whole, cut once at every position, and a character a delta."""
    outs = set()
    for i in range(len(text) + 1):
        f = Speakable(**kw)
        outs.add(f.feed(text[:i]) + f.feed(text[i:]) + f.finish())
    f = Speakable(**kw)
    outs.add("".join(f.feed(c) for c in text) + f.finish())
    return outs


@pytest.mark.parametrize("raw, spoken", SPEAKABLE, ids=[r[0][:24] for r in SPEAKABLE])
def test_speakable_rules_hold_however_the_text_is_cut(raw, spoken):
    assert _outputs(raw) == {spoken}


def test_speakable_output_is_the_same_however_markdown_is_cut():
    """Random replies built of words, marks and spans: one output for every cut."""
    parts = ["Hello", " there", " word", ". ", ", ", "! ", "?", "**bold**", " *laughs* ", "(sighs)", " (at noon)",
             "[link](http://x.y/z)", " `code` ", " _em_ ", " [pause] ", "🎉", "\n- ", "\n# ", "\n1. ", "\n\n",
             "\n```\ncode\n```\n", "\n| a | b |\n|---|---|\n| c | d |\n"]
    rng = random.Random(0)
    for _ in range(150):
        text = "".join(rng.choice(parts) for _ in range(rng.randint(1, 10)))
        assert len(_outputs(text)) == 1, text


def test_piece_cutter_gives_the_pieces_of_the_whole_reply_as_they_complete():
    rng = random.Random(1)
    words = ["Hello", "there", "friend,", "this is", "a sentence.", "Dr. Who", "**said**", "*laughs*", "so:",
             "ok!", "- item", "\n\n", "really long clause words here and more,", "yes?"]
    for _ in range(100):
        reply = " ".join(rng.choice(words) for _ in range(rng.randint(1, 14)))
        whole = Speakable()
        expected = speech_pieces(whole.feed(reply) + whole.finish())
        f = Speakable()
        cutter = PieceCutter(f)
        got, i = [], 0
        while i < len(reply):
            n = rng.randint(1, 6)
            got += cutter.update(f.feed(reply[i:i + n]), final=False)
            i += n
        got += cutter.update(f.finish(), final=True)
        assert got == expected, reply


def test_speakable_holds_back_only_undecided_spans():
    f = Speakable()
    assert f.feed("Hello there, my") == "Hello there, my"  # plain text at once (the space is held)
    assert f.feed(" *la") == ""  # a span that may be a stage direction waits
    assert f.feed("ughs* friend") == " friend"
    assert f.feed("\n- ") == "\n"  # a line's marks wait for its first word
    assert f.feed("item") == "item"
    assert f.finish() == "."
    assert f.text == "Hello there, my friend\nitem."


def test_stage_directions_are_sounds_and_gestures():
    assert all(is_stage_direction(s) for s in ("laughs", "sighs", "clears throat", "nodding", "sobbing",
                                               "in a whisper", "smiles warmly", "giggled"))
    assert not any(is_stage_direction(s) for s in ("really", "at noon", "see below", "",
                                                   "one two three four five six seven eight laughs"))


def test_reply_bound_ends_at_the_next_sentence_end():
    text = "One two three. Four five six. Seven eight nine."
    assert _outputs(text, max_chars=10) == {"One two three."}
    assert _outputs(text, max_chars=14) == {"One two three."}
    assert _outputs(text, max_chars=15) == {"One two three. Four five six."}
    assert _outputs(text, max_chars=1000) == {text}
    run_on = "one two three four five six seven eight nine ten."
    assert _outputs(run_on, max_chars=10, overrun_chars=10) == {"one two three four"}  # cut after a whole word
    f = Speakable(max_chars=5)
    f.feed("Hi there. More")
    assert f.full and f.feed(" text.") == "" and f.finish() == "" and f.text == "Hi there."
    with pytest.raises(ValueError, match="max_chars"):
        Speakable(max_chars=0)


# -- history --------------------------------------------------------------------------------------


def test_heard_text_keeps_played_pieces_and_the_words_the_frames_cover():
    a, b, c = "One two three four.", "Five six seven eight nine ten.", "Eleven."
    assert heard_text([HeardPiece(a, 20, 20), HeardPiece(b, 30, 30)]) == (f"{a} {b}", False)
    # b's 30 frames, 18 sent: floor(18 / 30 * 6 words) = 3 words; c was never heard
    assert heard_text([HeardPiece(a, 20, 20), HeardPiece(b, 18, 30), HeardPiece(c, 0, None)]) == \
        ("One two three four. Five six seven", True)
    # b cut while generated (length unknown): a's rate, 20 frames / 4 words = 5 frames a word; 14 frames: 2 words
    assert heard_text([HeardPiece(a, 20, 20), HeardPiece(b, 14, None)])[0] == f"{a} Five six"
    # no piece played whole: the default rate (5 frames a word), never more words than the piece has
    assert heard_text([HeardPiece(b, 11, None)]) == ("Five six", True)
    assert heard_text([HeardPiece(a, 500, None)]) == (a, True)
    assert heard_text([HeardPiece(a, 0, 20)]) == ("", True)
    assert heard_text([]) == ("", False)


def test_history_alternates_keeps_what_was_heard_and_drops_the_oldest():
    h = History("Be brief.", max_chars=60)
    h.user("Hi")
    assert h.assistant_heard([HeardPiece("Hello there. How are you?", 10, 40)]) == f"Hello {CUT}"
    h.user("Fine")
    h.assistant_heard([HeardPiece("Good.", 0, None)])  # nothing heard: no assistant turn
    h.user("  and   you? ")
    assert h.messages() == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                            {"role": "assistant", "content": f"Hello {CUT}"},
                            {"role": "user", "content": "Fine and you?"}]
    h.assistant("I am well, thank you for asking, it is kind of you.")
    assert [t["role"] for t in h.messages()] == ["system", "user", "assistant"]  # opens with the user
    assert h.turns[0]["content"] == "Fine and you?"
    h.messages()[1]["content"] = "changed"
    assert h.turns[0]["content"] == "Fine and you?"  # messages are copies


# -- the stand-in and the client ------------------------------------------------------------------


def _model(server: StandInLLM, **kw) -> LanguageModel:
    return LanguageModel(LLMConfig(server.url, "stand-in", **kw))


async def _collect(reply) -> list[str]:
    return [d async for d in reply]


def test_stand_in_speaks_the_openai_protocol_streamed_and_whole():
    import openai

    text = "Hi! I am a stand-in, speaking tokens."
    with StandInLLM([text], tokens_per_s=1000) as server:
        async def run():
            client = openai.AsyncOpenAI(base_url=server.url, api_key="k", max_retries=0)
            whole = await client.chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}])
            stream = await client.chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}],
                                                          stream=True)
            chunks = [c async for c in stream]
            models = await client.models.list()
            await client.close()
            return whole, chunks, models

        whole, chunks, models = asyncio.run(run())
    assert whole.choices[0].message.content == text and whole.choices[0].finish_reason == "stop"
    deltas = [c.choices[0].delta.content for c in chunks if c.choices[0].delta.content]
    assert deltas == tokens(text) and "".join(deltas) == text
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert [m.id for m in models.data] == ["stand-in"]
    assert len(server.requests) == 2 and server.requests[1]["stream"] is True


def test_reply_streams_deltas_and_sends_the_messages():
    with StandInLLM(["Hello there. How can I help?"], tokens_per_s=500) as server:
        async def run():
            model = _model(server, api_key="secret")
            reply = model.reply([{"role": "user", "content": "hi"}])
            deltas = await _collect(reply)
            await model.close()
            return reply, deltas

        reply, deltas = asyncio.run(run())
    assert deltas == ["Hello ", "there. ", "How ", "can ", "I ", "help?"]
    assert reply.text == "Hello there. How can I help?" and reply.finish_reason == "stop"
    assert server.requests[0]["messages"] == [{"role": "user", "content": "hi"}]
    assert server.requests[0]["model"] == "stand-in" and server.requests[0]["stream"] is True


def test_cancel_closes_the_connection_and_a_finished_reply_keeps_it_pooled():
    long = " ".join(f"word{i}" for i in range(200))
    with StandInLLM(["Short.", long], tokens_per_s=100) as server:
        async def run():
            model = _model(server)
            done = await _collect(model.reply([{"role": "user", "content": "a"}]))
            pooled = await asyncio.to_thread(server.wait_connections, 1)  # a finished reply's connection stays
            reply = model.reply([{"role": "user", "content": "b"}])
            got = [await reply.__anext__(), await reply.__anext__()]
            await reply.cancel()
            after = await asyncio.to_thread(server.wait_connections, 0)  # the client is still open
            rest = await _collect(reply)
            await reply.cancel()  # twice: nothing
            await model.close()
            return done, pooled, got, after, rest, reply

        done, pooled, got, after, rest, reply = asyncio.run(run())
    assert done == ["Short."] and pooled == 1
    assert got == ["word0 ", "word1 "] and after == 0 and rest == [] and reply.cancelled


def test_cancel_before_the_first_token_abandons_the_request():
    with StandInLLM([Scripted("Late.", first_token_s=30)]) as server:
        async def run():
            model = _model(server, first_token_timeout_s=60)
            reply = model.reply([{"role": "user", "content": "a"}])
            waiting = asyncio.ensure_future(_collect(reply))
            await asyncio.to_thread(server.wait_connections, 1)
            await reply.cancel()  # from another task, while the first is waiting
            deltas = await waiting
            after = await asyncio.to_thread(server.wait_connections, 0)
            await model.close()
            return deltas, after

        assert asyncio.run(run()) == ([], 0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fault(server_or_url, got=None, **kw):
    """A coroutine function that asks the model and adds each delta to `got`."""
    got = [] if got is None else got

    async def run():
        url = server_or_url if isinstance(server_or_url, str) else server_or_url.url
        model = LanguageModel(LLMConfig(url, "stand-in", **kw))
        try:
            async for d in model.reply([{"role": "user", "content": "a"}]):
                got.append(d)
        finally:
            await model.close()
        return got

    return run


def test_faults_are_clear_errors():
    with pytest.raises(LLMUnreachable, match="cannot reach the language model at http://127.0.0.1:"):
        asyncio.run(_fault(f"http://127.0.0.1:{_free_port()}/v1")())
    replies = [Scripted(status=500), Scripted(status=401), Scripted(hang=True), Scripted("Slow.", first_token_s=5),
               Scripted("One two three four five.", stop_after=3)]
    with StandInLLM(replies, tokens_per_s=1000) as server:
        with pytest.raises(LLMStatusError, match="answered 500: scripted failure 500") as e:
            asyncio.run(_fault(server)())
        assert e.value.status == 500
        with pytest.raises(LLMStatusError) as e:
            asyncio.run(_fault(server)())
        assert e.value.status == 401
        with pytest.raises(LLMTimeout, match="no reply within 0.3 s"):
            asyncio.run(_fault(server, first_token_timeout_s=0.3)())
        assert server.wait_connections(0) == 0  # the hung request's connection is closed
        with pytest.raises(LLMTimeout, match="no reply within 0.3 s"):
            asyncio.run(_fault(server, first_token_timeout_s=0.3)())
        got = []
        with pytest.raises(LLMStopped, match="broke off"):
            asyncio.run(_fault(server, got)())
        assert got == ["One ", "two ", "three "] and server.wait_connections(0) == 0
    with StandInLLM([Scripted("One two three four.", stall_after=2)], tokens_per_s=1000) as server:
        got = []
        with pytest.raises(LLMTimeout, match="went silent for more than 0.3 s"):
            asyncio.run(_fault(server, got, stall_timeout_s=0.3)())
        assert got == ["One ", "two "] and server.wait_connections(0) == 0


def test_a_slow_model_holds_up_only_its_own_reply():
    def script(messages):
        slow = messages[-1]["content"] == "slow"
        return Scripted("Slow answer.", first_token_s=30) if slow else Scripted("Fast answer.")

    with StandInLLM(script, tokens_per_s=200) as server:
        async def run():
            model = _model(server, first_token_timeout_s=60)
            slow = model.reply([{"role": "user", "content": "slow"}])
            slow_first = asyncio.ensure_future(slow.__anext__())
            fast = await _collect(model.reply([{"role": "user", "content": "fast"}]))
            state = slow_first.done()
            await slow.cancel()
            with pytest.raises(StopAsyncIteration):
                await slow_first
            await model.close()
            return fast, state

        assert asyncio.run(run()) == (["Fast ", "answer."], False)


def test_config_and_system_prompt_checks(tmp_path):
    with pytest.raises(ValueError, match="http:// or https://"):
        LLMConfig("localhost:8080", "m")
    with pytest.raises(ValueError, match="name must be given"):
        LLMConfig("http://localhost:8080/v1", " ")
    with pytest.raises(ValueError, match="first_token_timeout_s must be a positive"):
        LLMConfig("http://localhost:8080/v1", "m", first_token_timeout_s=0)
    (tmp_path / "p.txt").write_text("  You are kind.\n")
    assert load_system_prompt(f"@{tmp_path}/p.txt") == "You are kind."
    assert load_system_prompt("Be brief.") == "Be brief." and load_system_prompt(None) == ""
    with pytest.raises(ValueError, match="cannot be read"):
        load_system_prompt(f"@{tmp_path}/missing.txt")


def test_server_settings_name_the_model(tmp_path, monkeypatch):
    from fastcsm.cli import build_parser
    from fastcsm.server.settings import Settings, settings_from_args

    (tmp_path / "p.txt").write_text("Be brief.")
    monkeypatch.setenv("FASTCSM_LLM_URL", "http://127.0.0.1:9/v1")
    monkeypatch.setenv("FASTCSM_LLM_API_KEY", "sk-1")
    args = build_parser().parse_args(["serve", "--llm-model", "llama", "--system-prompt", f"@{tmp_path}/p.txt",
                                      "--llm-timeout-s", "2.5"])
    config = LLMConfig.from_settings(settings_from_args(args))
    assert config == LLMConfig("http://127.0.0.1:9/v1", "llama", "sk-1", "Be brief.", 2.5, 2.5)
    assert LLMConfig.from_settings(Settings()) is None
    for fields, message in [({"llm_url": "ftp://x"}, "llm_url must be an http:// or https:// URL"),
                            ({"llm_url": "http://x/v1"}, r"llm_model must name the model .* \(--llm-model"),
                            ({"llm_api_key": ""}, "llm_api_key must not be empty"),
                            ({"system_prompt": "@/no/such"}, "cannot be read"),
                            ({"max_reply_chars": 0}, "max_reply_chars must be at least 1")]:
        with pytest.raises(ValueError, match=message):
            Settings(**fields)


# -- the turn driver ------------------------------------------------------------------------------


def test_assistant_speaks_pieces_as_they_complete_and_remembers_the_reply():
    first = ("**Sure!** *smiles* The answer is simple: water boils at a hundred degrees, at sea level, "
             "and lower up a mountain.\n\n- One more thing 🎉")
    with StandInLLM([first, "Second reply."], tokens_per_s=1000) as server:
        async def run():
            model = _model(server, system_prompt="Be brief.")
            assistant = Assistant(model)
            turn = assistant.turn("When does water boil?")
            pieces = [p async for p in turn]
            kept = turn.finish()
            second = assistant.turn("Thanks")
            [p async for p in second]
            await model.close()
            return turn, pieces, kept

        turn, pieces, kept = asyncio.run(run())
    spoken = Speakable()
    clean = spoken.feed(first) + spoken.finish()
    assert pieces == speech_pieces(clean) == ["Sure!", "The answer is simple: water boils at a hundred degrees,",
                                              "at sea level, and lower up a mountain.", "One more thing."]
    assert speech_pieces(" ".join(pieces), final=False) == pieces[:-1]  # a line fed them splits them alike
    assert speech_pieces(" ".join(pieces)) == pieces
    assert turn.reason == "stop" and kept == " ".join(pieces)
    assert turn.first_token_at is not None and turn.first_piece_at >= turn.first_token_at
    assert server.requests[1]["messages"] == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "When does water boil?"},
        {"role": "assistant", "content": " ".join(pieces)}, {"role": "user", "content": "Thanks"}]


def test_each_piece_comes_out_before_the_model_writes_the_next():
    with StandInLLM(["First sentence here. Second one follows. Third."], tokens_per_s=1000) as server:
        async def run():
            model = _model(server)
            turn = Assistant(model).turn("go")
            seen = []
            async for piece in turn:
                seen.append((piece, turn.reply.text))
            await model.close()
            return seen

        seen = asyncio.run(run())
    # each piece is handed out with the token that ends it, not at the end of the reply
    assert seen == [("First sentence here.", "First sentence here. "),
                    ("Second one follows.", "First sentence here. Second one follows. "),
                    ("Third.", "First sentence here. Second one follows. Third.")]


async def _speaking(turn):
    """A task speaking `turn` (collecting its pieces), once its first piece is out."""
    got = []

    async def speak():
        async for piece in turn:
            got.append(piece)

    task = asyncio.ensure_future(speak())
    while not got:
        await asyncio.sleep(0.01)
    return task, got


def test_barge_in_cancels_the_model_and_history_keeps_what_was_heard():
    reply = "I think the capital of France is Paris. It has the Eiffel tower and many museums to see."
    with StandInLLM([reply, "Okay."], tokens_per_s=10) as server:  # the next piece 1.2 s after the first
        async def run():
            model = _model(server)
            assistant = Assistant(model)
            turn = assistant.turn("Capital of France?")
            speaking, got = await _speaking(turn)
            await turn.cancel()  # the user speaks over the reply
            await speaking
            closed = await asyncio.to_thread(server.wait_connections, 0)
            # the first piece (8 words) was sent 12 of its 40 frames: 2 words heard
            kept = turn.finish([HeardPiece(got[0], 12, 40)])
            nxt = assistant.turn("Wait, what?")
            [p async for p in nxt]
            await model.close()
            return turn, got, closed, kept

        turn, got, closed, kept = asyncio.run(run())
    assert got == ["I think the capital of France is Paris."] and turn.reason == "interrupted" and closed == 0
    assert kept == f"I think {CUT}"
    assert server.requests[1]["messages"][-2:] == [{"role": "assistant", "content": f"I think {CUT}"},
                                                   {"role": "user", "content": "Wait, what?"}]
    with pytest.raises(RuntimeError, match="already in the history"):
        turn.finish()


def test_cancelling_the_task_that_speaks_closes_the_model_stream():
    # the second piece comes 1.2 s after the first: the task is cancelled long before
    with StandInLLM(["One. Two three four five six seven eight nine ten eleven twelve."], tokens_per_s=10) as server:
        async def run():
            model = _model(server)
            turn = Assistant(model).turn("count")
            task, got = await _speaking(turn)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            closed = await asyncio.to_thread(server.wait_connections, 0)
            await model.close()
            return turn, got, closed

        turn, got, closed = asyncio.run(run())
    assert got == ["One."] and turn.reason == "interrupted" and closed == 0


def test_reply_bound_stops_the_model():
    long = "This is a sentence. " * 200
    with StandInLLM([long], tokens_per_s=2000) as server:
        async def run():
            model = _model(server)
            turn = Assistant(model, max_reply_chars=50).turn("talk")
            pieces = [p async for p in turn]
            closed = await asyncio.to_thread(server.wait_connections, 0)
            await model.close()
            return turn, pieces, closed

        turn, pieces, closed = asyncio.run(run())
    assert pieces == ["This is a sentence."] * 3 and turn.reason == "length" and closed == 0
    assert len(turn.reply.text) < len(long)


def test_a_failed_reply_raises_and_the_next_turn_works():
    replies = [Scripted(status=503), Scripted("Half a reply. Then more words", stop_after=4), Scripted("Fine.")]
    with StandInLLM(replies, tokens_per_s=1000) as server:
        async def run():
            model = _model(server)
            assistant = Assistant(model)
            turn = assistant.turn("one")
            with pytest.raises(LLMStatusError):
                [p async for p in turn]
            assert turn.reason == "error" and turn.finish() == ""
            turn = assistant.turn("two")
            got = []
            with pytest.raises(LLMStopped):
                async for p in turn:
                    got.append(p)
            assert got == ["Half a reply."] and turn.finish() == "Half a reply."
            turn = assistant.turn("three")
            assert [p async for p in turn] == ["Fine."]
            await model.close()

        asyncio.run(run())
    # the failed turn's user words stay, joined to the next (turns alternate)
    assert server.requests[1]["messages"] == [{"role": "user", "content": "one two"}]
    assert server.requests[2]["messages"][-2:] == [{"role": "assistant", "content": "Half a reply."},
                                                   {"role": "user", "content": "three"}]


def test_turn_refuses_an_empty_transcript():
    async def run():
        model = LanguageModel(LLMConfig("http://127.0.0.1:9/v1", "m"))
        with pytest.raises(ValueError, match="transcript is empty"):
            Assistant(model).turn("  ")
        await model.close()

    asyncio.run(run())


def test_a_reply_asked_early_answers_only_the_turn_it_was_asked_for():
    """`Assistant.ask` leaves the history alone; `turn(transcript, asked)` answers with that reply
    when the turn gives the same messages, and asks anew when the words differ."""
    answers = {"What time is it": "Asked early.", "What time": "Asked again.",
               "What time is it in Paris": "Asked late."}
    with StandInLLM(lambda messages: answers[messages[-1]["content"]], tokens_per_s=1000) as server:
        async def run():
            model = _model(server, system_prompt="Be brief.")
            assistant = Assistant(model)
            asked = assistant.ask("What time is it")
            history_after_ask = assistant.history.messages()
            turn = assistant.turn("What time is it", asked)
            pieces = [p async for p in turn]
            turn.finish()
            went_on = assistant.ask("What time")
            late = assistant.turn("What time is it in Paris", went_on)
            await went_on.cancel()
            late_pieces = [p async for p in late]
            await model.close()
            return history_after_ask, turn is asked, pieces, late is went_on, late_pieces

        history_after_ask, same, pieces, reused, late_pieces = asyncio.run(run())
    assert history_after_ask == [{"role": "system", "content": "Be brief."}]
    assert same and pieces == ["Asked early."]
    assert not reused and late_pieces == ["Asked late."]
    # (the request cancelled may have been abandoned before it was sent)
    said = [r["messages"][-1]["content"] for r in server.requests if r["messages"][-1]["content"] != "What time"]
    assert said == ["What time is it", "What time is it in Paris"]
    assert max(server.requests, key=lambda r: len(r["messages"]))["messages"][1:] == [
        {"role": "user", "content": "What time is it"}, {"role": "assistant", "content": "Asked early."},
        {"role": "user", "content": "What time is it in Paris"}]
