"""The engine: many requests in fixed slots over one model, one frame per slot per step.

A fixed number of slots is allocated at start-up (`step.Buffers`): each slot owns a row of the
backbone and depth-decoder KV caches, of every per-slot tensor (last hidden state, position,
frame counter, seed, sampling parameters) and, with a codec, of Mimi's streaming decoder state.
A request takes the lowest free slot, its prompt is prefilled in chunks (a prefix seen before,
such as a voice or a conversation so far, is copied from `PrefixCache` instead), then it advances
one frame per `Engine.step()` together with every other running slot; ending frees the slot for
reuse without reallocation.

The engine knows nothing of text, HTTP or threads. What it runs on the device, and how (eager,
`torch.compile`, CUDA graphs), is the `Runner`'s job (`runner.py`); the frame step itself is in
`step.py`. A `Request` is the caller's and never changes; what the engine tracks per request
(slot, rows prefilled, frames, codec snapshots) is its private `_Row`.

The host learns each frame's codes (and PCM) through a copy that, on CUDA, it reads one step
later (`one_frame_late`), so it never waits on the GPU inside a step; a frame produced after a
slot's end frame is discarded, never emitted. Every request ends with one end event that says
why (`EndReason`). See docs/design.md.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections import OrderedDict
from contextlib import closing
from dataclasses import dataclass, field
from enum import StrEnum
from itertools import takewhile

import torch

from ..codec.codec import Codec
from ..model import quant
from ..model.context import check_fits
from ..model.network import CSM
from ..model.prompt import Prompt
from ..nested import leaves
from .runner import Runner
from .sampling import SamplingParams, SamplingPath, row_key
from .step import Buffers

# Kept codec states (for `audio_after`) per slot: enough for every slot's follower to be
# planned late, bounded so that clients who leave between pieces cannot grow it.
KEPT_AUDIO_PER_SLOT = 4


@dataclass(frozen=True, eq=False)
class Request:
    """One utterance to generate, as the caller asks for it; the engine never changes it.

    prefix_rows: the first rows of the prompt (a voice prompt, a conversation so far) are worth
      keeping: their KV is reused by later requests that start with the same rows.
    keep_audio: when the request ends by itself, the engine keeps its codec state, and
    audio_after: a request whose audio continues from that kept state (the next piece of one
      long utterance) instead of starting a fresh stream.
    eq=False: requests compare (and hash) by identity, so one can key a dict.
    """

    prompt: Prompt
    max_frames: int
    params: SamplingParams = SamplingParams()
    seed: int | None = None
    prefix_rows: int = 0
    keep_audio: bool = False
    audio_after: Request | None = None

    def __post_init__(self):
        if self.seed is None:
            seed = secrets.randbits(63)
        elif isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        else:
            seed = self.seed % (1 << 63)  # any integer: the noise stream is keyed by 63 bits
        object.__setattr__(self, "seed", seed)


class EndReason(StrEnum):
    """Why a request ended. The engine decides the first two; whoever releases a request early
    gives the reason (the scheduler: cancelled, deadline, error). The values are the names the
    server's protocol uses."""

    END_OF_SPEECH = "end"  # the model's end frame
    LENGTH = "max_length"  # `max_frames` frames emitted
    CANCELLED = "cancelled"  # released by its caller before it finished
    DEADLINE = "deadline"  # ran past its deadline
    ERROR = "error"  # its prefill or a frame step failed, or it was refused

    @property
    def complete(self) -> bool:
        """The request ran its course (its end frame or its bound), nothing stopped it."""
        return self in (EndReason.END_OF_SPEECH, EndReason.LENGTH)


@dataclass
class Emitted:
    """What the host learnt about one request in a step: a frame (`codes`, `pcm`), or its end
    (`reason` says why; `ended`)."""

    request: Request
    slot: int
    codes: torch.Tensor | None = None  # [K] long on CPU: a frame event's
    pcm: torch.Tensor | None = None  # [frame_size] float32 on CPU when the engine has a codec
    reason: EndReason | None = None  # the end event's: why the request ended
    prefill_rows: int = 0  # end event: prompt rows the request prefilled itself
    reused_rows: int = 0  # end event: prompt rows it took from the prefix cache

    @property
    def ended(self) -> bool:
        return self.reason is not None


class PrefillError(RuntimeError):
    """Putting `request`'s prompt into the cache failed. The request has left the engine; the
    other streams are untouched (the frame step of that engine step did not run).

    end: the request's end event, as `release` gives it: the rows it prefilled in the chunks
    that succeeded before the failing one, and the rows it took from the prefix cache."""

    def __init__(self, end: Emitted, cause: BaseException):
        self.request, self.end, self.cause = end.request, end, cause
        super().__init__(f"{self.brief}: {cause}")

    @property
    def brief(self) -> str:
        """The message without the cause's own text, for a client: "prefill failed after N of M
        prompt rows: RuntimeError"."""
        end = self.end
        return (f"prefill failed after {end.prefill_rows + end.reused_rows} of {len(end.request.prompt)} "
                f"prompt rows: {type(self.cause).__name__}")


@dataclass(eq=False)
class _Row:
    """What the engine tracks for one request it holds. Nothing outside this module sees it."""

    request: Request
    slot: int
    prefilled: int = 0  # prompt rows in the cache so far
    reused: int = 0  # of those, rows copied from the prefix cache
    frames: int = 0  # frames emitted
    steps: int = 0  # frame steps run for it (one more than `frames` while a frame is in flight)
    snapshots: list = field(default_factory=list)  # codec rows before the latest two steps (keep_audio)

    @property
    def ready(self) -> bool:
        """Its prompt is in the cache: it gets a frame every step."""
        return self.prefilled == len(self.request.prompt)

    @property
    def prefix(self) -> int:
        """Rows worth keeping in the prefix cache (never the whole prompt: its last row starts the audio)."""
        return min(self.request.prefix_rows, len(self.request.prompt) - 1)


class PrefixCache:
    """KV rows of recently seen prompt prefixes, keyed by their content, within a byte budget."""

    def __init__(self, budget_bytes: int):
        self.budget = budget_bytes
        self.entries: OrderedDict[str, torch.Tensor] = OrderedDict()  # key -> KV rows [L, 2G, n, hd]

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
        """The longest stored prefix of `prompt`'s first `rows` rows: (n, its KV rows), or None.

        A conversation grows turn by turn: the prefix stored for one turn is a prefix of the next
        turn's, so the next turn prefills only the rows added since."""
        lengths = sorted({kv.shape[2] for kv in self.entries.values() if kv.shape[2] <= rows})
        data, h, done, best = self._rows(prompt), hashlib.sha256(), 0, None
        for n in lengths:  # one pass over the rows, a digest at every stored length
            h.update(data[done:n].tobytes())
            done = n
            key = h.copy().hexdigest()
            if key in self.entries:
                best = key
        if best is None:
            return None
        kv = self.get(best)
        return kv.shape[2], kv

    def put(self, key: str, kv: torch.Tensor) -> None:
        if kv.nbytes > self.budget:
            return
        self.entries[key] = kv
        while sum(a.nbytes for a in self.entries.values()) > self.budget:
            self.entries.popitem(last=False)


class Engine:
    """Many streams in fixed slots over one model. Not thread-safe: one loop drives it.

    codec: a `fastcsm.codec.codec.Codec`; when given, every step also decodes each slot's new frame to
      PCM in per-slot streaming state, inside the same compiled / captured step.
    prefill_chunk: prompt rows prefilled per step, across waiting requests, so running streams
      never wait more than one chunk's time for their next frame.
    one_frame_late: learn each step's frames during the next step (default: on CUDA, where
      the step runs asynchronously; on CPU the step is synchronous and waiting costs nothing).
    sample_candidates: rank only this many tokens per codebook while every request's top-k fits
      (default 64; the reference's top-k is 50); other steps sort the whole vocabulary. Each step
      runs the leanest `SamplingPath` for its running requests' settings (no nucleus while every
      topp is 1, no argmax while none is greedy), picked on the host: the same codes.
    quantize: "int8" or "fp8" runs a quantized copy of a full-precision `model` (see quant.py);
      a model loaded with `quantize=` is already quantized (`self.quantization` says which).
    runner: how the step and prefill run (`runner.Runner`); by default one built from
      compile (wrap the step and prefill in `torch.compile`, batch dynamic: one compile for every
      bucket; "auto": only if the compile cache holds a finished build of them, decided by
      `warmup`), compile_cache (the directory that keeps what inductor compiled, see
      `compile_cache`; default ~/.cache/fastcsm/compile) and cuda_graphs (capture one graph per
      batch bucket and sampling path; default: on when the model is on CUDA).
    """

    def __init__(
        self,
        model: CSM,
        max_slots: int = 1,
        codec: Codec | None = None,
        max_seq_len: int | None = None,
        prefill_chunk: int = 512,
        compile: bool | str = False,
        cuda_graphs: bool | None = None,
        prefix_cache_bytes: int = 256 << 20,
        sample_candidates: int = 64,
        one_frame_late: bool | None = None,
        quantize: str | None = None,
        runner: Runner | None = None,
        compile_cache: str | None = None,
    ):
        if codec is not None and not isinstance(codec, Codec):
            raise TypeError(f"codec must be a fastcsm Codec (wrap a Mimi as Codec(mimi)), got {type(codec)}")
        if runner is not None and (compile or cuda_graphs or compile_cache):
            raise ValueError("give compile / cuda_graphs to the Runner you pass, not to the Engine")
        mode = quant.check_mode(quantize, model.device)
        if mode is not None and quant.mode_of(model) != mode:
            if quant.mode_of(model) is not None:
                raise ValueError(f"the model is already quantized as {quant.mode_of(model)}; load it in full "
                                 f"precision to run it as {mode}")
            model = quant.quantized_copy(model, mode)
        self.model, self.cfg, self.codec = model, model.cfg, codec
        self.quantization = quant.mode_of(model)
        self.device, self.dtype = model.device, model.dtype
        self.max_slots = max_slots
        self.max_seq_len = max_seq_len or self.cfg.max_seq_len
        self.prefill_chunk = prefill_chunk
        self.sample_candidates = sample_candidates
        on_cuda = self.device.type == "cuda"
        self.one_frame_late = on_cuda if one_frame_late is None else one_frame_late
        self.runner = runner or Runner(compile=compile, cuda_graphs=on_cuda if cuda_graphs is None else cuda_graphs,
                                       cache_dir=compile_cache)
        self.buffers = Buffers.allocate(model, max_slots, self.max_seq_len, codec.mimi if codec else None)
        self.runner.bind(self.buffers)
        # Pinned host copies of the newest frame (and its audio), read a step late on CUDA.
        self._host_codes = torch.zeros(max_slots, self.cfg.num_codebooks, dtype=torch.long, pin_memory=on_cuda)
        self._host_pcm = torch.zeros(max_slots, codec.frame_size, pin_memory=on_cuda) if codec else None
        self._copy_event = torch.cuda.Event() if on_cuda else None
        self.buckets = [b for b in (1 << i for i in range(max_slots.bit_length() + 1)) if b < max_slots] + [max_slots]
        self.prefix_cache = PrefixCache(prefix_cache_bytes)
        self.stats = {"prefill_rows": 0, "reused_rows": 0, "frames": 0, "steps": 0}
        self._slots: list[_Row | None] = [None] * max_slots
        self._rows: dict[Request, _Row] = {}
        self._waiting: list[_Row] = []  # admitted, prompt not fully in the cache yet, oldest first
        self._pending: list[_Row] = []  # the rows whose frames of the last step are still in flight
        self._kept: OrderedDict[Request, list[torch.Tensor]] = OrderedDict()  # codec rows for `audio_after`

    @property
    def cuda_graphs(self) -> bool:
        return self.runner.cuda_graphs

    # -- requests in and out ------------------------------------------------------------------

    @property
    def free_slots(self) -> int:
        return self._slots.count(None)

    @property
    def waiting(self) -> int:
        """Requests holding a slot whose prompt is not fully in the cache yet."""
        return len(self._waiting)

    def __contains__(self, request: Request) -> bool:
        """The request holds a slot: it has not ended nor been released."""
        return request in self._rows

    def busy(self) -> bool:
        return bool(self._rows) or bool(self._pending)

    def add(self, request: Request) -> int:
        """Take the lowest free slot for `request`; its prompt is prefilled by later steps."""
        check_fits(len(request.prompt), request.max_frames, self.max_seq_len, self.cfg.frame_ms,
                   f"the prompt ({len(request.prompt)} rows)", "shorten the prompt or lower max_frames")
        if request in self._rows:
            raise ValueError("this request is already in the engine")
        if None not in self._slots:
            raise RuntimeError(f"all {self.max_slots} slots are busy")
        row = _Row(request, self._slots.index(None))
        self._slots[row.slot] = self._rows[request] = row
        st, p = self.buffers.state, request.params
        st.active[row.slot] = False
        st.key[row.slot], st.frame[row.slot] = row_key(torch.tensor(request.seed)), 0
        st.temperature[row.slot], st.topk[row.slot], st.topp[row.slot] = p.temperature, p.topk, p.topp
        self._reuse_prefix(row)
        self._waiting.append(row)
        return row.slot

    def release(self, request: Request, reason: EndReason = EndReason.CANCELLED) -> Emitted | None:
        """Free the request's slot now (finished, cancelled, or its client went away); a frame of
        it still in flight is dropped. Returns its end event, with `reason`, or None if it held no slot."""
        row = self._rows.pop(request, None)
        if row is None:
            return None
        self._slots[row.slot] = None
        self.buffers.state.active[row.slot] = False
        if row in self._waiting:
            self._waiting.remove(row)
        self._pending = [r for r in self._pending if r is not row]
        return Emitted(request, row.slot, reason=EndReason(reason), prefill_rows=row.prefilled - row.reused,
                       reused_rows=row.reused)

    def events(self, request: Request):
        """Generate one request alone; yields its frame events, then its end event. Closing the
        iterator frees the slot."""
        self.add(request)
        try:
            while request in self:
                yield from (e for e in self.step() if e.request is request)
        finally:
            self.release(request)

    def run(self, request: Request):
        """Generate one request alone; yields its frame events (`events` without the end)."""
        with closing(self.events(request)) as events:
            yield from takewhile(lambda e: not e.ended, events)

    # -- the loop -----------------------------------------------------------------------------

    def step(self) -> list[Emitted]:
        """Prefill waiting prompts (one budget of rows), then one frame for every running slot.

        Returns what the host learnt this step: a frame per request (codes, and PCM with a
        codec), and the end events of requests that ended (their slot is free again). With
        `one_frame_late` the frames are those of the previous step, read while this step's are
        computed; otherwise this step's own, read when it is done.
        """
        self._prefill_waiting()
        previous, self._pending = self._pending, []
        late = self._read_host() if previous else None  # before this step's copy overwrites it
        running = [row for row in self._slots if row is not None and row.ready]
        if running:
            batch = self.bucket()
            self._snapshot_audio(running)
            # Row r writes its next frame at position prefilled + steps: attention needs no more.
            window = max(row.prefilled + row.steps for row in running) + 1
            self.runner.step(self.buffers, batch, self._sampling_path(running), window)
            for row in running:
                row.steps += 1
            self._copy_to_host(batch)
            self.stats["steps"] += 1
        if self.one_frame_late:
            self._pending = running
            return self._emit(previous, late)
        return self._emit(running, self._read_host())

    def bucket(self) -> int:
        """The smallest bucket holding every running slot (they sit low: lowest-free-first)."""
        top = max((row.slot for row in self._slots if row is not None and row.ready), default=-1)
        return next(b for b in self.buckets if b > top)

    def warmup(self, progress=None) -> float:
        """Build every variant of the step before traffic arrives (compile it, capture its CUDA
        graph) for each batch bucket and every sampling path (a compiled runner runs them as 2 variants
        a bucket, `Runner.variant`, from 2 compiled graphs each for all buckets), so that no request
        waits for that later. Streams already running are not advanced. `progress` hears of each
        build before it starts (`runner.Progress`). Returns the seconds it took."""
        t = time.perf_counter()
        paths = SamplingPath.every(self.sample_candidates)
        self.runner.warmup(self.buffers, [(b, p) for b in self.buckets for p in paths], progress)
        return time.perf_counter() - t

    def _sampling_path(self, running: list[_Row]) -> SamplingPath:
        """The sampling ops this step needs, from its running requests' settings (set at admission,
        known here without asking the device): a partial top-k when every top-k fits in
        `sample_candidates`, the nucleus only when some topp < 1, and so on (`SamplingPath.of`)."""
        return SamplingPath.of([row.request.params for row in running], self.sample_candidates)

    def _copy_to_host(self, batch: int) -> None:
        self._host_codes[:batch].copy_(self.buffers.state.codes[:batch], non_blocking=True)
        if self.codec is not None:
            self._host_pcm[:batch].copy_(self.buffers.pcm[:batch], non_blocking=True)
        if self._copy_event is not None:
            self._copy_event.record()

    def _read_host(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self._copy_event is not None:
            self._copy_event.synchronize()
        return self._host_codes.clone(), self._host_pcm.clone() if self.codec is not None else None

    def _emit(self, rows: list[_Row], host) -> list[Emitted]:
        """Frames (and ends) of `rows` from the host copy of one step's output."""
        out = []
        eos = self.cfg.codebook_eos_id
        for row in rows:  # a row released meanwhile has left `_pending` with its frame
            codes, pcm = host[0][row.slot], host[1]
            if bool((codes == eos).all()):  # the end frame: not audio
                self._keep_audio(row, ended_by_eos=True)
                out.append(self.release(row.request, EndReason.END_OF_SPEECH))
                continue
            row.frames += 1
            self.stats["frames"] += 1
            out.append(Emitted(row.request, row.slot, codes, pcm[row.slot] if pcm is not None else None))
            if row.frames >= row.request.max_frames:
                self._keep_audio(row, ended_by_eos=False)
                out.append(self.release(row.request, EndReason.LENGTH))
        return out

    # -- prefill ------------------------------------------------------------------------------

    def _prefill_waiting(self) -> None:
        """Prefill up to `prefill_chunk` prompt rows, oldest request first."""
        budget = self.prefill_chunk
        while self._waiting and budget > 0:
            row = self._waiting[0]
            try:
                budget -= self._prefill_chunk(row, budget)
            except Exception as e:
                raise PrefillError(self.release(row.request, EndReason.ERROR), e) from e

    def _reuse_prefix(self, row: _Row) -> None:
        hit = self.prefix_cache.longest(row.request.prompt, row.prefix) if row.prefix > 0 else None
        if hit is not None:
            n, kv = hit
            self.buffers.cache.write(row.slot, kv)
            row.prefilled = row.reused = n
            self.stats["reused_rows"] += n

    def _prefill_chunk(self, row: _Row, rows: int) -> int:
        """Put the next chunk (at most `rows` rows) of the row's prompt into its cache row.
        Returns the rows prefilled."""
        prompt, slot, start, P = row.request.prompt, row.slot, row.prefilled, row.prefix
        stop = min(len(prompt), start + rows)
        if start < P < stop and row.reused < P:
            stop = P  # end a chunk at the prefix boundary so its KV can be kept
        tokens = prompt.tokens[None, start:stop].to(self.device, non_blocking=True)
        mask = prompt.mask[None, start:stop].to(self.device, non_blocking=True)
        start_t = torch.full((1,), start, device=self.device, dtype=torch.long)
        h = self.runner.prefill(self.buffers, slot, tokens, mask, start_t, window=stop)
        row.prefilled = stop
        self.stats["prefill_rows"] += stop - start
        if stop == P and row.reused < P:
            self.prefix_cache.put(PrefixCache.key(prompt, P), self.buffers.cache.read(slot, P))
        if row.ready:
            self._start(row, h[0])
        return stop - start

    def _start(self, row: _Row, h: torch.Tensor) -> None:
        """The prompt is in: the slot generates from the next step on."""
        st, slot = self.buffers.state, row.slot
        st.h[slot], st.pos[slot], st.active[slot] = h, row.prefilled, True
        if self.codec is not None:  # its audio stream starts now: steps while it waited decoded noise
            kept = self._kept.pop(row.request.audio_after, None)
            if kept is not None:
                self._set_codec_rows(slot, kept)
            else:
                self.buffers.codec_state.reset(torch.arange(self.max_slots, device=self.device) == slot)
        self._waiting.remove(row)

    # -- audio that continues across requests -------------------------------------------------

    def _snapshot_audio(self, running: list[_Row]) -> None:
        """Keep the codec rows of `keep_audio` requests before this step: the two latest are
        enough to find the state right after the last frame, whichever way it ends."""
        if self.codec is None:
            return
        for row in running:
            if row.request.keep_audio:
                row.snapshots = [*row.snapshots[-1:], self._codec_rows(row.slot)]

    def _keep_audio(self, row: _Row, ended_by_eos: bool) -> None:
        """Store the codec state right after the request's last emitted frame. The end frame is
        not audio, and read one frame late, one more step has already run."""
        if not row.request.keep_audio or self.codec is None:
            return
        steps_back = int(ended_by_eos) + int(self.one_frame_late)  # steps run since its last frame
        self._kept[row.request] = row.snapshots[-steps_back] if steps_back else self._codec_rows(row.slot)
        while len(self._kept) > KEPT_AUDIO_PER_SLOT * self.max_slots:  # its follower never came
            self._kept.popitem(last=False)

    def _codec_rows(self, slot: int) -> list[torch.Tensor]:
        return [t[slot].clone() for t in leaves(self.buffers.codec_state)]

    def _set_codec_rows(self, slot: int, rows: list[torch.Tensor]) -> None:
        for t, row in zip(leaves(self.buffers.codec_state), rows, strict=True):
            t[slot].copy_(row)
