"""server.heap: a load's survivors are frozen, and garbage cycles from before are collected first."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.heap import freeze_long_lived


class _Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the cyclic collector frees it


@pytest.fixture(autouse=True)
def _thawed() -> Iterator[None]:
    gc.unfreeze()
    yield
    gc.unfreeze()  # the rest of the test session collects as usual


def test_survivors_are_frozen_and_earlier_cycles_collected() -> None:
    kept, dropped = _Node(), _Node()
    dropped_ref = weakref.ref(dropped)
    del dropped
    freeze_long_lived()
    assert dropped_ref() is None, "a cycle that was garbage before the freeze must be collected"
    assert gc.get_freeze_count() > 0
    assert not any(o is kept for o in gc.get_objects())  # frozen: no longer walked by collections
    assert kept.me is kept


def test_a_second_freeze_collects_cycles_that_were_frozen() -> None:
    node = _Node()
    ref = weakref.ref(node)
    freeze_long_lived()
    del node  # now garbage, but frozen: an ordinary collection cannot see it
    gc.collect()
    assert ref() is not None
    freeze_long_lived()  # what a later load or unload does
    assert ref() is None


def _resident_mb() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads resident memory from /proc")
def test_memory_freed_below_the_top_of_the_heap_goes_back_to_the_system() -> None:
    """glibc returns freed heap memory only from the heap's top by itself; a load's transient copies
    (the graph's bytes, protobuf, the runtimes' own) are freed beneath what the load keeps."""
    from server.heap import _malloc_trim, release_free_memory

    if _malloc_trim() is None:
        pytest.skip("no malloc_trim in this C library")
    release_free_memory()
    chunks = [bytearray(64 * 1024) for _ in range(2000)]  # 125 MiB from malloc's heap, pages touched
    kept = [bytearray(64 * 1024) for _ in range(4)]  # allocated above them: the top stays in use
    del chunks
    before = _resident_mb()
    assert release_free_memory()
    assert before - _resident_mb() > 60, "freed heap pages stayed resident"
    assert all(len(k) == 64 * 1024 for k in kept)
