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
XLA graph, dispatched asynchronously ahead of Python. Results are those of
eager execution.
"""
from __future__ import annotations

import atexit
import collections
import contextlib
import functools
import sys
import threading
import time
import warnings
import weakref
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any, Callable, TypeVar

import jax

from runtime import executable_cache
from runtime.executor import Executor, RemoteOptions, TerraExecutorError, select_executor, wait
from terra import config
from terra.coexec import COEXEC, FALLBACK, TRACING, StepRun, TerraInternalError, TerraWarning
from terra import cache as persistent, generate
from terra.generate import Program, build_program
from terra.intercept import TerraTrace, install, install_autodiff_hooks, install_trace_state_hook
from terra import telemetry
from terra.telemetry import Stats, events, hybrid, profiler
from terra.telemetry.events import COMPILE, COUNTER, GAVE_UP, INTERNAL_ERROR, STEP
from terra.trace import TraceGraph

F = TypeVar("F", bound=Callable[..., Any])

_active = threading.local()  # the StepRun this thread is inside, if any
install_autodiff_hooks()
install_trace_state_hook()


_names: collections.Counter = collections.Counter()
_names_lock = threading.Lock()


def _unique_name(name: str) -> str:
    """`name`, or `name#k` for the k-th step function of that name (telemetry keys)."""
    with _names_lock:
        _names[name] += 1
        k = _names[name]
    return name if k == 1 else f"{name}#{k}"


def _require_bool(api: str, name: str, value: Any, hint: str = "") -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{api}: {name} must be True or False{hint}, "
                        f"got {type(value).__name__} {value!r}")


def _check_options(max_graphs: Any, max_paths: Any, strict: Any, executor: Any,
                   cache: Any = True, warmup_wait: Any = None) -> None:
    """Refuse what `terra.function` cannot use, naming the argument and what it accepts."""
    for name, value in (("max_graphs", max_graphs), ("max_paths", max_paths)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"terra.function: {name} must be an int >= 1, "
                            f"got {type(value).__name__} {value!r}")
        if value < 1:
            raise ValueError(f"terra.function: {name} must be an int >= 1, got {value} "
                             "(to run the function eagerly, call it without terra.function "
                             "or set TERRA_DISABLE=1)")
    if strict is not None and not isinstance(strict, bool):
        raise TypeError(f"terra.function: strict must be True, False or None (TERRA_STRICT), "
                        f"got {type(strict).__name__} {strict!r}")
    _require_bool("terra.function", "cache", cache, " (TERRA_CACHE)")
    if warmup_wait is not None and (isinstance(warmup_wait, bool)
                                    or not isinstance(warmup_wait, (int, float))
                                    or not warmup_wait >= 0):
        raise ValueError(f"terra.function: warmup_wait must be a number of seconds >= 0 or None "
                         f"(TERRA_WARMUP_WAIT), got {warmup_wait!r}")
    if executor is not None and not isinstance(executor, str) and not all(
            callable(getattr(executor, m, None))
            for m in ("compile_function", "dispatch", "compile", "shutdown")):
        raise TypeError("terra.function: executor must be None (TERRA_EXECUTOR), a "
                        "\"grpc://HOST:PORT\" string, or an executor object (compile_function, "
                        f"dispatch, compile, shutdown), got {type(executor).__name__} {executor!r}")


def _executor(executor: Executor | str | None, settings: config.Config,
              cache_dir: str | None) -> Executor:
    if executor is None:
        executor = settings.executor
    elif isinstance(executor, str):
        executor = config.parse_executor("terra.function: executor", executor)
    return select_executor(executor, cache_dir=cache_dir, remote=RemoteOptions(
        settings.executor_token_file, settings.executor_tls_ca, settings.executor_keepalive_ms))


_step_functions: "weakref.WeakSet[StepFunction]" = weakref.WeakSet()
_exit_note_registered = False


def _register_exit_note() -> None:
    """Once, after the default executor exists: atexit runs last-registered first, so the
    note sees a compile still in flight before the executor's shutdown waits for it."""
    global _exit_note_registered
    if not _exit_note_registered:
        _exit_note_registered = True
        atexit.register(_note_step_functions_that_never_coexecuted)


def _note_step_functions_that_never_coexecuted() -> None:
    for fn in list(_step_functions):
        note = fn.never_coexecuted_note()
        if note:
            print(note, file=sys.stderr)


class StepFunction:
    """A step function run by Terra. Call it exactly like the wrapped function."""

    def __init__(self, fn: Callable, *, max_graphs: int = 8, max_paths: int = 64,
                 strict: bool | None = None, executor: Executor | str | None = None,
                 cache: bool = True, warmup_wait: float | None = None):
        if not callable(fn):
            raise TypeError(f"terra.function: fn must be a callable (the step function), "
                            f"got {type(fn).__name__} {fn!r}")
        _check_options(max_graphs, max_paths, strict, executor, cache, warmup_wait)
        functools.update_wrapper(self, fn)
        if not hasattr(self, "__name__"):  # a callable object or a partial
            self.__name__ = getattr(type(fn), "__name__", "step")
        self._fn = fn
        self.telemetry_name = _unique_name(self.__name__)
        self._max_graphs = max_graphs
        self._max_paths = max_paths
        settings = config.current()
        self._strict = settings.strict if strict is None else strict
        self._sync_compile = settings.sync_compile
        self._cache_dir = config.cache_folder(settings)
        self._cache_explicit = settings.cache_dir is not None
        self._executor = _executor(executor, settings, self._cache_dir)
        self._cache = cache and self._cache_dir is not None
        if self._cache:
            persistent.use_jax_compilation_cache(self._cache_dir)
        # Until one step co-executed to its end, a step waits (this long in all) for
        # the graph compiling instead of running eagerly beside it.
        self._warmup_left = (settings.warmup_wait if settings.warmup_wait is not None
                             else 60.0) if warmup_wait is None else warmup_wait
        self._warm = False                        # a step co-executed to its end
        self._first_step_at: float | None = None  # perf_counter() at the first call
        self._graph = TraceGraph()
        self._stats = Stats()
        self._program: Program | None = None
        self._pending = None                      # Future of the program being compiled
        self._compiling: Program | None = None    # ... and that program
        self._executables: dict = {}              # segment signature -> compiled executable
        self._busy = threading.Lock()             # held by the co-executed call in progress
        # One trace for all steps: JAX's per-call cost grows with every Trace
        # object ever created (measured: a fresh trivial Trace per step made
        # a 50-op step 17 -> 48 ms over 1200 steps; reusing one kept it flat).
        self._trace = TerraTrace(None)
        self._warned_concurrent = False
        self._looked_in_cache = False             # for a saved graph (terra/cache.py)
        self._graph_store: persistent.GraphStore | None = None
        self._calls: hybrid.Calls | None = None   # while events are on: for the explain report
        _step_functions.add(self)
        _register_exit_note()

    def __get__(self, obj, objtype=None):  # used as a method: bind `self`
        return self if obj is None else functools.partial(self, obj)

    def stats(self) -> Stats:
        """Counters of what Terra did so far (see `terra.telemetry.Stats`)."""
        if not self._stats.gave_up:
            self._stats.paths = self._graph.paths()
        return self._stats

    def wait_for_graph(self, timeout: float | None = None) -> bool:
        """Block until the graph in use covers every path learned so far (benchmarks).

        Also generates that graph if the steps since the last compile taught new
        paths: otherwise a path learned while a compile was in flight would wait
        for the end of the next step to be compiled.
        Returns whether the next call will co-execute.
        """
        self._wait_for_pending(timeout)
        if self._pending is None and self._graph.paths() and self._program_is_stale():
            try:
                self._maybe_generate(grew=False)
            except Exception as err:
                self._internal_failure(err, "generating a graph")
            self._wait_for_pending(timeout)
        return self._program is not None and not self._stats.gave_up

    def _wait_for_pending(self, timeout: float | None) -> None:
        pending = self._pending
        if pending is not None:
            try:
                pending.result(timeout=timeout)
            except Exception:
                pass  # reported by the next call, under the failure policy
            self._adopt_compiled_program()

    def _program_is_stale(self) -> bool:
        """The TraceGraph learned something the program in use was not built from."""
        program = self._program
        return not self._stats.gave_up and (program is None
                                            or program.version != self._graph.version)

    def __call__(self, *args, **kwargs):
        nested = getattr(_active, "run", None) is not None
        if nested or self._stats.gave_up or config.current().disable:
            return self._call_eagerly(args, kwargs)
        # One co-executed call at a time: a call from a second thread while one
        # runs goes eagerly (same results, never waits for the other thread).
        if not self._busy.acquire(blocking=False):
            if not self._warned_concurrent:
                self._warned_concurrent = True
                warnings.warn(f"terra: {self.__name__!r} was called from two threads at once; "
                              "concurrent calls run eagerly (results are unchanged)",
                              TerraWarning, stacklevel=2)
            return self._call_eagerly(args, kwargs)
        try:
            return self._call(args, kwargs)
        finally:
            self._busy.release()

    def _call_eagerly(self, args, kwargs):
        stats = self._stats
        stats.steps += 1
        stats.eager += 1
        telemetry, start_ns = events.recorder, time.perf_counter_ns()
        try:
            return self._fn(*args, **kwargs)
        finally:
            if telemetry is not None:
                telemetry.slice(STEP, self.telemetry_name, stats.steps, start_ns, {"phase": "eager"})

    def _call(self, args, kwargs):
        stats = self._stats
        stats.steps += 1
        telemetry = events.recorder
        start_ns = time.perf_counter_ns()
        if telemetry is not None:
            hybrid.calls_of(self).observe(args, kwargs)
        if not self._looked_in_cache:
            self._first_step_at = time.perf_counter()
            self._resume_from_cache()
        self._adopt_compiled_program()
        self._wait_for_first_graph()
        program = self._program
        leaves = jax.tree.leaves((args, kwargs))
        run = StepRun(self, COEXEC if program is not None else TRACING, program, leaves)
        nodes_before = self._graph.num_nodes
        counts = stats.wait_seconds, stats.fetch_waits, stats.feeds
        start = time.perf_counter()
        try:
            self._trace.handler = run
            with profiler.step(self.telemetry_name, stats.steps, run.mode), install(self._trace):
                _active.run = run
                try:
                    out = self._fn(*args, **kwargs)
                finally:
                    _active.run = None
        except BaseException as err:
            run.abort()
            if telemetry is not None:
                self._step_event(telemetry, run, start_ns, counts, raised=type(err).__name__)
            raise
        out = run.finish(out)
        if run.mode == COEXEC:
            self._warm = True
        elif run.mode == FALLBACK:
            self._repredict()
        if program is not None:
            stats.step_seconds += time.perf_counter() - start
        if telemetry is not None:
            self._step_event(telemetry, run, start_ns, counts)
        try:
            self._maybe_generate(grew=self._graph.num_nodes != nodes_before)
        except Exception as err:
            self._internal_failure(err, "generating a graph")
        return out

    def _step_event(self, telemetry, run: StepRun, start_ns: int, counts: tuple,
                    raised: str | None = None) -> None:
        """The step's slice; `counts` are the stats (wait, waits, feeds) before it."""
        stats, (waited, syncs, feeds) = self._stats, counts
        data = {"phase": run.mode, "wait_us": (stats.wait_seconds - waited) * 1e6,
                "syncs": stats.fetch_waits - syncs, "feeds": stats.feeds - feeds,
                "ops": len(run.rec.ops)}
        if raised:
            data["raised"] = raised
        telemetry.slice(STEP, self.telemetry_name, run.step, start_ns, data)
        # Counters are sampled once per step: cheap, and enough for a dashboard.
        telemetry.instant(COUNTER, "", 0, {"segments in flight": telemetry.segments_in_flight,
                                           "placeholders (last step)": len(run.rec.ops)})

    # -- the persistent cache (terra/cache.py) ---------------------------------
    def _resume_from_cache(self) -> None:
        """First call with the persistent cache on: load the saved graph and its executables.

        Waits for them, so a resumed job co-executes from its first step. A
        saved graph that cannot be compiled is dropped and recorded again.
        """
        self._looked_in_cache = True
        if not self._cache:
            return
        store = self._graph_store = persistent.graph_store(
            self._fn, self.telemetry_name, self._cache_dir, self._cache_explicit)
        graph = None if store is None else store.load()
        if graph is None:
            return
        self._graph = graph
        self._maybe_generate(grew=False)
        try:
            if self._pending is not None:
                wait(self._pending)
        except Exception as err:
            warnings.warn(f"terra: the saved graph of {self.__name__!r} could not be compiled "
                          f"({err!r}); it is recorded again", TerraWarning, stacklevel=4)
            store.remove()
            self._graph, self._pending, self._stats.compiles = TraceGraph(), None, 0
            return
        self._adopt_compiled_program()
        self._stats.resumed = self._program is not None

    # -- warm-up: the first steps ---------------------------------------------
    def _wait_for_first_graph(self) -> None:
        """Until a step co-executed to its end, wait for the graph compiling (bounded).

        Beside a compile, an eagerly run step is slow (it shares the cores with
        the compiler, and each op compiles on first sight) and its graph is
        compiling already: waiting makes the second step co-execute.
        """
        pending = self._pending
        if pending is None or self._warm or self._warmup_left <= 0 or pending.done():
            return
        start = time.perf_counter()
        with contextlib.suppress(Exception):  # a failed compile is reported when adopted
            wait(pending, self._warmup_left)
        waited = time.perf_counter() - start
        self._warmup_left -= waited
        self._stats.warmup_seconds += waited
        self._adopt_compiled_program()

    def _repredict(self) -> None:
        """A fallback step: predict the values Python fed in it (see Program.repredict)."""
        for program in {id(p): p for p in (self._program, self._compiling) if p}.values():
            program.repredict()

    def never_coexecuted_note(self) -> str:
        """What to tell the user at exit when this function never co-executed a whole step."""
        stats = self._stats
        if self._warm or stats.gave_up or stats.steps - stats.eager < 2:
            return ""  # co-executed, said why already, or called once: not a training loop
        name, ran = self.__name__, f"ran {stats.steps} step(s) and never co-executed one"
        if self._pending is not None and not self._pending.done():
            spent = time.perf_counter() - (self._first_step_at or time.perf_counter())
            later = ("the next run loads it from the persistent cache and co-executes from "
                     "its first step" if self._cache else
                     "the persistent cache (off: TERRA_CACHE=0 or cache=False) would let the "
                     "next run start co-executed")
            return (f"terra: {name!r} {ran}: its graph was still compiling when the program "
                    f"ended ({spent:.1f} s after the first step); {later}, or raise "
                    "TERRA_WARMUP_WAIT (seconds) to wait longer for it")
        if stats.divergences:
            return (f"terra: {name!r} {ran}: every co-executed step diverged (last: "
                    f"{stats.last_divergence}); TERRA_EXPLAIN=1 reports where and why")
        return (f"terra: {name!r} {ran}: its graph was ready only after its last step; "
                "TERRA_WARMUP_WAIT (seconds, default 60) bounds how long the first steps "
                "wait for it")

    # -- graph generation, always off the Python thread's critical path ------
    def _maybe_generate(self, grew: bool) -> None:
        """Regenerate once the TraceGraph changed and the last step added no new ops.

        The first graph is generated right after the first step: it is
        speculative (every op is validated against it) and a new path only
        costs the step that took it.
        """
        if self._graph.paths() > self._max_paths:
            self._give_up(f"it took {self._graph.paths()} different paths "
                          f"(max_paths={self._max_paths}): shapes or Python values that decide "
                          "the path keep changing; last change: "
                          f"{self._stats.last_divergence or 'new paths while tracing'}")
            return
        first = self._program is None and self._stats.compiles == 0
        if (grew and not first) or self._pending is not None or not self._program_is_stale():
            return
        if self._stats.compiles >= self._max_graphs:
            self._give_up(f"its TraceGraph changed {self._stats.compiles} times "
                          f"(max_graphs={self._max_graphs}); last change: "
                          f"{self._stats.last_divergence or 'new paths while tracing'}")
            return
        graph = self._graph
        program = build_program(graph)
        executables, stats, executor, store = self._executables, self._stats, self._executor, \
            self._graph_store

        telemetry, paths = events.recorder, self._graph.paths()

        def compile_program():
            with profiler.span("terra compile", function=self.telemetry_name,
                               version=program.version):
                return compile_segments()

        def compile_segments():
            start = time.perf_counter_ns()
            for seg in program.segments:     # unchanged segments: compiled already
                seg.executable = executables.get(seg.signature)
            todo = [seg for seg in program.compile_order() if seg.executable is None]
            for seg, executable in _compile_segments(todo, executor, self._cache):
                seg.executable = executables[seg.signature] = executable
            program.mark_ready()
            compiled = len(todo)
            if store is not None:
                store.save(graph, program.version)  # lowering ran every custom_jvp rule it needs
            if telemetry is not None:
                telemetry.slice(COMPILE, self.telemetry_name, 0, start, {
                    "version": program.version, "segments": len(program.segments),
                    "compiled": compiled, "paths": paths,
                    "ops": sum(len(seg.nodes) for seg in program.segments)})
            return program, compiled

        stats.compiles += 1
        self._compiling = program
        self._pending = self._executor.compile(compile_program)
        # Tests want a deterministic switch to co-execution; so does a multi-process
        # run: every process must run the same computations in the same order, or
        # their collectives would not pair up.
        if self._sync_compile or jax.process_count() > 1:
            wait(self._pending)
            self._adopt_compiled_program()

    def _adopt_compiled_program(self) -> None:
        pending = self._pending
        if pending is None:
            return
        if not pending.done():
            return
        self._pending = self._compiling = None
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
        if events.recorder is not None:
            events.recorder.instant(INTERNAL_ERROR, self.telemetry_name, self._stats.steps,
                                    {"doing": doing, "error": repr(err)})
        if self._strict:
            raise TerraInternalError(f"terra failed while {doing}: {err!r}") from err
        self._give_up(f"internal error while {doing}: {err!r}")

    def _give_up(self, reason: str) -> None:
        if not self._stats.gave_up:
            self._stats.gave_up = reason
            self._stats.paths = self._graph.paths()
            # Staying eager from now on: free the graph, the program and its executables.
            self._graph, self._program, self._executables = TraceGraph(), None, {}
            if events.recorder is not None:
                events.recorder.instant(GAVE_UP, self.telemetry_name, self._stats.steps,
                                        {"reason": reason})
            warnings.warn(f"terra: {self.__name__!r} stays eager from now on: {reason}",
                          TerraWarning, stacklevel=4)


def _compile_segments(segments: list, executor: Executor, use_store: bool):
    """Yield (segment, executable) as each compiles: in parallel where the executor
    allows (XLA compiles without the GIL), else one by one in `segments` order."""
    def compile_one(seg):
        with contextlib.nullcontext() if use_store else executable_cache.disabled():
            return generate.compile_segment(seg, executor)

    workers = min(len(segments), getattr(executor, "compile_workers", 1))
    if workers <= 1:
        for seg in segments:
            yield seg, compile_one(seg)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="terra-compiler") as pool:
        futures = {pool.submit(compile_one, seg): seg for seg in segments}
        for future in as_completed(futures):
            yield futures[future], future.result()


def function(fn: F | None = None, *, max_graphs: int = 8, max_paths: int = 64,
             strict: bool | None = None, executor: Executor | str | None = None,
             cache: bool = True, warmup_wait: float | None = None) -> F:
    """Run `fn` with imperative-symbolic co-execution. Use as `@terra.function`.

    Args:
        fn: the step function; any Python is allowed inside.
        max_graphs: how many times the graph may be regenerated (new paths,
            shape changes) before the function stays eager, with a warning.
        max_paths: how many distinct paths (step endings) the TraceGraph may
            hold; past it the function stays eager, with a warning, and its
            graph is freed (bounds memory when shapes never repeat).
        strict: raise `TerraInternalError` on Terra's own failures instead of
            falling back to eager (default: the TERRA_STRICT environment variable).
        executor: where the graph runs: "grpc://host:port" for a
            `python -m terra serve` process, or an executor object (default:
            the TERRA_EXECUTOR environment variable, else the in-process
            executor). Raises `terra.TerraExecutorError` if it cannot
            be reached.
        cache: False keeps this function out of the persistent cache (on by
            default in TERRA_CACHE_DIR, else $XDG_CACHE_HOME/terra, else
            ~/.cache/terra; TERRA_CACHE=0 switches it off for every function).
        warmup_wait: until one step has co-executed to its end, a step waits for
            the graph compiling in the background, at most this many seconds in
            all (default: TERRA_WARMUP_WAIT, else 60); 0 runs those steps eagerly
            beside the compile instead.

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
        # refused at the decorator, not at the first call
        _check_options(max_graphs, max_paths, strict, executor, cache, warmup_wait)
        return functools.partial(function, max_graphs=max_graphs, max_paths=max_paths,
                                 strict=strict, executor=executor, cache=cache,
                                 warmup_wait=warmup_wait)  # type: ignore
    return StepFunction(fn, max_graphs=max_graphs, max_paths=max_paths, strict=strict,
                        executor=executor, cache=cache, warmup_wait=warmup_wait)  # type: ignore


def explain(fn: StepFunction | None = None, *, at_exit: bool = False, jit: bool = False) -> str:
    """The explain report: sync points, divergences, compiles, advice, and whether
    whole-step `jax.jit` would give the same results (the hybridization report).

    Events are collected while telemetry is on (TERRA_EXPLAIN=1, TERRA_TRACE,
    TERRA_TELEMETRY, `terra.timeline`, or `explain(..., at_exit=True)` before
    the loop); without them the report has the counters only.

    Args:
        fn: a `terra.function`; None for every step function seen.
        at_exit: also switch event collection on now and print the report of
            every step function to stderr when the program exits (with `jit`).
        jit: check the jax.jit verdict by running the step's last call eagerly
            and under jax.jit, and time both (it runs the step function a few
            more times; its prints are captured).

    Example:
        >>> terra.explain(train_step, at_exit=True)       # doctest: +SKIP
        >>> for batch in data: train_step(...)            # report printed at exit
    """
    if fn is not None and not isinstance(fn, StepFunction):
        raise TypeError(f"terra.explain: fn must be a terra.function or None (every step "
                        f"function), got {type(fn).__name__} {fn!r}")
    _require_bool("terra.explain", "at_exit", at_exit)
    if at_exit:
        telemetry.enable(explain_at_exit=True)
    name = None if fn is None else fn.telemetry_name
    text = telemetry.report(name, check=jit)
    if fn is not None and not text:  # no events: the counters, and how to get more
        s = fn.stats()
        text = (f"terra explain: {name}\n  steps: {s.steps} (tracing {s.traced}, co-executed "
                f"{s.coexecuted}, fell back {s.fallbacks}, eager {s.eager}); {s.compiles} compiles; "
                f"{s.fetch_waits} of {s.fetches} fetches waited for the graph\n"
                "  no events were collected for it: set TERRA_EXPLAIN=1 (or call terra.explain(fn, "
                "at_exit=True) before the loop) for sync points and divergences by source line")
    return text
