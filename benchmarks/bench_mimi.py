"""Mimi speed on this machine: whole-file encode/decode real-time factors and streaming frame latency.

Real Mimi shapes (32 codebooks) with random weights, fp32. Prints a few human lines, then one JSON
line. Real-time factor ("rtf") = compute time / audio time, as everywhere in fastcsm (below 1 is
faster than real time). Streaming latency is the wall time of one 80 ms frame step for all slots, measured
after warm-up. At batch 1 a step is bound by reading the decoder's weights once: the JSON gives
those bytes and the bandwidth achieved, to compare with the machine's memory bandwidth. The peer
is transformers' `MimiModel` with the same weights, in the same run (whole sequences only: it
keeps no convolution state, so it has no continuous frame-by-frame decode to compare with).

    python benchmarks/bench_mimi.py [--seconds 5] [--frames 20] [--device cpu] [--no-peer]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from fastcsm.codec.mimi import Mimi, MimiConfig
from fastcsm.codec.weights import export_state_dict


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(fns: dict, device, repeats: int) -> dict:
    """Best wall time in seconds of each function, after one warm-up call each.

    Runs are interleaved (a, b, a, b, ...) so that both see the same machine load.
    """
    for fn in fns.values():
        fn()
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync(device)
            t = time.perf_counter()
            fn()
            _sync(device)
            best[name] = min(best[name], time.perf_counter() - t)
    return best


def random_mimi(config: MimiConfig, device) -> Mimi:
    torch.manual_seed(0)
    mimi = Mimi(config)
    with torch.no_grad():
        mimi.quantizer.codebooks.normal_()
    return mimi.to(device).eval()


def stream_latency(mimi: Mimi, batch: int, frames: int, device) -> dict:
    dec = mimi.streaming_decoder(batch)
    codes = torch.randint(0, mimi.config.codebook_size, (batch, mimi.config.num_codebooks, frames + 3), device=device)
    times = []
    for t in range(frames + 3):
        _sync(device)
        start = time.perf_counter()
        dec.step(codes[..., t: t + 1])
        _sync(device)
        times.append(time.perf_counter() - start)
    times = sorted(times[3:])
    median = statistics.median(times)
    frame_s = mimi.config.frame_size / mimi.config.sample_rate
    return {
        "batch": batch,
        "median_ms": round(median * 1e3, 2),
        "p90_ms": round(times[int(0.9 * (len(times) - 1))] * 1e3, 2),
        "streams_realtime": round(batch * frame_s / median, 1),  # streams one step keeps in real time
    }


def decode_flops_per_frame(mimi: Mimi, device) -> int:
    dec = mimi.streaming_decoder(1)
    codes = torch.zeros(1, mimi.config.num_codebooks, 1, dtype=torch.long, device=device)
    with FlopCounterMode(display=False) as counter:
        dec.step(codes)
    return counter.get_total_flops()


def decode_weight_bytes(mimi: Mimi) -> int:
    """Bytes of weights a decode step reads: at batch 1 the step is bound by reading them."""
    parts = [mimi.upsample, mimi.decoder_transformer, mimi.decoder,
             mimi.quantizer.semantic_output_proj, mimi.quantizer.acoustic_output_proj]
    return sum(p.numel() * p.element_size() for part in parts for p in part.parameters())


def peer_model(mimi: Mimi, device):
    """transformers' MimiModel with the same weights, or None when transformers is missing."""
    try:
        import transformers
    except ImportError:
        return None
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as d:
        save_file(export_state_dict(mimi, "hf"), str(Path(d) / "model.safetensors"))
        (Path(d) / "config.json").write_text(json.dumps(mimi.config.to_hf_dict()))
        return transformers.MimiModel.from_pretrained(d).to(device).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="audio length for whole encode/decode")
    parser.add_argument("--frames", type=int, default=20, help="timed streaming steps per batch size")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-peer", action="store_true")
    args = parser.parse_args()

    device = torch.device(args.device)
    config = MimiConfig()
    mimi = random_mimi(config, device)
    frames = max(1, round(args.seconds * config.frame_rate))
    seconds = frames * config.frame_size / config.sample_rate
    wav = 0.1 * torch.randn(1, 1, frames * config.frame_size, device=device)
    codes = torch.randint(0, config.codebook_size, (1, config.num_codebooks, frames), device=device)

    peer = None if args.no_peer else peer_model(mimi, device)
    fns = {"encode": lambda: mimi.encode(wav), "decode": lambda: mimi.decode(codes)}
    if peer is not None:
        fns.update({"peer_encode": lambda: peer.encode(wav), "peer_decode": lambda: peer.decode(codes)})
    with torch.no_grad():
        best = _time(fns, device, args.repeats)
    encode_s, decode_s = best["encode"], best["decode"]
    print(f"whole encode: {seconds:.2f} s of audio in {encode_s * 1e3:.0f} ms (rtf {encode_s / seconds:.3f})")
    print(f"whole decode: {seconds:.2f} s of audio in {decode_s * 1e3:.0f} ms (rtf {decode_s / seconds:.3f})")

    streaming = [stream_latency(mimi, b, args.frames, device) for b in args.batches]
    for s in streaming:
        print(f"streaming decode, batch {s['batch']}: {s['median_ms']} ms per frame step (p90 {s['p90_ms']} ms)")
    flops = decode_flops_per_frame(mimi, device)
    weight_bytes = decode_weight_bytes(mimi)
    batch1 = streaming[0]["median_ms"] / 1e3 if args.batches[0] == 1 else None

    result = {
        "bench": "mimi",
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "dtype": "float32",
        "num_codebooks": config.num_codebooks,
        "audio_seconds": seconds,
        "encode_rtf": round(encode_s / seconds, 4),
        "decode_rtf": round(decode_s / seconds, 4),
        "streaming": streaming,
        "decode_gflop_per_frame": round(flops / 1e9, 3),
        "streaming_batch1_gflops": round(flops / 1e9 / batch1, 1) if batch1 else None,
        "decode_weight_mb_per_step": round(weight_bytes / 1e6, 1),
        "streaming_batch1_weight_gb_per_s": round(weight_bytes / 1e9 / batch1, 2) if batch1 else None,
    }
    if peer is not None:
        import transformers

        result.update({"peer": f"transformers {transformers.__version__} MimiModel",
                       "peer_encode_rtf": round(best["peer_encode"] / seconds, 4),
                       "peer_decode_rtf": round(best["peer_decode"] / seconds, 4)})
    print(json.dumps(result))


if __name__ == "__main__":
    main()
