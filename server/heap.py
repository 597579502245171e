"""Short garbage-collector pauses while serving: what a model load leaves alive is frozen.

A loaded server holds a few hundred thousand long-lived Python objects (FastAPI, pydantic, NumPy,
ONNX Runtime's bindings, the models). CPython's full (oldest-generation) collection walks all of
them, and it runs on whichever thread happens to allocate, holding the GIL: on a 2-core machine
under load that froze the event loop for 65-100 ms, and a 503 that should take 2 ms took 78.
`gc.freeze` moves the survivors of a collection out of the collector's sight, so later full
collections only walk what requests created since. Objects frozen are still freed by reference
counting; only a reference cycle among them would stay, so each load or unload first thaws the heap
and collects it whole (once, at a time when the server is already doing slow work).

Then what loading freed goes back to the operating system. Opening a session passes through
transient copies of the graph (the ONNX bytes, the protobuf, ONNX Runtime's and OpenVINO's own), and
glibc's malloc keeps freed memory in its heaps unless asked to return it (`malloc_trim`): ViT-B/16 on
the OpenVINO build with two lanes was 2.8 GB resident after loading and 1.8 GB after the trim, 0.94
and 0.74 GB on the CPU build (2026-12-04). Elsewhere than glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import time

logger = logging.getLogger(__name__)


def freeze_long_lived() -> None:
    """Collect everything once, hide the survivors from later collections, return freed memory."""
    start = time.perf_counter()
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    trimmed = release_free_memory()
    logger.debug(
        "heap frozen: %d objects, in %.1f ms%s", gc.get_freeze_count(), (time.perf_counter() - start) * 1e3,
        "; free memory returned to the system" if trimmed else "",
    )  # fmt: skip


def release_free_memory() -> bool:
    """Give the C heap's free pages back to the system (glibc's `malloc_trim`); whether it could."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def _malloc_trim():  # the libc function, or None where there is none (musl, macOS)
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):
        return None
