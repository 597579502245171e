"""Worker threads give way to the event loop: decoding and inference run at a higher nice value.

Under load every core is busy decoding and running batches, and the event loop (HTTP, admission,
the 503s of an overloaded queue, health checks) would otherwise wait its turn behind them. The loop
needs little CPU per request, so giving it the core first costs throughput nothing and keeps those
answers prompt. Linux keeps a nice value per thread; elsewhere, or where the change is refused,
the threads simply run at the process's priority.
"""

from __future__ import annotations

import logging
import os
import sys
import threading

logger = logging.getLogger(__name__)

MAX_NICE = 19


def lower_thread_priority(niceness: int) -> None:
    """Add `niceness` to the calling thread's nice value (0: nothing); never raises."""
    if niceness <= 0 or sys.platform != "linux":  # elsewhere a thread id is not a process id
        return
    try:
        tid = threading.get_native_id()
        current = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, min(current + niceness, MAX_NICE))
    except (AttributeError, OSError) as exc:  # no per-thread priorities here, or not permitted
        logger.debug("thread priority left as it is: %s", exc)
