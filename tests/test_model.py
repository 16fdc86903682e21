"""fastcsm's network against the transformers CSM (the oracle) on the same random weights."""

import json

import pytest
import torch

from fastcsm.engine.step import prefill
from fastcsm.generator import Generator
from fastcsm.model import checkpoints
from fastcsm.model.config import CsmConfig, preset, tiny_config
from fastcsm.model.prompt import Segment
from fastcsm.testing import write_hf_checkpoint, write_tokenizer

pytest.importorskip("transformers")

CFG = tiny_config()
K = CFG.num_codebooks


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_csm")
    hf = write_hf_checkpoint(root, CFG, seed=0)
    return root, hf


@pytest.fixture(scope="module")
def gen(hf_dir):
    return Generator.from_pretrained(hf_dir[0], device="cpu")


def context_codes(frames=5, seed=1):
    return torch.randint(0, CFG.codebook_size, (frames, K), generator=torch.Generator().manual_seed(seed))


def conversation():
    return [Segment(1, "Hello, how are you?"), Segment(0, "Fine, thanks.", codes=context_codes())]


def oracle_embeds(hf, prompt):
    """Rows embedded with the oracle's own tables: text rows by text id, audio rows by codes."""
    tokens, mask = prompt.tokens[None], prompt.mask[None]
    text = hf.embed_text_tokens(tokens[..., K])
    audio = hf.backbone_model.embed_tokens(tokens[..., :K])
    is_text = mask[..., K:].float()
    return text * is_text + audio * (1 - is_text)


def test_hf_config_round_trip(hf_dir):
    loaded = CsmConfig.from_json(hf_dir[0] / "config.json")
    assert loaded.backbone.inv_freq().allclose(CFG.backbone.inv_freq())
    assert loaded.decoder.inv_freq().allclose(CFG.decoder.inv_freq())
    assert (loaded.backbone.num_layers, loaded.decoder.head_dim) == (CFG.backbone.num_layers, CFG.decoder.head_dim)


def test_csm_1b_rope_matches_hf_convention():
    """The HF config writes the decoder's Llama-3 scaling as low 1/512, high 1/128, original 16."""
    hf = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 0.001953125,
          "high_freq_factor": 0.0078125, "original_max_position_embeddings": 16}
    ours = preset("csm-1b").decoder
    import dataclasses

    from fastcsm.model.config import RopeScaling

    theirs = dataclasses.replace(ours, rope_scaling=RopeScaling.from_hf(hf))
    assert torch.allclose(theirs.inv_freq(), ours.inv_freq(), rtol=1e-6)


@torch.no_grad()
def test_logits_match_oracle(hf_dir, gen):
    _, hf = hf_dir
    prompt = gen.prompt("Nice to meet you.", 0, conversation())
    # the prompt holds a text-only segment, a segment with audio (+ EOS frame), and the line to speak
    assert len(prompt) == sum(len(s.text.encode()) + len(f"[{s.speaker}]") + 2 for s in conversation()) + 6 + len(
        "[0]Nice to meet you.") + 2
    ref = hf(inputs_embeds=oracle_embeds(hf, prompt), output_hidden_states=True)
    ref_logits = ref.logits[0]
    ref_h = ref.hidden_states[-1][0, -1]

    model = gen.model
    T = len(prompt)
    cache = model.backbone_cache(1)
    pos = torch.arange(T)[None]
    h = model.run_backbone(model.embed_rows(prompt.tokens[None], prompt.mask[None]), pos, cache)
    assert (model.codebook0_logits(h)[0] - ref_logits).abs().max() < 1e-4

    # Depth decoder: teacher-forced over one frame of codes, all K-1 logits.
    codes = context_codes(1, seed=7)[0]
    ref_dd = hf.depth_decoder(input_ids=torch.cat([torch.zeros(1, dtype=torch.long), codes[:-1]])[None],
                              backbone_last_hidden_state=ref_h[None]).logits[0]  # [K-1, V]
    x = torch.cat([h[:, -1:], torch.stack([model.embed_code(codes[i:i + 1], i) for i in range(K - 1)], dim=1)], dim=1)
    out = model.run_decoder(x, torch.arange(K)[None], model.decoder_cache(1))[0]
    ours = torch.stack([model.codebook_logits(out[i], i) for i in range(1, K)])
    assert ours.shape == ref_dd.shape
    assert (ours - ref_dd).abs().max() < 1e-4


@torch.no_grad()
def test_prefill_then_decode_matches_one_pass(gen):
    """Rows fed one at a time through the cache give the same hidden states as one prefill."""
    model = gen.model
    prompt = gen.prompt("One two three.", 2, conversation())
    T = len(prompt)
    tokens, mask = prompt.tokens[None], prompt.mask[None]
    full = model.run_backbone(model.embed_rows(tokens, mask), torch.arange(T)[None], model.backbone_cache(1))
    cache = model.backbone_cache(1)
    split = T - 4
    h = prefill(model, tokens[:, :split], mask[:, :split], torch.tensor([0]), cache)
    assert torch.allclose(h, full[:, split - 1], atol=1e-5)
    for t in range(split, T):
        h = prefill(model, tokens[:, t:t + 1], mask[:, t:t + 1], torch.tensor([t]), cache)
        assert torch.allclose(h, full[:, t], atol=1e-5)


@torch.no_grad()
def test_greedy_generation_matches_oracle(hf_dir, gen):
    _, hf = hf_dir
    prompt = gen.prompt("Say something.", 0, conversation())
    frames = 20
    padding = list(range(CFG.codebook_size, CFG.audio_vocab_size))  # never sampled: not audio codes
    ref = hf.generate(inputs_embeds=oracle_embeds(hf, prompt), max_new_tokens=frames, do_sample=False,
                      depth_decoder_do_sample=False, suppress_tokens=padding, depth_decoder_suppress_tokens=padding)
    ref = ref[0]  # [frames, K]
    ours = gen.generate_codes("Say something.", 0, conversation(), max_audio_length_ms=frames * 80, temperature=0)
    assert ours.shape == (frames, K), "random weights should not emit the end frame this early"
    assert torch.equal(ours, ref[:frames])


def sesame_checkpoint(hf_root, dest, fmt):
    """Rewrite an HF checkpoint in the original Sesame naming and RoPE order."""
    model, _ = checkpoints.load_model(hf_root, "cpu")
    state = checkpoints.to_sesame_state_dict(model.state_dict(), model.cfg)
    dest.mkdir()
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, dest / "model.safetensors")
    else:
        torch.save(state, dest / "ckpt.pt")
    write_tokenizer(dest)
    return dest


@pytest.mark.parametrize("fmt", ["safetensors", "ckpt"])
@pytest.mark.parametrize("with_config", [True, False])
@torch.no_grad()
def test_sesame_format_gives_the_same_numbers(hf_dir, gen, tmp_path, fmt, with_config):
    root = sesame_checkpoint(hf_dir[0], tmp_path / "sesame", fmt)
    if with_config:  # as Sesame's hub mixin writes it; without it, the flavours are inferred from shapes
        (root / "config.json").write_text(json.dumps({
            "backbone_flavor": "tiny-backbone", "decoder_flavor": "tiny-decoder", "text_vocab_size": 128256,
            "audio_vocab_size": 2051, "audio_num_codebooks": 32}))
    sesame = Generator.from_pretrained(root, device="cpu")
    assert checkpoints.inspect(root).format == "sesame"
    for name, p in gen.model.state_dict().items():
        assert torch.equal(p, sesame.model.state_dict()[name]), name
    a = gen.generate_codes("Same numbers.", 0, conversation(), max_audio_length_ms=8 * 80, seed=3)
    b = sesame.generate_codes("Same numbers.", 0, conversation(), max_audio_length_ms=8 * 80, seed=3)
    assert torch.equal(a, b)


def test_sharded_checkpoint_loads(hf_dir, gen, tmp_path):
    root = tmp_path / "sharded"
    write_hf_checkpoint(root, CFG, seed=0, max_shard_size="10MB")
    assert (root / "model.safetensors.index.json").is_file()
    sharded = Generator.from_pretrained(root, device="cpu")
    for name, p in gen.model.state_dict().items():
        assert torch.equal(p, sharded.model.state_dict()[name]), name


def test_seed_reproduces_and_seeds_differ(gen):
    kw = dict(context=conversation(), max_audio_length_ms=10 * 80)
    a = gen.generate_codes("Random words.", 0, seed=11, **kw)
    b = gen.generate_codes("Random words.", 0, seed=11, **kw)
    c = gen.generate_codes("Random words.", 0, seed=12, **kw)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.dtype == torch.long and a.shape[1] == K
    assert int(a.min()) >= 0 and int(a.max()) < CFG.codebook_size


def test_interleaved_rope_permutation_is_the_original_convention(hf_dir, tmp_path):
    """Attention scores from the original weights with torchtune's interleaved-pair RoPE equal
    ours from the permuted weights with rotate-half RoPE."""
    from safetensors.torch import load_file

    root = sesame_checkpoint(hf_dir[0], tmp_path / "orig", "safetensors")
    original = load_file(root / "model.safetensors")
    ours = Generator.from_pretrained(hf_dir[0], device="cpu").model
    b = CFG.backbone
    S, hd = 12, b.head_dim
    x = torch.randn(S, b.dim, generator=torch.Generator().manual_seed(0))
    freqs = torch.arange(S)[:, None].float() * b.inv_freq()[None]  # [S, hd/2]
    cos, sin = freqs.cos(), freqs.sin()

    def interleaved(w, heads):
        t = (x @ w.T).view(S, heads, hd // 2, 2)
        a, c = t[..., 0], t[..., 1]
        cs, sn = cos[:, None], sin[:, None]
        return torch.stack([a * cs - c * sn, c * cs + a * sn], dim=-1).flatten(2)

    def half(w, heads):
        t = (x @ w.T).view(S, heads, hd)
        emb_cos, emb_sin = torch.cat([cos, cos], -1)[:, None], torch.cat([sin, sin], -1)[:, None]
        return t * emb_cos + torch.cat([-t[..., hd // 2:], t[..., :hd // 2]], -1) * emb_sin

    state = ours.state_dict()
    q_ref = interleaved(original["backbone.layers.0.attn.q_proj.weight"], b.num_heads)
    k_ref = interleaved(original["backbone.layers.0.attn.k_proj.weight"], b.num_kv_heads)
    q = half(state["backbone.layers.0.attn.q_proj.weight"], b.num_heads)
    k = half(state["backbone.layers.0.attn.k_proj.weight"], b.num_kv_heads)
    group = b.num_heads // b.num_kv_heads
    scores_ref = torch.einsum("shd,thd->hst", q_ref, k_ref.repeat_interleave(group, dim=1))
    scores = torch.einsum("shd,thd->hst", q, k.repeat_interleave(group, dim=1))
    assert torch.allclose(scores, scores_ref, atol=1e-4)
    assert not torch.allclose(q, q_ref, atol=1e-3), "the two conventions must differ in layout"


def test_one_rope_pass_turns_q_and_k_and_writes_keys_and_values_exactly():
    """Attention turns q and k and passes v through in one RoPE pass (cos 1, sin 0 at the value heads),
    then writes keys and values with one scatter: the cache holds v bit for bit, and k equal to RoPE
    applied to k alone."""
    from fastcsm.model.network import CSM, KVCache, rope
    from fastcsm.testing import randomize_

    cfg = tiny_config()
    model = CSM(cfg)
    randomize_(model, seed=1)
    stack = model.backbone
    attn, c = stack.layers[0].attn, stack.cfg
    B, S, T = 2, 3, 8
    x = torch.randn(B, S, c.dim, generator=torch.Generator().manual_seed(0))
    pos = torch.tensor([[0, 1, 2], [4, 5, 6]])
    cache = KVCache.allocate(c, B, T)
    t = stack.tables(pos, T, x.dtype)
    with torch.no_grad():
        attn(x, t, cache.layers[0])
        q, k, v = (p.view(B, S, -1, c.head_dim).transpose(1, 2)
                   for p in attn.qkv_proj(x).split(list(attn.fused["qkv_proj"].values()), dim=-1))
    H, G = c.num_heads, c.num_kv_heads
    cos, sin = t.cos[:, :1], t.sin[:, :1]  # the q/k heads' tables
    assert torch.equal(t.cos[:, H + G:], torch.ones_like(t.cos[:, H + G:]))
    assert torch.equal(t.sin[:, H + G:], torch.zeros_like(t.sin[:, H + G:]))
    for b in range(B):
        at = pos[b]
        assert torch.equal(cache.layers[0][b, G:][:, at], v[b])
        assert torch.equal(cache.layers[0][b, :G][:, at], rope(k, cos, sin)[b])
    untouched = torch.ones(T, dtype=torch.bool)
    untouched[pos[0]] = False
    assert not cache.layers[0][0][:, untouched].any()
