"""The line driver (`fastcsm.speech.line.Line`) on its own: pieces handed out in order, codes fed
back, carried audio, trimming, text in fragments; then driven over a tiny engine, streamed
against whole."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fastcsm.engine.engine import EndReason, Engine
from fastcsm.model.config import tiny_config
from fastcsm.model.context import ContextTooLong
from fastcsm.model.network import CSM
from fastcsm.model.prompt import TextTokenizer, audio_rows, concat
from fastcsm.speech.line import Line
from fastcsm.speech.planner import split, spoken_rows, streamed_pieces
from fastcsm.speech.speech import SpeakOptions
from fastcsm.testing import byte_tokenizer_json, randomize_

CFG = tiny_config()
K = CFG.num_codebooks
TOK = TextTokenizer.from_json(byte_tokenizer_json())
TEXT = "First one here. Second one now. And the third."
OPTS = SpeakOptions(max_audio_length_ms=400, max_piece_chars=16)


def codes(n: int, value: int) -> list[torch.Tensor]:
    return [torch.full((K,), value, dtype=torch.long) for _ in range(n)]


def small_window(rows: int):
    return dataclasses.replace(CFG, backbone=dataclasses.replace(CFG.backbone, max_seq_len=rows))


def speak(line: Line, frames: int = 2) -> list:
    """Drive `line` to its end, each piece given `frames` frames of codes (value: its index + 1)."""
    planned = []
    while (p := line.next()) is not None:
        planned.append(p)
        for c in codes(frames, len(planned)):
            line.add(c)
        line.end(EndReason.END_OF_SPEECH)
    return planned


def test_a_whole_text_is_spoken_piece_after_piece_each_after_the_ones_before():
    pinned = [audio_rows(torch.ones(3, K, dtype=torch.long), CFG)]
    context = [audio_rows(torch.full((4, K), 2), CFG)]
    line = Line(TEXT, 1, pinned, context, TOK, CFG, OPTS, seed=10)
    assert line.texts == split(TEXT, OPTS) == ["First one here.", "Second one now.", "And the third."]
    planned = speak(line)
    assert line.done and line.next() is None and line.frames == 6
    requests = [p.request for p in planned]
    assert [r.seed for r in requests] == [10, 11, 12]
    assert [r.keep_audio for r in requests] == [True, True, False], "a piece keeps its audio while one follows"
    assert [r.audio_after for r in requests] == [None, requests[0], requests[1]]
    assert [len(c) for _, c in line.spoken] == [2, 2, 2]
    said = [spoken_rows(p.line, c, CFG) for p, (_, c) in zip(planned, line.spoken, strict=True)]
    want = concat([*pinned, *context, *said[:2], planned[2].line])
    assert torch.equal(requests[2].prompt.tokens, want.tokens) and torch.equal(requests[2].prompt.mask, want.mask)
    assert requests[2].prefix_rows == len(want) - len(planned[2].line)
    assert [(p.index, p.frames, p.reason, p.seed) for p in line.pieces] == \
        [(i, 2, EndReason.END_OF_SPEECH, 10 + i) for i in range(3)]
    assert line.text_rows == sum(len(p.line) for p in planned)


def test_without_carried_pieces_the_prompt_holds_only_the_context_but_the_audio_still_runs_on():
    line = Line(TEXT, 0, [], [], TOK, CFG, dataclasses.replace(OPTS, carry_pieces=False), seed=0)
    planned = speak(line)
    assert [len(p.request.prompt) for p in planned] == [len(p.line) for p in planned]
    assert planned[1].request.audio_after is planned[0].request and planned[2].request.audio_after is planned[1].request
    assert [p.request.keep_audio for p in planned] == [True, True, False]


def test_a_line_in_fragments_waits_for_complete_pieces_and_plans_what_the_whole_line_plans():
    whole = Line(TEXT, 0, [], [], TOK, CFG, OPTS, seed=3, streamed=True)
    assert whole.texts == streamed_pieces(TEXT, final=True)
    want = speak(whole)

    line = Line("First one", 0, [], [], TOK, CFG, OPTS, seed=3, streamed=True, final=False)
    assert line.next() is None and line.waiting and not line.done
    got = []
    for fragment in (" here. Sec", "ond one now. And the", " third."):
        line.append(fragment, final=False)
        while (p := line.next()) is not None:
            got.append(p)
            for c in codes(2, len(got)):
                line.add(c)
            line.end("end")
        assert line.waiting, "a line that is not complete waits for more"
    assert len(got) == 2, "the last sentence may still grow until the line is complete"
    line.append("", final=True)
    p = line.next()
    got.append(p)
    line.add(codes(1, 3)[0])
    line.end("end")
    assert line.done and line.next() is None and line.length == len(TEXT) and line.texts == whole.texts
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a.request.prompt.tokens, b.request.prompt.tokens)
        assert (a.request.seed, a.request.max_frames, a.request.prefix_rows) == \
            (b.request.seed, b.request.max_frames, b.request.prefix_rows)
    assert [p.request.keep_audio for p in got] == [True, True, False], "while more may come, a piece keeps its audio"


def test_the_last_piece_of_a_complete_streamed_line_keeps_no_audio():
    line = Line(TEXT, 0, [], [], TOK, CFG, OPTS, streamed=True)
    assert [p.request.keep_audio for p in speak(line)] == [True, True, False]


def test_a_full_window_drops_context_then_earlier_pieces_and_a_conversation_forgets_them():
    cfg = small_window(72)
    opts = SpeakOptions(max_audio_length_ms=400, max_piece_chars=5)  # 9 rows of text and 5 frames a piece
    context = [audio_rows(torch.ones(12, K, dtype=torch.long), cfg)]  # 13 rows
    prompts = []
    for forget in (False, True):
        line = Line("One. Two. Six. Ten.", 0, [], context, TOK, cfg, opts, seed=0, forget_dropped=forget)
        planned = speak(line, frames=20)  # each piece spoken: 30 rows
        assert [p.dropped_context for p in planned] == [[], [], [0], [0]]
        assert all(len(p.request.prompt) + p.request.max_frames <= 72 for p in planned)
        prompts.append([p.request.prompt.tokens for p in planned])
        if forget:  # piece 0 went for good when piece 2 dropped it: piece 3 drops only piece 1
            assert [r.dropped_pieces for r in line.pieces] == [[], [], [0], [1]] and len(line.spoken) == 2
        else:  # every piece refits from all that was spoken
            assert [r.dropped_pieces for r in line.pieces] == [[], [], [0], [0, 1]] and len(line.spoken) == 4
    assert all(torch.equal(a, b) for a, b in zip(*prompts, strict=True))


def test_a_piece_that_does_not_complete_ends_the_line():
    line = Line(TEXT, 0, [], [], TOK, CFG, OPTS)
    line.next()
    line.add(codes(1, 1)[0])
    line.end(EndReason.CANCELLED)
    assert line.done and line.stopped is EndReason.CANCELLED and line.next() is None
    assert [len(c) for _, c in line.spoken] == [1], "what was spoken of it is kept"


def test_misuse_and_text_that_cannot_fit_are_refused_and_leave_the_line_as_it_was():
    cfg = small_window(40)
    voice = audio_rows(torch.ones(20, K, dtype=torch.long), cfg)  # 21 rows: with the line, 43
    with pytest.raises(ContextTooLong):  # a whole text: refused before anything is spoken
        Line("A line.", 0, [voice], [], TOK, cfg, SpeakOptions(max_audio_length_ms=800))
    line = Line("A line.", 0, [voice], [], TOK, cfg, SpeakOptions(max_audio_length_ms=800), streamed=True)
    with pytest.raises(ContextTooLong):
        line.next()
    assert not line.pieces and line.in_flight is None
    line.pinned = []  # a conversation unpins a voice and asks again
    assert line.next().request.seed == line.seed
    with pytest.raises(RuntimeError, match="has not ended"):
        line.next()
    with pytest.raises(ValueError, match="whole text cannot grow"):
        Line(TEXT, 0, [], [], TOK, CFG, OPTS).append("More.", final=True)
    with pytest.raises(RuntimeError, match="no piece is in flight"):
        Line(TEXT, 0, [], [], TOK, CFG, OPTS).add(codes(1, 1)[0])
    refused = Line("Fine. Bad\u0007 one.", 0, [], [], TOK, CFG, OPTS, streamed=True, check=_no_bell)
    refused.next()
    refused.end("end")
    with pytest.raises(ValueError, match="bell"):
        refused.next()
    assert len(refused.pieces) == 1


def _no_bell(text: str) -> str:
    if "\u0007" in text:
        raise ValueError("the text rings a bell")
    return text


def test_driven_over_a_tiny_engine_fragments_give_the_codes_of_the_whole_line():
    model = CSM(CFG)
    randomize_(model, seed=0)
    model = model.eval().requires_grad_(False)
    opts = SpeakOptions(max_audio_length_ms=320, temperature=0.9)

    def drive(line: Line, fragments=()) -> list:
        engine = Engine(model, max_slots=1)
        fragments = list(fragments)
        while not line.done:
            planned = line.next()
            if planned is None:
                line.append(fragments.pop(0), final=not fragments)  # (popped first)
                continue
            for event in engine.events(planned.request):
                line.add(event.codes) if not event.ended else line.end(event.reason)
        return [torch.stack(c) for _, c in line.spoken]

    whole = drive(Line(TEXT, 0, [], [], TOK, CFG, opts, seed=5, streamed=True))
    parts = [TEXT[i:i + 5] for i in range(5, len(TEXT), 5)]
    streamed = drive(Line(TEXT[:5], 0, [], [], TOK, CFG, opts, seed=5, streamed=True, final=False), parts)
    assert len(whole) == 3 and all(len(c) == 4 for c in whole)
    for a, b in zip(whole, streamed, strict=True):
        assert torch.equal(a, b)
