"""Mimi: parity with transformers' MimiModel, streamed against whole, and every weight layout.

The reference is a tiny transformers `MimiModel` (real strides, 32 codebooks of 2048 entries, an
8-step attention window so that "longer than the window" is cheap) whose random weights are pushed
far from their init: layer scales near 1 instead of 0.01, non-trivial LayerNorms, non-zero
codebooks with uneven (and some zero) cluster usage.
"""

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fastcsm.codec.mimi import Mimi, MimiConfig, check_codes, tiny_mimi_config
from fastcsm.codec.weights import (
    KYUTAI_FILENAME,
    detect_layout,
    export_state_dict,
    load_mimi,
    mimi_from_state_dict,
)
from fastcsm.model.checkpoints import half_to_interleaved, interleaved_to_half

transformers = pytest.importorskip("transformers")

CFG = tiny_mimi_config()  # sliding window 8 steps = 4 frames
FRAME = CFG.frame_size


def _randomise(hf, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("layer_scale.scale"):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            elif "layernorm" in name:
                p.copy_(float(name.endswith("weight")) + 0.2 * torch.randn(p.shape, generator=g))
            elif "_transformer." in name:  # attention and MLP: unit-variance outputs, not std 0.02
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
        for name, b in hf.named_buffers():
            if name.endswith("cluster_usage"):
                usage = 0.2 + 2 * torch.rand(b.shape, generator=g)
                usage[:3] = 0.0  # the reference clamps usage at 1e-5
                b.copy_(usage)
            elif name.endswith("embed_sum"):
                total = torch.randn(b.shape, generator=g)
                total[:3] *= 1e-5
                b.copy_(total)
        for m in hf.modules():
            if hasattr(m, "_embed"):
                m._embed = None
        # Bring the output to speech-like scale so that absolute tolerances mean something.
        codes = torch.randint(0, CFG.codebook_size, (2, CFG.num_codebooks, 6), generator=g)
        scale = 0.3 / hf.decode(codes).audio_values.std()
        last = hf.decoder.decoder_seanet.layers[-1].conv
        last.weight.mul_(scale)
        last.bias.mul_(scale)


@pytest.fixture(scope="module")
def hf():
    torch.manual_seed(0)
    model = transformers.MimiModel(transformers.MimiConfig(**CFG.to_hf_dict())).eval()
    _randomise(model)
    return model


@pytest.fixture(scope="module")
def hf_dir(hf, tmp_path_factory):
    path = tmp_path_factory.mktemp("mimi_hf")
    hf.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def mimi(hf_dir):
    return load_mimi(hf_dir)


def _wav(batch: int, samples: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(samples) / CFG.sample_rate
    tone = 0.3 * torch.sin(2 * torch.pi * 220 * t * (1 + torch.arange(batch)[:, None]))
    return (tone + 0.1 * torch.randn(batch, samples, generator=g))[:, None]


def _codes(batch: int, frames: int, seed: int, k: int = CFG.num_codebooks) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, CFG.codebook_size, (batch, k, frames), generator=g)


# -- config ---------------------------------------------------------------------------------------


def test_config_from_transformers_and_csm_dicts(hf):
    assert MimiConfig.from_dict(hf.config.to_dict()) == CFG
    assert MimiConfig.from_dict({"model_type": "csm", "codec_config": CFG.to_hf_dict()}) == CFG
    published = MimiConfig.from_dict({"model_type": "mimi", "frame_rate": 12.5})  # older configs state it
    assert published == MimiConfig()
    assert (published.hop_length, published.frame_size, published.frame_rate) == (960, 1920, 12.5)
    for bad in ({"use_causal_conv": False}, {"num_key_value_heads": 4}, {"upsample_groups": 1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            MimiConfig.from_dict(bad)


def test_published_shapes_match_transformers():
    """Every tensor of the published Mimi, in transformers' names, has transformers' shape."""
    with torch.device("meta"):
        ours = export_state_dict(Mimi(MimiConfig()), "hf")
        theirs = transformers.MimiModel(transformers.MimiConfig()).state_dict()
    flat = {
        re.sub(r"^(encoder|decoder)\.(encoder|decoder)_seanet\.", r"\1.", re.sub(
            r"^(encoder|decoder)\.((encoder|decoder)_transformer|downsample|upsample)\.", r"\2.", k)): v.shape
        for k, v in theirs.items()
    }
    assert {k: v.shape for k, v in ours.items()} == flat


# -- parity with transformers -----------------------------------------------------------------------


@pytest.mark.parametrize("samples", [3 * FRAME, 9 * FRAME + 777], ids=["within-window", "beyond-window-ragged"])
def test_encode_matches_transformers(hf, mimi, samples):
    wav = _wav(2, samples, seed=samples)
    with torch.no_grad():
        expected = hf.encode(wav).audio_codes
    codes = mimi.encode(wav)
    assert codes.shape == expected.shape == (2, CFG.num_codebooks, -(-samples // FRAME))
    assert codes.unique().numel() > 100  # not a degenerate codebook
    assert torch.equal(codes, expected)
    assert torch.equal(mimi.encode(wav, num_codebooks=8), expected[:, :8])
    assert torch.equal(mimi.encode_frames(wav[0, 0]), expected[0].T)


@pytest.mark.parametrize("frames", [3, 20], ids=["within-window", "beyond-window"])
def test_decode_matches_transformers(hf, mimi, frames):
    codes = _codes(2, frames, seed=frames)
    with torch.no_grad():
        expected = hf.decode(codes).audio_values
    pcm = mimi.decode(codes)
    assert pcm.shape == expected.shape == (2, 1, frames * FRAME)
    assert expected.std() > 0.1
    torch.testing.assert_close(pcm, expected, atol=1e-4, rtol=0)
    with torch.no_grad():
        expected8 = hf.decode(codes[:, :8]).audio_values
    torch.testing.assert_close(mimi.decode(codes[:, :8]), expected8, atol=1e-4, rtol=0)


def test_kyutai_rope_convention():
    """Kyutai rotates interleaved pairs; its q/k rows permuted to halves give the same scores."""
    g = torch.Generator().manual_seed(0)
    heads, head_dim, dim, steps = 2, 8, 16, 5
    wq, wk = torch.randn(dim, dim, generator=g), torch.randn(dim, dim, generator=g)
    x = torch.randn(steps, dim, generator=g)
    angles = torch.arange(steps)[:, None] * (1.0 / 10_000 ** (torch.arange(0, head_dim, 2) / head_dim))

    def interleaved(y):  # y: [steps, heads, head_dim], pairs (0,1), (2,3), ...
        a, b = y[..., 0::2], y[..., 1::2]
        c, s = angles.cos()[:, None], angles.sin()[:, None]
        return torch.stack([a * c - b * s, a * s + b * c], dim=-1).flatten(-2)

    def halves(y):
        a, b = y.chunk(2, dim=-1)
        c, s = angles.cos()[:, None], angles.sin()[:, None]
        return torch.cat([a * c - b * s, a * s + b * c], dim=-1)

    def scores(q, k):
        return torch.einsum("qhd,khd->hqk", q, k)

    view = (steps, heads, head_dim)
    kyutai = scores(interleaved((x @ wq.T).view(view)), interleaved((x @ wk.T).view(view)))
    q2, k2 = interleaved_to_half(wq, heads), interleaved_to_half(wk, heads)
    ours = scores(halves((x @ q2.T).view(view)), halves((x @ k2.T).view(view)))
    torch.testing.assert_close(ours, kyutai, atol=1e-4, rtol=1e-5)
    assert torch.equal(half_to_interleaved(q2, heads), wq)


# -- streaming equals whole -------------------------------------------------------------------------


@pytest.mark.parametrize("chunks", [[1] * 24, [1, 1, 3, 2, 3, 5, 1, 4, 4]], ids=["frame-by-frame", "uneven"])
def test_streaming_decode_equals_whole(mimi, chunks):
    """Slot 0 streams from the start; slot 1 starts at frame 5; slot 2 is reset at frame 10."""
    total = sum(chunks)
    a, b, c1, c2 = _codes(1, 24, 1), _codes(1, 19, 2), _codes(1, 10, 3), _codes(1, 14, 4)
    junk = _codes(1, 5, 5)
    streams = torch.cat([a, torch.cat([junk, b], -1), torch.cat([c1, c2], -1)])  # [3, K, 24]
    decoder = mimi.streaming_decoder(3, max_chunk_frames=4)  # chunks of 5 exercise the split
    out, t = [], 0
    for n in chunks:
        if t in (5, 10):
            decoder.reset(torch.tensor([False, t == 5, t == 10]))
        out.append(decoder.decode(streams[..., t: t + n]))
        t += n
    out = torch.cat(out, -1)
    assert t == total and out.shape == (3, 1, total * FRAME)
    tol = dict(atol=1e-5, rtol=0)
    torch.testing.assert_close(out[0], mimi.decode(a)[0], **tol)
    torch.testing.assert_close(out[1, :, 5 * FRAME:], mimi.decode(b)[0], **tol)
    torch.testing.assert_close(out[2, :, : 10 * FRAME], mimi.decode(c1)[0], **tol)
    torch.testing.assert_close(out[2, :, 10 * FRAME:], mimi.decode(c2)[0], **tol)


def test_streaming_encode_equals_whole(hf, mimi):
    wav = _wav(2, 10 * FRAME, seed=7)
    encoder = mimi.streaming_encoder(2, max_chunk_frames=2)
    codes = []
    for t, n in zip([0, 1, 4, 6, 7], [1, 3, 2, 1, 3], strict=True):
        if t == 4:
            encoder.reset(torch.tensor([False, True]))
        codes.append(encoder.encode(wav[..., t * FRAME: (t + n) * FRAME]))
    codes = torch.cat(codes, -1)
    assert torch.equal(codes[:1], mimi.encode(wav[:1]))
    assert torch.equal(codes[1:, :, :4], mimi.encode(wav[1:, :, : 4 * FRAME]))
    with torch.no_grad():
        expected = hf.encode(wav[1:, :, 4 * FRAME:]).audio_codes
    assert torch.equal(codes[1:, :, 4:], expected)


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_decode_step_compiles_fullgraph(mimi, backend):
    """The single-frame step traces as one graph (no host syncs or value branches) and equals eager."""
    eager, compiled = mimi.streaming_decoder(2), mimi.streaming_decoder(2)
    step = torch.compile(compiled.step, fullgraph=True, backend=backend)
    codes = _codes(2, 4, seed=11)
    for t in range(4):
        if t == 2:
            mask = torch.tensor([True, False])
            eager.reset(mask)
            compiled.reset(mask)
        torch.testing.assert_close(step(codes[..., t: t + 1]), eager.step(codes[..., t: t + 1]), atol=1e-5, rtol=0)


def test_stream_state_survives_inference_mode_boundaries(mimi):
    codes = _codes(1, 2, seed=12)
    with torch.inference_mode():
        made_inside = mimi.streaming_decoder(1)
        first = made_inside.decode(codes[..., :1])
    second = made_inside.decode(codes[..., 1:])  # in-place state updates outside inference mode
    torch.testing.assert_close(torch.cat([first, second], -1), mimi.decode(codes), atol=1e-5, rtol=0)


# -- codes at the boundary --------------------------------------------------------------------------


@pytest.mark.parametrize("value", [-1, CFG.codebook_size, 2050])
def test_out_of_range_codes_raise(mimi, value):
    codes = _codes(2, 3, seed=0)
    codes[1, 5, 2] = value
    with pytest.raises(ValueError, match=rf"{value} at \[batch 1, codebook 5, frame 2\]"):
        mimi.decode(codes)
    with pytest.raises(ValueError, match="outside 0..2047"):
        mimi.streaming_decoder(2).decode(codes)


@pytest.mark.parametrize(
    "codes, message",
    [
        (torch.zeros(1, 32, 2), "integer tensor"),
        (torch.zeros(32, 2, dtype=torch.long), "shape"),
        (torch.zeros(1, 33, 2, dtype=torch.long), "33 codebooks"),
        (torch.zeros(1, 32, 0, dtype=torch.long), "no frames"),
    ],
)
def test_malformed_codes_raise(codes, message):
    with pytest.raises(ValueError, match=message):
        check_codes(codes, CFG)


def test_streaming_decoder_checks_slots_and_clamps_unchecked_codes(mimi):
    decoder = mimi.streaming_decoder(2)
    with pytest.raises(ValueError, match="2 slots"):
        decoder.decode(_codes(3, 1, seed=0))
    codes = _codes(2, 1, seed=0)
    wild = codes.clone()
    wild[0, 0, 0] = 10**6  # unvalidated: clamped into the table, never an out-of-bounds read
    clamped = codes.clone()
    clamped[0, 0, 0] = CFG.codebook_size - 1
    torch.testing.assert_close(decoder.step(wild), mimi.streaming_decoder(2).step(clamped))


def test_encode_rejects_bad_waveforms(mimi):
    with pytest.raises(ValueError, match=r"\[batch, 1, samples\]"):
        mimi.encode(torch.zeros(FRAME))
    with pytest.raises(ValueError, match="empty"):
        mimi.encode(torch.zeros(1, 1, 0))
    with pytest.raises(ValueError, match="NaN"):
        mimi.encode(torch.full((1, 1, FRAME), float("nan")))
    with pytest.raises(ValueError, match="k \\* 1920"):
        mimi.streaming_encoder(1).encode(torch.zeros(1, 1, FRAME + 1))


# -- weight layouts ---------------------------------------------------------------------------------


def _hf_to_kyutai(sd: dict, hf) -> dict:
    """transformers checkpoint names -> Kyutai's, written from the published conversion in reverse."""
    layer_names = {
        "self_attn.o_proj": "self_attn.out_proj", "input_layernorm": "norm1",
        "post_attention_layernorm": "norm2", "mlp.fc1": "linear1", "mlp.fc2": "linear2",
        "self_attn_layer_scale": "layer_scale_1", "mlp_layer_scale": "layer_scale_2",
    }
    transposed = {i for i, layer in enumerate(hf.decoder.decoder_seanet.layers)
                  if isinstance(layer, transformers.models.mimi.modeling_mimi.MimiConvTranspose1d)}
    heads = hf.config.num_attention_heads

    def interleave(w):  # inverse of the conversion script's rotate-half permutation
        return w.view(heads, 2, w.shape[0] // heads // 2, w.shape[1]).transpose(1, 2).reshape(w.shape)

    out = {}
    for name, t in sd.items():
        if m := re.fullmatch(r"(\w+)_transformer\.layers\.(\d+)\.(.+)\.(weight|bias|scale)", name):
            stack, i, module, kind = m.groups()
            prefix = f"{stack}_transformer.transformer.layers.{i}."
            if module == "self_attn.q_proj":
                k, v = sd[name.replace("q_proj", "k_proj")], sd[name.replace("q_proj", "v_proj")]
                out[prefix + "self_attn.in_proj_weight"] = torch.cat([interleave(t), interleave(k), v])
            elif module not in ("self_attn.k_proj", "self_attn.v_proj"):
                out[f"{prefix}{layer_names[module]}.{kind}"] = t
        elif m := re.fullmatch(r"(encoder|decoder)\.layers\.(\d+)\.(.*)conv\.(weight|bias)", name):
            stack, i, inner, kind = m.groups()
            conv = "convtr.convtr" if stack == "decoder" and int(i) in transposed else "conv.conv"
            out[f"{stack}.model.{i}.{inner}{conv}.{kind}"] = t
        elif name == "downsample.conv.weight":
            out["downsample.conv.conv.conv.weight"] = t
        elif name == "upsample.conv.weight":
            out["upsample.convtr.convtr.convtr.weight"] = t
        else:
            name = name.replace("semantic_residual_vector_quantizer", "rvq_first")
            name = name.replace("acoustic_residual_vector_quantizer", "rvq_rest")
            name = re.sub(r"\.layers\.(\d+)\.codebook\.", r".vq.layers.\1._codebook.", name)
            out[name.replace("embed_sum", "embedding_sum").replace("initialized", "_initialized")] = t
    return out


def _hf_checkpoint(hf_dir) -> dict:
    from safetensors.torch import load_file

    return load_file(str(hf_dir / "model.safetensors"))


def _assert_same_model(a: Mimi, b: Mimi) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


def test_published_layouts_names_and_shapes():
    """fastcsm's names and shapes for the full-size codec, in both layouts, are those of the published
    checkpoints (tests/data/mimi_layouts.json, written from Kyutai's checkpoint and transformers'
    conversion script, not from fastcsm's mapping)."""
    golden = json.loads((Path(__file__).parent / "data" / "mimi_layouts.json").read_text())["pairs"]
    with torch.device("meta"):
        full = Mimi(MimiConfig())
    for layout in ("kyutai", "hf"):
        exported = {name: list(t.shape) for name, t in export_state_dict(full, layout).items()}
        for pair in golden:
            assert exported.get(pair[layout]) == pair[f"{layout}_shape"], pair[layout]
        assert detect_layout([pair[layout] for pair in golden]) == layout


def test_kyutai_and_transformers_layouts_give_identical_outputs(hf, hf_dir, mimi, tmp_path):
    kyutai_sd = _hf_to_kyutai(_hf_checkpoint(hf_dir), hf)
    assert detect_layout(kyutai_sd) == "kyutai"
    save_file(kyutai_sd, str(tmp_path / KYUTAI_FILENAME))
    kyutai = load_mimi(tmp_path, config=CFG)
    _assert_same_model(kyutai, mimi)
    wav, codes = _wav(1, 4 * FRAME + 5, seed=3), _codes(1, 6, seed=3)
    assert torch.equal(kyutai.encode(wav), mimi.encode(wav))
    assert torch.equal(kyutai.decode(codes), mimi.decode(codes))
    # Newer moshi names for the attention projections, transformers' nested in-memory names, our own
    # export in both layouts, and our own state dict all load to the same model.
    renamed = {re.sub(r"in_proj_weight$", "in_projs.0.weight", re.sub(r"out_proj\.", "out_projs.0.", k)): v
               for k, v in kyutai_sd.items()}
    _assert_same_model(mimi_from_state_dict(renamed, CFG), mimi)
    _assert_same_model(mimi_from_state_dict(hf.state_dict(), CFG), mimi)
    for layout in ("kyutai", "hf"):
        _assert_same_model(mimi_from_state_dict(export_state_dict(mimi, layout), CFG), mimi)
    _assert_same_model(mimi_from_state_dict(mimi.state_dict(), CFG), mimi)


def test_csm_checkpoint_codec_prefix(hf_dir, mimi, tmp_path):
    """A transformers CSM checkpoint: the codec is `codec_model.*`, its shapes in `codec_config`."""
    csm = {"codec_model." + k: v for k, v in _hf_checkpoint(hf_dir).items()}
    other = {"backbone_model.embed_tokens.weight": torch.zeros(4, 2), "lm_head.weight": torch.zeros(3, 2)}
    _assert_same_model(mimi_from_state_dict({**csm, **other}, CFG, prefix="codec_model."), mimi)
    # On disk, sharded, with the codec split over two shards and one shard without it.
    names = sorted(csm)
    shards = {"model-00001-of-00003.safetensors": other,
              "model-00002-of-00003.safetensors": {k: csm[k] for k in names[: len(names) // 2]},
              "model-00003-of-00003.safetensors": {k: csm[k] for k in names[len(names) // 2:]}}
    for file, tensors in shards.items():
        save_file(tensors, str(tmp_path / file))
    weight_map = {k: file for file, tensors in shards.items() for k in tensors}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "csm", "codec_config": CFG.to_hf_dict()}))
    _assert_same_model(load_mimi(tmp_path), mimi)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda sd: sd.pop("decoder_transformer.layers.1.mlp.fc2.weight"),
         r"missing tensor 'codec_model.decoder_transformer.layers.1.mlp.fc2.weight' \(expected shape \[32, 64\]\)"),
        (lambda sd: sd.update({"encoder.layers.0.conv.extra": torch.zeros(2)}),
         r"unexpected tensor 'codec_model.encoder.layers.0.conv.extra' \(shape \[2\]\)"),
        (lambda sd: sd.update({"upsample.conv.weight": torch.zeros(32, 32, 4)}),
         r"tensor 'codec_model.upsample.conv.weight' has shape \[32, 32, 4\], expected \[32, 1, 4\]"),
        (lambda sd: sd.pop("quantizer.acoustic_residual_vector_quantizer.layers.30.codebook.embed_sum"),
         r"missing tensor .*acoustic_residual_vector_quantizer.layers.30.codebook.embed_sum"),
    ],
    ids=["missing", "extra", "misshaped", "missing-codebook"],
)
def test_bad_weights_name_the_tensor(hf_dir, edit, message):
    sd = _hf_checkpoint(hf_dir)
    edit(sd)
    with pytest.raises(ValueError, match=message):
        mimi_from_state_dict({"codec_model." + k: v for k, v in sd.items()}, CFG, prefix="codec_model.")


def test_unrecognised_weights_and_paths(tmp_path):
    with pytest.raises(ValueError, match="could not recognise"):
        mimi_from_state_dict({"foo.weight": torch.zeros(1)}, CFG)
    with pytest.raises(ValueError, match="no Mimi tensors under prefix 'codec_model.'"):
        mimi_from_state_dict({"foo.weight": torch.zeros(1)}, CFG, prefix="codec_model.")
    with pytest.raises(FileNotFoundError):
        load_mimi(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no Mimi weights"):
        load_mimi(tmp_path)
