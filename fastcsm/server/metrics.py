"""`/metrics` in the Prometheus text format (written by hand: a handful of series)."""

from __future__ import annotations


def _histogram(lines: list[str], name: str, help: str, h) -> None:
    lines += [f"# HELP {name} {help}", f"# TYPE {name} histogram"]
    for le, count in h.cumulative():
        lines.append(f'{name}_bucket{{le="{le}"}} {count}')
    lines += [f"{name}_sum {h.sum:.6f}", f"{name}_count {h.count}"]


def render_metrics(service) -> str:
    lines: list[str] = []

    def metric(name: str, kind: str, help: str, value) -> None:
        lines.extend([f"# HELP {name} {help}", f"# TYPE {name} {kind}", f"{name} {value}"])

    metric("fastcsm_ready", "gauge", "1 once the model is loaded", int(service.ready))
    s = service.scheduler
    if s is None:
        return "\n".join(lines) + "\n"
    m, stats = s.metrics, s.engine.stats
    metric("fastcsm_slots", "gauge", "streams the engine generates in one batch", s.slots)
    metric("fastcsm_active_streams", "gauge", "requests holding an engine slot", s.active)
    metric("fastcsm_queue_depth", "gauge", "requests waiting for a slot", s.queued)
    metric("fastcsm_requests_total", "counter", "requests admitted to the scheduler", m.submitted)
    metric("fastcsm_completed_total", "counter", "requests that ended with their end frame or length bound",
           m.completed)
    metric("fastcsm_rejected_total", "counter", "requests refused because the queue was full (503)", m.rejected)
    metric("fastcsm_cancelled_total", "counter", "requests cancelled (client gone, interrupt)", m.cancelled)
    metric("fastcsm_deadline_total", "counter", "requests stopped at their deadline", m.deadline)
    metric("fastcsm_errors_total", "counter", "requests that ended in an error", m.errors)
    metric("fastcsm_frames_total", "counter", "80 ms audio frames generated", m.frames)
    metric("fastcsm_engine_steps_total", "counter", "engine steps (one frame for every active stream)", stats["steps"])
    metric("fastcsm_prefill_rows_total", "counter", "prompt rows run through the backbone", stats["prefill_rows"])
    metric("fastcsm_reused_rows_total", "counter", "prompt rows taken from the prefix KV cache",
           stats["reused_rows"])
    _histogram(lines, "fastcsm_ttfa_seconds", "time from admission to a request's first audio frame", m.ttfa)
    _histogram(lines, "fastcsm_frame_seconds", "wall time of one engine step (prefill chunk + one frame)", m.step)
    return "\n".join(lines) + "\n"
