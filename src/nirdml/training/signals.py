"""SIGINT/SIGTERM as a request to stop cleanly (the trainer saves a resumable checkpoint)."""

from __future__ import annotations

import signal
from collections.abc import Callable
from contextlib import contextmanager


@contextmanager
def stop_requests(request: Callable[[int], None], requested: Callable[[], bool]):
    """While the block runs, SIGINT/SIGTERM call ``request(signum)``; a second signal after a
    request (``requested()``) stops at once (KeyboardInterrupt). Previous handlers are restored
    on exit; outside the main thread nothing is installed."""
    def handler(signum, frame):
        if requested():  # second signal: stop now
            raise KeyboardInterrupt
        request(signum)

    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread
            pass
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
