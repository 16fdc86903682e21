"""A conversation that grows turn by turn reuses the KV of its longest cached prefix, so each
turn prefills only the rows added since the previous one, and the codes equal a plain run."""

import torch

from fastcsm.engine.engine import Engine, Request
from fastcsm.engine.sampling import SamplingParams
from fastcsm.model.config import tiny_config
from fastcsm.model.network import CSM
from fastcsm.model.prompt import Segment, TextTokenizer, audio_rows, concat, segment_rows, text_rows
from fastcsm.testing import byte_tokenizer_json, randomize_, run_alone

CFG = tiny_config()
TOK = TextTokenizer.from_json(byte_tokenizer_json())


def test_growing_conversation_prefills_only_new_rows():
    model = CSM(CFG)
    randomize_(model, seed=0)
    model = model.eval().requires_grad_(False)
    engine = Engine(model, max_slots=2, prefill_chunk=7)
    codes = torch.randint(0, 2048, (5, CFG.num_codebooks), generator=torch.Generator().manual_seed(1))
    history = [segment_rows(Segment(1, "Voice sample.", codes=codes), TOK, CFG)]
    params = SamplingParams(temperature=0.9, topk=50)
    stored = 0  # rows of the prefix the previous turn left in the cache
    for turn, line_text in enumerate(["Hello there.", "How are you today?", "Fine, thanks."]):
        line = text_rows(TOK, 0, line_text, CFG)
        prompt = concat([*history, line])
        prefix = len(prompt) - len(line)
        before = dict(engine.stats)
        got = torch.stack([e.codes for e in engine.run(Request(prompt, 4, params, seed=turn, prefix_rows=prefix))])
        reused = engine.stats["reused_rows"] - before["reused_rows"]
        assert reused == stored
        assert engine.stats["prefill_rows"] - before["prefill_rows"] == len(prompt) - stored
        assert torch.equal(got, run_alone(model, Request(prompt, 4, params, seed=turn)))
        stored = prefix
        # The spoken line and its audio join the conversation, then the other party answers.
        history += [concat([line, audio_rows(got, CFG)]),
                    segment_rows(Segment(1, f"Answer {turn}."), TOK, CFG)]
