"""Speaking end to end on a tiny random checkpoint: audio, streaming, voices, context, long text.

Random weights almost never emit the end frame, so every generation here runs to its bound;
bounds are a few frames to keep the module fast.
"""

import logging

import pytest
import torch
from recording_engine import recording_generator

from fastcsm.engine.engine import EndReason, Engine
from fastcsm.engine.runner import Runner
from fastcsm.generator import Generator
from fastcsm.model.config import tiny_config
from fastcsm.model.context import ContextTooLong, Trim, fit
from fastcsm.model.prompt import Segment, audio_rows, text_rows
from fastcsm.speech.speech import SpeakOptions
from fastcsm.speech.voices import Voice
from fastcsm.testing import speech_ending_step

CFG = tiny_config()
K = CFG.num_codebooks
FRAME = 1920
FRAME_MS = CFG.frame_ms


@pytest.fixture(scope="module")
def gen(tiny_csm_dir):
    return recording_generator(Generator.from_pretrained(tiny_csm_dir, device="cpu"))


@pytest.fixture
def prompts(gen):
    """The prompt of every generation from here on, and the frames drawn from the engine."""
    gen.engine.record.runs.clear()
    return gen.engine.record


def ms(max_audio_length_ms, **kw):
    return SpeakOptions(max_audio_length_ms=max_audio_length_ms, **kw)


def random_codes(frames, seed):
    return torch.randint(0, CFG.codebook_size, (frames, K), generator=torch.Generator().manual_seed(seed))


def test_generate_decodes_the_generated_codes(gen):
    speech = gen.speak("Hello there.", 0, options=ms(3 * FRAME_MS), seed=5)
    assert speech.sample_rate == 24_000
    assert speech.codes.shape == (3, K) and speech.pieces[0].frames == 3
    assert speech.pieces[0].reason is EndReason.LENGTH and not speech.pieces[0].ended
    assert speech.audio.shape == (3 * FRAME,) and speech.audio.dtype == torch.float32
    assert torch.equal(speech.codes, gen.generate_codes("Hello there.", 0, max_audio_length_ms=3 * FRAME_MS, seed=5))
    # The engine decodes frame by frame in its step; one decode of the whole sequence agrees.
    torch.testing.assert_close(speech.audio, gen.codec.decode(speech.codes), rtol=1e-4, atol=1e-5)


def test_stream_concatenates_to_generate(gen):
    whole = gen.generate("Streaming works.", 1, [], 5 * FRAME_MS, 0.9, 50, seed=3)  # the reference's signature
    with gen.stream("Streaming works.", 1, chunk_frames=2, options=ms(5 * FRAME_MS), seed=3) as stream:
        chunks = list(stream)
    assert [c.numel() for c in chunks] == [FRAME, 2 * FRAME, 2 * FRAME]
    assert torch.equal(torch.cat(chunks), whole), "the same frames' PCM from the engine, chunked"
    assert stream.frames == 5 and stream.closed


def test_first_chunk_after_one_frame_and_stopping_frees_everything(gen, prompts):
    stream = gen.stream("Interrupt me.", 0, options=ms(8 * FRAME_MS), seed=1, chunk_frames=4)
    assert prompts.frames == 0, "nothing runs before the first chunk is asked for"
    first = next(stream)
    assert first.numel() == FRAME and prompts.frames == 1
    assert gen.engine.free_slots == 0
    stream.close()
    assert stream.closed and gen.engine.free_slots == gen.engine.max_slots
    assert list(stream) == []
    # Breaking out of a loop and dropping the stream frees it too.
    for _ in gen.stream("Again.", 0, options=ms(8 * FRAME_MS), seed=1):
        break
    import gc

    gc.collect()
    assert gen.engine.free_slots == gen.engine.max_slots
    assert gen.generate_codes("Still works.", 0, max_audio_length_ms=2 * FRAME_MS, seed=1).shape == (2, K)


def test_context_audio_is_encoded_and_voice_is_pinned(gen, prompts):
    wav = 0.1 * torch.randn(3 * FRAME + 100, generator=torch.Generator().manual_seed(0))
    voice = Voice.from_audio(gen.codec, wav, "Reference words.", speaker=2)
    assert voice.codes.shape == (4, K)  # 3 frames and a partial one
    context = [Segment(1, "A turn with audio.", audio=wav)]
    speech = gen.speak("With a voice.", None, context, voice=voice, options=ms(2 * FRAME_MS), seed=0)
    prompt = prompts.prompts[-1]
    voice_rows = text_rows(gen.tokenizer, 2, "Reference words.", CFG)
    n = len(voice_rows)
    assert torch.equal(prompt.tokens[:n], voice_rows.tokens), "the voice comes first, under the line's speaker"
    assert torch.equal(prompt.tokens[n:n + 4, :K], voice.codes)
    ctx_rows = text_rows(gen.tokenizer, 1, "A turn with audio.", CFG)
    start = n + 5 + len(ctx_rows)
    assert torch.equal(prompt.tokens[start:start + 4, :K], gen.codec.encode_waveform(wav))
    assert speech.codes.shape == (2, K)


def test_trimming_drops_oldest_context_and_reports(gen, prompts, caplog):
    context = [Segment(i % 2, f"Turn {i}.", codes=random_codes(700, seed=i)) for i in range(4)]  # ~2850 rows
    voice = Voice(0, "Pinned voice.", random_codes(50, seed=9))
    with caplog.at_level(logging.WARNING, logger="fastcsm"):
        speech = gen.speak("Reply.", 0, context, voice=voice, options=ms(3 * FRAME_MS), seed=0)
    piece = speech.pieces[0]
    assert piece.dropped_context == [0, 1] and speech.dropped_context == [0, 1]
    rows = [len(text_rows(gen.tokenizer, s.speaker, s.text, CFG)) + 701 for s in context]
    assert piece.trim.dropped_rows == rows[0] + rows[1]
    assert piece.prompt_rows + 3 <= CFG.max_seq_len < piece.prompt_rows + 3 + rows[1]
    assert "dropped context segments [0, 1]" in caplog.text
    prompt = prompts.prompts[-1]
    assert len(prompt) == piece.prompt_rows
    vrows = len(text_rows(gen.tokenizer, 0, "Pinned voice.", CFG))
    assert torch.equal(prompt.tokens[vrows:vrows + 50, :K], voice.codes), "the pinned voice is never dropped"
    line = len(text_rows(gen.tokenizer, 0, "Reply.", CFG))
    assert torch.equal(prompt.tokens[-line - 701:-line - 1, :K], context[-1].codes), "the newest turn is kept"


def test_a_line_that_cannot_fit_alone_is_a_clear_error(gen):
    huge_voice = Voice(0, "Long.", random_codes(2030, seed=1))
    with pytest.raises(ContextTooLong, match="with all other context dropped.*context window.*shorter voice"):
        gen.speak("This line does not fit.", 0, voice=huge_voice, options=ms(20 * FRAME_MS))
    with pytest.raises(ContextTooLong, match="shorten the text"):
        gen.speak("word " * 500, 0, options=ms(100 * FRAME_MS, max_piece_chars=None, guard_ms_per_char=None))


def test_fit_unit():
    line = text_rows(_ByteTok(), 0, "Hi.", CFG)
    pinned = [audio_rows(random_codes(10, 0), CFG)]
    context = [audio_rows(random_codes(900, i), CFG) for i in range(3)]
    prompt, trim = fit(pinned, context, line, 200, CFG)
    assert trim.dropped == [0] and trim.dropped_rows == 901 and isinstance(trim, Trim) and trim
    assert len(prompt) == 11 + 2 * 901 + len(line) and "dropped 1 oldest" in trim.describe()
    # Experimental: older audio keeps codebook 0 only; rows are unchanged.
    prompt2, trim2 = fit(pinned, context, line, 200, CFG, older_audio="codebook0", keep_full_audio=1)
    assert trim2.reduced == [1] and len(prompt2) == len(prompt)
    seg1 = slice(11, 11 + 901)
    assert prompt2.mask[seg1, 0].all() and not prompt2.mask[seg1, 1:K].any()
    assert torch.equal(prompt2.mask[11 + 901:], prompt.mask[11 + 901:])
    with pytest.raises(ValueError, match="older_audio"):
        fit(pinned, context, line, 200, CFG, older_audio="half")


def test_long_text_is_split_and_pieces_carry_context(gen, prompts, caplog):
    text = "The first sentence is here. A second one follows it. And a third closes the text."
    kw = dict(seed=7, options=ms(2 * FRAME_MS, max_piece_chars=30))
    with caplog.at_level(logging.WARNING, logger="fastcsm"):
        speech = gen.speak(text, 0, **kw)
    assert [p.text for p in speech.pieces] == ["The first sentence is here.", "A second one follows it.",
                                               "And a third closes the text."]
    assert [p.seed for p in speech.pieces] == [7, 8, 9]
    assert speech.codes.shape == (6, K) and speech.audio.numel() == 6 * FRAME
    # Piece 3's prompt holds pieces 1 and 2 with the audio generated for them.
    p3 = prompts.prompts[2]
    r1 = text_rows(gen.tokenizer, 0, speech.pieces[0].text, CFG)
    assert torch.equal(p3.tokens[:len(r1)], r1.tokens)
    assert torch.equal(p3.tokens[len(r1):len(r1) + 2, :K], speech.codes[:2])
    assert (p3.tokens[len(r1) + 2, :K] == 0).all(), "each earlier piece ends with the EOS frame"
    assert speech.pieces[2].prompt_rows == len(p3)
    assert "piece 3/3 stopped at its bound" in caplog.text
    # Each piece's audio continues the codec state of the one before: the whole equals one decode
    # of all the codes, which fresh decoder states per piece would not.
    torch.testing.assert_close(speech.audio, gen.codec.decode(speech.codes), rtol=1e-4, atol=1e-5)
    fresh = torch.cat([gen.codec.decode(speech.codes[i:i + 2]) for i in (0, 2, 4)])
    assert (fresh - speech.audio).abs().max() > 1e-2
    requests = prompts.requests[-3:]
    assert [r.keep_audio for r in requests] == [True, True, False]
    with gen.stream(text, 0, chunk_frames=4, **kw) as stream:
        chunks = list(stream)
    assert [c.numel() // FRAME for c in chunks] == [1, 1, 2, 2], "a piece's last frames are flushed at its end"
    assert torch.equal(torch.cat(chunks), speech.audio)
    assert len(stream.pieces) == 3 and stream.num_pieces == 3


def test_pieces_say_how_they_ended(gen, caplog):
    """Each piece keeps the engine's reason for its end: the model's end frame, or its bound (and
    the bound is logged)."""
    ends = {0: 1}
    speaker = Generator(gen.model, gen.tokenizer, gen.codec,
                        engine=Engine(gen.model, codec=gen.codec, runner=Runner(step=speech_ending_step(ends))))
    text = "The first sentence is here. A second one follows it."
    kw = dict(seed=7, options=ms(3 * FRAME_MS, max_piece_chars=30))
    with caplog.at_level(logging.WARNING, logger="fastcsm"):
        speech = speaker.speak(text, 0, **kw)
        assert [(p.reason, p.ended, p.frames) for p in speech.pieces] == [(EndReason.END_OF_SPEECH, True, 1)] * 2
        assert "stopped at its bound" not in caplog.text
        ends[0] = 3
        speech = speaker.speak(text, 0, **kw)
    assert [(p.reason, p.ended, p.frames) for p in speech.pieces] == [(EndReason.LENGTH, False, 3)] * 2
    assert "piece 2/2 stopped at its bound" in caplog.text


def test_length_guard_bounds_a_piece_by_its_text(gen):
    opts = SpeakOptions(guard_ms_per_char=20, guard_base_ms=100)
    speech = gen.speak("Hi there.", 0, options=opts, seed=0)  # 100 + 9 * 20 = 280 ms -> 4 frames
    assert speech.pieces[0].max_frames == 4 and speech.codes.shape[0] == 4
    assert opts.guard_ms("Hi there.") == 280
    assert SpeakOptions(guard_ms_per_char=None).guard_ms("anything") is None
    with pytest.raises(ValueError, match="guard_ms_per_char"):
        SpeakOptions(guard_ms_per_char=0)


def test_input_errors_raise_before_any_generation(gen, prompts):
    with pytest.raises(ValueError, match="text is empty"):
        gen.stream("   ", 0)
    with pytest.raises(ValueError, match="shorter than one 80 ms frame"):
        gen.stream("Hi.", 0, options=ms(40))
    with pytest.raises(ValueError, match="finite"):
        gen.speak("Hi.", 0, options=ms(float("inf")))
    with pytest.raises(ValueError, match="chunk_frames"):
        gen.stream("Hi.", 0, chunk_frames=0)
    with pytest.raises(TypeError, match="context must be a sequence of Segment"):
        gen.speak("Hi.", 0, [("not", "a segment")])
    with pytest.raises(ValueError, match="no voice named"):
        gen.speak("Hi.", 0, voice="nobody-here-" + "x" * 8)
    assert prompts.frames == 0 and (gen.engine is None or gen.engine.free_slots == gen.engine.max_slots)


class _ByteTok:
    bos_id, eos_id = 128_000, 128_001

    def encode(self, text):
        return list(text.encode())


def test_a_voice_is_prefilled_once_and_reused(gen):
    voice = Voice(speaker=1, text="My own voice sample.", codes=random_codes(12, 4))
    gen.speak("First line in this voice.", voice=voice, options=ms(2 * FRAME_MS), seed=1)
    stats = dict(gen.engine.stats)
    gen.speak("Second line, same voice.", voice=voice, options=ms(2 * FRAME_MS), seed=1)
    line = text_rows(gen.tokenizer, 1, "Second line, same voice.", CFG)
    reused = gen.engine.stats["reused_rows"] - stats["reused_rows"]
    assert reused > 12  # the voice's text and audio rows
    assert gen.engine.stats["prefill_rows"] - stats["prefill_rows"] == len(line)


def test_one_stream_at_a_time_is_a_clear_error(gen):
    with gen.stream("An open stream.", 0, options=ms(4 * FRAME_MS), seed=1) as first:
        next(iter(first))
        with pytest.raises(RuntimeError, match="one stream at a time"):
            gen.generate_codes("Another.", 0, max_audio_length_ms=FRAME_MS)
    assert gen.generate_codes("Another.", 0, max_audio_length_ms=FRAME_MS).shape == (1, K)
