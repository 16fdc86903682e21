"""Fused linears: a layer runs q/k/v as one matmul and gate/up as one, in full precision and in
8 bits, while its state dict keeps the checkpoint's separate names (round trips through
`load_state_dict` and through `fastcsm quantize` + load give the same names and outputs), and
the fused step still compiles as one graph."""

import pytest
import torch

from fastcsm import bench
from fastcsm.engine.engine import Request
from fastcsm.engine.sampling import SamplingParams
from fastcsm.model import checkpoints, network, quant
from fastcsm.model.config import tiny_config
from fastcsm.model.network import CSM, FusedState, Linear, linear
from fastcsm.model.prompt import Segment, TextTokenizer, build_prompt
from fastcsm.testing import assert_compiled_step_equals_eager, byte_tokenizer_json, randomize_, run_alone

CFG = tiny_config()
TOK = TextTokenizer.from_json(byte_tokenizer_json())


def checkpoint_names(cfg, quantized=False):
    """The state-dict names of a CSM as the checkpoint (Sesame's torchtune naming) has them, in
    order; `quantized`: with a `scale` beside each 8-bit weight (the heads as a module, last)."""
    def linear(base):
        return [f"{base}.weight", f"{base}.scale"] if quantized else [f"{base}.weight"]

    names = [] if quantized else ["audio_head"]
    names += ["text_embeddings.weight", "audio_embeddings.weight"]
    for stack, t in (("backbone", cfg.backbone), ("decoder", cfg.decoder)):
        for i in range(t.num_layers):
            p = f"{stack}.layers.{i}."
            names += [p + "sa_norm.scale", *linear(p + "attn.q_proj"), *linear(p + "attn.k_proj"),
                      *linear(p + "attn.v_proj"), *linear(p + "attn.output_proj"), p + "mlp_norm.scale",
                      *linear(p + "mlp.w1"), *linear(p + "mlp.w2"), *linear(p + "mlp.w3")]
        names.append(f"{stack}.norm.scale")
    names += [*linear("projection"), *linear("codebook0_head")]
    return names + (linear("audio_head") if quantized else [])


def request(text="Fused, the same.", speaker=0, seed=0, cfg=CFG, frames=6):
    codes = torch.randint(0, 2048, (3, cfg.num_codebooks), generator=torch.Generator().manual_seed(seed))
    prompt = build_prompt(text, speaker, [Segment(1, "Voice.", codes=codes)], TOK, cfg)
    return Request(prompt, frames, SamplingParams(temperature=0.9, topk=20), seed=seed)


@pytest.fixture(scope="module")
def model():
    return bench.random_model(CFG, "cpu", torch.float32)


def outputs(model):
    """Hidden states of both stacks and the codes of a short sampled run."""
    x = torch.randn(2, 5, CFG.backbone.dim, generator=torch.Generator().manual_seed(0))
    pos = torch.arange(5).expand(2, 5)
    with torch.inference_mode():
        h = model.run_backbone(x, pos, model.backbone_cache(2, 8))
        d = model.run_decoder(h, pos, model.decoder_cache(2))
    return h, d, run_alone(model, request())


def assert_same_outputs(a, b):
    for x, y in zip(outputs(a), outputs(b), strict=True):
        assert torch.equal(x, y)


def test_a_layer_holds_four_linears_and_its_state_dict_the_checkpoints_seven(model):
    attn, mlp = model.backbone.layers[0].attn, model.backbone.layers[0].mlp
    b = CFG.backbone
    assert [n for n, _ in attn.named_children()] == ["qkv_proj", "output_proj"]
    assert [n for n, _ in mlp.named_children()] == ["gate_up_proj", "w2"]
    assert attn.qkv_proj.weight.shape == ((b.num_heads + 2 * b.num_kv_heads) * b.head_dim, b.dim)
    assert mlp.gate_up_proj.weight.shape == (2 * b.intermediate_size, b.dim)
    state = model.state_dict()
    assert list(state) == checkpoint_names(CFG)
    # The parts are views of the fused rows, in order (no copies).
    q, k, v = (state[f"backbone.layers.0.attn.{n}_proj.weight"] for n in "qkv")
    assert q.shape == (b.num_heads * b.head_dim, b.dim) and k.shape == v.shape == (b.num_kv_heads * b.head_dim, b.dim)
    fused = attn.qkv_proj.weight
    assert q.data_ptr() == fused.data_ptr() and v.data_ptr() == fused[-v.shape[0]:].data_ptr()
    assert torch.equal(torch.cat([q, k, v]), fused)
    w1, w3 = state["backbone.layers.0.mlp.w1.weight"], state["backbone.layers.0.mlp.w3.weight"]
    assert torch.equal(torch.cat([w1, w3]), mlp.gate_up_proj.weight)
    assert w1.data_ptr() == mlp.gate_up_proj.weight.data_ptr()


def test_fused_outputs_equal_the_separate_linears(model):
    """One layer by hand with the checkpoint's seven linears equals the fused layer."""
    layer, state, b = model.backbone.layers[0], model.state_dict(), CFG.backbone
    w = lambda n: state[f"backbone.layers.0.{n}.weight"]  # noqa: E731
    x = torch.randn(3, 1, b.dim, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        qkv = layer.attn.qkv_proj(x).split(list(layer.attn.fused["qkv_proj"].values()), dim=-1)
        for y, name in zip(qkv, ("attn.q_proj", "attn.k_proj", "attn.v_proj"), strict=True):
            assert torch.allclose(y, x @ w(name).T, rtol=1e-6, atol=1e-6)
        ref = (torch.nn.functional.silu(x @ w("mlp.w1").T) * (x @ w("mlp.w3").T)) @ w("mlp.w2").T
        assert torch.allclose(layer.mlp(x), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(1, 512), (2, 512), (3, 1, 512), (4, 5, 512), (8, 1, 512), (40, 512)])
def test_the_linear_equals_f_linear(shape):
    """`linear` runs a large fp32 weight on the CPU through oneDNN: the same products, summed in
    another order; a small weight, more than ONEDNN_MAX_ROWS rows, and bf16 through F.linear itself."""
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(*shape, generator=g), torch.randn(600, 512, generator=g) / 16
    assert w.numel() >= network.ONEDNN_MIN
    y = linear(x, w)
    assert y.shape == (*shape[:-1], 600) and y.is_contiguous()
    assert torch.allclose(y, torch.nn.functional.linear(x, w), rtol=1e-5, atol=1e-5)
    small = w[:100]
    assert torch.equal(linear(x, small), torch.nn.functional.linear(x, small))
    many = torch.randn(network.ONEDNN_MAX_ROWS + 1, 512, generator=g)  # oneDNN keeps a primitive a row count
    assert torch.equal(linear(many, w), torch.nn.functional.linear(many, w))
    xb, wb = x.bfloat16(), w.bfloat16()
    assert torch.equal(linear(xb, wb), torch.nn.functional.linear(xb, wb))


def test_every_full_precision_linear_runs_as_the_linear(model):
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(type(m) is Linear and m.bias is None for m in linears)
    assert not any(isinstance(m, torch.nn.Linear) for m in quant.quantized_copy(model, "int8").modules())


@pytest.mark.parametrize("mode", [None, "int8", "fp8"])
def test_state_dict_round_trips_through_load_state_dict(model, mode):
    src = model if mode is None else quant.quantized_copy(model, mode)
    state = src.state_dict()
    assert list(state) == checkpoint_names(CFG, quantized=mode is not None)
    other = CSM(CFG)
    randomize_(other, seed=5)  # other numbers everywhere, then loaded over
    other = quant.prepare(other, mode).eval().requires_grad_(False)
    other.load_state_dict(state, strict=True)
    back = other.state_dict()
    assert list(back) == list(state)
    for name, t in state.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name].float(), t.float()), name
    assert_same_outputs(src, other)


def test_a_missing_part_is_named(model):
    state = dict(model.state_dict())
    del state["decoder.layers.1.attn.k_proj.weight"]
    with pytest.raises(RuntimeError, match=r"decoder\.layers\.1\.attn\.k_proj\.weight"):
        CSM(CFG).load_state_dict(state)
    state.pop("backbone.layers.0.mlp.w3.weight")
    missing = CSM(CFG).load_state_dict(state, strict=False).missing_keys
    assert {"decoder.layers.1.attn.k_proj.weight", "backbone.layers.0.mlp.w3.weight"} <= set(missing)


def test_fused_state_writes_parts_into_their_rows(model):
    """What the loader fills: each part goes straight into the rows of its stacked tensor."""
    with torch.device("meta"):
        target = CSM(CFG)
    state = FusedState(target)
    src = model.state_dict()
    p = "backbone.layers.0.attn."
    state.add({p + "v_proj.weight": src[p + "v_proj.weight"], p + "q_proj.weight": src[p + "q_proj.weight"]})
    assert list(state) == [p + "qkv_proj.weight"]
    state.add({p + "k_proj.weight": src[p + "k_proj.weight"]})
    assert torch.equal(state[p + "qkv_proj.weight"], model.backbone.layers[0].attn.qkv_proj.weight)
    with pytest.raises(ValueError, match="rows"):
        state.add({p + "k_proj.weight": src[p + "q_proj.weight"]})
    with pytest.raises(ValueError, match="unlike the other parts"):
        state.add({p + "k_proj.weight": src[p + "k_proj.weight"].half()})


@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_write_quantized_then_load_keeps_names_and_outputs(model, tmp_path, mode):
    """A full-precision checkpoint written from the fused model's state dict, quantized by
    `fastcsm quantize` and loaded: the checkpoint's names on disk, the same state dict as
    quantizing the loaded model, the same outputs."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    src = tmp_path / "fp32"
    src.mkdir()
    save_file(checkpoints.to_sesame_state_dict(model.state_dict(), CFG), src / "model.safetensors")
    (src / "config.json").write_text('{"backbone_flavor": "tiny-backbone", "decoder_flavor": "tiny-decoder"}')
    out = checkpoints.write_quantized(src, tmp_path / mode, mode)
    with safe_open(out / "model.safetensors", "pt") as f:
        on_disk = set(f.keys())  # noqa: SIM118 (safe_open is not a dict)
    names = checkpoint_names(CFG)
    assert on_disk == set(names) | {n + quant.SCALE_SUFFIX for n in names if quant.QUANTIZED.match(n)}
    loaded, files = checkpoints.load_model(out, "cpu")
    assert files.quantization == mode and quant.mode_of(loaded) == mode
    ref = quant.quantized_copy(model, mode)
    a, b = loaded.state_dict(), ref.state_dict()
    assert list(a) == list(b) == checkpoint_names(CFG, quantized=True)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name].float(), b[name].float()), name
    assert_same_outputs(loaded, ref)
    full, _ = checkpoints.load_model(src, "cpu")  # and the full-precision checkpoint itself
    assert list(full.state_dict()) == names
    assert_same_outputs(full, model)


@pytest.mark.parametrize("onednn", [False, True], ids=["f_linear", "onednn"])
@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_fused_step_compiles_fullgraph_and_equals_eager(backend, onednn, monkeypatch):
    """The fused full-precision frame step is one graph and gives the eager codes (the 8-bit ones:
    test_quant.py), with the tiny model's linears through F.linear, and through oneDNN as a large
    model's are on the CPU (an opaque op in the graph)."""
    if onednn:
        if not network.ONEDNN:
            pytest.skip("this torch has no oneDNN")
        monkeypatch.setattr(network, "ONEDNN_MIN", 0)
    cfg = tiny_config(num_codebooks=2)
    m = CSM(cfg)
    randomize_(m, seed=1)
    m = m.eval().requires_grad_(False)
    rs = [request("Compile me.", i, seed=i, cfg=cfg, frames=8) for i in range(2)]
    assert_compiled_step_equals_eager(m, rs, backend)
