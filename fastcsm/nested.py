"""One walker over nested state: the engine's slot tensors, KV caches and Mimi's streaming state
are dataclasses, lists and tuples of tensors (or of smaller state objects)."""

from __future__ import annotations

import dataclasses

import torch


def map_leaves(fn, obj, kind=torch.Tensor):
    """`obj` rebuilt with every `kind` inside it replaced by `fn(leaf)`; lists, tuples and
    dataclasses are opened, anything else is kept as it is."""
    if isinstance(obj, kind):
        return fn(obj)
    if isinstance(obj, (list, tuple)):
        items = [map_leaves(fn, o, kind) for o in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)  # a NamedTuple or not
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: map_leaves(fn, getattr(obj, f.name), kind)
                                           for f in dataclasses.fields(obj) if f.init})
    return obj


def leaves(obj, kind=torch.Tensor) -> list:
    """Every `kind` inside `obj`, in a fixed order (the order `map_leaves` visits them)."""
    found = []
    map_leaves(found.append, obj, kind)
    return found


def first_rows(obj, n: int):
    """A view of the first n rows of every tensor in `obj`."""
    return map_leaves(lambda t: t[:n], obj)
