"""How the engine's device work runs: eagerly, under `torch.compile`, or as CUDA graphs.

The engine owns the buffers (`step.Buffers`) and decides what to run; a `Runner` runs it:

    runner.prefill(buffers, slot, tokens, mask, start) -> h   prompt rows into one slot's cache row
    runner.step(buffers, batch, path)                         one frame for rows 0..batch-1
    runner.warmup(buffers, variants, progress)                build those (batch, path) steps now

A step variant is (batch bucket, `sampling.SamplingPath`). With CUDA graphs each variant is
captured once (`capture`: after two warm-up runs on a side stream) and replayed; compiled or
eager, it is called.

Compiled, one graph serves every bucket: the batch is a dynamic dimension (`mark_batch`; batch
1 gets a graph of its own, which dynamo specialises anyway, and a branch on the batch size in
the step splits the rest: for csm-1b 2-16 and 17 up), so a warm-up over all buckets compiles 2
or 3 graphs a sampling variant however many buckets there are, and on CUDA each bucket's graph
is captured from that compiled code. Prefill compiles the same
way with its rows as the dynamic dimension. A compiled runner runs every sampling path as the
path with every filter for its `candidates` (the same picks): 2 variants, not 9. What inductor
builds is kept on disk (`compile_cache`), so a later start loads it instead of compiling.

Building a variant must not advance any stream, so every per-slot tensor is saved and restored
around it (`preserved`). The functions run are arguments: a test gives a scripted step or a
failing prefill instead of patching the engine. A runner serves one engine (its graphs hold that
engine's buffers).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from ..nested import leaves
from . import compile_cache
from .sampling import SamplingPath
from .step import Buffers, engine_step, prefill

log = logging.getLogger("fastcsm")


@dataclass(frozen=True)
class Progress:
    """Where a warm-up stands, for a console line or a readiness probe."""

    done: int  # variants built so far
    total: int  # variants to build
    what: str  # the one being built: "step batch 8 top-64", "prefill rows 2+"
    elapsed_s: float  # since the warm-up began

    def __str__(self) -> str:
        return f"building {self.what} ({self.done + 1}/{self.total}, {self.elapsed_s:.0f} s so far)"


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


# Compiled frames attend over their window rounded up to a multiple of this. Not a power of two:
# dynamo gives dynamic sizes that are equal when first traced one symbol, and a window equal to a
# batch size (a power of two) would tie the two, to recompile when they part.
SPAN_STEP = 96


def mark_batch(args: tuple) -> None:
    """Mark the batch dimension (every per-row tensor has it first) of `engine_step`'s args
    dynamic, so that one compiled graph serves every bucket above 1. Where the step's code
    branches on the batch size, dynamo keeps one graph per side of it (the sampler's whole-frame
    noise, up to B x K x 2048 = 2^20: csm-1b's batches 2-16 and 17 up)."""
    _, _, state, cache, decoder_cache, tables, codec_state, pcm, _ = args
    if state.h.shape[0] < 2:
        return
    for t in leaves((state, cache.layers, decoder_cache.layers, tables, codec_state, pcm)):
        torch._dynamo.maybe_mark_dynamic(t, 0)


def compiled_variant(batch: int, path: SamplingPath) -> tuple[int, SamplingPath]:
    """The variant a compiled runner runs `path` at `batch` as (see `Runner.variant`)."""
    return batch, SamplingPath(path.candidates if path.sampled else None)


def variant_name(batch: int, path: SamplingPath) -> str:
    """A step variant as the compile cache's `built.json` lists it."""
    return f"step batch {batch} {describe(path)}"


def describe(path: SamplingPath) -> str:
    """A sampling variant in a few words, for progress lines."""
    if not path.sampled:
        return "greedy"
    return "full sort" if path.candidates is None else f"top-{path.candidates}"


class Runner:
    """step: the frame step, called as `engine_step` is; prefill: as `step.prefill`.
    compile: False, True (inductor), a `torch.compile` backend (a name or a callable), for the
      step and prefill, or "auto": inductor if the compile cache holds a finished build of every
      variant the warm-up asks for (`compile_cache.holds`: a `fastcsm compile`, or an earlier
      compiled start, made it), so that it loads in seconds instead of compiling for minutes;
      else eager. Decided by the first `warmup`. cache_dir: where inductor's output is kept
      (`compile_cache`; default `compile_cache.default_dir()`). cuda_graphs: capture one graph
      per variant (CUDA only)."""

    def __init__(self, step=engine_step, prefill=prefill, compile: bool | str | Callable = False,
                 cuda_graphs: bool = False, cache_dir: str | Path | None = None):
        self.auto = compile == "auto"  # until the first warm-up decides
        self.backend: str | Callable | None = None
        self._step, self._prefill = self._eager = step, prefill
        if compile and not self.auto:
            self._compile("inductor" if compile is True else compile)
        self.cuda_graphs = cuda_graphs
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else compile_cache.default_dir()
        self.cache_key: dict | None = None  # what inductor's output is kept under (inductor or "auto")
        self.cache_entry: Path | None = None  # the compile cache's entry in use (inductor only)
        self.built: set[tuple[int, SamplingPath]] = set()  # variants compiled / captured / run so far
        self._graphs: dict[tuple[int, SamplingPath], torch.cuda.CUDAGraph] = {}
        self._pool = None  # one memory pool for every graph: only one runs at a time
        self._buffers: Buffers | None = None  # the engine's, which its graphs read and write
        self._prefill_built = False  # compiled: both prefill graphs were built by a warm-up

    @property
    def compiled(self) -> bool:
        return self.backend is not None

    def _compile(self, backend: str | Callable) -> None:
        # Two graphs a sampling variant plus prefill's, and a test or a second engine may compile
        # more in one process: past dynamo's recompile limit (8) fullgraph=True fails.
        for name in ("recompile_limit", "accumulated_recompile_limit"):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 1024))
        self.backend = backend
        self._step, self._prefill = (torch.compile(f, fullgraph=True, dynamic=False, backend=backend)
                                     for f in self._eager)

    def bind(self, bufs: Buffers) -> None:
        """Serve the engine of `bufs` (and only it); compiled with inductor, open its compile cache entry."""
        if self._buffers is None:
            self._buffers = bufs
            if self.backend == "inductor" or self.auto:  # the model's shapes are known now
                self.cache_key = compile_cache.cache_key(bufs.model, bufs.mimi, bufs.cache.length)
            if self.backend == "inductor":
                self.cache_entry = compile_cache.open_entry(self.cache_dir, self.cache_key)
        elif bufs is not self._buffers:
            raise ValueError("this Runner already serves another engine; give each engine its own")

    def prefill(self, bufs: Buffers, slot: int, tokens: torch.Tensor, mask: torch.Tensor,
                start: torch.Tensor, window: int | None = None) -> torch.Tensor:
        """`window`: the prompt's rows end below it (attention reads no further). Compiled, the
        rows are a dynamic dimension and attention reads the whole cache (static shapes)."""
        self.bind(bufs)
        cache = bufs.cache.rows(slot, slot + 1)
        if self.compiled:
            if tokens.shape[1] >= 2:
                for t in (tokens, mask):
                    torch._dynamo.maybe_mark_dynamic(t, 1)
        else:
            cache = cache.within(window)
        with torch.inference_mode():
            return self._prefill(bufs.model, tokens, mask, start, cache)

    def variant(self, batch: int, path: SamplingPath) -> tuple[int, SamplingPath]:
        """The variant that runs `path` at `batch`: itself, or when compiled the path with every
        filter and the same candidates (a greedy-only path: the full sort), which picks the same."""
        return compiled_variant(batch, path) if self.compiled else (batch, path)

    def step(self, bufs: Buffers, batch: int, path: SamplingPath, window: int | None = None) -> None:
        """`window`: every active row's position is below it. An eager step attends over that
        many positions only, a compiled one over a span of about that many (`_step_args`); a
        captured one keeps its static shapes (the whole cache)."""
        self.bind(bufs)
        key = self.variant(batch, path)
        batch, path = key
        if self.cuda_graphs:
            if key not in self._graphs:
                self._build(bufs, *key)
            self._graphs[key].replay()
            return
        with torch.inference_mode():
            self._run_step(self._step_args(bufs, batch, path, window))
        self.built.add(key)

    def _step_args(self, bufs: Buffers, batch: int, path: SamplingPath, window: int | None) -> tuple:
        """Eager: attention over `window`. Compiled (not captured): over `window` rounded up to a
        multiple of `SPAN_STEP`, as a span of dynamic length, so one graph serves every window
        (the warm-up traces with the first multiple, whose length no batch size shares)."""
        if not self.compiled:
            return bufs.step_args(batch, path, window)
        # At most the cache's length less its parking position (see `Buffers.allocate`): a span of
        # the whole length makes the keys' view contiguous, which the graph holds a guard against.
        last = bufs.cache.length - 1
        window = last if window is None else min(-(-window // SPAN_STEP) * SPAN_STEP, last)
        return bufs.step_args(batch, path, window, span=True)

    def _run_step(self, args: tuple) -> None:
        if self.compiled:
            mark_batch(args)
        self._step(*args)

    def warmup(self, bufs: Buffers, variants, progress: Callable[[Progress], None] | None = None) -> None:
        """Build every variant not built yet (and, compiled, both prefill graphs), without advancing
        any stream. `progress` hears of each build before it starts. With `compile="auto"` the
        first warm-up decides first whether to compile (see the class's docstring)."""
        self.bind(bufs)
        variants = list(variants)
        if self.auto and not self._decide(variants) and not self.cuda_graphs:
            return  # eager: nothing to build that the first frames would not
        todo = [("step", k) for k in dict.fromkeys(self.variant(*v) for v in variants) if k not in self.built]
        if self.compiled and not self._prefill_built:
            todo += [("prefill", rows) for rows in (1, 2)]
        start = time.perf_counter()
        for done, (kind, what) in enumerate(todo):
            words = variant_name(*what) if kind == "step" else f"prefill rows {what}{'+' if what > 1 else ''}"
            report = Progress(done, len(todo), words, time.perf_counter() - start)
            log.info("fastcsm: %s", report)
            if progress is not None:
                progress(report)
            if kind == "step":
                self._build(bufs, *what)
            else:
                self._build_prefill(bufs, what)
        self._prefill_built = self._prefill_built or self.compiled
        if self.cache_entry is not None:  # a later start with compile="auto" may load them
            compile_cache.mark_built(self.cache_entry, [variant_name(*self.variant(*v)) for v in variants])

    def _decide(self, variants: list) -> bool:
        """compile="auto": inductor if the compile cache holds a finished build of `variants`."""
        self.auto = False
        names = [variant_name(*compiled_variant(*v)) for v in variants]
        if compile_cache.holds(self.cache_dir, self.cache_key, names):
            log.info("fastcsm: the compile cache %s holds this model's compiled step for every batch bucket: "
                     "compiling from it", self.cache_dir)
            self._compile("inductor")
            self.cache_entry = compile_cache.open_entry(self.cache_dir, self.cache_key)
            return True
        log.info("fastcsm: running the step eagerly: the compile cache %s holds no finished build of it for "
                 "this model, device and batch buckets (`fastcsm compile` with the same model flags and --slots "
                 "makes one, in minutes; later starts then compile from it in seconds)", self.cache_dir)
        return False

    def _build(self, bufs: Buffers, batch: int, path: SamplingPath) -> None:
        self.bind(bufs)
        # (Compiled: traced with a short span, as most frames have.)
        args = bufs.step_args(batch, path) if self.cuda_graphs else self._step_args(bufs, batch, path, 1)
        with preserved(bufs.state, bufs.codec_state), torch.inference_mode():
            if self.cuda_graphs:
                self._graphs[(batch, path)] = self._capture(args)
            else:
                self._run_step(args)
        self.built.add((batch, path))

    def _build_prefill(self, bufs: Buffers, rows: int) -> None:
        """Compile prefill for `rows` prompt rows (1, or 2 for every longer chunk): a dummy prompt
        into the last slot's final positions, which are put back afterwards."""
        cache, slot = bufs.cache, bufs.cache.batch - 1
        start = cache.length - rows
        K = bufs.model.cfg.num_codebooks
        device = bufs.model.device
        tokens = torch.zeros(1, rows, K + 1, dtype=torch.long, device=device)
        mask = torch.ones(1, rows, K + 1, dtype=torch.bool, device=device)
        with preserved([t[slot, :, start:] for t in cache.layers]):
            self.prefill(bufs, slot, tokens, mask, torch.full((1,), start, device=device))

    def _capture(self, args: tuple) -> torch.cuda.CUDAGraph:
        graph = capture(lambda: self._run_step(args), self._pool)
        self._pool = self._pool or graph.pool()
        return graph
