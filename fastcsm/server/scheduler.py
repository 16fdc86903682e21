"""Continuous batching: many requests over one `Engine`, driven by one background thread.

    asyncio handlers ──submit()──> inbox ──> waiting queue (bounded) ──engine.add()──> slots
                                                                            │ engine.step()
    asyncio.Queue per stream <──call_soon_threadsafe── frames (codes + PCM) ─┘

The engine is not thread-safe, so exactly one thread (`Scheduler._run`) touches it. Requests
join the running batch at the next step after a slot frees and leave it the moment they end,
are cancelled, or pass their deadline: a cancelled request's slot is released before the next
frame step, so a client that goes away costs at most the frame already in flight.

Admission is bounded: when the waiting queue is full, `submit` raises `Busy` at once (the
server answers 503 with Retry-After) rather than letting work pile up. Failures stay with
their request: a request the engine refuses, or one whose prefill raises, ends with an error
event for that stream only (a failed prefill says so: "prefill failed after N of M prompt
rows"); a failure inside a batched frame step ends the requests in that step (their state is
suspect; "generation failed") and the loop carries on for everyone else.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from ..engine.engine import EndReason, Engine, PrefillError, Request

log = logging.getLogger("fastcsm")

# Bucket upper bounds (seconds) of the latency histograms.
TTFA_BUCKETS = (0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0)
STEP_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.12, 0.2, 0.4, 1.0, 2.0)


class Busy(RuntimeError):
    """The waiting queue is full; try again after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after


class Closed(RuntimeError):
    """The scheduler has stopped."""


@dataclass
class Frame:
    """One generated 80 ms frame of a stream."""

    index: int  # 0, 1, 2, ... within the stream
    codes: torch.Tensor  # [K] long, CPU
    pcm: np.ndarray | None  # [frame_size] float32, or None when the engine has no codec


@dataclass
class End:
    """How a stream ended: `reason` is the engine's for an end it decided (end frame, length
    bound), the scheduler's otherwise (cancelled, deadline, error); a name is taken as its `EndReason`.

    Every stream gets exactly one End. Its rows are those of its request in the engine, however it
    ended: prompt rows it prefilled itself (a failed prefill: the chunks that went in before the
    failing one) and rows taken from the prefix cache; 0 for a request that never got a slot."""

    reason: EndReason
    frames: int
    message: str = ""
    prefill_rows: int = 0
    reused_rows: int = 0

    def __post_init__(self):
        self.reason = EndReason(self.reason)


class Histogram:
    """A Prometheus-style cumulative histogram (written by one thread, read by any)."""

    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        i = next((i for i, b in enumerate(self.buckets) if value <= b), len(self.buckets))
        self.counts[i] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        out, total = [], 0
        for b, c in zip([*map(repr, self.buckets), "+Inf"], self.counts, strict=True):
            total += c
            out.append((b, total))
        return out


@dataclass
class Metrics:
    """Counters the scheduler keeps; `/metrics` renders them."""

    submitted: int = 0
    rejected: int = 0  # queue full
    cancelled: int = 0
    deadline: int = 0
    errors: int = 0
    completed: int = 0
    frames: int = 0
    ttfa: Histogram = field(default_factory=lambda: Histogram(TTFA_BUCKETS))  # submit -> first frame
    step: Histogram = field(default_factory=lambda: Histogram(STEP_BUCKETS))  # one engine step


class Stream:
    """The consumer's side of one request: iterate it (`async for frame in stream`) in the
    event loop that submitted it; `end` says how it finished. `cancel()` from any thread."""

    def __init__(self, scheduler: Scheduler, request: Request, loop: asyncio.AbstractEventLoop, deadline: float):
        self.scheduler = scheduler
        self.request = request
        self.loop = loop
        self.deadline = deadline  # time.monotonic() by which it must have finished
        self.queue: asyncio.Queue = asyncio.Queue()
        self.submitted_at = time.monotonic()
        self.first_frame_at: float | None = None
        self.frames = 0
        self.end: End | None = None  # set (in the consumer's loop) when the End item is taken
        self.finished = False  # set by the scheduler thread when it has sent the End
        self.priority = False  # goes ahead of the waiting queue

    async def next(self) -> Frame | End:
        item = await self.queue.get()
        if isinstance(item, End):
            self.end = item
        return item

    async def wait_end(self) -> End:
        """Its End, the one the scheduler sends every stream (a cancelled one's within a step);
        frames still queued before it are dropped."""
        while self.end is None:
            await self.next()
        return self.end

    def __aiter__(self):
        return self

    async def __anext__(self) -> Frame:
        if self.end is not None:
            raise StopAsyncIteration
        item = await self.next()
        if isinstance(item, End):
            raise StopAsyncIteration
        return item

    def cancel(self) -> None:
        """Stop generating; the slot is freed before the engine's next frame step."""
        self.scheduler._cancel(self)


class Scheduler:
    """Owns `engine` and drives it from a background thread; see the module docstring.

    max_queue: requests that may wait for a free slot before `submit` raises `Busy`.
    timeout_s: default deadline of a request, from submission to its last frame.
    """

    def __init__(self, engine: Engine, max_queue: int = 64, timeout_s: float = 300.0):
        self.engine = engine
        self.max_queue = max_queue
        self.timeout_s = timeout_s
        self.metrics = Metrics()
        self._cv = threading.Condition()
        self._inbox: list[Stream] = []  # submitted, not yet seen by the loop
        self._cancels: list[Stream] = []
        self._waiting: deque[Stream] = deque()  # seen by the loop, waiting for a slot
        self._queued = 0  # inbox + waiting, guarded by _cv
        self._running: dict[Request, Stream] = {}  # in the engine
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="fastcsm-scheduler", daemon=True)
        self._thread.start()

    # -- the consumer side (any thread) -------------------------------------------------------

    @property
    def alive(self) -> bool:
        """The loop is running (it stops at `close`, or if it dies)."""
        return self._thread.is_alive()

    @property
    def slots(self) -> int:
        return self.engine.max_slots

    @property
    def active(self) -> int:
        """Requests holding a slot."""
        return len(self._running)

    @property
    def queued(self) -> int:
        """Requests waiting for a slot."""
        return self._queued

    def submit(self, request: Request, loop: asyncio.AbstractEventLoop | None = None,
               timeout_s: float | None = None, priority: bool = False) -> Stream:
        """Queue `request`; frames arrive in the returned stream's asyncio queue in `loop`
        (default: the running loop). Raises `Busy` when the waiting queue is full, unless
        `priority` (the continuation of work already admitted: it goes first, never refused)."""
        loop = loop or asyncio.get_running_loop()
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        stream = Stream(self, request, loop, deadline)
        stream.priority = priority
        with self._cv:
            if self._closing:
                raise Closed("the scheduler has stopped")
            if self._queued >= self.max_queue and not priority:
                self.metrics.rejected += 1
                raise Busy(f"the server is busy: all {self.slots} streams are taken and {self._queued} requests "
                           f"are waiting; retry shortly", retry_after=1)
            self._queued += 1
            self.metrics.submitted += 1
            self._inbox.append(stream)
            self._cv.notify()
        return stream

    def _cancel(self, stream: Stream) -> None:
        with self._cv:
            if stream.finished:
                return
            if stream not in self._inbox:
                self._cancels.append(stream)
                self._cv.notify()
                return
            # Not seen by the loop yet: it leaves the queue now, not after the step in flight
            # (a client that submits and cancels in a burst never fills the queue).
            self._inbox.remove(stream)
            self._queued -= 1
            self.metrics.cancelled += 1
            stream.finished = True
        try:
            stream.loop.call_soon_threadsafe(_put_all, [(stream, End(EndReason.CANCELLED, 0))])
        except RuntimeError:  # the consumer's loop is closed: nobody is listening
            pass

    def close(self, timeout: float = 10.0) -> None:
        """Stop the loop; every unfinished stream ends with reason `error`."""
        with self._cv:
            self._closing = True
            self._cv.notify()
        self._thread.join(timeout)

    # -- the loop (scheduler thread only) -----------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cv:
                while not (self._closing or self._inbox or self._cancels or self._running or self._waiting):
                    self._cv.wait()
                if self._closing:
                    break
                for s in self._inbox:
                    if s.priority:
                        self._waiting.appendleft(s)
                    else:
                        self._waiting.append(s)
                self._inbox.clear()
                cancels, self._cancels = self._cancels, []
            out: dict[asyncio.AbstractEventLoop, list] = {}
            try:
                self._tick(cancels, out)
            except Exception:  # a bug in the loop itself: end everything in flight, keep serving
                log.exception("scheduler step failed")
                for s in [*self._running.values(), *self._waiting]:
                    self._finish(s, End(EndReason.ERROR, s.frames, "internal error while generating"), out)
            self._deliver(out)
        out = {}
        with self._cv:
            self._waiting.extend(self._inbox)
            self._inbox.clear()
        for s in [*self._running.values(), *self._waiting]:
            self._finish(s, End(EndReason.ERROR, s.frames, "the server is shutting down"), out)
        self._deliver(out)

    def _tick(self, cancels: list[Stream], out: dict) -> None:
        engine = self.engine
        for s in cancels:
            if not s.finished:
                self.metrics.cancelled += 1
                self._finish(s, End(EndReason.CANCELLED, s.frames), out)
        now = time.monotonic()
        for s in [*self._running.values(), *self._waiting]:
            if now > s.deadline and not s.finished:
                self.metrics.deadline += 1
                self._finish(s, End(EndReason.DEADLINE, s.frames, "the request ran past its deadline"), out)
        while self._waiting and engine.free_slots:
            s = self._waiting.popleft()
            with self._cv:
                self._queued -= 1
            try:
                engine.add(s.request)
            except (ValueError, RuntimeError) as e:
                self._finish(s, End(EndReason.ERROR, 0, str(e)), out, in_queue=False)
                continue
            self._running[s.request] = s
        if not engine.busy():
            return
        self._deliver(out)  # the ends decided so far (cancels, deadlines, refusals) go out before the step runs
        out.clear()
        t0 = time.perf_counter()
        try:
            emitted = engine.step()
        except PrefillError as e:  # one prompt failed before the frame step ran: blame it alone
            self._prefill_failed(e, out)
            return
        except Exception as e:
            self._step_failed(e, out)
            return
        self.metrics.step.observe(time.perf_counter() - t0)
        for e in emitted:
            s = self._running.get(e.request)
            if s is None or s.finished:
                continue
            if e.ended:
                self.metrics.completed += 1
                self._finish(s, End(e.reason, s.frames, prefill_rows=e.prefill_rows, reused_rows=e.reused_rows), out)
                continue
            if s.first_frame_at is None:
                s.first_frame_at = time.monotonic()
                self.metrics.ttfa.observe(s.first_frame_at - s.submitted_at)
            pcm = e.pcm.numpy() if e.pcm is not None else None
            out.setdefault(s.loop, []).append((s, Frame(s.frames, e.codes, pcm)))
            s.frames += 1
            self.metrics.frames += 1

    def _prefill_failed(self, error: PrefillError, out: dict) -> None:
        """One request's prompt could not be put in the cache; the engine has released it and the
        frame step did not run, so it alone ends. Its End reports the rows it did prefill."""
        log.error("prefill failed: %r", error, exc_info=error)
        s = self._running.get(error.request)
        if s is None:
            return
        gone = error.end
        self._finish(s, End(EndReason.ERROR, s.frames, error.brief, gone.prefill_rows, gone.reused_rows), out)

    def _step_failed(self, error: Exception, out: dict) -> None:
        """The frame step raised: every request of the batch ends, since their state is suspect."""
        log.error("engine step failed: %r", error, exc_info=error)
        for s in list(self._running.values()):
            self._finish(s, End(EndReason.ERROR, s.frames, f"generation failed: {type(error).__name__}"), out)

    def _finish(self, s: Stream, end: End, out: dict, in_queue: bool | None = None) -> None:
        """End `s`: free its slot (or its place in the queue) and send its End."""
        if s.finished:
            return
        r = s.request
        if self._running.pop(r, None) is not None:
            gone = self.engine.release(r, end.reason)  # None when the engine ended it itself
            if gone is not None:
                end.prefill_rows, end.reused_rows = gone.prefill_rows, gone.reused_rows
        elif in_queue is not False and s in self._waiting:
            self._waiting.remove(s)
            with self._cv:
                self._queued -= 1
        if end.reason is EndReason.ERROR:
            self.metrics.errors += 1
        with self._cv:
            s.finished = True
        out.setdefault(s.loop, []).append((s, end))

    def _deliver(self, out: dict) -> None:
        """Hand each loop its items in one callback (cheap: one wake-up per loop per step)."""
        for loop, items in out.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the consumer's loop is closed: nobody is listening
                for s, _ in items:
                    if not s.finished:
                        self._cancel(s)


def _put_all(items: list) -> None:
    for stream, item in items:
        stream.queue.put_nowait(item)


class WatermarkedStream:
    """A scheduler `Stream` whose audio is watermarked: an utterance's frames are held until it
    ends, then marked as one waveform and handed on (everything else is the stream's own)."""

    def __init__(self, stream, watermarker, sample_rate: int):
        self._stream = stream
        self._watermarker = watermarker
        self._sample_rate = sample_rate
        self._ready: deque = deque()

    def __getattr__(self, name):
        return getattr(self._stream, name)

    async def next(self):
        if not self._ready:
            frames = []
            while not isinstance(item := await self._stream.next(), End):
                frames.append(item)
            if frames and frames[0].pcm is not None:
                pcm = torch.from_numpy(np.concatenate([f.pcm for f in frames]))
                marked = (await asyncio.to_thread(self._watermarker.apply, pcm, self._sample_rate)).numpy()
                cuts = np.cumsum([f.pcm.shape[0] for f in frames])[:-1]
                frames = [replace(f, pcm=p) for f, p in zip(frames, np.split(marked, cuts), strict=True)]
            self._ready.extend([*frames, item])
        return self._ready.popleft()
