"""The in-process graph executor: one thread dispatches segments, one compiles.

Dispatch and compilation live on separate threads so a long XLA compile of a
new graph never delays the segments of a graph that is already running.
Segments are dispatched with JAX's asynchronous dispatch: a dispatch job
returns as soon as XLA has accepted the work, so the executor thread keeps up
with Python while the device computes.
"""
from __future__ import annotations

import atexit
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

_TIMEOUT_POLL_S = 0.1  # how often a waiting Python thread checks for Ctrl-C


class GraphExecutor:
    """Runs dispatch and compile jobs in two dedicated daemon-free threads."""

    def __init__(self) -> None:
        self._dispatch = ThreadPoolExecutor(1, thread_name_prefix="terra-executor")
        self._compile = ThreadPoolExecutor(1, thread_name_prefix="terra-compiler")
        self._closed = False
        self._lock = threading.Lock()

    def dispatch(self, job: Callable[[], Any]) -> Future:
        """Queue a segment dispatch; jobs run in submission (FIFO) order."""
        return self._dispatch.submit(job)

    def compile(self, job: Callable[[], Any]) -> Future:
        """Queue a compilation; never blocks the caller."""
        return self._compile.submit(job)

    def shutdown(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._dispatch.shutdown(wait=True, cancel_futures=True)
        self._compile.shutdown(wait=True, cancel_futures=True)


def wait(future: Future) -> Any:
    """`future.result()` that stays responsive to KeyboardInterrupt."""
    while True:
        try:
            return future.result(timeout=_TIMEOUT_POLL_S)
        except TimeoutError:
            continue


_default: GraphExecutor | None = None
_default_lock = threading.Lock()


def default_executor() -> GraphExecutor:
    """The process-wide executor, created on first use and shut down at exit."""
    global _default
    with _default_lock:
        if _default is None:
            _default = GraphExecutor()
            atexit.register(_default.shutdown)
        return _default
