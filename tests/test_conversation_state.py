"""A conversation's state without a socket (`fastcsm.speech.conversation.ConversationState`):
pinned voices and their unpinning, turns dropped for good, a line spoken into it and what of it
was heard."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fastcsm.engine.engine import EndReason
from fastcsm.model.config import tiny_config
from fastcsm.model.context import ContextTooLong
from fastcsm.model.prompt import TextTokenizer, audio_rows, concat, text_rows
from fastcsm.speech.conversation import ContextDropped, ConversationState, VoiceUnpinned
from fastcsm.speech.normalize import normalize
from fastcsm.speech.planner import spoken_rows
from fastcsm.speech.speech import SpeakOptions
from fastcsm.testing import byte_tokenizer_json

TOK = TextTokenizer.from_json(byte_tokenizer_json())
OPTS = SpeakOptions(max_audio_length_ms=400)  # 5 frames a piece


def window(rows: int):
    cfg = tiny_config()
    return dataclasses.replace(cfg, backbone=dataclasses.replace(cfg.backbone, max_seq_len=rows))


def audio(frames: int, cfg, value: int = 1):
    return audio_rows(torch.full((frames, cfg.num_codebooks), value, dtype=torch.long), cfg)


def frames(n: int, cfg) -> list[torch.Tensor]:
    return [torch.full((cfg.num_codebooks,), 3, dtype=torch.long)] * n


def test_configured_voices_come_back_on_reset_and_voices_pinned_by_speaking_do_not():
    cfg = window(2048)
    state = ConversationState(cfg)
    ann, bob = audio(4, cfg), audio(6, cfg)
    state.configure([("ann", ann)])
    said = state.say("Hello there.", 2, TOK, OPTS, seed=1, voice="bob", pin=bob)
    planned = state.next_piece(said)
    assert planned.request.prompt.tokens[: len(ann) + len(bob)].equal(concat([ann, bob]).tokens)
    assert state.pinned_voices == ["ann"], "a voice is pinned once its line is heard, not before"
    for c in frames(2, cfg):
        said.line.add(c)
    said.line.end(EndReason.END_OF_SPEECH)
    state.remember(said)
    assert state.pinned_voices == ["ann", "bob"] and len(state.turns) == 1
    assert state.say("Again.", 2, TOK, OPTS, voice="bob", pin=bob).pin is None, "pinned already"
    state.reset()
    assert state.pinned_voices == ["ann"] and state.pinned == [ann] and state.turns == []


def test_a_line_in_a_voice_that_was_never_heard_leaves_it_unpinned():
    cfg = window(2048)
    state = ConversationState(cfg)
    said = state.say("Hello there.", 0, TOK, OPTS, voice="bob", pin=audio(6, cfg))
    state.next_piece(said)
    state.remember(said, heard=[])  # interrupted before its first frame
    assert state.pinned_voices == [] and state.turns == []


def test_a_line_without_room_unpins_the_oldest_other_voice_and_never_its_own():
    cfg = window(60)
    state = ConversationState(cfg)
    state.configure([("ann", audio(20, cfg)), ("cat", audio(10, cfg))])
    said = state.say("A line.", 0, TOK, OPTS, voice="bob", pin=audio(20, cfg))  # 12 + 5 + 21 + 21 + 11 rows
    planned = state.next_piece(said)
    assert state.take_events() == [VoiceUnpinned("ann", 21, 11)] and state.pinned_voices == ["cat"]
    assert len(planned.request.prompt) + planned.request.max_frames <= 60

    tight = ConversationState(window(35))  # 12 + 5 + 21 rows
    tight.configure([("ann", audio(20, cfg))])
    mine = tight.say("A line.", 0, TOK, OPTS, voice="ann", pin=None)
    with pytest.raises(ContextTooLong):  # its own voice stays: the line cannot be spoken
        tight.next_piece(mine)
    assert tight.pinned_voices == ["ann"] and tight.take_events() == []


def test_turns_dropped_to_make_room_are_dropped_for_good():
    cfg = window(64)
    state = ConversationState(cfg)
    for value in (1, 2, 3):
        assert state.add_turn(audio(16, cfg, value)) == value - 1
    state.forget_unfittable()
    assert state.take_events() == []
    said = state.say("Now.", 0, TOK, OPTS)  # 9 rows and 5 frames beside 51 rows of turns
    planned = state.next_piece(said)
    assert planned.dropped_context == [0] and len(state.turns) == 2
    assert state.take_events() == [ContextDropped(1, 17, 34)]
    assert torch.equal(planned.request.prompt.tokens, concat([*state.turns, planned.line]).tokens)


def test_turns_that_can_never_fit_again_are_forgotten_as_they_come():
    cfg = window(40)
    state = ConversationState(cfg)
    state.add_turn(audio(15, cfg))
    state.add_turn(audio(15, cfg))
    state.forget_unfittable()
    assert len(state.turns) == 2
    state.add_turn(audio(30, cfg))  # without the oldest, the others still fill the window
    state.forget_unfittable()
    assert len(state.turns) == 2 and state.take_events() == [ContextDropped(1, 16, 47)]


def test_a_line_joins_as_one_turn_and_of_a_piece_cut_off_only_the_words_heard():
    cfg = window(2048)
    state = ConversationState(cfg)
    said = state.say("First one here. Then the second", 0, TOK, OPTS, seed=0, final=False)
    first = state.next_piece(said)
    for c in frames(3, cfg):
        said.line.add(c)
    said.line.end("end")
    assert state.next_piece(said) is None and said.line.waiting
    said.line.append(" one, cut off.", final=True)
    second = state.next_piece(said)
    assert second.request.audio_after is first.request and not second.request.keep_audio
    said.line.add(frames(1, cfg)[0])  # then interrupted: of its words, two were heard
    words = normalize("Then the second one, cut off.").words
    state.remember(said, heard=words[:2])
    heard = text_rows(TOK, 0, "Then the", cfg)
    want = concat([spoken_rows(first.line, frames(3, cfg), cfg), spoken_rows(heard, frames(1, cfg), cfg)])
    assert len(state.turns) == 1 and torch.equal(state.turns[0].tokens, want.tokens)
    assert said.line.stopped is EndReason.CANCELLED
