"""The batches of one epoch, surviving a crashed data-loader worker.

A loader worker that dies (out of memory, a killed process) would end the run. A
:class:`ResilientBatches` iterates an epoch's batches from the first one not trained on; when a
worker dies it shuts that loader down and starts a new one at the first untrained batch (at
most ``max_restarts`` times per epoch, counted in ``restarts``), so nothing is lost or trained
twice.

PyTorch reports a dead worker from a SIGCHLD handler, which raises in the main thread wherever
it happens to be (mid optimiser step, for instance). While iterating, SIGCHLD only records that
it came, and the loader's own check runs between batches, where a crash can be answered.
"""

from __future__ import annotations

import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from nirdml.errors import TrainingError


@contextmanager
def worker_crash_held():
    """Hold PyTorch's "DataLoader worker died" check for the block; yields ``check()``.

    Inside the block SIGCHLD only records that it came, and ``check()`` runs the loader's
    handler at a point of our choosing (between batches). Blocking the signal with
    ``pthread_sigmask`` is not enough: another thread (OpenMP, pin-memory) may receive it.
    While held, the loader still finds a dead worker itself within 5 s of waiting.
    """
    previous = None
    if hasattr(signal, "SIGCHLD") and threading.current_thread() is threading.main_thread():
        previous = signal.getsignal(signal.SIGCHLD)
    pending: list[int] = []

    def check() -> None:
        if pending and callable(previous):
            pending.clear()
            previous(signal.SIGCHLD, None)

    if previous is None:
        yield check
        return
    signal.signal(signal.SIGCHLD, lambda signum, frame: pending.append(signum))
    try:
        yield check
    finally:
        signal.signal(signal.SIGCHLD, previous)


def is_worker_crash(exc: BaseException, batches) -> bool:
    """Whether ``exc``, raised by fetching a batch or by the held check, means a worker died.

    PyTorch reports a dead worker as a RuntimeError naming the "DataLoader worker"; a worker
    killed while handing over a batch instead breaks the transfer (ConnectionResetError,
    EOFError) in the main process, which only counts as a crash when a worker is in fact dead.
    """
    if isinstance(exc, RuntimeError) and "DataLoader worker" in str(exc):
        return True
    if isinstance(exc, (OSError, EOFError)):
        # the transfer breaks when the dying worker's sockets close, a moment before the
        # process is reaped, so give it a few seconds to show up as dead
        workers = getattr(batches, "_workers", [])
        deadline = time.monotonic() + 5.0
        while workers and time.monotonic() < deadline:
            if any(not w.is_alive() for w in workers):
                return True
            time.sleep(0.02)
    return False


def shutdown_loader(batches) -> None:
    """Stop a loader iterator's workers now (and unregister them from PyTorch's SIGCHLD check),
    rather than whenever the iterator is garbage-collected."""
    shutdown = getattr(batches, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()


class ResilientBatches:
    """The rest of an epoch's batches (see the module docstring).

    Args:
        make_loader: returns a DataLoader over the batches not trained on yet (the caller
            advances its own position as it trains on each yielded batch).
        where: describes the position for messages (e.g. ``"batch 57 of epoch 3"``).
        give_up: called before raising TrainingError after too many restarts (e.g. to save a
            checkpoint); returns a hint added to the message.
        max_restarts: crashed workers tolerated per epoch.
    """

    def __init__(self, make_loader: Callable, where: Callable[[], str],
                 give_up: Callable[[], str], max_restarts: int = 5):
        self.make_loader = make_loader
        self.where = where
        self.give_up = give_up
        self.max_restarts = max_restarts
        self.restarts = 0

    def __iter__(self) -> Iterator:
        # the loader's SIGCHLD handler is installed when its first iterator starts; the hold
        # goes on top of it so that a dead worker never raises in the middle of a step
        batches = iter(self.make_loader())
        with worker_crash_held() as check_workers:
            try:
                while True:
                    try:
                        item = next(batches)
                    except StopIteration:
                        return
                    except Exception as exc:
                        crash = exc
                    else:
                        yield item
                        try:
                            check_workers()
                            continue
                        except RuntimeError as exc:
                            crash = exc
                    batches = self._restart(crash, batches)
            finally:
                shutdown_loader(batches)

    def _restart(self, crash: BaseException, batches):
        if not is_worker_crash(crash, batches):
            raise crash
        shutdown_loader(batches)  # also unregisters its workers from the check
        if self.restarts >= self.max_restarts:
            hint = self.give_up()
            raise TrainingError(
                f"data-loader workers crashed {self.restarts + 1} times ({crash!r}, at "
                f"{self.where()}). Check memory (fewer data.num_workers) and the dataset's image "
                f"files. {hint}") from crash
        self.restarts += 1
        warnings.warn(f"data-loader worker crashed ({crash!r}); restarting the loader at "
                      f"{self.where()}", RuntimeWarning, stacklevel=3)
        return iter(self.make_loader())
