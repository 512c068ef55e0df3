"""The public front end: `terra.function` and its configuration.

    import terra

    @terra.function
    def train_step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        if loss > 10.0:                      # Python control flow on a tensor
            print("spike", float(loss))
        updates, opt_state = opt.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, loss

The first steps run eagerly while Terra records them; then the step
co-executes: Python keeps running every line, and the DL ops run as a compiled
XLA graph on the executor thread. Results are those of eager execution.
"""
from __future__ import annotations

import functools
import os
import threading
import time
import warnings
from typing import Any, Callable, TypeVar

import jax

from runtime.executor import Executor, TerraExecutorError, select_executor, wait
from terra.coexec import COEXEC, TRACING, StepRun, TerraInternalError, TerraWarning
from terra import generate
from terra.generate import Program, build_program
from terra.intercept import TerraTrace, install, install_autodiff_hooks
from terra.telemetry import Stats
from terra.trace import TraceGraph

F = TypeVar("F", bound=Callable[..., Any])

_active = threading.local()  # the StepRun this thread is inside, if any
install_autodiff_hooks()


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


class StepFunction:
    """A step function run by Terra. Call it exactly like the wrapped function."""

    def __init__(self, fn: Callable, *, max_graphs: int = 8, strict: bool | None = None,
                 executor: Executor | str | None = None):
        functools.update_wrapper(self, fn)
        self._fn = fn
        self._max_graphs = max_graphs
        self._strict = _env_flag("TERRA_STRICT") if strict is None else strict
        self._sync_compile = _env_flag("TERRA_SYNC_COMPILE")
        self._executor = select_executor(executor)
        self._graph = TraceGraph()
        self._stats = Stats()
        self._program: Program | None = None
        self._pending = None                      # Future of the program being compiled
        self._executables: dict = {}              # segment signature -> compiled executable

    def __get__(self, obj, objtype=None):  # used as a method: bind `self`
        return self if obj is None else functools.partial(self, obj)

    def stats(self) -> Stats:
        """Counters of what Terra did so far (see `terra.telemetry.Stats`)."""
        self._stats.paths = self._graph.paths()
        return self._stats

    def wait_for_graph(self, timeout: float | None = None) -> bool:
        """Block until a graph compiling in the background is in use (benchmarks).

        Returns whether the next call will co-execute.
        """
        pending = self._pending
        if pending is not None:
            try:
                pending.result(timeout=timeout)
            except Exception:
                pass  # reported by the next call, under the failure policy
            self._adopt_compiled_program()
        return self._program is not None and not self._stats.gave_up

    def __call__(self, *args, **kwargs):
        stats = self._stats
        stats.steps += 1
        if self._stats.gave_up or _env_flag("TERRA_DISABLE") or getattr(_active, "run", None):
            stats.eager += 1
            return self._fn(*args, **kwargs)
        self._adopt_compiled_program()
        program = self._program
        leaves = jax.tree.leaves((args, kwargs))
        run = StepRun(self, COEXEC if program is not None else TRACING, program, leaves)
        nodes_before = self._graph.num_nodes
        start = time.perf_counter()
        try:
            with install(TerraTrace(run)):
                _active.run = run
                try:
                    out = self._fn(*args, **kwargs)
                finally:
                    _active.run = None
        except BaseException:
            run.abort()
            raise
        out = run.finish(out)
        if program is not None:
            stats.step_seconds += time.perf_counter() - start
        try:
            self._maybe_generate(grew=self._graph.num_nodes != nodes_before)
        except Exception as err:
            self._internal_failure(err, "generating a graph")
        return out

    # -- graph generation, always off the Python thread's critical path ------
    def _maybe_generate(self, grew: bool) -> None:
        """Regenerate once the TraceGraph changed and the last step added no new ops."""
        program = self._program
        if grew or self._pending is not None:
            return
        if program is not None and program.version == self._graph.version:
            return
        if self._stats.compiles >= self._max_graphs:
            self._give_up(f"its TraceGraph changed {self._stats.compiles} times "
                          f"(max_graphs={self._max_graphs}); last change: "
                          f"{self._stats.last_divergence or 'new paths while tracing'}")
            return
        program = build_program(self._graph)
        cache, stats, executor = self._executables, self._stats, self._executor

        def compile_program():
            compiled = 0
            for seg in program.segments:
                exe = cache.get(seg.signature)
                if exe is None:
                    exe = cache[seg.signature] = generate.compile_segment(seg, executor)
                    compiled += 1
                seg.executable = exe
            return program, compiled

        stats.compiles += 1
        self._pending = self._executor.compile(compile_program)
        if self._sync_compile:  # tests: deterministic switch to co-execution
            wait(self._pending)
            self._adopt_compiled_program()

    def _adopt_compiled_program(self) -> None:
        pending = self._pending
        if pending is None or not pending.done():
            return
        self._pending = None
        try:
            program, compiled = pending.result()
        except Exception as err:
            self._internal_failure(err, "compiling a graph")
            return
        self._stats.segments_compiled += compiled
        self._program = program
        live = {seg.signature for seg in program.segments}
        for sig in [s for s in self._executables if s not in live]:
            del self._executables[sig]

    def _internal_failure(self, err: Exception, doing: str) -> None:
        if isinstance(err, TerraExecutorError):
            raise err  # the executor is gone: not Terra's failure, and not recoverable here
        self._stats.internal_errors += 1
        if self._strict:
            raise TerraInternalError(f"terra failed while {doing}: {err!r}") from err
        self._give_up(f"internal error while {doing}: {err!r}")

    def _give_up(self, reason: str) -> None:
        if not self._stats.gave_up:
            self._stats.gave_up = reason
            warnings.warn(f"terra: {self.__name__!r} stays eager from now on: {reason}",
                          TerraWarning, stacklevel=4)


def function(fn: F | None = None, *, max_graphs: int = 8, strict: bool | None = None,
             executor: Executor | str | None = None) -> F:
    """Run `fn` with imperative-symbolic co-execution. Use as `@terra.function`.

    Args:
        fn: the step function; any Python is allowed inside.
        max_graphs: how many times the graph may be regenerated (new paths,
            shape changes) before the function stays eager, with a warning.
        strict: raise `TerraInternalError` on Terra's own failures instead of
            falling back to eager (default: the TERRA_STRICT environment variable).
        executor: where the graph runs: "grpc://host:port" for a
            `python -m terra serve` process, or an executor object (default:
            the TERRA_EXECUTOR environment variable, else the in-process
            executor thread). Raises `terra.TerraExecutorError` if it cannot
            be reached.

    Example:
        >>> import jax.numpy as jnp, terra
        >>> @terra.function
        ... def step(w, x):
        ...     return w - 0.1 * jnp.mean(w * x)
        >>> w = jnp.ones(3)
        >>> for _ in range(5):
        ...     w = step(w, jnp.arange(3.0))
        >>> step.stats().steps
        5
    """
    if fn is None:
        return functools.partial(function, max_graphs=max_graphs, strict=strict,  # type: ignore
                                 executor=executor)
    return StepFunction(fn, max_graphs=max_graphs, strict=strict, executor=executor)  # type: ignore
