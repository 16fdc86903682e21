"""How fast the engine runs CSM here, how far that is from the hardware, and from the peer.

Random weights of a preset's shapes (the numbers do not depend on the weights), or a real
checkpoint (`--model DIR`). Measures:
- ms per frame step at each batch size (every slot active), and from it the real-time factor
  (generation time / audio duration: below 1 is faster than real time), the real-time streams
  one device sustains, and weight bytes read per frame / time as GB/s and as a fraction of the
  memory-bandwidth floor;
- time to first audio (request in -> first PCM chunk out) with a voice prompt of
  `--voice-seconds`, cold and with the prompt's KV reused;
- start-up (engine allocation, compile and graph capture);
- the peer, transformers' `CsmForConditionalGeneration.generate`, on the same weights in the
  same run, and the ratio.

    python -m fastcsm.bench --preset tiny
    python -m fastcsm.bench --preset csm-1b --device cuda --batch 1,8,64,256 --compile --plot bench.png

Prints a table (mode x batch) on stdout, then one JSON object as the last line. Other libraries'
warnings are silenced; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
import time
import warnings

import torch

from .bounds import TEMPERATURE, TOPK
from .codec.codec import Codec
from .engine.engine import Engine, Request
from .engine.sampling import SamplingParams
from .model import quant
from .model.config import CsmConfig, preset
from .model.network import CSM
from .model.prompt import Prompt, audio_rows, concat


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
        for name, p in model.state_dict().items():  # the checkpoint's linears, in order (see model.FusedLinears)
            if name.endswith("scale"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
        model.init_buffers(device)
    return model.eval().requires_grad_(False)


def random_codec(cfg: CsmConfig, device) -> Codec:
    from .codec.mimi import mimi_preset
    from .testing import random_mimi

    return Codec(random_mimi(mimi_preset("tiny" if cfg.backbone.dim < 512 else "mimi")).to(device), cfg.num_codebooks)


def weight_bytes_per_frame(cfg: CsmConfig, itemsize: int, linear_itemsize: int | None = None) -> int:
    """Weights one frame must read: the backbone and its head once, the decoder (with the
    projection and one codebook head) once per codebook after the first. `linear_itemsize`: the
    bytes of a quantized linear's weight (its fp32 scales, one per output channel, are counted)."""
    b, d, K, V = cfg.backbone, cfg.decoder, cfg.num_codebooks, cfg.audio_vocab_size
    li = itemsize if linear_itemsize is None else linear_itemsize
    scale = 0 if linear_itemsize is None else 4
    backbone = li * (b.param_count() + V * b.dim) + itemsize * K * b.dim  # layers, codebook0 head, K embedding rows
    decoder_step = li * (d.param_count() + b.dim * d.dim + d.dim * V) + itemsize * b.dim  # + projection, head, 1 row

    def channels(t):  # output channels of a layer's linears: q, o, w2 (dim); k, v; w1, w3
        return t.num_layers * (3 * t.dim + 2 * t.num_kv_heads * t.head_dim + 2 * t.intermediate_size)

    scales = scale * (channels(b) + V)
    scales_step = scale * (channels(d) + d.dim + V)
    return backbone + scales + (K - 1) * (decoder_step + scales_step)


def copy_bandwidth_gbps(device: torch.device) -> float:
    """Device memory copy bandwidth, measured in this run on every device (read + write bytes / time
    of the best of five 256 MB copies): the floor each mode's ms per frame is compared with."""
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
        shape = (audio_frames, cfg.num_codebooks)
        tokens[:audio_frames, :cfg.num_codebooks] = torch.randint(0, cfg.codebook_size, shape, generator=g)
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
        if any(e.request is request and not e.ended for e in engine.step()):
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

    from .model.checkpoints import hf_name
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
    offsets = torch.arange(cfg.num_codebooks, device=dev) * cfg.audio_vocab_size
    hf.backbone_model.embed_tokens.audio_tokens_offsets = offsets
    for m in hf.modules():  # RoPE tables, as the model computes them
        if type(m).__name__.endswith("RotaryEmbedding"):
            init = ROPE_INIT_FUNCTIONS.get(m.rope_type, type(m).compute_default_rope_parameters)
            inv = init(m.config)[0]
            m.inv_freq, m.original_inv_freq = inv.to(dev), inv.to(dev)
    hf = hf.eval()
    ids = torch.randint(0, 1000, (1, 24), device=dev)
    run = lambda n: hf.generate(input_ids=ids, max_new_tokens=n, min_new_tokens=n, do_sample=True,  # noqa: E731
                                temperature=TEMPERATURE.default, top_k=TOPK.default, depth_decoder_do_sample=True,
                                depth_decoder_temperature=TEMPERATURE.default, depth_decoder_top_k=TOPK.default)
    with torch.inference_mode():
        run(2)
        sync(dev)
        t = time.perf_counter()
        out = run(frames)
        sync(dev)
    elapsed = time.perf_counter() - t
    return {"ms_per_frame": 1000 * elapsed / out.shape[1], "frames": int(out.shape[1])}


SETTINGS = ("device", "dtype", "threads", "compile")  # from fastcsm serve's table: the same flags and variables


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .server.settings import add_arguments as add_settings

    p.add_argument("--preset", default="tiny", metavar="NAME",
                   help="model shapes of the random weights: tiny, csm-1b, csm-3b, csm-8b (default: %(default)s)")
    p.add_argument("--model", metavar="DIR", help="bench this checkpoint (directory or hub id) instead of random "
                                                  "weights; --preset is then ignored")
    p.add_argument("--batch", default=None, metavar="B,B,...",
                   help="comma-separated batch sizes (default: 1,8,64,256 on CUDA; 1,8 on CPU)")
    p.add_argument("--steps", type=int, default=None, metavar="N",
                   help="timed frame steps per batch size (default: 50 on CUDA; 20 for tiny, 3 otherwise on CPU)")
    p.add_argument("--voice-seconds", type=float, default=10.0, metavar="S",
                   help="voice prompt length for time to first audio (default: %(default)g)")
    p.add_argument("--no-graphs", action="store_true", help="do not capture CUDA graphs")
    p.add_argument("--no-codec", action="store_true", help="leave Mimi decode out of the step")
    p.add_argument("--no-peer", action="store_true", help="skip the transformers peer")
    p.add_argument("--peer-frames", type=int, default=None, metavar="N",
                   help="frames the peer generates (default: 20 on CUDA or for tiny; 2 otherwise)")
    p.add_argument("--quantize", default="none", metavar="MODE,...",
                   help="comma-separated modes measured side by side: none (the --dtype weights), int8, fp8 "
                        "(CUDA, compute capability 8.9+); e.g. none,int8 (default: %(default)s)")
    p.add_argument("--accuracy-frames", type=int, default=16, metavar="N",
                   help="frames generated after the voice prompt and line for the quantized modes' accuracy "
                        "(default: %(default)s)")
    p.add_argument("--plot", metavar="FILE.png",
                   help='also draw ms per step and streams sustained against batch size, the floor marked '
                        '(needs matplotlib: pip install "fastcsm[bench]")')
    add_settings(p, names=SETTINGS)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m fastcsm.bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return run(p.parse_args(argv))


def quiet_other_libraries() -> None:
    """Other libraries' warnings (transformers' config checks, torch's deprecations) off: they
    would land in the middle of the table."""
    warnings.filterwarnings("ignore")
    for name in ("transformers", "torch", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except ImportError:
        pass


def check_plot_available(path: str | None) -> None:
    if path is None:
        return
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ValueError('--plot needs matplotlib: pip install "fastcsm[bench]"') from None
    if not path.lower().endswith(".png"):
        raise ValueError(f"--plot writes a PNG image: give a name ending in .png, got {path!r}")


def load_checkpoint(path: str, device, dtype):
    """A real checkpoint at full precision (8-bit modes are made from it as from random weights),
    and its codec, or None when it carries none."""
    from .codec.codec import load_codec
    from .model.checkpoints import load_model, resolve

    model, files = load_model(path, device, dtype, quantize="none")
    try:
        codec = load_codec(resolve(path), device)
    except (OSError, ValueError) as e:
        log(f"  no codec in the step: {e}")
        codec = None
    return model, codec


def run(args) -> dict:
    from . import threads
    from .model.checkpoints import resolve_device_dtype
    from .server.settings import values_from_args

    for name, value in values_from_args(args, SETTINGS).items():
        setattr(args, name, value)
    args.compile = bool(args.compile)  # (the bench measures what it is told: unset is eager)
    check_plot_available(args.plot)
    quiet_other_libraries()
    device, dtype = resolve_device_dtype(args.device, args.dtype)
    cuda = device.type == "cuda"
    batches = [int(b) for b in (args.batch or ("1,8,64,256" if cuda else "1,8")).split(",")]
    modes = [m.strip() for m in (args.quantize or "none").split(",")]
    for m in modes:
        quant.check_mode(m, device)
    name = args.model or args.preset

    t0 = time.perf_counter()
    if args.model:
        model, codec = load_checkpoint(args.model, device, dtype)
        codec = None if args.no_codec else codec
    else:
        model = random_model(preset(args.preset), device, dtype)
        codec = None if args.no_codec else random_codec(model.cfg, device)
    cfg = model.cfg
    load_s = time.perf_counter() - t0
    threads.apply(args.threads, cfg.param_count())
    small = cfg.param_count() < threads.SMALL_MODEL_PARAMS
    steps = args.steps or (50 if cuda else (20 if small else 3))
    log(f"fastcsm bench: {name} on {device} ({dtype}), {torch.get_num_threads()} thread(s), modes {modes}, "
        f"batches {batches}, {steps} steps each")

    bandwidth = copy_bandwidth_gbps(device)
    result = {
        "preset": None if args.model else args.preset, "model": args.model, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if cuda else "cpu",
        "dtype": str(dtype).removeprefix("torch."), "torch": torch.__version__, "compile": args.compile,
        "cuda_graphs": cuda and not args.no_graphs, "codec_in_step": codec is not None,
        "params": cfg.param_count(), "model_init_s": round(load_s, 2), "threads": torch.get_num_threads(),
        "copy_bandwidth_gbps": round(bandwidth, 1), "steps": steps, "frame_ms": cfg.frame_ms, "modes": {},
    }
    voice_frames = int(args.voice_seconds * 1000 // cfg.frame_ms)
    for mode in modes:
        m = model if quant.check_mode(mode) is None else quant.quantized_copy(model, mode)
        result["modes"][mode] = r = bench_mode(m, codec, batches, steps, voice_frames, args, bandwidth)
        r["quantize"] = mode
        if m is not model:
            r["kernel"] = quant.kernel_report(m)
            log(f"  {mode}: 8-bit linears run on {r['kernel']}; teacher-forced accuracy against {result['dtype']} ...")
            r["accuracy"] = quant_accuracy(model, m, voice_frames, frames=args.accuracy_frames)
        del m
    base = result["modes"][modes[0]]
    for mode in modes[1:]:
        r = result["modes"][mode]
        r["ms_ratio_to_" + modes[0]] = {b: round(r["batches"][b]["ms_per_step"] / base["batches"][b]["ms_per_step"], 3)
                                        for b in r["batches"]}

    if not args.no_peer:
        peer_frames = args.peer_frames or (20 if cuda or small else 2)
        log(f"  transformers generate, {peer_frames} frames ...")
        peer = peer_ms_per_frame(model, peer_frames)
        if "ms_per_frame" in peer and 1 in batches:
            peer["speedup_batch1"] = {mode: round(peer["ms_per_frame"] / r["batches"][1]["ms_per_step"], 2)
                                      for mode, r in result["modes"].items()}
        result["peer_transformers"] = peer
    print(table(result), flush=True)
    if args.plot:
        plot(result, args.plot)
        result["plot"] = args.plot
    print(json.dumps(result))
    return result


def ratio_words(ratio: float) -> str:
    """A speed ratio (theirs / ours, > 1: ours is faster) in words: "3.2x faster", "5.0x slower"."""
    return f"{ratio:.1f}x faster" if ratio >= 1 else f"{1 / ratio:.1f}x slower"


def table(result: dict) -> str:
    """The results for a person: a row per mode and batch, then time to first audio, accuracy, peer."""
    frame_ms = result["frame_ms"]
    lines = [f"fastcsm bench: {result['model'] or result['preset']} on {result['device_name']} ({result['dtype']}, "
             f"{result['threads']} thread(s)), copy bandwidth {result['copy_bandwidth_gbps']} GB/s",
             f"real-time factor = generation time / audio duration (lower is better; below 1 keeps up with "
             f"real time); a frame is {frame_ms} ms of audio",
             "",
             f"{'mode':<6}{'batch':>6}{'ms/frame':>11}{'RTF':>8}{'real time':>11}{'% of floor':>12}{'start-up':>10}",
             ]
    for mode, r in result["modes"].items():
        for batch, b in r["batches"].items():
            rtf = b["real_time_factor"]
            keeps = f"{batch} stream{'s' if int(batch) > 1 else ''}" if rtf <= 1 else "behind"
            lines.append(f"{mode:<6}{batch:>6}{b['ms_per_step']:>11.2f}{rtf:>8.2f}{keeps:>11}"
                         f"{100 * b['fraction_of_floor']:>11.1f}%{b['startup_s']:>9.1f}s")
    lines.append("")
    for mode, r in result["modes"].items():
        t = r["ttfa_ms"]
        lines.append(f"{mode}: time to first audio with a {t['voice_seconds']:g} s voice prompt: {t['cold']:.1f} ms "
                     f"cold, {t['prefix_reused']:.1f} ms with its prefix reused; floor {r['floor_ms_per_frame']} "
                     f"ms/frame")
        if "accuracy" in r:
            a = r["accuracy"]
            lines.append(f"{mode}: codebook 0 rel RMS {a['codebook0_rel_rms']:.4f}, top-1 {a['codebook0_top1']:.3f}; "
                         f"decoder rel RMS {a['decoder_rel_rms_mean']:.4f} (max {a['decoder_rel_rms_max']:.4f}), "
                         f"top-1 {a['decoder_top1_mean']:.3f} (min {a['decoder_top1_min']:.3f})")
    peer = result.get("peer_transformers")
    if peer and "speedup_batch1" in peer:
        words = ", ".join(f"{ratio_words(x)} ({mode})" for mode, x in peer["speedup_batch1"].items())
        lines.append(f"transformers generate: {peer['ms_per_frame']:.2f} ms/frame at batch 1; fastcsm is {words}")
    elif peer:
        lines.append(f"transformers generate: {peer.get('error', 'measured without batch 1')}")
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    """ms per step and real-time streams sustained against batch size, a line per mode; the
    memory-bandwidth floor and the real-time bound (one frame's audio) drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frame_ms = result["frame_ms"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for mode, r in result["modes"].items():
        batches = [int(b) for b in r["batches"]]
        ms = [b["ms_per_step"] for b in r["batches"].values()]
        line, = left.plot(batches, ms, "o-", label=f"{mode}")
        left.axhline(r["floor_ms_per_frame"], color=line.get_color(), linestyle=":",
                     label=f"{mode} floor (weights / copy bandwidth)")
        right.plot(batches, [min(b, b * frame_ms / m) for b, m in zip(batches, ms, strict=True)], "o-", label=mode)
    left.axhline(frame_ms, color="grey", linestyle="--", label=f"real time ({frame_ms} ms of audio)")
    right.plot(batches, batches, color="grey", linestyle="--", label="every stream in real time")
    every = sorted({int(b) for r in result["modes"].values() for b in r["batches"]})
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xticks(every, labels=[str(b) for b in every])
        ax.minorticks_off()
        ax.set_xlabel("batch (streams generated together)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    left.set_yscale("log")
    left.set_ylabel("ms per step (one frame for every stream)")
    right.set_ylabel("streams sustained in real time")
    fig.suptitle(f"fastcsm bench: {result['model'] or result['preset']} on {result['device_name']} "
                 f"({result['dtype']}, {result['threads']} thread(s))")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    log(f"  plot written to {path}")


def bench_mode(model: CSM, codec, batches: list[int], steps: int, voice_frames: int, args, bandwidth: float) -> dict:
    """Frame steps at every batch, time to first audio and start-up for one model (one mode)."""
    cfg, device = model.cfg, model.device
    cuda = device.type == "cuda"
    mode = quant.mode_of(model) or "none"
    bytes_per_frame = weight_bytes_per_frame(cfg, model.dtype.itemsize, 1 if quant.mode_of(model) else None)
    floor_ms = bytes_per_frame / (bandwidth * 1e9) * 1000
    out = {"weight_bytes": quant.weight_bytes(model), "weight_bytes_per_frame": bytes_per_frame,
           "floor_ms_per_frame": round(floor_ms, 3)}
    per_batch = {}
    for batch in batches:
        t = time.perf_counter()
        engine = Engine(model, max_slots=batch, codec=codec, compile=args.compile,
                        cuda_graphs=cuda and not args.no_graphs)
        first = frame_times(engine, batch, 1, warmup=0)  # includes compile / capture for this bucket
        startup = time.perf_counter() - t
        times = frame_times(engine, batch, steps)
        ms = 1000 * statistics.median(times)
        per_batch[batch] = {
            "ms_per_step": round(ms, 3),
            "ms_per_step_p90": round(1000 * sorted(times)[9 * (len(times) - 1) // 10], 3),
            "frames_per_s": round(1000 * batch / ms, 1),
            "real_time_factor": round(ms / cfg.frame_ms, 3),  # of each stream: step time / a frame's audio
            "realtime_streams": batch if ms <= cfg.frame_ms else 0,
            "gbps": round(bytes_per_frame / (ms / 1000) / 1e9, 3),
            "fraction_of_floor": round(floor_ms / ms, 3),
            "startup_s": round(startup, 2),
            "first_step_ms": round(1000 * first[0], 1),
        }
        log(f"  {mode} batch {batch}: {ms:.2f} ms/step")
        del engine
    out["batches"] = per_batch
    if 1 in per_batch:  # generation time / audio duration: below 1 is faster than real time
        out["real_time_factor_batch1"] = round(per_batch[1]["ms_per_step"] / cfg.frame_ms, 3)
    out["realtime_streams_sustained"] = max((b for b, r in per_batch.items() if r["ms_per_step"] <= cfg.frame_ms),
                                            default=0)

    # Time to first audio, cold and with the voice prompt's KV reused.
    engine = Engine(model, max_slots=1, codec=codec, compile=args.compile, cuda_graphs=cuda and not args.no_graphs)
    time_to_first_audio(engine, voice_frames, seed=0)  # warm-up: compile / capture
    engine.prefix_cache.entries.clear()
    cold = time_to_first_audio(engine, voice_frames, seed=1)
    warm = time_to_first_audio(engine, voice_frames, seed=2)
    out["ttfa_ms"] = {"voice_seconds": args.voice_seconds, "prompt_rows": voice_frames + 21,
                      "cold": round(1000 * cold, 2), "prefix_reused": round(1000 * warm, 2)}
    return out


def quant_accuracy(reference: CSM, quantized: CSM, voice_frames: int, frames: int = 16, text_rows: int = 20) -> dict:
    """Logit error and top-1 agreement of `quantized` against `reference` under teacher forcing:
    over a voice prompt of `voice_frames` frames plus a line, then `frames` frames that the
    reference generates greedily after it (so one differing code never compounds)."""
    prompt = dummy_prompt(reference.cfg, text_rows, voice_frames)
    request = Request(prompt, frames, SamplingParams(temperature=0), seed=0)
    generated = [e.codes for e in Engine(reference).run(request)]
    seq = concat([prompt, audio_rows(torch.stack(generated), reference.cfg)]) if generated else prompt
    rows = list(range(1, voice_frames + 1)) + list(range(len(prompt), len(prompt) + len(generated)))
    ref = quant.teacher_forced_logits(reference, seq.tokens, seq.mask, rows)
    got = quant.teacher_forced_logits(quantized, seq.tokens, seq.mask, rows)
    return quant.accuracy(ref, got)


if __name__ == "__main__":
    main()
