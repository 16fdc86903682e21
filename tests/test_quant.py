"""Eight-bit weights: the kernels' numbers, accuracy against full precision (tolerances pinned
on tiny random models), compiled equals eager, batched equals alone, quantize-while-loading and
pre-quantized checkpoints."""

import json
import os

import pytest
import torch

from fastcsm import bench
from fastcsm.engine.engine import Engine, Request
from fastcsm.engine.sampling import SamplingParams
from fastcsm.generator import Generator
from fastcsm.model import checkpoints, quant
from fastcsm.model.config import tiny_config
from fastcsm.model.network import CSM
from fastcsm.model.prompt import Segment, TextTokenizer, build_prompt
from fastcsm.testing import (
    assert_compiled_step_equals_eager,
    byte_tokenizer_json,
    randomize_,
    run_alone,
    run_together,
    write_tokenizer,
)

CFG = tiny_config()
K = CFG.num_codebooks
TOK = TextTokenizer.from_json(byte_tokenizer_json())


@pytest.fixture(scope="module")
def model():
    """N(0, 0.02) weights, the scale of a trained Llama-style model. (With `randomize_`'s N(0, 0.3)
    the tiny stacks are chaotic: an int8 rounding grows through the layers to ~10% logit error.)"""
    return bench.random_model(CFG, "cpu", torch.float32)


@pytest.fixture(scope="module")
def int8(model):
    return quant.quantized_copy(model, "int8")


def prompt(text, speaker=0, frames=4, seed=0, cfg=CFG):
    codes = torch.randint(0, 2048, (frames, cfg.num_codebooks), generator=torch.Generator().manual_seed(seed))
    return build_prompt(text, speaker, [Segment(1, "Voice sample.", codes=codes)], TOK, cfg)


# -- kernels --------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode, bound", [("int8", 0.012), ("fp8", 0.05)])
def test_weights_round_trip_per_output_channel(mode, bound):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 64, generator=g) * torch.logspace(-3, 1, 96)[:, None]  # rows of very different size
    q, s = quant.quantize(w, mode)
    assert q.dtype == quant.STORAGE[mode] and s.shape == (96,)
    back = quant.dequantize(q, s, torch.float32)
    rel = (back - w).norm(dim=1) / w.norm(dim=1)  # each row keeps its own precision
    assert rel.max() < bound


@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_linear_matches_full_precision(mode):
    g = torch.Generator().manual_seed(1)
    w, x = torch.randn(80, 48, generator=g), torch.randn(5, 3, 48, generator=g)
    lin = quant.QuantLinear(48, 80, mode)
    lin.weight, lin.scale = quant.quantize(w, mode)
    with torch.inference_mode():
        y = lin(x)
    ref = x @ w.T
    assert y.shape == ref.shape and y.dtype == x.dtype
    assert ((y - ref).norm() / ref.norm()) < {"int8": 0.03, "fp8": 0.05}[mode]


def test_cpu_int8_rows_are_independent_of_the_batch():
    """fbgemm quantizes activations with one scale per call; each row is normalised first, so a
    row's result does not depend on the rows beside it (a loud request never coarsens a quiet one)."""
    g = torch.Generator().manual_seed(2)
    lin = quant.QuantLinear(64, 40, "int8")
    lin.weight, lin.scale = quant.quantize(torch.randn(40, 64, generator=g), "int8")
    x = torch.randn(6, 64, generator=g) * torch.tensor([1e-3, 1.0, 50.0, 0.1, 7.0, 1e3])[:, None]
    with torch.inference_mode():
        together = lin(x)
        for i in range(6):
            assert torch.equal(lin(x[i:i + 1]), together[i:i + 1])


def test_a_fused_linear_equals_its_parts_and_follows_new_weights():
    """A layer's q/k/v (and gate/up) are one 8-bit linear over their stacked rows: quantizing the
    stack is exactly quantizing each part (one scale per row), each slice of its output equals its
    part's own linear, and loading new weights packs them again."""
    g = torch.Generator().manual_seed(3)
    ws = [torch.randn(n, 64, generator=g) * (i + 1) for i, n in enumerate((40, 16, 24))]
    for mode in ("int8", "fp8"):
        q, s = quant.quantize(torch.cat(ws), mode)
        parts = [quant.quantize(w, mode) for w in ws]
        assert torch.equal(q.float(), torch.cat([p[0] for p in parts]).float())
        assert torch.equal(s, torch.cat([p[1] for p in parts]))
    fused = quant.QuantLinear(64, 80, "int8")
    fused.load_state_dict(dict(zip(("weight", "scale"), quant.quantize(torch.cat(ws), "int8"), strict=True)))
    lins = []
    for w in ws:
        lin = quant.QuantLinear(64, w.shape[0], "int8")
        lin.load_state_dict(dict(zip(("weight", "scale"), quant.quantize(w, "int8"), strict=True)))
        lins.append(lin)
    x = torch.randn(3, 2, 64, generator=g)
    with torch.inference_mode():
        first = fused(x)
        assert first.shape == (3, 2, 80)
        for f, lin in zip(first.split([40, 16, 24], dim=-1), lins, strict=True):
            assert torch.allclose(f, lin(x), rtol=1e-6, atol=1e-6)
        w = torch.randn(16, 64, generator=g)
        q, s = quant.quantize(torch.cat([ws[0], w, ws[2]]), "int8")
        fused.load_state_dict({"weight": q, "scale": s})
        again = fused(x)
        ref = x @ quant.dequantize(q[40:56], s[40:56], torch.float32).T
        assert (again[..., 40:56] - ref).norm() / ref.norm() < 0.03
        assert not torch.allclose(again[..., 40:56], first[..., 40:56])
        assert torch.equal(again[..., :40], first[..., :40])


def test_moving_an_int8_linear_drops_its_packed_weight():
    """Eager CPU int8 calls run the packed fbgemm weight straight away; a move or cast (`_apply`)
    must drop it, or a linear moved off the CPU, or back with new numbers, would run stale bytes."""
    g = torch.Generator().manual_seed(4)
    lin = quant.QuantLinear(64, 40, "int8")
    lin.load_state_dict(dict(zip(("weight", "scale"), quant.quantize(torch.randn(40, 64, generator=g), "int8"),
                                 strict=True)))
    x = torch.randn(2, 64, generator=g)
    with torch.inference_mode():
        first = lin(x)  # packs
        assert quant._packed_eager(lin.key) is not None and torch.equal(lin(x), first)
        lin.to("meta")
        assert quant._packed_eager(lin.key) is None
        lin.to_empty(device="cpu")
        lin.weight.copy_(quant.quantize(torch.randn(40, 64, generator=g), "int8")[0])
        lin.scale.fill_(0.01)
        assert not torch.equal(lin(x), first)


def test_a_model_built_on_the_meta_device_runs_fbgemm_on_the_cpu():
    """Models are built under `torch.device("meta")`, where whether fbgemm runs is first asked: the
    check must run on the CPU whatever the default device, or every CPU int8 linear would fall
    back to the (20x slower) weight-only matmul without a word."""
    if not quant._vnni() and not torch.backends.quantized.supported_engines:
        pytest.skip("this torch has no quantized CPU engine")
    quant.fbgemm_available.cache_clear()
    try:
        with torch.device("meta"):
            lin = quant.QuantLinear(64, 40, "int8")
        assert lin.fbgemm
        assert all(pin.device.type == "cpu" for pin in quant._pins.values())
    finally:
        quant.fbgemm_available.cache_clear()


# -- the model ------------------------------------------------------------------------------------

def test_what_is_quantized(model, int8):
    q = dict(int8.state_dict())
    for name, t in model.state_dict().items():
        if quant.QUANTIZED.match(name):
            base = "audio_head." if name == "audio_head" else name[:-len("weight")]
            assert q[base + "weight"].dtype == torch.int8
            assert q[base + "scale"].dtype == torch.float32
        else:  # embeddings and norms stay as they were
            assert q[name].dtype == t.dtype and q[name].data_ptr() == t.data_ptr()
    assert int8.audio_head.weight.shape == (K - 1, CFG.audio_vocab_size, CFG.decoder.dim)
    assert quant.mode_of(int8) == "int8" and quant.mode_of(model) is None
    assert int8.dtype == torch.float32


# Pinned on the tiny model, 48 teacher-forced frames. Seen: int8 codebook-0 rel RMS 0.0085, top-1
# 0.96; decoder rel RMS 0.018 (max 0.019), top-1 0.97 (min 0.94) with VNNI (8-bit activations);
# 0.014, 0.96; 0.028 (0.030), 0.95 (0.88) with 7-bit activations. fp8: 0.025, 0.88; 0.063 (0.065),
# 0.89 (0.79). Random logits are flat, so top-1 flips at smaller errors than a trained model's.
@pytest.mark.parametrize("mode, rms0, top0, rms, top", [("int8", 0.025, 0.9, 0.045, 0.9),
                                                          ("fp8", 0.045, 0.8, 0.1, 0.8)])
def test_teacher_forced_accuracy(model, mode, rms0, top0, rms, top):
    q = quant.quantized_copy(model, mode)
    acc = bench.quant_accuracy(model, q, voice_frames=40, frames=8)
    assert acc["frames"] == 40 - 1 + 1 + 8  # the voice frames after the first, its end frame, the generated frames
    assert acc["codebook0_rel_rms"] < rms0 and acc["codebook0_top1"] >= top0
    assert acc["decoder_rel_rms_max"] < rms and acc["decoder_top1_mean"] >= top


def test_first_frames_agree_with_full_precision(model, int8):
    """Greedy runs diverge once one code differs, so compare the first frame of several lines.
    Within a frame the depth decoder compounds too (a differing code feeds the next codebook):
    seen, codebook 0 agrees on 7/7 lines and 152/224 codes agree (120 with 7-bit activations);
    `test_teacher_forced_accuracy`
    measures each codebook without that compounding."""
    lines = ["Hello there.", "Another line entirely.", "Short.", "What time is it?", "Fine, thanks.",
             "Numbers: 1, 2, 3.", "The last one."]
    agree, agree0 = 0, 0
    for i, text in enumerate(lines):
        p = prompt(text, i % 2, frames=3 + i, seed=i)
        ref = next(Engine(model).run(Request(p, 1, SamplingParams(temperature=0), seed=0))).codes
        got = next(Engine(int8).run(Request(p, 1, SamplingParams(temperature=0), seed=0))).codes
        agree += int((ref == got).sum())
        agree0 += int(ref[0] == got[0])
    assert agree0 == len(lines)  # codebook 0: every line
    assert agree >= 0.45 * K * len(lines)


# -- the engine -----------------------------------------------------------------------------------

def test_engine_quantize_argument(model):
    e = Engine(model, quantize="int8")
    assert e.quantization == "int8" and e.model is not model and e.dtype == torch.float32
    assert Engine(model).quantization is None
    with pytest.raises(ValueError, match="unknown quantize='int4'"):
        Engine(model, quantize="int4")
    with pytest.raises(ValueError, match="already quantized as int8"):
        Engine(e.model, quantize="fp8")


def test_int8_batched_equals_alone(int8):
    rs = [Request(prompt(t, i, frames=2 + i, seed=i), 5, SamplingParams(temperature=[0.9, 0.0, 1.1][i], topk=20),
                  seed=10 + i) for i, t in enumerate(["One.", "Two, longer.", "Three!"])]
    for r, together in zip(rs, run_together(Engine(int8, max_slots=4), rs), strict=True):
        assert torch.equal(together, run_alone(int8, Request(r.prompt, 5, r.params, seed=r.seed)))


SLOW = pytest.mark.skipif(not os.environ.get("FASTCSM_SLOW_TESTS"),
                          reason="inductor compiles for minutes on a busy CPU; set FASTCSM_SLOW_TESTS=1")


@pytest.mark.parametrize("mode, backend", [("int8", "aot_eager"), ("fp8", "aot_eager"), ("weight-only", "aot_eager"),
                                           pytest.param("int8", "inductor", marks=SLOW),
                                           pytest.param("fp8", "inductor", marks=SLOW),
                                           pytest.param("weight-only", "inductor", marks=SLOW)])
def test_quantized_step_compiles_fullgraph_and_equals_eager(mode, backend):
    """The 8-bit frame step is one graph (the CPU int8 kernel and the weight-only matmul of CUDA,
    here forced onto the CPU, are opaque custom ops; fp8 is forced onto `torch._scaled_mm` from
    one row, as on CUDA for larger batches) and the compiled step gives the eager codes."""
    torch._dynamo.reset()
    cfg = tiny_config(num_codebooks=2)
    m = CSM(cfg)
    randomize_(m, seed=1)
    q = quant.quantized_copy(m.eval().requires_grad_(False), "int8" if mode == "weight-only" else mode)
    for mod in q.modules():
        if isinstance(mod, (quant.QuantLinear, quant.QuantHeads)):
            mod.scaled_mm_rows = 1 if mode == "fp8" else None
            mod.fbgemm = mod.fbgemm and mode != "weight-only"
    rs = [Request(prompt("Compile me.", i, frames=3, seed=i, cfg=cfg), 8,
                  SamplingParams(temperature=0.9 if i else 0.0, topk=20), seed=i) for i in range(2)]
    assert_compiled_step_equals_eager(q, rs, backend, atol=1e-3, rtol=1e-3)


# -- loading --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sesame_root(tmp_path_factory, model):
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("sesame")
    state = checkpoints.to_sesame_state_dict(model.state_dict(), CFG)
    save_file({k: v.contiguous() for k, v in state.items()}, root / "model.safetensors")
    (root / "config.json").write_text(json.dumps({"backbone_flavor": "tiny-backbone",
                                                  "decoder_flavor": "tiny-decoder"}))
    write_tokenizer(root)
    return root


def same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k].float(), sb[k].float()), k


@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_quantize_while_loading_equals_quantizing_the_loaded_model(sesame_root, model, mode):
    gen = Generator.from_pretrained(sesame_root, device="cpu", quantize=mode)
    assert quant.mode_of(gen.model) == mode
    same_state(gen.model, quant.quantized_copy(model, mode))
    assert Generator.from_pretrained(sesame_root, device="cpu", quantize="none").model.audio_head.dtype == torch.float32


def test_prequantized_checkpoint_loads_directly(sesame_root, model, tmp_path):
    from fastcsm.cli import main

    out = tmp_path / "int8"
    assert main(["quantize", str(sesame_root), str(out)]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization"]["method"] == "int8" and cfg["backbone_flavor"] == "tiny-backbone"
    assert (out / "tokenizer.json").is_file()
    gen = Generator.from_pretrained(out, device="cpu")  # 8 bits, as stored
    same_state(gen.model, quant.quantized_copy(model, "int8"))
    linears = sum(t.nbytes for n, t in model.state_dict().items() if quant.QUANTIZED.match(n))  # fp32
    saved = (sesame_root / "model.safetensors").stat().st_size - (out / "model.safetensors").stat().st_size
    assert saved > 0.7 * linears  # int8 + fp32 scales (tiny rows of 32-64: the scales show), mostly embeddings
    full = Generator.from_pretrained(out, device="cpu", quantize="none").model  # dequantized
    assert quant.mode_of(full) is None
    w1 = "backbone.layers.0.mlp.w1.weight"
    rel = (full.state_dict()[w1] - model.state_dict()[w1]).norm() / model.state_dict()[w1].norm()
    assert rel < 0.01
    with pytest.raises(checkpoints.CheckpointError, match="already quantized"):
        checkpoints.write_quantized(out, tmp_path / "again")
    with pytest.raises(checkpoints.CheckpointError, match="not an empty directory"):
        checkpoints.write_quantized(sesame_root, out)


@pytest.mark.slow
def test_prequantized_hf_checkpoint_keeps_its_codec(tiny_csm_dir, tmp_path):
    src = tiny_csm_dir
    out = checkpoints.write_quantized(src, tmp_path / "hf-int8")
    direct = Generator.from_pretrained(src, device="cpu", quantize="int8")
    stored = Generator.from_pretrained(out, device="cpu")
    same_state(direct.model, stored.model)
    assert stored.codec is not None
    codes = torch.randint(0, 2048, (3, K), generator=torch.Generator().manual_seed(0))
    assert torch.equal(direct.codec.decode(codes), stored.codec.decode(codes))
    frames = stored.generate_codes("Hi there.", 0, max_audio_length_ms=400, temperature=0)
    assert frames.shape[1] == K


def test_cli_quantize_flags(sesame_root, tmp_path, capsys):
    from fastcsm.cli import main

    for flag in ("--quantize", "--mode"):  # --mode: the older spelling
        with pytest.raises(SystemExit) as exc:
            main(["quantize", str(sesame_root), str(tmp_path / "x"), flag, "int4"])
        assert exc.value.code == 2 and "int4" in capsys.readouterr().err
    assert main(["quantize", str(tmp_path / "nowhere"), str(tmp_path / "y")]) == 3


def test_speak_and_serve_settings_take_quantize(tiny_csm_dir, tmp_path, capsys):
    import soundfile as sf

    from fastcsm.cli import main
    from fastcsm.server.cli import add_serve
    from fastcsm.server.settings import settings_from_args

    out = tmp_path / "int8.wav"
    assert main(["speak", "Hello.", "--model", str(tiny_csm_dir), "--device", "cpu", "--quantize", "int8",
                 "--max-ms", "240", "--seed", "1", "-q", "-o", str(out)]) == 0
    assert sf.info(str(out)).frames > 0
    with pytest.raises(SystemExit) as exc:
        main(["speak", "Hello.", "--model", str(tiny_csm_dir), "--quantize", "int4", "-o", str(out)])
    assert exc.value.code == 2 and "int4" in capsys.readouterr().err

    import argparse
    sub = argparse.ArgumentParser().add_subparsers()
    add_serve(sub)
    args = sub.choices["serve"].parse_args(["--quantize", "int8"])
    assert settings_from_args(args).quantize == "int8"
