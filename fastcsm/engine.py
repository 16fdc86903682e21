"""The engine: slots, KV caches, the frame step, CUDA graphs and the decode loop.

A fixed number of slots is allocated at start-up. Each slot owns a row of the backbone and
depth-decoder KV caches and a row of every per-slot state tensor (`SlotState`): last hidden
state, position, frame counter, seed and sampling parameters. A request takes the lowest free
slot, is prefilled in chunks, then advances one frame per `Engine.step()` together with every
other active slot; leaving frees the slot for reuse without reallocation.

One frame (docs/design.md):
  h --codebook0_head--> c0 ; decoder([h, emb0(c0)]) --audio_head[0]--> c1 ;
  decoder(emb1(c1)) --audio_head[1]--> c2 ; ... ; c31 ; then the 32 codes, embedded as one
  row, go through the backbone at the slot's next position to give the next h.

`frame_step` does all of it for rows 0..B-1 with static shapes, in place, without host syncs:
it runs eagerly, under `torch.compile(fullgraph=True)`, or captured as one CUDA graph per batch
bucket (1, 2, 4, ... slots). The host learns each frame's codes through a copy it reads one
step later, so it never waits on the GPU inside a step; a frame produced after a slot's end
frame is discarded, never emitted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch._inductor.config

from . import quant
from .context import check_fits
from .model import CSM, KVCache
from .prompt import Prompt
from .sampling import SamplingParams, counter_noise, sample

# -- the frame step ---------------------------------------------------------------------------

@dataclass
class SlotState:
    """Per-slot tensors, one row per slot. `rows(n)` gives views of the first n rows."""

    h: torch.Tensor  # [S, D] backbone hidden state the next frame is sampled from
    pos: torch.Tensor  # [S] long, position the next frame is written at
    frame: torch.Tensor  # [S] long, frames sampled so far (the noise counter)
    seed: torch.Tensor  # [S] long
    active: torch.Tensor  # [S] bool
    temperature: torch.Tensor  # [S] float
    topk: torch.Tensor  # [S] long
    topp: torch.Tensor  # [S] float
    codes: torch.Tensor  # [S, K] long, the newest frame

    @staticmethod
    def allocate(slots: int, dim: int, num_codebooks: int, device, dtype) -> SlotState:
        long = dict(device=device, dtype=torch.long)
        return SlotState(
            h=torch.zeros(slots, dim, device=device, dtype=dtype),
            pos=torch.zeros(slots, **long),
            frame=torch.zeros(slots, **long),
            seed=torch.zeros(slots, **long),
            active=torch.zeros(slots, device=device, dtype=torch.bool),
            temperature=torch.ones(slots, device=device),
            topk=torch.zeros(slots, **long),
            topp=torch.ones(slots, device=device),
            codes=torch.zeros(slots, num_codebooks, **long),
        )

    def rows(self, n: int) -> SlotState:
        return SlotState(**{name: t[:n] for name, t in vars(self).items()})


def sample_frame(model: CSM, state: SlotState, decoder_cache: KVCache, candidates: int | None = None) -> torch.Tensor:
    """Sample one frame [B, K] from state.h for every row (the decoder cache restarts at 0).
    `candidates`: see `sampling.sample`."""
    K, C = model.cfg.num_codebooks, model.cfg.codebook_size
    h = state.h
    B = h.shape[0]

    def pick(logits, codebook):
        # Only real Mimi codes are drawn: ids from codebook_size up (padding) are never audio.
        noise = counter_noise(state.seed, state.frame, codebook, C)
        return sample(logits[:, :C], noise, state.temperature, state.topk, state.topp, candidates)

    c = pick(model.codebook0_logits(h), 0)
    codes = [c]
    x = torch.stack([h, model.embed_code(c, 0)], dim=1)  # [B, 2, D]
    pos = torch.arange(2, device=h.device).expand(B, 2)
    for i in range(1, K):
        out = model.run_decoder(x, pos, decoder_cache)[:, -1]  # [B, d]
        c = pick(model.codebook_logits(out, i), i)
        codes.append(c)
        x = model.embed_code(c, i)[:, None]  # [B, 1, D]
        pos = pos[:, -1:] + 1
    return torch.stack(codes, dim=1)


def frame_step(model: CSM, state: SlotState, cache: KVCache, decoder_cache: KVCache,
               candidates: int | None = None) -> None:
    """Advance every active row by one frame, in place. Inactive rows compute and keep nothing."""
    codes = sample_frame(model, state, decoder_cache, candidates)
    active = state.active
    # Inactive rows (free, or a prompt being prefilled) write at the window's last position: a
    # request writes that position itself, if it ever gets there, before reading it.
    pos = torch.where(active, state.pos, cache.length - 1)
    h = model.run_backbone(model.embed_frame(codes), pos[:, None], cache)[:, 0]
    state.codes.copy_(codes)
    state.h.copy_(torch.where(active[:, None], h.to(state.h.dtype), state.h))
    state.pos.add_(active.long())
    state.frame.add_(active.long())


def engine_step(model: CSM, codec, state: SlotState, cache: KVCache, decoder_cache: KVCache,
                codec_state, pcm: torch.Tensor | None, candidates: int | None) -> None:
    """One frame for rows 0..B-1 and, with a codec, its 80 ms of audio into pcm [B, frame_size]."""
    frame_step(model, state, cache, decoder_cache, candidates)
    if codec is not None:
        pcm.copy_(codec.decode_step(state.codes[:, :, None], codec_state)[:, 0].to(pcm.dtype))


def enable_compile_cache() -> Path:
    """Keep compiled kernels on disk (`$FASTCSM_CACHE/inductor`, default ~/.cache/fastcsm), so a
    restart loads them instead of compiling again. An explicit TORCHINDUCTOR_CACHE_DIR wins."""
    root = Path(os.environ.get("FASTCSM_CACHE", "~/.cache/fastcsm")).expanduser() / "inductor"
    root.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(root))
    torch._inductor.config.fx_graph_cache = True
    return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])


def first_rows(obj, n: int):
    """A view of the first n rows of every tensor in a (nested) state object."""
    if isinstance(obj, torch.Tensor):
        return obj[:n]
    if isinstance(obj, (list, tuple)):
        return type(obj)(first_rows(o, n) for o in obj)
    if dataclasses.is_dataclass(obj):
        return dataclasses.replace(obj, **{f.name: first_rows(getattr(obj, f.name), n)
                                           for f in dataclasses.fields(obj) if f.init})
    return obj


def prefill(model: CSM, tokens: torch.Tensor, mask: torch.Tensor, start: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Run the backbone over prompt rows.

    tokens, mask: [B, S, K+1]; start: [B] first position of these rows; cache: B rows.
    Returns the final-normed hidden state of each row's last prompt row [B, D].
    """
    S = tokens.shape[1]
    pos = start[:, None] + torch.arange(S, device=tokens.device)
    return model.run_backbone(model.embed_rows(tokens, mask), pos, cache)[:, -1]


# -- requests ---------------------------------------------------------------------------------

@dataclass(eq=False)
class Request:
    """One utterance to generate. `prefix_rows` > 0 marks the first rows of the prompt (a voice
    prompt, a conversation so far) as worth keeping: their KV is reused by later requests with
    the same rows."""

    prompt: Prompt
    max_frames: int
    params: SamplingParams = field(default_factory=SamplingParams)
    seed: int | None = None
    prefix_rows: int = 0
    # Set by the engine.
    slot: int = -1
    prefilled: int = 0  # prompt rows in the cache so far
    frames: int = 0  # frames emitted
    done: bool = False
    reused_rows: int = 0  # rows taken from the prefix cache
    # Audio that continues across requests (the pieces of one long utterance): a request with
    # `keep_audio` leaves its codec state in `audio_state` when it ends by itself, and a request
    # with `audio_after` set to it starts from that state instead of a fresh stream.
    keep_audio: bool = False
    audio_after: Request | None = None
    audio_state: list[torch.Tensor] | None = None
    _audio_snapshots: list = field(default_factory=list, repr=False)  # codec state before recent steps

    def __post_init__(self):
        if self.seed is None:
            self.seed = secrets.randbits(63)
        elif isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        else:
            self.seed %= 1 << 63  # any integer: the noise stream is keyed by 63 bits


class PrefillError(RuntimeError):
    """Putting `request`'s prompt into the cache failed. The request has left the engine; the
    other streams are untouched (the frame step of that engine step did not run)."""

    def __init__(self, request: Request, cause: BaseException):
        super().__init__(f"prefill failed: {type(cause).__name__}: {cause}")
        self.request = request


@dataclass
class Emitted:
    request: Request
    codes: torch.Tensor | None  # [K] long on CPU, or None when the request just ended
    slot: int
    pcm: torch.Tensor | None = None  # [frame_size] float32 on CPU when the engine has a codec


class PrefixCache:
    """KV rows of recently seen prompt prefixes, keyed by their content, within a byte budget."""

    def __init__(self, budget_bytes: int):
        self.budget = budget_bytes
        self.entries: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    @staticmethod
    def _rows(prompt: Prompt):
        # [T, 2(K+1)] int64: a row's tokens and mask side by side, so a prefix is a byte prefix.
        return torch.cat([prompt.tokens, prompt.mask.long()], dim=1).contiguous().numpy()

    @staticmethod
    def key(prompt: Prompt, rows: int) -> str:
        return hashlib.sha256(PrefixCache._rows(prompt)[:rows].tobytes()).hexdigest()

    def get(self, key: str):
        if key in self.entries:
            self.entries.move_to_end(key)
            return self.entries[key]
        return None

    def longest(self, prompt: Prompt, rows: int):
        """The longest stored prefix of `prompt`'s first `rows` rows: (n, k, v), or None.

        A conversation grows turn by turn: the prefix stored for one turn is a prefix of the next
        turn's, so the next turn prefills only the rows added since."""
        lengths = sorted({k.shape[2] for k, _ in self.entries.values() if k.shape[2] <= rows})
        data, h, done, best = self._rows(prompt), hashlib.sha256(), 0, None
        for n in lengths:  # one pass over the rows, a digest at every stored length
            h.update(data[done:n].tobytes())
            done = n
            key = h.copy().hexdigest()
            if key in self.entries:
                best = key
        if best is None:
            return None
        k, v = self.get(best)
        return k.shape[2], k, v

    def put(self, key: str, k: torch.Tensor, v: torch.Tensor) -> None:
        if k.nbytes + v.nbytes > self.budget:
            return
        self.entries[key] = (k, v)
        while sum(a.nbytes + b.nbytes for a, b in self.entries.values()) > self.budget:
            self.entries.popitem(last=False)


class Engine:
    """Many streams in fixed slots over one model. Not thread-safe: one loop drives it.

    codec: a Mimi codec; when given, every step also decodes each slot's new frame to PCM in
      per-slot streaming state, inside the same compiled / captured step.
    compile: wrap the step in `torch.compile` (kernel fusion).
    cuda_graphs: capture one graph per batch bucket (default: on when the model is on CUDA).
    prefill_chunk: prompt rows prefilled per step, across waiting requests, so running streams
      never wait more than one chunk's time for their next frame.
    one_frame_late: learn each step's frames during the next step (default: on CUDA, where
      the step runs asynchronously; on CPU the step is synchronous and waiting costs nothing).
    sample_candidates: rank only this many tokens per codebook while every request's top-k fits
      (default 64; the reference's top-k is 50); other steps sort the whole vocabulary.
    quantize: "int8" or "fp8" runs a quantized copy of a full-precision `model` (see quant.py);
      a model loaded with `quantize=` is already quantized (`self.quantization` says which).
    """

    def __init__(
        self,
        model: CSM,
        max_slots: int = 1,
        codec=None,
        max_seq_len: int | None = None,
        prefill_chunk: int = 512,
        compile: bool = False,
        cuda_graphs: bool | None = None,
        prefix_cache_bytes: int = 256 << 20,
        sample_candidates: int = 64,
        one_frame_late: bool | None = None,
        quantize: str | None = None,
    ):
        mode = quant.check_mode(quantize, model.device)
        if mode is not None and quant.mode_of(model) != mode:
            if quant.mode_of(model) is not None:
                raise ValueError(f"the model is already quantized as {quant.mode_of(model)}; load it in full "
                                 f"precision to run it as {mode}")
            model = quant.quantized_copy(model, mode)
        self.model = model
        self.quantization = quant.mode_of(model)
        self.cfg = model.cfg
        self.device, self.dtype = model.device, model.dtype
        self.max_slots = max_slots
        self.max_seq_len = max_seq_len or self.cfg.max_seq_len
        self.prefill_chunk = prefill_chunk
        self.cache = model.backbone_cache(max_slots, self.max_seq_len)
        self.decoder_cache = model.decoder_cache(max_slots)
        self.state = SlotState.allocate(max_slots, self.cfg.backbone.dim, self.cfg.num_codebooks, self.device,
                                        self.dtype)
        pinned = self.device.type == "cuda"
        self.host_codes = torch.zeros(max_slots, self.cfg.num_codebooks, dtype=torch.long, pin_memory=pinned)
        self.codec = codec
        if codec is not None:
            self.codec_state = codec.init_decoder_state(max_slots, 1)
            frame_size = codec.config.frame_size
            self.pcm = torch.zeros(max_slots, frame_size, device=self.device)
            self.host_pcm = torch.zeros(max_slots, frame_size, pin_memory=pinned)
        else:
            self.codec_state = self.pcm = self.host_pcm = None
        self.slots: list[Request | None] = [None] * max_slots
        self.waiting: list[Request] = []  # admitted, prompt not fully in the cache yet
        self.pending: list[tuple[int, Request]] = []  # (slot, request) of the step whose frames are in flight
        self.prefix_cache = PrefixCache(prefix_cache_bytes)
        self.buckets = [b for b in (1 << i for i in range(max_slots.bit_length() + 1)) if b < max_slots] + [max_slots]
        if compile:
            enable_compile_cache()
        self._step = torch.compile(engine_step, fullgraph=True, dynamic=False) if compile else engine_step
        self.compiled = compile
        self.cuda_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        self._graphs: dict[tuple[int, int | None], torch.cuda.CUDAGraph] = {}
        self.sample_candidates = sample_candidates
        self._graph_pool = None
        self.one_frame_late = self.device.type == "cuda" if one_frame_late is None else one_frame_late
        self._copy_event = torch.cuda.Event() if self.device.type == "cuda" else None
        self.stats = {"prefill_rows": 0, "reused_rows": 0, "frames": 0, "steps": 0}

    # -- slots --------------------------------------------------------------------------------

    @property
    def free_slots(self) -> int:
        return self.slots.count(None)

    def add(self, request: Request) -> int:
        """Take the lowest free slot for `request`; its prompt is prefilled by later steps."""
        check_fits(len(request.prompt), request.max_frames, self.max_seq_len, self.cfg.frame_ms,
                   f"the prompt ({len(request.prompt)} rows)", "shorten the prompt or lower max_frames")
        try:
            slot = self.slots.index(None)
        except ValueError:
            raise RuntimeError(f"all {self.max_slots} slots are busy") from None
        request.slot, request.prefilled, request.frames, request.done = slot, 0, 0, False
        self.slots[slot] = request
        st = self.state
        st.active[slot] = False
        st.seed[slot] = request.seed
        st.frame[slot] = 0
        st.temperature[slot] = request.params.temperature
        st.topk[slot] = request.params.topk
        st.topp[slot] = request.params.topp
        self._reuse_prefix(request)
        self.waiting.append(request)
        return slot

    def release(self, request: Request) -> None:
        """Free the request's slot now (finished, cancelled, or its client went away)."""
        slot = request.slot
        if slot >= 0 and self.slots[slot] is request:
            self.slots[slot] = None
            self.state.active[slot] = False
        if request in self.waiting:
            self.waiting.remove(request)
        self.pending = [(s, r) for s, r in self.pending if r is not request]  # its frame in flight is dropped
        request.done = True

    # -- prefill ------------------------------------------------------------------------------

    def _reuse_prefix(self, request: Request) -> None:
        P = min(request.prefix_rows, len(request.prompt) - 1)
        if P <= 0:
            return
        hit = self.prefix_cache.longest(request.prompt, P)
        if hit is not None:
            n, k, v = hit
            self.cache.k[:, request.slot, :, :n].copy_(k)
            self.cache.v[:, request.slot, :, :n].copy_(v)
            request.prefilled = request.reused_rows = n
            self.stats["reused_rows"] += n

    def _prefill_chunk(self, request: Request, rows: int | None = None) -> int:
        """Put the next chunk (at most `rows` rows) of the request's prompt into its cache row.
        Returns the rows prefilled."""
        slot, start = request.slot, request.prefilled
        stop = min(len(request.prompt), start + (rows or self.prefill_chunk))
        P = min(request.prefix_rows, len(request.prompt) - 1)
        if start < P < stop and request.reused_rows < P:
            stop = P  # end a chunk at the prefix boundary so its KV can be kept
        tokens = request.prompt.tokens[None, start:stop].to(self.device, non_blocking=True)
        mask = request.prompt.mask[None, start:stop].to(self.device, non_blocking=True)
        start_t = torch.full((1,), start, device=self.device, dtype=torch.long)
        with torch.inference_mode():
            h = prefill(self.model, tokens, mask, start_t, self.cache.rows(slot, slot + 1))
        request.prefilled = stop
        self.stats["prefill_rows"] += stop - start
        if stop == P and request.reused_rows < P:
            key = PrefixCache.key(request.prompt, P)
            self.prefix_cache.put(key, self.cache.k[:, slot, :, :P].clone(), self.cache.v[:, slot, :, :P].clone())
        if stop == len(request.prompt):
            st = self.state
            st.h[slot] = h[0]
            st.pos[slot] = stop
            st.active[slot] = True
            if self.codec is not None:  # its audio stream starts now: steps while waiting decoded noise
                before = request.audio_after
                if before is not None and before.audio_state is not None:
                    self._set_codec_rows(slot, before.audio_state)
                    request.audio_after = None  # the state is in the slot now
                else:
                    fresh = torch.zeros(self.max_slots, dtype=torch.bool, device=self.device)
                    fresh[slot] = True
                    self.codec_state.reset(fresh)
            self.waiting.remove(request)
        return stop - start

    # -- the loop -----------------------------------------------------------------------------

    def bucket(self) -> int:
        """The smallest bucket holding every active slot (active slots sit low: lowest-free-first)."""
        top = max((i for i, r in enumerate(self.slots) if r is not None and r not in self.waiting), default=-1)
        return next(b for b in self.buckets if b > top)

    def candidates(self, running: list[tuple[int, Request]]) -> int | None:
        """Tokens the sampler must rank this step: a partial top-k when every running request's
        top-k fits in `sample_candidates` (the pick is the same), else a full sort."""
        n = self.sample_candidates
        if n and all(0 < r.params.topk <= n for _, r in running):
            return n
        return None

    def _step_args(self, batch: int, candidates: int | None) -> tuple:
        return (self.model, self.codec, self.state.rows(batch), self.cache.rows(0, batch),
                self.decoder_cache.rows(0, batch), first_rows(self.codec_state, batch), first_rows(self.pcm, batch),
                candidates)

    def _run_step(self, batch: int, candidates: int | None) -> None:
        if self.cuda_graphs:
            key = (batch, candidates)
            graph = self._graphs.get(key)
            if graph is None:
                graph = self._graphs[key] = self._capture(batch, candidates)
            graph.replay()
        else:
            with torch.inference_mode():
                self._step(*self._step_args(batch, candidates))

    def warmup(self) -> float:
        """Build every variant of the step before traffic arrives: compile it and capture its
        CUDA graph for each batch bucket and both sampling paths, so that no request waits for
        that later. Streams already running are not advanced. Returns the seconds it took."""
        t = time.perf_counter()
        for batch in self.buckets:
            for candidates in dict.fromkeys([self.sample_candidates or None, None]):
                if self.cuda_graphs:
                    if (batch, candidates) not in self._graphs:
                        self._graphs[(batch, candidates)] = self._capture(batch, candidates)
                elif self.compiled:
                    saved = [x.clone() for x in _tensors([self.state, self.codec_state])]
                    with torch.inference_mode():
                        self._step(*self._step_args(batch, candidates))
                    for x, copy in zip(_tensors([self.state, self.codec_state]), saved, strict=True):
                        x.copy_(copy)
        return time.perf_counter() - t

    def _capture(self, batch: int, candidates: int | None) -> torch.cuda.CUDAGraph:
        """Warm up on a side stream, then capture the step for `batch` rows."""
        args = self._step_args(batch, candidates)
        # Warm-up must not advance any stream: save and restore every piece of per-slot state.
        saved = [t.clone() for t in _tensors([self.state, self.codec_state])]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(2):
                self._step(*args)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # All buckets share one memory pool: only one graph runs at a time.
        with torch.cuda.graph(graph, pool=self._graph_pool), torch.inference_mode():
            self._step(*args)
        self._graph_pool = self._graph_pool or graph.pool()
        for t, copy in zip(_tensors([self.state, self.codec_state]), saved, strict=True):
            t.copy_(copy)
        return graph

    def step(self) -> list[Emitted]:
        """Prefill waiting prompts (one budget of rows), then one frame for every active slot.

        Returns what the host learnt this step: a frame per request (codes, and PCM with a
        codec), and requests that ended (codes None; their slot is free again). With
        `one_frame_late` (the default on CUDA) the frames are those of the previous step, read
        through an asynchronous copy while this step's frame is computed; otherwise this
        step's own frames, read when the step is done.
        """
        budget = self.prefill_chunk  # prompt rows per step, across waiting requests
        while self.waiting and budget > 0:
            request = self.waiting[0]
            try:
                budget -= self._prefill_chunk(request, budget)
            except Exception as e:
                self.release(request)
                raise PrefillError(request, e) from e
        # Read back the previous step's frames before launching the next.
        previous, self.pending = self.pending, []
        if previous and self._copy_event is not None:
            self._copy_event.synchronize()
        read = self._read_host() if previous else (None, None)
        running = [(r.slot, r) for r in self.slots if r is not None and r not in self.waiting and not r.done]
        batch = self.bucket() if running else 0
        if batch:
            if self.codec is not None:
                for slot, r in running:
                    if r.keep_audio:  # the two latest: enough to find the state after its last frame
                        r._audio_snapshots = [*r._audio_snapshots[-1:], self._codec_rows(slot)]
            self._run_step(batch, self.candidates(running))
            self.host_codes[:batch].copy_(self.state.codes[:batch], non_blocking=True)
            if self.codec is not None:
                self.host_pcm[:batch].copy_(self.pcm[:batch], non_blocking=True)
            if self._copy_event is not None:
                self._copy_event.record()
            self.stats["steps"] += 1
        if self.one_frame_late:
            self.pending = running
            return self._emit(previous, *read)
        if self._copy_event is not None:
            self._copy_event.synchronize()
        return self._emit(running, *self._read_host())

    def _read_host(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.host_codes.clone(), self.host_pcm.clone() if self.codec is not None else None

    def _emit(self, previous: list[tuple[int, Request]], codes, pcm) -> list[Emitted]:
        out = []
        eos = self.cfg.codebook_eos_id
        for slot, request in previous:  # a request released meanwhile left `pending` with its frame
            frame = codes[slot]
            if bool((frame == eos).all()):
                self._keep_audio(request, slot, ended_by_eos=True)
                self.release(request)
                out.append(Emitted(request, None, slot))
                continue
            request.frames += 1
            self.stats["frames"] += 1
            out.append(Emitted(request, frame, slot, pcm[slot] if pcm is not None else None))
            if request.frames >= request.max_frames:
                self._keep_audio(request, slot, ended_by_eos=False)
                self.release(request)
                out.append(Emitted(request, None, slot))
        return out

    def _keep_audio(self, request: Request, slot: int, ended_by_eos: bool) -> None:
        """Store the codec state right after the request's last emitted frame. The end frame is
        not audio, and read one frame late, one more step has already run."""
        if not request.keep_audio or self.codec is None:
            return
        snaps = request._audio_snapshots
        steps_back = int(ended_by_eos) + int(self.one_frame_late)  # steps run since its last frame
        request.audio_state = snaps[-steps_back] if steps_back else self._codec_rows(slot)
        request._audio_snapshots = []

    def _codec_rows(self, slot: int) -> list[torch.Tensor]:
        return [t[slot].clone() for t in _tensors(self.codec_state)]

    def _set_codec_rows(self, slot: int, rows: list[torch.Tensor]) -> None:
        for t, row in zip(_tensors(self.codec_state), rows, strict=True):
            t[slot].copy_(row)

    def busy(self) -> bool:
        return any(r is not None for r in self.slots) or bool(self.pending)

    def run(self, request: Request):
        """Generate one request alone; yields its frame events (`Emitted`: codes [K] CPU long, and
        PCM with a codec), never its end event. Closing the iterator frees the slot."""
        self.add(request)
        try:
            while not request.done:
                for e in self.step():
                    if e.request is request and e.codes is not None:
                        yield e
        finally:
            self.release(request)


def _tensors(obj) -> list[torch.Tensor]:
    """Every tensor in a (nested) state object."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _tensors(o)]
    if dataclasses.is_dataclass(obj):
        return [t for f in dataclasses.fields(obj) for t in _tensors(getattr(obj, f.name))]
    return []
