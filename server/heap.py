"""Short garbage-collector pauses while serving: what a model load leaves alive is frozen.

A loaded server holds a few hundred thousand long-lived Python objects (FastAPI, pydantic, NumPy,
ONNX Runtime's bindings, the models). CPython's full (oldest-generation) collection walks all of
them, and it runs on whichever thread happens to allocate, holding the GIL: on a 2-core machine
under load that froze the event loop for 65-100 ms, and a 503 that should take 2 ms took 78.
`gc.freeze` moves the survivors of a collection out of the collector's sight, so later full
collections only walk what requests created since. Objects frozen are still freed by reference
counting; only a reference cycle among them would stay, so each load or unload first thaws the heap
and collects it whole (once, at a time when the server is already doing slow work).
"""

from __future__ import annotations

import gc
import logging
import time

logger = logging.getLogger(__name__)


def freeze_long_lived() -> None:
    """Collect everything once, then hide the survivors from later collections."""
    start = time.perf_counter()
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    logger.debug(
        "heap frozen: %d objects, in %.1f ms", gc.get_freeze_count(), (time.perf_counter() - start) * 1e3
    )
