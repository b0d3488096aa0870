"""A small cache of engines for ``fm.mtl_backward``, so its buffers are reused across steps.

Entries are keyed on (kind, engine name, the identities of the shared parameters, in order),
hold the parameters by weak reference only, and are dropped when one of them is freed; at
most ``MAX_ENTRIES`` are kept (least recently used first out). ``clear()`` empties it.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import TypeVar

from torch import Tensor

__all__ = ["MAX_ENTRIES", "cached", "clear", "size"]

MAX_ENTRIES = 8
E = TypeVar("E")

_entries: OrderedDict[tuple, tuple[list[weakref.ref], object]] = OrderedDict()


def _drop(key: tuple) -> Callable[[weakref.ref], None]:
    def callback(_: weakref.ref) -> None:
        _entries.pop(key, None)
    return callback


def cached(kind: str, engine: str, params: Sequence[Tensor], factory: Callable[[], E]) -> E:
    """The cached engine for these parameters, created with ``factory()`` on a miss."""
    key = (kind, engine, tuple(id(p) for p in params))
    entry = _entries.get(key)
    if entry is not None and all(ref() is p for ref, p in zip(entry[0], params)):
        _entries.move_to_end(key)
        return entry[1]
    obj = factory()
    _entries[key] = ([weakref.ref(p, _drop(key)) for p in params], obj)
    while len(_entries) > MAX_ENTRIES:
        _entries.popitem(last=False)
    return obj


def clear() -> None:
    """Forget every cached engine (their buffers are freed when nothing else holds them)."""
    _entries.clear()


def size() -> int:
    return len(_entries)
