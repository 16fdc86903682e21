"""Bad input gets a clear error at the boundary, and the generator keeps working afterwards."""

import json

import pytest
import torch

from fastcsm.generator import Generator
from fastcsm.model import checkpoints
from fastcsm.model.config import tiny_config
from fastcsm.model.network import CSM
from fastcsm.model.prompt import Segment
from fastcsm.testing import randomize_, write_tokenizer

CFG = tiny_config()
K = CFG.num_codebooks


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A tiny checkpoint in the original Sesame format (no transformers needed)."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("sesame")
    model = CSM(CFG)
    randomize_(model, seed=0)
    state = checkpoints.to_sesame_state_dict(model.state_dict(), CFG)
    save_file({k: v.contiguous() for k, v in state.items()}, root / "model.safetensors")
    flavors = {"backbone_flavor": "tiny-backbone", "decoder_flavor": "tiny-decoder"}
    (root / "config.json").write_text(json.dumps(flavors))
    write_tokenizer(root)
    return root


@pytest.fixture(scope="module")
def gen(root):
    return Generator.from_pretrained(root, device="cpu")


def ok(gen):
    """The generator still works after a refused request."""
    assert gen.generate_codes("Still here.", 0, max_audio_length_ms=160, seed=0).shape == (2, K)


@pytest.mark.parametrize("text", ["", "   ", "\n\t"])
def test_empty_text(gen, text):
    with pytest.raises(ValueError, match="text is empty"):
        gen.generate_codes(text, 0)
    ok(gen)


def test_text_not_a_string(gen):
    with pytest.raises(TypeError, match="text must be a string"):
        gen.generate_codes(None, 0)


@pytest.mark.parametrize("speaker", [-1, 1.5, "0", True, None, 1_000_001])
def test_bad_speaker(gen, speaker):
    with pytest.raises(ValueError, match="speaker must be an integer from 0 to 1000000"):
        gen.generate_codes("Hello.", speaker)
    with pytest.raises(ValueError, match="speaker must be an integer from 0 to 1000000"):
        gen.generate_codes("Hello.", 0, context=[Segment(speaker, "Hi.")])
    ok(gen)


def test_prompt_too_long_for_window(gen):
    long_codes = torch.zeros(1500, K, dtype=torch.long) + 5
    with pytest.raises(ValueError) as e:
        gen.generate_codes("Hello.", 0, context=[Segment(1, "Hi.", codes=long_codes)], max_audio_length_ms=90_000)
    msg = str(e.value)
    rows = len(gen.prompt("Hello.", 0, [Segment(1, "Hi.", codes=long_codes)]))
    assert f"the prompt ({rows} rows)" in msg and "1125 frames" in msg and "2048-row context window" in msg
    assert "shorten the context" in msg and f"at most {(2048 - rows) * 80} ms" in msg
    ok(gen)


@pytest.mark.parametrize("ms, match", [(79, "shorter than one 80 ms frame"), (0, "must be a finite number > 0"),
                                       (-5, "must be a finite number > 0")])
def test_length_below_one_frame(gen, ms, match):
    with pytest.raises(ValueError, match=match):
        gen.generate_codes("Hello.", 0, max_audio_length_ms=ms)


@pytest.mark.parametrize(
    "codes, match",
    [
        (torch.full((3, K), 2048), r"0\.\.2047"),
        (torch.full((3, K), -1), r"0\.\.2047"),
        (torch.zeros(3, K - 1, dtype=torch.long), r"shape \[frames, 32\]"),
        (torch.zeros(3, K, 2, dtype=torch.long), r"shape \[frames, 32\]"),
        (torch.zeros(0, K, dtype=torch.long), "no frames"),
        (torch.zeros(3, K), "integer tensor"),
    ],
)
def test_bad_codes(gen, codes, match):
    with pytest.raises(ValueError, match=match):
        gen.generate_codes("Hello.", 0, context=[Segment(1, "Hi.", codes=codes)])
    ok(gen)


def test_audio_without_codec(gen):
    with pytest.raises(ValueError, match="no audio codec"):
        gen.generate_codes("Hello.", 0, context=[Segment(1, "Hi.", audio=torch.zeros(24000))])


@pytest.mark.parametrize("kw, match", [
    (dict(temperature=-0.1), "temperature"), (dict(topk=-1), "topk"), (dict(topk=2.5), "topk"),
    (dict(topp=0), "topp"), (dict(topp=1.5), "topp"),
])
def test_bad_sampling(gen, kw, match):
    with pytest.raises(ValueError, match=match):
        gen.generate_codes("Hello.", 0, **kw)


def test_directory_without_weights(tmp_path):
    with pytest.raises(checkpoints.CheckpointError, match="no CSM weights"):
        Generator.from_pretrained(tmp_path, device="cpu")


def test_unknown_format(tmp_path):
    from safetensors.torch import save_file

    save_file({"encoder.weight": torch.zeros(2, 2)}, tmp_path / "model.safetensors")
    with pytest.raises(checkpoints.CheckpointError, match="unknown checkpoint format"):
        Generator.from_pretrained(tmp_path, device="cpu")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(checkpoints.CheckpointError, match="'bert' model, not CSM"):
        Generator.from_pretrained(tmp_path, device="cpu")


def test_not_a_path_or_repo():
    with pytest.raises(checkpoints.CheckpointError, match="neither an existing directory nor a hub repo id"):
        Generator.from_pretrained("./no/such/dir", device="cpu")


def test_missing_extra_and_misshaped_tensors(root, tmp_path):
    from safetensors.torch import load_file, save_file

    state = load_file(root / "model.safetensors")
    config = (root / "config.json").read_text()

    def attempt(st):
        d = tmp_path / f"ckpt{len(list(tmp_path.iterdir()))}"
        d.mkdir()
        save_file(st, d / "model.safetensors")
        (d / "config.json").write_text(config)
        write_tokenizer(d)
        return Generator.from_pretrained(d, device="cpu")

    missing = dict(state)
    del missing["projection.weight"]
    with pytest.raises(checkpoints.CheckpointError, match=r"lacks tensors: projection.weight \[32, 64\]"):
        attempt(missing)
    extra = dict(state, **{"backbone.layers.9.attn.q_proj.weight": torch.zeros(4, 4)})
    with pytest.raises(checkpoints.CheckpointError, match=r"does not have: \['backbone.layers.9"):
        attempt(extra)
    wrong = dict(state, **{"codebook0_head.weight": torch.zeros(2051, 65)})
    with pytest.raises(checkpoints.CheckpointError,
                       match=r"'codebook0_head.weight' has shape \[2051, 65\], expected \[2051, 64\]"):
        attempt(wrong)


def test_missing_tokenizer(root, tmp_path):
    import shutil

    d = tmp_path / "notok"
    shutil.copytree(root, d)
    (d / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        Generator.from_pretrained(d, device="cpu")
    assert Generator.from_pretrained(d, device="cpu", tokenizer=root / "tokenizer.json").tokenizer is not None


def test_dtype_the_device_cannot_run(root):
    with pytest.raises(ValueError, match="not supported"):
        Generator.from_pretrained(root, device="cpu", dtype=torch.int8)
    with pytest.raises(ValueError, match="unknown dtype"):
        Generator.from_pretrained(root, device="cpu", dtype="fp8")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="sees no CUDA GPU"):
            Generator.from_pretrained(root, device="cuda")


def test_bf16_on_cpu_runs(root):
    gen = Generator.from_pretrained(root, device="cpu", dtype="bf16")
    assert gen.model.codebook0_head.weight.dtype == torch.bfloat16
    assert gen.generate_codes("Hello.", 0, max_audio_length_ms=240, seed=1).shape == (3, K)


def test_hub_id_resolves_offline_from_the_local_cache(root, tmp_path, monkeypatch):
    """A repo id found in the hub cache loads with no network (HF_HUB_OFFLINE)."""
    import shutil

    import huggingface_hub.constants as hub

    cache = tmp_path / "hub"
    snapshot = cache / "models--someone--tiny-csm" / "snapshots" / ("0" * 40)
    shutil.copytree(root, snapshot)
    (cache / "models--someone--tiny-csm" / "refs").mkdir()
    (cache / "models--someone--tiny-csm" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    gen = Generator.from_pretrained("someone/tiny-csm", device="cpu")
    assert gen.generate_codes("Offline.", 0, max_audio_length_ms=160, seed=0).shape == (2, K)
    with pytest.raises(checkpoints.CheckpointError, match="not in the local hub cache.*huggingface-cli login"):
        Generator.from_pretrained("someone/not-cached", device="cpu")


@pytest.mark.parametrize("repo_files, fetched", [
    ({"config.json", "model.safetensors", "ckpt.pt"}, {"config.json", "model.safetensors"}),
    ({"config.json", "ckpt.pt"}, {"config.json", "ckpt.pt"}),
])
def test_a_repo_with_two_formats_downloads_one(tmp_path, monkeypatch, repo_files, fetched):
    """The small files first, then the weights of one format only."""
    import fnmatch

    import huggingface_hub

    got = set()

    def snapshot_download(repo, allow_patterns, local_files_only=False):
        for f in repo_files:
            if any(fnmatch.fnmatch(f, p) for p in allow_patterns):
                (tmp_path / f).write_text("x")
                got.add(f)
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    assert checkpoints.resolve("someone/two-formats") == tmp_path
    assert got == fetched


def test_any_integer_seed_and_a_clear_error_for_others(gen):
    big = gen.generate_codes("Seeds.", 0, max_audio_length_ms=160, seed=2**70 + 3)
    assert torch.equal(big, gen.generate_codes("Seeds.", 0, max_audio_length_ms=160, seed=(2**70 + 3) % 2**63))
    assert gen.generate_codes("Seeds.", 0, max_audio_length_ms=160, seed=-1).shape == (2, K)
    for bad in ("7", 1.5, True):
        with pytest.raises(ValueError, match="seed must be an integer"):
            gen.generate_codes("Seeds.", 0, max_audio_length_ms=160, seed=bad)
    ok(gen)
