"""Graph executors: the in-process one (default) and how a program picks one.

The in-process executor hands each segment to XLA on the calling (Python)
thread, and compiles on a thread of its own, so a long XLA compile of a new
graph never delays Python or the segments of a graph already running.
Segments use JAX's asynchronous dispatch: a dispatch returns as soon as XLA
has accepted the work, and XLA's runtime computes it on its own threads (the
CPU client's thread pool, a GPU stream) while Python runs ahead.

Why not a dispatch thread: it needs the GIL for every dispatch, and while
Python runs the skeleton it gets it only at a switch interval (5 ms), so
segments started late; dispatching from the Python thread made co-executed
steps 1-23% faster on all 13 programs of the suite (see the README).

Every executor offers the same seam: `compile_function(fn, specs)` turns a
segment's flat function into something callable with the segment's inputs,
`dispatch(job)` runs a job that calls it, `compile(job)` runs a compilation
off the Python thread. What the callable returns is either a jax.Array or a
`RemoteValue` (held by an executor in another process, see runtime/client.py)
whose `local()` downloads it.
"""
from __future__ import annotations

import abc
import atexit
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, NamedTuple, Protocol, Sequence

import jax

from runtime.executable_cache import executable_store

_TIMEOUT_POLL_S = 0.1  # how often a waiting Python thread checks for Ctrl-C

# Eager rounds every op's output to its dtype; a fused XLA computation may keep
# bf16/f16 intermediates in f32 ("excess precision"), so a segment would not
# compute eager's values. Segments are compiled without it (docs/numerics.md).
EAGER_ROUNDING = {"xla_allow_excess_precision": False}


class Executor(Protocol):
    """What co-execution needs from an executor (GraphExecutor, client.RemoteExecutor)."""

    def compile_function(self, fn: Callable, specs: Sequence[jax.ShapeDtypeStruct],
                         out_shardings: Sequence | None = None) -> Callable: ...
    def dispatch(self, job: Callable[[], Any]) -> Future: ...
    @property
    def compile_workers(self) -> int:
        """Segments of one graph compiled at once: the cores other work leaves idle.

        On a loaded machine parallel XLA compiles only slow each other down
        (measured: benchmarks/segment_compile.py).
        """
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
            (os.cpu_count() or 1)
        busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
        return max(1, int(cores - busy))

    def compile(self, job: Callable[[], Any]) -> Future: ...
    def shutdown(self) -> None: ...


class GraphExecutor:
    """Dispatches on the caller's thread; compiles in a dedicated daemon-free thread.

    With a `cache_dir`, executables compiled before (also by an earlier
    process) are loaded from it instead of compiled.
    """

    def __init__(self, cache_dir: str | None = None) -> None:
        self._store = executable_store(cache_dir)
        self._compile = ThreadPoolExecutor(1, thread_name_prefix="terra-compiler")
        self._closed = False
        self._lock = threading.Lock()

    def dispatch(self, job: Callable[[], Any]) -> Future:
        """Run a segment dispatch now; its failure is raised where its values are waited for."""
        future: Future = Future()
        try:
            future.set_result(job())
        except Exception as err:
            future.set_exception(err)
        return future

    @property
    def compile_workers(self) -> int:
        """Segments of one graph compiled at once: the cores other work leaves idle.

        On a loaded machine parallel XLA compiles only slow each other down
        (measured: benchmarks/segment_compile.py).
        """
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
            (os.cpu_count() or 1)
        busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
        return max(1, int(cores - busy))

    def compile(self, job: Callable[[], Any]) -> Future:
        """Queue a compilation; never blocks the caller."""
        return self._compile.submit(job)

    def compile_function(self, fn: Callable, specs: Sequence[jax.ShapeDtypeStruct],
                         out_shardings: Sequence | None = None) -> Callable:
        """Lower and compile `fn` for inputs `specs` (runs in the compile thread).

        `out_shardings` (None: XLA's choice) places the outputs on a mesh.
        With the persistent cache on, executables compiled before (also by
        an earlier process) are loaded instead of compiled.
        """
        shardings = {} if out_shardings is None else {"out_shardings": out_shardings}
        lowered = jax.jit(fn, keep_unused=True, **shardings).lower(*specs)
        if self._store is None:
            return lowered.compile(compiler_options=EAGER_ROUNDING)
        return self._store.compile(lowered, EAGER_ROUNDING)

    def shutdown(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._compile.shutdown(wait=True, cancel_futures=True)


class TerraExecutorError(RuntimeError):
    """The graph executor cannot be reached, or it failed: the step cannot finish.

    Raised (never turned into an eager fallback: the values it held are gone)
    with the executor's address and what to do about it.
    """


class RemoteValue(abc.ABC):
    """An array held by an executor in another process, named by a handle.

    Like executor jobs, `local()` must run with no JAX trace installed.
    """

    __slots__ = ()

    @abc.abstractmethod
    def local(self) -> jax.Array:
        """The array here, in this process (downloaded once, then cached)."""


def wait(future: Future, timeout: float | None = None) -> Any:
    """`future.result(timeout)` that stays responsive to KeyboardInterrupt."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        poll = _TIMEOUT_POLL_S if deadline is None else \
            min(_TIMEOUT_POLL_S, max(0.0, deadline - time.monotonic()))
        try:
            return future.result(timeout=poll)
        except TimeoutError:
            if deadline is not None and time.monotonic() >= deadline:
                raise


_defaults: dict[str | None, GraphExecutor] = {}
_default_lock = threading.Lock()


def default_executor(cache_dir: str | None = None) -> GraphExecutor:
    """The process-wide executor (one per cache directory), created on first use, shut down at exit."""
    with _default_lock:
        executor = _defaults.get(cache_dir)
        if executor is None:
            executor = _defaults[cache_dir] = GraphExecutor(cache_dir)
            atexit.register(executor.shutdown)
        return executor


class RemoteOptions(NamedTuple):
    """How to reach a `python -m terra serve` process (terra.config reads them from TERRA_EXECUTOR_*)."""

    token_file: str | None = None     # holds the token the server requires
    tls_ca: str | None = None         # PEM roots checking its certificate (grpcs://)
    keepalive_ms: int = 5000          # a silent server is declared dead after two periods


def select_executor(spec: Executor | str = "", *, cache_dir: str | None = None,
                    remote: RemoteOptions = RemoteOptions()) -> Executor:
    """The executor `spec` names.

    `spec` is an executor object, "" for the in-process executor (using the
    executable cache in `cache_dir`, if any), or "grpc://host:port"
    ("grpcs://" for TLS) for a `python -m terra serve` process, reached with
    `remote`.

    Example:
        >>> select_executor("") is default_executor()
        True
    """
    if not isinstance(spec, str):
        return spec
    if not spec.strip():
        return default_executor(cache_dir)
    if spec.startswith(("grpc://", "grpcs://")):
        from runtime.client import connect  # grpc is imported only when it is used
        return connect(spec, remote)
    raise ValueError(f"unknown executor {spec!r}: use grpc://host:port (or grpcs:// for TLS) "
                     "for a `python -m terra serve` process, or \"\" for the in-process executor")
