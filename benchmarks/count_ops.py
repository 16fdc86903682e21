"""Count the operations one frame step launches: csm-1b's layer and codebook counts at tiny widths
(the count does not depend on the widths), batch 1, eager, on the CPU.

On a GPU each compute op is at least one kernel, so this count times a kernel's launch latency
bounds a captured step from below, whatever the bandwidth:

    python benchmarks/count_ops.py [--preset csm-1b] [--codec]

The top-level figures are for the default request's sampling path (temperature 0.9, top-k 50,
top-p 1: no nucleus, no argmax); `paths` gives the compute ops of others for comparison.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json

import torch
from torch.profiler import ProfilerActivity, profile

from fastcsm.codec.codec import Codec
from fastcsm.engine.engine import Engine, Request
from fastcsm.engine.sampling import SamplingParams, SamplingPath
from fastcsm.model import config
from fastcsm.model.network import CSM
from fastcsm.model.prompt import Prompt
from fastcsm.testing import random_mimi, randomize_

# Ops that only make a view or change metadata: no kernel on a GPU.
VIEWS = {"transpose", "reshape", "view", "select", "slice", "expand", "unsqueeze", "squeeze", "permute",
         "as_strided", "t", "detach", "alias", "unbind", "split", "split_with_sizes", "chunk", "narrow",
         "_unsafe_view", "view_as", "expand_as", "unflatten", "flatten", "lift_fresh", "empty", "empty_like",
         "contiguous", "to", "_to_copy", "resolve_conj", "resolve_neg"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="csm-1b")
    p.add_argument("--codec", action="store_true", help="decode Mimi inside the step too")
    args = p.parse_args()
    cfg = config.preset(args.preset)
    narrow = lambda t: dataclasses.replace(t, dim=64, intermediate_size=128, head_dim=8)  # noqa: E731
    cfg = dataclasses.replace(cfg, backbone=narrow(cfg.backbone), decoder=narrow(cfg.decoder))
    model = CSM(cfg)
    randomize_(model, seed=0)
    engine = Engine(model.eval().requires_grad_(False), max_slots=1, codec=Codec(random_mimi()) if args.codec else None)
    K = cfg.num_codebooks
    mask = torch.zeros(8, K + 1, dtype=torch.bool)
    mask[:, -1] = True
    engine.add(Request(Prompt(torch.zeros(8, K + 1, dtype=torch.long), mask), 16, seed=1))
    for _ in range(3):  # prefill and a few frames
        engine.step()
    n = engine.sample_candidates
    paths = {"default": SamplingPath.of([SamplingParams()], n), "every_filter": SamplingPath(n),
             "nucleus": SamplingPath(n, nucleus=True, greedy=False),
             "greedy": SamplingPath.of([SamplingParams(0.0)], n)}
    counts = {name: count(engine, path) for name, path in paths.items()}
    top, work = counts["default"]
    print(json.dumps({"preset": args.preset, "codec": args.codec, "backbone_layers": cfg.backbone.num_layers,
                      "decoder_layers": cfg.decoder.num_layers, "codebooks": K, "ops": len(top),
                      "compute_ops": sum(work.values()), "most": dict(work.most_common(10)),
                      "paths": {name: {"compute_ops": sum(w.values()), **path._asdict()}
                                for (name, path), (_, w) in zip(paths.items(), counts.values(), strict=True)}}))


def count(engine: Engine, path: SamplingPath) -> tuple[list[str], collections.Counter]:
    """The aten ops one frame step on `path` calls at the top level, and those that compute, by name.
    (Run on the engine's buffers: the step advances its one stream, which nothing reads.)"""
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        engine.runner.step(engine.buffers, 1, path)
    top = [e.name.removeprefix("aten::") for e in prof.events() if e.name.startswith("aten::") and outermost_op(e) is e]
    return top, collections.Counter(name for name in top if name not in VIEWS)


def outermost_op(e):
    """The top-level aten op profiler event `e` runs inside (itself if it is one): what the Python
    code called."""
    while e.cpu_parent is not None and e.cpu_parent.name.startswith("aten::"):
        e = e.cpu_parent
    return e


if __name__ == "__main__":
    main()
