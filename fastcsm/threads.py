"""How many CPU threads torch runs a model on, and how its pool waits: chosen so that a shared,
busy machine slows fastcsm down a little, not twenty-fold.

A frame step is thousands of small ops, and every op with more than one thread ends in a barrier
that waits for the slowest thread. When another process holds one of the cores, a thread on that
core runs only in the scheduler's slices, so each barrier waits milliseconds, and OpenMP's
spinning waiters take time from that very thread. Hence the default policy (`threads=0`):

- a small model (below `SMALL_MODEL_PARAMS`) runs on one thread: its ops are too short to gain
  from a second one, and a single thread has no barrier to wait at;
- a larger model runs on every core this process may use (`os.sched_getaffinity`): its ops
  (csm-1b's linears take milliseconds) outlast a barrier's wait, and on a busy machine each thread
  is one more share of the CPU (measured: one thread instead of two was 1.3-3x slower for csm-1b
  int8, idle or with a core busy);
- the pool's idle threads sleep instead of spinning (`OMP_WAIT_POLICY=PASSIVE`): OpenMP reads it
  once, when torch loads, so `quiet_pool` must run before the first `import torch`.

`--threads N` (or `FASTCSM_THREADS=N`) fixes the count; an `OMP_WAIT_POLICY` already in the
environment is kept. `benchmarks/bench_threads.py` measures these choices against torch's default.

A server runs two Python threads that share one GIL: the event loop (requests, JSON, sockets)
and the scheduler's thread, which steps the engine. A frame step is thousands of torch calls,
each of which lets go of the GIL and takes it back; while the loop is busy (a flood of requests)
each taking-back waits until the loop is made to hand the GIL over, which Python does after its
switch interval (5 ms by default). `share_gil` sets that interval to `SWITCH_INTERVAL_S` in a
serving process (`Service.load`, where the scheduler's thread starts). Measured on the tiny
checkpoint (one torch thread, 2 shared cores) beside a thread running pure Python without pause,
a frame step's median was 75-171 ms at 5 ms and 49-58 ms at 0.5 ms (20-25 ms alone); the busy
thread did about as much work either way. Below 0.5 ms nothing more was measurably gained.
"""

from __future__ import annotations

import os
import sys

SMALL_MODEL_PARAMS = 200_000_000  # tiny presets run best alone; csm-1b (1.5 B) uses every core
SWITCH_INTERVAL_S = 0.0005  # how long a thread may keep the GIL from another that waits for it


def quiet_pool(environ=os.environ) -> None:
    """Sleeping, not spinning, pool threads; a no-op once torch is loaded (OpenMP read it then)."""
    environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask, e.g. a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def choose(threads: int = 0, params: int | None = None) -> int:
    """The thread count: `threads` if > 0, else the default policy above (`params` None: a large model)."""
    if threads > 0:
        return threads
    if params is not None and params < SMALL_MODEL_PARAMS:
        return 1
    return usable_cores()


def apply(threads: int = 0, params: int | None = None) -> int:
    """Set torch's thread count by `choose` and return it."""
    import torch

    n = choose(threads, params)
    torch.set_num_threads(n)
    return n


def share_gil(interval_s: float = SWITCH_INTERVAL_S) -> None:
    """Make a thread that holds the GIL hand it to one waiting for it after `interval_s` (the
    process's switch interval; see the module docstring)."""
    sys.setswitchinterval(interval_s)
