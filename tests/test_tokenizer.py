"""Begin/end-of-text ids come from the checkpoint's own tokenizer.

A checkpoint whose tokenizer is not Llama-3's (a 272-token vocabulary with its specials at
260..263, a config.json without `eos_token_id`) speaks through the library, `fastcsm speak` and
`fastcsm serve` with exactly transformers' prompt ids (`CsmProcessor`) and greedy codes
(`CsmForConditionalGeneration.generate`).
"""

import base64
import dataclasses
import json
import logging

import numpy as np
import pytest
import soundfile as sf
import torch

from fastcsm.audio import read_audio
from fastcsm.cli import main
from fastcsm.generator import Generator
from fastcsm.model.config import CsmConfig, tiny_config
from fastcsm.model.prompt import LLAMA3_BOS_ID, LLAMA3_EOS_ID, Segment, TextTokenizer, text_rows
from fastcsm.testing import SMALL_VOCAB_SPECIALS, byte_tokenizer_json, write_small_vocab_checkpoint

pytest.importorskip("transformers")

BOS, EOS, AUDIO, AUDIO_EOS = SMALL_VOCAB_SPECIALS.values()
FRAMES = 6  # greedy frames to compare
FRAME = 1920
TURNS = [(1, "How was the trip?", 4), (0, "Long, but worth it.", 5), (1, "Tell me more!", 3)]
LINE = (0, "We saw the sea.")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """The small-vocabulary checkpoint, its transformers model, and three turns of audio as WAV files."""
    root = tmp_path_factory.mktemp("small_vocab")
    hf = write_small_vocab_checkpoint(root / "model", seed=3)
    g = torch.Generator().manual_seed(0)
    turns = []
    for i, (speaker, text, frames) in enumerate(TURNS):
        t = torch.arange(frames * FRAME) / 24_000
        wave = 0.3 * torch.sin(2 * torch.pi * (150 + 60 * i) * t) + 0.05 * torch.randn(t.shape, generator=g)
        path = root / f"turn{i}.wav"
        sf.write(str(path), wave.numpy(), 24_000, subtype="PCM_16")
        turns.append({"speaker": speaker, "text": text, "audio": path.name})
    (root / "conversation.json").write_text(json.dumps(turns))
    # Every path reads the audio back from the 16-bit files: the same waveforms everywhere.
    waves = [read_audio(root / t["audio"]) for t in turns]
    return root, hf, waves


@pytest.fixture(scope="module")
def gen(ckpt):
    return Generator.from_pretrained(ckpt[0] / "model", device="cpu")


def hf_inputs(ckpt):
    """transformers' own processor on the conversation: text with its tokenizer's specials, audio by the codec."""
    from transformers import CsmProcessor, EncodecFeatureExtractor, PreTrainedTokenizerFast

    root, _, waves = ckpt
    tok = PreTrainedTokenizerFast(tokenizer_file=str(root / "model" / "tokenizer.json"),
                                  bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
                                  pad_token="<|end_of_text|>")  # one sequence: never padded
    processor = CsmProcessor(EncodecFeatureExtractor(feature_size=1, sampling_rate=24_000), tok)
    text = "".join(f"{tok.bos_token}[{s}]{t}{tok.eos_token}<|AUDIO|><|audio_eos|>" for s, t, _ in TURNS)
    text += f"{tok.bos_token}[{LINE[0]}]{LINE[1]}{tok.eos_token}"
    return processor(text, audio=[w.numpy() for w in waves], return_tensors="pt")


@pytest.fixture(scope="module")
def hf_codes(ckpt):
    hf = ckpt[1]
    cfg = tiny_config()
    padding = list(range(cfg.codebook_size, cfg.audio_vocab_size))  # never sampled: not audio codes
    with torch.no_grad():
        out = hf.generate(**hf_inputs(ckpt), max_new_tokens=FRAMES, do_sample=False, depth_decoder_do_sample=False,
                          suppress_tokens=padding, depth_decoder_suppress_tokens=padding)
    return out[0][:FRAMES]


def context(ckpt):
    return [Segment(s, t, audio=w) for (s, t, _), w in zip(TURNS, ckpt[2], strict=True)]


# -- resolving the ids ----------------------------------------------------------------------------

def test_ids_come_from_the_tokenizer_not_llama3(gen):
    assert (gen.tokenizer.bos_id, gen.tokenizer.eos_id) == (BOS, EOS)
    assert gen.cfg.eos_token_id is None and gen.cfg.bos_token_id == BOS  # as config.json says


def test_prompt_rows_equal_the_processors_ids(ckpt, gen):
    ours = gen.prompt(LINE[1], LINE[0], context(ckpt))
    theirs = hf_inputs(ckpt)["input_ids"][0]
    assert len(ours) == len(theirs)
    text = ours.mask[:, -1]
    assert torch.equal(ours.tokens[text, -1], theirs[text])
    # Audio rows stand where the processor put <|AUDIO|> (frames) and <|audio_eos|> (the end frame).
    assert set(theirs[~text].tolist()) == {AUDIO, AUDIO_EOS}
    assert torch.equal(ours.tokens[~text, :-1].eq(0).all(1), theirs[~text] == AUDIO_EOS)


def test_greedy_codes_equal_transformers_generate(ckpt, gen, hf_codes):
    ours = gen.generate_codes(LINE[1], LINE[0], context(ckpt), max_audio_length_ms=FRAMES * 80, temperature=0)
    assert ours.shape == (FRAMES, gen.cfg.num_codebooks), "random weights should not emit the end frame this early"
    assert torch.equal(ours, hf_codes)


def test_template_post_processor_gives_the_ids():
    """A tokenizer that names its specials otherwise: the ids its template puts around a text."""
    spec = byte_tokenizer_json(1000, 1001)
    for t in spec["added_tokens"]:
        t["content"] = {1000: "<s>", 1001: "</s>"}[t["id"]]
    spec["model"]["vocab"] = {k: v for k, v in spec["model"]["vocab"].items() if v < 1000} | {"<s>": 1000,
                                                                                               "</s>": 1001}
    spec["post_processor"] = {"type": "Sequence", "processors": [
        {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        {"type": "TemplateProcessing",
         "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                    {"SpecialToken": {"id": "</s>", "type_id": 0}}],
         "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
         "special_tokens": {"<s>": {"id": "<s>", "ids": [1000], "tokens": ["<s>"]},
                            "</s>": {"id": "</s>", "ids": [1001], "tokens": ["</s>"]}}}]}
    tok = TextTokenizer.from_json(spec)
    assert (tok.bos_id, tok.eos_id) == (1000, 1001)
    rows = text_rows(tok, 0, "Hi", dataclasses.replace(tiny_config(), text_vocab_size=1002))
    assert rows.tokens[:, -1].tolist() == [1000, *tok.encode("[0]Hi"), 1001]


def test_config_then_llama3_defaults_when_the_tokenizer_has_none():
    spec = byte_tokenizer_json()
    spec["added_tokens"] = []
    spec["model"]["vocab"] = {k: v for k, v in spec["model"]["vocab"].items() if v < 256}
    assert vars(TextTokenizer.from_json(spec, 300, 301)).items() >= {"bos_id": 300, "eos_id": 301}.items()
    tok = TextTokenizer.from_json(spec)
    assert (tok.bos_id, tok.eos_id) == (LLAMA3_BOS_ID, LLAMA3_EOS_ID)


def test_a_mismatch_warns_and_the_tokenizer_wins(caplog):
    with caplog.at_level(logging.WARNING, logger="fastcsm"):
        tok = TextTokenizer.from_json(byte_tokenizer_json(BOS, EOS), bos_token_id=128_000, eos_token_id=EOS)
    assert (tok.bos_id, tok.eos_id) == (BOS, EOS)
    [record] = caplog.records
    assert "begin-of-text id is 260" in record.message and "bos_token_id=128000" in record.message
    assert "using 260, the tokenizer's" in record.message


def test_config_json_special_ids_are_read():
    d = dataclasses.replace(tiny_config(), bos_token_id=5, eos_token_id=6).to_hf_dict()
    assert (CsmConfig.from_dict(d).bos_token_id, CsmConfig.from_dict(d).eos_token_id) == (5, 6)
    d = tiny_config().to_hf_dict()
    assert "eos_token_id" not in d and CsmConfig.from_dict(d).eos_token_id is None
    assert CsmConfig.from_dict({**d, "eos_token_id": [7, 8]}).eos_token_id == 7


# -- the same through the command line and the server ---------------------------------------------

def expected_pcm(gen, hf_codes) -> np.ndarray:
    """transformers' codes decoded, as 16-bit audio holds them (random weights go past full scale)."""
    return np.clip(gen.codec.decode(hf_codes).numpy(), -1, 32767 / 32768)


def test_fastcsm_speak_says_transformers_codes(ckpt, gen, hf_codes, tmp_path, capsys):
    root = ckpt[0]
    out = tmp_path / "line.wav"
    rc = main(["speak", LINE[1], "--speaker", str(LINE[0]), "--context", str(root / "conversation.json"),
               "--model", str(root / "model"), "--device", "cpu", "--temperature", "0",
               "--max-ms", str(FRAMES * 80), "-q", "-o", str(out), "--voices-dir", str(tmp_path / "voices")])
    assert rc == 0, capsys.readouterr().err
    audio, sr = sf.read(str(out), dtype="float32")
    want = expected_pcm(gen, hf_codes)
    assert sr == 24_000 and audio.shape == want.shape
    assert np.abs(audio - want).max() <= 2 / 32768  # 16-bit rounding of the same decoded frames


def test_fastcsm_serve_says_transformers_codes(ckpt, gen, hf_codes, tmp_path):
    openai = pytest.importorskip("openai")
    from server_harness import LiveServer

    root = ckpt[0]
    turns = json.loads((root / "conversation.json").read_text())
    ctx = [{"speaker": t["speaker"], "text": t["text"],
            "audio": base64.b64encode((root / t["audio"]).read_bytes()).decode()} for t in turns]
    with LiveServer(model=str(root / "model"), slots=2, voices_dir=str(tmp_path / "voices")) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)
        response = client.audio.speech.create(
            model="csm-1b", voice=str(LINE[0]), input=LINE[1], response_format="pcm",
            extra_body={"context": ctx, "temperature": 0, "max_audio_length_ms": FRAMES * 80})
    audio = np.frombuffer(response.content, "<i2").astype(np.float32) / 32768
    want = expected_pcm(gen, hf_codes)
    assert audio.shape == want.shape
    assert np.abs(audio - want).max() <= 2 / 32768
