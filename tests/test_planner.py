"""The speech planner: one rule for pieces and bounds, and one path from text to audio.

The library (`Generator.speak`) and the server (`POST /v1/audio/speech`) plan through
`fastcsm.speech.planner` and speak on the engine's in-step decode, so the same long text, voice,
context and seed give the same pieces, requests, codes and audio on both.
"""

from __future__ import annotations

import base64
import dataclasses
import io

import httpx
import numpy as np
import pytest
import soundfile as sf
import torch

from fastcsm.model.config import tiny_config
from fastcsm.model.context import ContextTooLong
from fastcsm.model.prompt import audio_rows, concat
from fastcsm.speech import planner
from fastcsm.speech.speech import SpeakOptions

CFG = tiny_config()
K = CFG.num_codebooks
FRAME_MS = CFG.frame_ms


class ByteTok:
    bos_id, eos_id = 128_000, 128_001

    def encode(self, text):
        return list(text.encode())


# -- the rules --------------------------------------------------------------------------------------

def test_the_frame_bound_is_the_request_lowered_by_the_guard_on_every_path():
    opts = SpeakOptions(max_audio_length_ms=1000, guard_ms_per_char=20, guard_base_ms=100)
    assert planner.frame_bound("Hi there.", opts, FRAME_MS) == 4  # guard 280 ms, rounded up
    assert planner.frame_bound("x" * 200, opts, FRAME_MS) == 12  # the request, 1000 ms, rounded down
    # A server's limit caps what may be asked; the guard applies whether or not a bound is given.
    assert planner.frame_bound("Hi there.", opts, FRAME_MS, limit_ms=8000) == 4
    with pytest.raises(ValueError, match="above the limit of 800 ms"):
        planner.frame_bound("Hi.", opts, FRAME_MS, limit_ms=800)
    with pytest.raises(ValueError, match="shorter than one 80 ms frame"):
        planner.frame_bound("Hi.", SpeakOptions(max_audio_length_ms=79), FRAME_MS)
    assert planner.frame_bound("Hi.", SpeakOptions(max_audio_length_ms=1000, guard_ms_per_char=None), FRAME_MS) == 12
    with pytest.raises(ValueError, match="finite"):
        SpeakOptions(max_audio_length_ms=float("nan"))
    with pytest.raises(ValueError, match="temperature"):
        SpeakOptions(temperature=-1)


def test_whole_text_is_packed_and_a_streaming_line_is_cut_at_every_sentence():
    text = "One short sentence. Another one here. And a third."
    assert planner.split(text, SpeakOptions()) == [text], "text that fits is left exactly as given"
    assert planner.split(text, SpeakOptions(max_piece_chars=40)) == ["One short sentence. Another one here.",
                                                                     "And a third."]
    assert planner.split(text, SpeakOptions(max_piece_chars=None)) == [text]
    assert planner.streamed_pieces(text, final=True) == ["One short sentence.", "Another one here.", "And a third."]
    assert planner.streamed_pieces(text[:25], final=False) == ["One short sentence."]


def test_a_piece_carries_the_pieces_before_it_and_chains_their_audio():
    tok = ByteTok()
    opts = SpeakOptions(max_audio_length_ms=400, max_piece_chars=12)
    pinned = [audio_rows(torch.ones(3, K, dtype=torch.long), CFG)]
    context = [audio_rows(torch.full((5, K), 2), CFG)]
    pieces = planner.whole_pieces("First one. Second one. Third.", 0, pinned, tok, CFG, opts)
    assert [p.text for p in pieces] == ["First one.", "Second one.", "Third."]
    assert [p.max_frames for p in pieces] == [5, 5, 5]

    def plan(index, spoken, after=None):
        return planner.plan_piece(CFG, pinned, context, spoken, pieces[index], opts.sampling, 10 + index, opts,
                                  keep_audio=index + 1 < len(pieces), audio_after=after)

    first = plan(0, [])
    assert first.request.keep_audio and first.request.audio_after is None and first.request.seed == 10
    assert first.request.prefix_rows == len(pinned[0]) + len(context[0])
    codes = [torch.full((K,), 7), torch.full((K,), 8)]
    second = plan(1, [(pieces[0].line, codes)], after=first.request)
    assert second.request.audio_after is first.request and second.request.seed == 11
    carried = concat([pieces[0].line, audio_rows(torch.stack(codes), CFG)])
    want = concat([*pinned, *context, carried, pieces[1].line])
    assert torch.equal(second.request.prompt.tokens, want.tokens)
    last = plan(2, [(pieces[0].line, codes), (pieces[1].line, [])], after=second.request)
    assert not last.request.keep_audio, "the last piece keeps no audio state"
    assert len(last.request.prompt) == len(want) - len(pieces[1].line) + len(pieces[2].line)


def test_a_small_window_drops_context_then_earlier_pieces():
    tiny = tiny_config()
    cfg = dataclasses.replace(tiny, backbone=dataclasses.replace(tiny.backbone, max_seq_len=64))
    line = planner.piece_text("Now.", 0, ByteTok(), cfg, SpeakOptions(max_audio_length_ms=400))
    context = [audio_rows(torch.ones(20, K, dtype=torch.long), cfg)]
    spoken = [(line.line, [torch.ones(K, dtype=torch.long)] * 30), (line.line, [torch.ones(K, dtype=torch.long)])]
    got = planner.plan_piece(cfg, [], context, spoken, line, SpeakOptions().sampling, 0, SpeakOptions())
    assert got.dropped_context == [0] and got.dropped_pieces == [0]
    assert len(got.request.prompt) + line.max_frames <= 64
    with pytest.raises(ContextTooLong):
        planner.whole_pieces("word " * 40, 0, [], ByteTok(), cfg, SpeakOptions(max_piece_chars=None))


# -- one path: the library and the server agree ----------------------------------------------------

@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from recording_engine import recording_generator
    from server_harness import LiveServer, tiny_checkpoint

    from fastcsm.generator import Generator

    with LiveServer(slots=4, max_audio_length_ms=1600, voices_dir=str(tmp_path_factory.mktemp("voices"))) as s:
        yield s, recording_generator(Generator.from_pretrained(tiny_checkpoint(), device="cpu"))


def wav_bytes(seconds: float, hz: float) -> bytes:
    t = np.arange(int(24_000 * seconds)) / 24_000
    buf = io.BytesIO()
    sf.write(buf, (0.3 * np.sin(2 * np.pi * hz * t)).astype(np.float32), 24_000, format="WAV")
    return buf.getvalue()


def record_server(service, monkeypatch) -> list:
    """(request, codes) of every request the service submits, through its public `submit`."""
    from fastcsm.server.scheduler import End

    seen, submit = [], service.submit

    def recording(request, follow_on=False):
        stream = submit(request, follow_on)
        codes, nxt = [], stream.next

        async def next_item():
            item = await nxt()
            if not isinstance(item, End):
                codes.append(item.codes)
            return item

        stream.next = next_item
        seen.append((request, codes))
        return stream

    monkeypatch.setattr(service, "submit", recording)
    return seen


def record_generator(gen) -> list:
    """(request, codes) of every request `gen` (a recording generator) runs from here on."""
    gen.engine.record.runs.clear()
    return gen.engine.record.runs


@pytest.mark.parametrize("temperature,max_ms", [(0.0, 240), (0.9, None)], ids=["greedy", "seeded"])
def test_http_and_generator_speak_identically(served, monkeypatch, temperature, max_ms):
    from fastcsm.audio import read_audio
    from fastcsm.model.prompt import Segment
    from fastcsm.server.audio_out import encoder

    server, gen = served
    assert server.service.generator.dtype == gen.dtype
    r = httpx.post(server.url + "/v1/voices", data={"name": "ann", "text": "My voice, recorded.", "speaker": "2"},
                   files={"audio": ("ann.wav", wav_bytes(0.5, 220), "audio/wav")}, timeout=60)
    assert r.status_code in (201, 409), r.text
    turn_audio = wav_bytes(0.3, 330)
    text = " ".join(f"Sentence number {i} says a few more words than it needs." for i in range(8))  # ~460 chars
    body = {"input": text, "voice": "ann", "response_format": "pcm", "seed": 42, "temperature": temperature,
            "context": [{"speaker": 1, "text": "An earlier turn.", "audio": base64.b64encode(turn_audio).decode()},
                        {"speaker": 0, "text": "And one without audio."}]}
    if max_ms is not None:
        body["max_audio_length_ms"] = max_ms
    served_requests = record_server(server.service, monkeypatch)
    with httpx.stream("POST", server.url + "/v1/audio/speech", json=body, timeout=120) as r:
        assert r.status_code == 200, r.read()
        pieces = int(r.headers["x-fastcsm-pieces"])
        pcm = r.read()

    gen_requests = record_generator(gen)
    context = [Segment(1, "An earlier turn.", audio=read_audio(turn_audio)), Segment(0, "And one without audio.")]
    options = SpeakOptions(max_audio_length_ms=max_ms or server.settings.max_audio_length_ms,
                           temperature=temperature, topk=50)
    speech = gen.speak(text, None, context, voice=server.service.store.path("ann"), seed=42, options=options)

    assert pieces == len(speech.pieces) == len(served_requests) == len(gen_requests) == 3
    for (a, a_codes), (b, b_codes) in zip(served_requests, gen_requests, strict=True):
        assert torch.equal(a.prompt.tokens, b.prompt.tokens) and torch.equal(a.prompt.mask, b.prompt.mask)
        assert (a.max_frames, a.seed, a.prefix_rows, a.keep_audio, a.params) == \
            (b.max_frames, b.seed, b.prefix_rows, b.keep_audio, b.params)
        assert len(a_codes) == a.max_frames  # random weights run every piece to its bound
        assert torch.equal(torch.stack(a_codes), torch.stack(b_codes))
    assert [p.max_frames for p in speech.pieces] == [r.max_frames for r, _ in served_requests]
    assert torch.equal(speech.codes, torch.cat([torch.stack(c) for _, c in served_requests]))
    enc = encoder("pcm", 24_000)
    assert enc.start() + enc.write(speech.audio.numpy()) + enc.finish() == pcm
