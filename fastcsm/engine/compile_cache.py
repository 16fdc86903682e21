"""Compiled code kept on disk: a restart, a second process or a new Ray replica loads what inductor
built instead of compiling again (minutes a graph for csm-1b).

A cache directory (`--compile-cache`, FASTCSM_COMPILE_CACHE, default ~/.cache/fastcsm/compile)
holds one entry per key, a folder named by the key's hash:

    <dir>/<hash>/key.json    what the compiled code was built for: torch version, fastcsm's
                             compiled code (a hash of its source, `code_hash`), device (GPU name
                             and compute capability, or CPU model and vector ISA), model shapes,
                             dtype, quantization, codec shapes, cache length
    <dir>/<hash>/inductor/   TORCHINDUCTOR_CACHE_DIR: inductor's FX-graph, AOTAutograd and
                             autotuning caches and its compiled kernels
    <dir>/<hash>/built.json  the step variants (batch bucket, sampling) whose warm-up, prefill's
                             included, has finished: what a start with `compile="auto"` needs
                             to find to compile from the cache (`holds`)

A process uses the entry of its own key only: entries built for another torch, device or model, or
by another version of fastcsm's code, are left alone and named in a log line. An entry whose
key.json cannot be read or names another key is cleared and rebuilt, never trusted; inductor
itself logs and recompiles a graph it cannot load.
Processes share a directory safely: inductor writes its files by rename, and so is key.json.
The inductor directory is a process-wide setting (the environment variable): the last entry
opened serves every compile of the process.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import platform
import shutil
import tempfile
from pathlib import Path

import torch

log = logging.getLogger("fastcsm")

KEY_FILE = "key.json"
BUILT_FILE = "built.json"


def default_dir() -> Path:
    """FASTCSM_COMPILE_CACHE, else $XDG_CACHE_HOME/fastcsm/compile (~/.cache/fastcsm/compile)."""
    if os.environ.get("FASTCSM_COMPILE_CACHE"):
        return Path(os.environ["FASTCSM_COMPILE_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "fastcsm" / "compile"


def device_name(device: torch.device) -> str:
    """What compiled code for `device` depends on: the GPU and its compute capability, or the CPU
    and the vector instructions inductor generates for it."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"cuda {torch.cuda.get_device_name(device)} sm_{major}{minor}"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{device.type} {cpu} {torch.backends.cpu.get_cpu_capability()}"


PACKAGE = Path(__file__).resolve().parent.parent
COMPILED_CODE = ("model", "engine", "codec", "nested.py")  # under PACKAGE: what a compiled step and prefill trace


@functools.cache
def code_hash(root: Path = PACKAGE) -> str:
    """A hash of the source of fastcsm's code that compiled graphs are traced from (`COMPILED_CODE`
    under the package `root`). Another release, or an edit, may trace other graphs: its entry is
    another, so a start from the cache never finds a build that does not hold its graphs (and
    compiles for minutes where `built.json` promised seconds)."""
    h = hashlib.sha256()
    for part in COMPILED_CODE:
        path = root / part
        for f in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:12]


def cache_key(model, mimi=None, cache_length: int | None = None) -> dict:
    """The key of the compiled step and prefill of `model` (a `CSM`, quantized or not) with `mimi`."""
    from ..model.quant import mode_of

    return {
        "torch": torch.__version__,
        "code": code_hash(),
        "device": device_name(model.device),
        "model": dataclasses.asdict(model.cfg),
        "dtype": str(model.dtype).removeprefix("torch."),
        "quantization": mode_of(model),
        "codec": dataclasses.asdict(mimi.config) if mimi is not None else None,
        "cache_length": cache_length,
    }


def key_hash(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _as_stored(key: dict) -> dict:
    """`key` as key.json reads back (tuples as lists, other values as their text)."""
    return json.loads(json.dumps(key, sort_keys=True, default=str))


def _read_key(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _summary(key) -> str:
    if not isinstance(key, dict):
        return "unreadable key"
    model = key.get("model") or {}
    backbone = model.get("backbone", {}) if isinstance(model, dict) else {}
    return (f"torch {key.get('torch')}, code {key.get('code')}, {key.get('device')}, {key.get('dtype')}"
            f"{'/' + key['quantization'] if key.get('quantization') else ''}, "
            f"backbone dim {backbone.get('dim') if isinstance(backbone, dict) else '?'}")


def open_entry(root: str | Path, key: dict) -> Path:
    """Make `root`'s entry for `key` inductor's cache (process-wide) and return the entry's folder."""
    key = _as_stored(key)
    root = Path(root).expanduser()
    entry = root / key_hash(key)
    # An entry without key.json is one another process is making right now: its key is ours.
    written = (entry / KEY_FILE).exists()
    stored = _read_key(entry / KEY_FILE) if written else key
    if stored != key:
        why = "cannot be read" if stored is None else f"was built for {_summary(stored)}"
        log.warning("fastcsm: compile cache %s %s, not for this process (%s): cleared, compiling afresh",
                    entry, why, _summary(key))
        shutil.rmtree(entry, ignore_errors=True)
    if not written or stored != key:
        others = [p for p in root.glob(f"*/{KEY_FILE}") if p.parent != entry] if root.is_dir() else []
        if others:
            log.info("fastcsm: compile cache %s has no entry for %s; ignoring %d entries built for: %s", root,
                     _summary(key), len(others), "; ".join(_summary(_read_key(p)) for p in others[:4]))
        else:
            log.info("fastcsm: compile cache %s has nothing yet for %s: this start compiles and fills it", root,
                     _summary(key))
        _write_key(entry, key)
    else:
        log.info("fastcsm: compile cache %s: loading what earlier starts compiled", entry)
    inductor = entry / "inductor"
    inductor.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(inductor)
    import torch._functorch.config
    import torch._inductor.config

    torch._inductor.config.fx_graph_cache = True
    torch._functorch.config.enable_autograd_cache = True
    return entry


def _write_key(entry: Path, key: dict) -> None:
    entry.mkdir(parents=True, exist_ok=True)
    _write(entry / KEY_FILE, key)


def _write(path: Path, value) -> None:
    """`value` as JSON at `path`, by rename: a reader sees the old file or the new one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-")
    with os.fdopen(fd, "w") as f:
        json.dump(value, f, indent=1, sort_keys=True, default=str)
    os.replace(tmp, path)


def _built(entry: Path) -> set[str]:
    names = _read_key(entry / BUILT_FILE)
    return {n for n in names if isinstance(n, str)} if isinstance(names, list) else set()


def mark_built(entry: Path, names) -> None:
    """The warm-up of the step variants `names` finished in `entry` (added to those already there)."""
    _write(entry / BUILT_FILE, sorted(_built(entry) | set(names)))


def holds(root: str | Path, key: dict, names) -> bool:
    """`root` has an entry for `key` (its key.json says so) whose finished warm-ups include every
    step variant of `names`: a start compiling them loads them instead of compiling."""
    key = _as_stored(key)
    entry = Path(root).expanduser() / key_hash(key)
    return _read_key(entry / KEY_FILE) == key and set(names) <= _built(entry)
