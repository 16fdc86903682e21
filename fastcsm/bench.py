"""How fast the engine runs CSM here, how far that is from the hardware, and from the peer.

Random weights of a preset's shapes (the numbers do not depend on the weights). Measures:
- ms per frame step at each batch size (every slot active), and from it the real-time factor,
  the real-time streams one device sustains, and weight bytes read per frame / time as GB/s
  and as a fraction of the memory-bandwidth floor;
- time to first audio (request in -> first PCM chunk out) with a voice prompt of
  `--voice-seconds`, cold and with the prompt's KV reused;
- start-up (engine allocation, compile and graph capture);
- the peer, transformers' `CsmForConditionalGeneration.generate`, on the same weights in the
  same run, and the ratio.

    python -m fastcsm.bench --preset tiny
    python -m fastcsm.bench --preset csm-1b --device cuda --batch 1,8,64,256 --compile

Prints a few human lines on stderr and one JSON object on the last line of stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time

import torch

from .config import CsmConfig, preset
from .engine import Engine, Request
from .model import CSM
from .prompt import Prompt
from .sampling import SamplingParams

# The copy bandwidth taken as given on an H100 (docs/design.md); other devices are measured in the run.
H100_COPY_GBPS = 3000.0


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def random_model(cfg: CsmConfig, device, dtype) -> CSM:
    """A CSM with N(0, 0.02) weights, built directly on the device without a CPU copy."""
    with torch.device("meta"):
        model = CSM(cfg)
    model = model.to_empty(device=device).to(dtype)
    g = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("scale"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
        model.init_buffers(device)
    return model.eval().requires_grad_(False)


def random_codec(cfg: CsmConfig, device):
    from .mimi import mimi_preset
    from .testing import random_mimi

    return random_mimi(mimi_preset("tiny" if cfg.backbone.dim < 512 else "mimi")).to(device)


def weight_bytes_per_frame(cfg: CsmConfig, itemsize: int) -> int:
    """Weights one frame must read: the backbone and its head once, the decoder (with the
    projection and one codebook head) once per codebook after the first."""
    b, d, K, V = cfg.backbone, cfg.decoder, cfg.num_codebooks, cfg.audio_vocab_size
    backbone = b.param_count() + V * b.dim + K * b.dim  # layers, codebook0 head, K embedding rows
    decoder_step = d.param_count() + b.dim * d.dim + d.dim * V + b.dim  # + projection, head, one embedding row
    return itemsize * (backbone + (K - 1) * decoder_step)


def copy_bandwidth_gbps(device: torch.device) -> float:
    """Measured device memory copy bandwidth (read + write bytes / time)."""
    if device.type == "cuda":
        return H100_COPY_GBPS if "H100" in torch.cuda.get_device_name(device) else _measure_copy(device)
    return _measure_copy(device)


def _measure_copy(device) -> float:
    n = 64 << 20  # 256 MB of fp32
    a = torch.empty(n, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    best = math.inf
    for _ in range(5):
        sync(device)
        t = time.perf_counter()
        b.copy_(a)
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * a.nbytes / best / 1e9


def dummy_prompt(cfg: CsmConfig, text_rows: int, audio_frames: int, seed: int = 0) -> Prompt:
    """A prompt of `audio_frames` voice-prompt frames (+ EOS) and `text_rows` text rows."""
    g = torch.Generator().manual_seed(seed)
    T = audio_frames + 1 + text_rows if audio_frames else text_rows
    tokens = torch.zeros(T, cfg.num_columns, dtype=torch.long)
    mask = torch.zeros(T, cfg.num_columns, dtype=torch.bool)
    if audio_frames:
        tokens[:audio_frames, :cfg.num_codebooks] = torch.randint(0, cfg.codebook_size, (audio_frames, cfg.num_codebooks),
                                                                  generator=g)
        mask[:audio_frames + 1, :cfg.num_codebooks] = True
    tokens[T - text_rows:, cfg.text_column] = torch.randint(0, 128_000, (text_rows,), generator=g)
    mask[T - text_rows:, cfg.text_column] = True
    return Prompt(tokens, mask)


def frame_times(engine: Engine, batch: int, steps: int, warmup: int = 2) -> list[float]:
    """Seconds per engine step with `batch` active slots (prefill excluded)."""
    cfg = engine.cfg
    requests = [Request(dummy_prompt(cfg, 24, 0, seed=i), steps + warmup + 4, SamplingParams(), seed=i)
                for i in range(batch)]
    for r in requests:
        engine.add(r)
    while engine.waiting:
        engine.step()
    for _ in range(warmup):
        engine.step()
    times = []
    for _ in range(steps):
        sync(engine.device)
        t = time.perf_counter()
        engine.step()
        sync(engine.device)
        times.append(time.perf_counter() - t)
    for r in requests:
        engine.release(r)
    return times


def time_to_first_audio(engine: Engine, voice_frames: int, seed: int) -> float:
    """Seconds from a request's arrival to its first PCM chunk."""
    prompt = dummy_prompt(engine.cfg, 20, voice_frames)
    request = Request(prompt, 8, SamplingParams(), seed=seed, prefix_rows=voice_frames + 1)
    sync(engine.device)
    t = time.perf_counter()
    engine.add(request)
    while True:
        if any(e.request is request and e.codes is not None for e in engine.step()):
            break
    elapsed = time.perf_counter() - t
    engine.release(request)
    return elapsed


def peer_ms_per_frame(model: CSM, frames: int) -> dict:
    """transformers' generate on the same weights (shared, not copied), ms per frame at batch 1."""
    try:
        from transformers import CsmConfig as HFCsmConfig, CsmForConditionalGeneration
    except ImportError as e:
        return {"error": f"transformers not installed: {e}"}
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from .checkpoints import hf_name
    from .testing import tiny_mimi_hf_config

    cfg = model.cfg
    d = cfg.to_hf_dict()
    d.pop("model_type")
    with torch.device("meta"):
        hf = CsmForConditionalGeneration(HFCsmConfig(**d, codec_config=tiny_mimi_hf_config()))
    ours = model.state_dict()
    dev, dtype = model.codebook0_head.weight.device, model.codebook0_head.weight.dtype
    named = list(hf.named_parameters(remove_duplicate=False)) + list(hf.named_buffers(remove_duplicate=False))
    for name, p in named:  # share our tensors; give the rest (codec, buffers) real storage
        target = hf_name(name)
        module_name, _, attr = name.rpartition(".")
        module = hf.get_submodule(module_name)
        if target is not None:
            tensor = ours[target]
        else:
            tensor = torch.zeros(p.shape, dtype=dtype if p.is_floating_point() else p.dtype, device=dev)
        setattr(module, attr, torch.nn.Parameter(tensor, requires_grad=False)
                if isinstance(p, torch.nn.Parameter) else tensor)
    hf.backbone_model.embed_tokens.audio_tokens_offsets = torch.arange(cfg.num_codebooks, device=dev) * cfg.audio_vocab_size
    for m in hf.modules():  # RoPE tables, as the model computes them
        if type(m).__name__.endswith("RotaryEmbedding"):
            init = ROPE_INIT_FUNCTIONS.get(m.rope_type, type(m).compute_default_rope_parameters)
            inv = init(m.config)[0]
            m.inv_freq, m.original_inv_freq = inv.to(dev), inv.to(dev)
    hf = hf.eval()
    ids = torch.randint(0, 1000, (1, 24), device=dev)
    run = lambda n: hf.generate(input_ids=ids, max_new_tokens=n, min_new_tokens=n, do_sample=True,  # noqa: E731
                                temperature=0.9, top_k=50, depth_decoder_do_sample=True,
                                depth_decoder_temperature=0.9, depth_decoder_top_k=50)
    with torch.inference_mode():
        run(2)
        sync(dev)
        t = time.perf_counter()
        out = run(frames)
        sync(dev)
    elapsed = time.perf_counter() - t
    return {"ms_per_frame": 1000 * elapsed / out.shape[1], "frames": int(out.shape[1])}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="tiny", help="model shapes: tiny, csm-1b, csm-3b, csm-8b (default tiny)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    p.add_argument("--dtype", default=None, help="bf16 (CUDA default) or fp32 (CPU default)")
    p.add_argument("--batch", default=None,
                   help="comma-separated batch sizes (default: 1,8,64,256 on CUDA; 1,8 on CPU)")
    p.add_argument("--steps", type=int, default=None, help="timed frame steps per batch size")
    p.add_argument("--voice-seconds", type=float, default=10.0, help="voice prompt length for time to first audio")
    p.add_argument("--compile", action="store_true", help="torch.compile the frame step (cached on disk)")
    p.add_argument("--no-graphs", action="store_true", help="do not capture CUDA graphs")
    p.add_argument("--no-codec", action="store_true", help="leave Mimi decode out of the step")
    p.add_argument("--no-peer", action="store_true", help="skip the transformers peer")
    p.add_argument("--peer-frames", type=int, default=None, help="frames the peer generates")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m fastcsm.bench", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return run(p.parse_args(argv))


def run(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    from .checkpoints import resolve_device_dtype

    device, dtype = resolve_device_dtype(args.device, args.dtype)
    cuda = device.type == "cuda"
    batches = [int(b) for b in (args.batch or ("1,8,64,256" if cuda else "1,8")).split(",")]
    cfg = preset(args.preset)
    steps = args.steps or (50 if cuda else (20 if args.preset == "tiny" else 3))
    log(f"fastcsm bench: {args.preset} on {device} ({dtype}), batches {batches}, {steps} steps each")

    t0 = time.perf_counter()
    model = random_model(cfg, device, dtype)
    codec = None if args.no_codec else random_codec(cfg, device)
    load_s = time.perf_counter() - t0

    result = {
        "preset": args.preset, "device": str(device), "device_name": torch.cuda.get_device_name(device) if cuda else
        "cpu", "dtype": str(dtype).removeprefix("torch."), "torch": torch.__version__, "compile": args.compile,
        "cuda_graphs": cuda and not args.no_graphs, "codec_in_step": codec is not None,
        "params": cfg.param_count(), "model_init_s": round(load_s, 2),
    }
    bytes_per_frame = weight_bytes_per_frame(cfg, torch.empty(0, dtype=dtype).element_size())
    bandwidth = copy_bandwidth_gbps(device)
    floor_ms = bytes_per_frame / (bandwidth * 1e9) * 1000
    result.update(weight_bytes_per_frame=bytes_per_frame, copy_bandwidth_gbps=round(bandwidth, 1),
                  floor_ms_per_frame=round(floor_ms, 3))

    per_batch = {}
    startup = {}
    for batch in batches:
        t = time.perf_counter()
        engine = Engine(model, max_slots=batch, codec=codec, compile=args.compile,
                        cuda_graphs=cuda and not args.no_graphs)
        first = frame_times(engine, batch, 1, warmup=0)  # includes compile / capture for this bucket
        startup[batch] = time.perf_counter() - t
        times = frame_times(engine, batch, steps)
        ms = 1000 * statistics.median(times)
        per_batch[batch] = {
            "ms_per_step": round(ms, 3),
            "ms_per_step_p90": round(1000 * sorted(times)[int(0.9 * (len(times) - 1))], 3),
            "frames_per_s": round(1000 * batch / ms, 1),
            "realtime_streams": batch if ms <= cfg.frame_ms else 0,
            "gbps": round(bytes_per_frame / (ms / 1000) / 1e9, 1),
            "fraction_of_floor": round(floor_ms / ms, 3),
            "startup_s": round(startup[batch], 2),
            "first_step_ms": round(1000 * first[0], 1),
        }
        log(f"  batch {batch:4d}: {ms:9.2f} ms/step  ({per_batch[batch]['gbps']} GB/s, "
            f"{100 * floor_ms / ms:.1f}% of floor), start-up {startup[batch]:.1f} s")
        del engine
    result["batches"] = per_batch
    ms1 = per_batch[min(batches)]["ms_per_step"] if 1 in per_batch else None
    if ms1:
        result["realtime_factor_batch1"] = round(cfg.frame_ms / ms1, 2)  # > 1: faster than real time
    result["realtime_streams_sustained"] = max((b for b, r in per_batch.items() if r["ms_per_step"] <= cfg.frame_ms),
                                               default=0)

    # Time to first audio, cold and with the voice prompt's KV reused.
    voice_frames = int(args.voice_seconds * 1000 // cfg.frame_ms)
    engine = Engine(model, max_slots=1, codec=codec, compile=args.compile, cuda_graphs=cuda and not args.no_graphs)
    time_to_first_audio(engine, voice_frames, seed=0)  # warm-up: compile / capture
    engine.prefix_cache.entries.clear()
    cold = time_to_first_audio(engine, voice_frames, seed=1)
    warm = time_to_first_audio(engine, voice_frames, seed=2)
    result["ttfa_ms"] = {"voice_seconds": args.voice_seconds, "prompt_rows": voice_frames + 21,
                         "cold": round(1000 * cold, 2), "prefix_reused": round(1000 * warm, 2)}
    log(f"  time to first audio with a {args.voice_seconds:g} s voice prompt: cold {1000 * cold:.1f} ms, "
        f"prefix reused {1000 * warm:.1f} ms")
    del engine

    if not args.no_peer:
        peer_frames = args.peer_frames or (20 if cuda or args.preset == "tiny" else 2)
        peer = peer_ms_per_frame(model, peer_frames)
        if ms1 and "ms_per_frame" in peer:
            peer["speedup_batch1"] = round(peer["ms_per_frame"] / ms1, 2)
            log(f"  transformers generate: {peer['ms_per_frame']:.2f} ms/frame -> fastcsm is "
                f"{peer['speedup_batch1']}x faster at batch 1")
        result["peer_transformers"] = peer
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
