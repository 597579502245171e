"""server.heap: a load's survivors are frozen, and garbage cycles from before are collected first."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

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
