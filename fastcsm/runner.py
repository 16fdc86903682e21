"""How the engine's device work runs: eagerly, under `torch.compile`, or as CUDA graphs.

The engine owns the buffers (`step.Buffers`) and decides what to run; a `Runner` runs it:

    runner.prefill(buffers, slot, tokens, mask, start) -> h   prompt rows into one slot's cache row
    runner.step(buffers, batch, path)                         one frame for rows 0..batch-1
    runner.warmup(buffers, variants)                          build those (batch, path) steps now

A step variant is (batch bucket, `sampling.SamplingPath`). With CUDA graphs each variant is
captured once (`capture`: after two warm-up runs on a side stream) and replayed; compiled or
eager, it is called. A compiled runner runs every path as the path with every filter for its
`candidates` (the same picks): each compile takes minutes for csm-1b, so a bucket compiles 2
variants, not 9, and inductor fuses most of what the lean paths leave out anyway. Building a
variant must not advance any stream, so every per-slot tensor is saved and restored around it
(`preserved`). The functions run are arguments: a test gives a scripted step or a failing
prefill instead of patching the engine. A runner serves one engine (its graphs hold that
engine's buffers).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import torch
import torch._inductor.config

from .nested import leaves
from .sampling import SamplingPath
from .step import Buffers, engine_step, prefill


def enable_compile_cache() -> Path:
    """Keep compiled kernels on disk (`$FASTCSM_CACHE/inductor`, default ~/.cache/fastcsm), so a
    restart loads them instead of compiling again. An explicit TORCHINDUCTOR_CACHE_DIR wins."""
    root = Path(os.environ.get("FASTCSM_CACHE", "~/.cache/fastcsm")).expanduser() / "inductor"
    root.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(root))
    torch._inductor.config.fx_graph_cache = True
    return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])


def capture(fn, pool=None) -> torch.cuda.CUDAGraph:
    """A CUDA graph of fn(), after two warm-up runs on a side stream (lazy initialisation, autotuning
    and allocator warm-up happen there, not in the capture). `pool`: a memory pool to share."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        fn()
    return graph


@contextmanager
def preserved(*states):
    """Run the body, then put every tensor in `states` back as it was."""
    saved = [t.clone() for t in leaves(states)]
    try:
        yield
    finally:
        for t, copy in zip(leaves(states), saved, strict=True):
            t.copy_(copy)


class Runner:
    """step: the frame step, called as `engine_step` is; prefill: as `step.prefill`.
    compile: False, True (inductor) or a `torch.compile` backend name, for the step.
    cuda_graphs: capture one graph per variant (CUDA only)."""

    def __init__(self, step=engine_step, prefill=prefill, compile: bool | str = False, cuda_graphs: bool = False):
        if compile:
            backend = "inductor" if compile is True else compile
            if backend == "inductor":
                enable_compile_cache()
            # Each variant is one compiled graph of the same function, more than dynamo's default
            # recompile limit (8) for a few buckets (2 each); past the limit fullgraph=True fails.
            for name in ("recompile_limit", "accumulated_recompile_limit"):
                setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 1024))
            step = torch.compile(step, fullgraph=True, dynamic=False, backend=backend)
        self._step, self._prefill = step, prefill
        self.compiled = bool(compile)
        self.cuda_graphs = cuda_graphs
        self.built: set[tuple[int, SamplingPath]] = set()  # variants compiled / captured / run so far
        self._graphs: dict[tuple[int, SamplingPath], torch.cuda.CUDAGraph] = {}
        self._pool = None  # one memory pool for every graph: only one runs at a time
        self._buffers: Buffers | None = None  # the engine's, which its graphs read and write

    def _bind(self, bufs: Buffers) -> None:
        if self._buffers is None:
            self._buffers = bufs
        elif bufs is not self._buffers:
            raise ValueError("this Runner already serves another engine; give each engine its own")

    def prefill(self, bufs: Buffers, slot: int, tokens: torch.Tensor, mask: torch.Tensor,
                start: torch.Tensor, window: int | None = None) -> torch.Tensor:
        """`window`: the prompt's rows end below it (attention reads no further; prefill is eager)."""
        with torch.inference_mode():
            return self._prefill(bufs.model, tokens, mask, start, bufs.cache.rows(slot, slot + 1).within(window))

    def variant(self, batch: int, path: SamplingPath) -> tuple[int, SamplingPath]:
        """The variant that runs `path` at `batch`: itself, or when compiled the path with every
        filter and the same candidates (a greedy-only path: the full sort), which picks the same."""
        if self.compiled:
            path = SamplingPath(path.candidates if path.sampled else None)
        return batch, path

    def step(self, bufs: Buffers, batch: int, path: SamplingPath, window: int | None = None) -> None:
        """`window`: every active row's position is below it. An eager step attends over that
        many positions only; a compiled or captured one keeps its static shapes (the whole cache)."""
        self._bind(bufs)
        key = self.variant(batch, path)
        batch, path = key
        if self.cuda_graphs:
            if key not in self._graphs:
                self._build(bufs, *key)
            self._graphs[key].replay()
            return
        with torch.inference_mode():
            self._step(*bufs.step_args(batch, path, None if self.compiled else window))
        self.built.add(key)

    def warmup(self, bufs: Buffers, variants) -> None:
        """Build every variant not built yet, without advancing any stream."""
        for key in dict.fromkeys(self.variant(*v) for v in variants):
            if key not in self.built:
                self._build(bufs, *key)

    def _build(self, bufs: Buffers, batch: int, path: SamplingPath) -> None:
        self._bind(bufs)
        args = bufs.step_args(batch, path)
        with preserved(bufs.state, bufs.codec_state), torch.inference_mode():
            if self.cuda_graphs:
                self._graphs[(batch, path)] = self._capture(args)
            else:
                self._step(*args)
        self.built.add((batch, path))

    def _capture(self, args: tuple) -> torch.cuda.CUDAGraph:
        graph = capture(lambda: self._step(*args), self._pool)
        self._pool = self._pool or graph.pool()
        return graph
