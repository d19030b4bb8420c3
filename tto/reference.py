"""Reference mode: every fast path (memory scan, SDPA attention) switches to its slow, obviously
correct reference. Tests run a model both ways and compare."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

_ACTIVE = False


@contextmanager
def reference_mode() -> Iterator[None]:
    global _ACTIVE
    previous, _ACTIVE = _ACTIVE, True
    try:
        yield
    finally:
        _ACTIVE = previous


def in_reference_mode() -> bool:
    return _ACTIVE
