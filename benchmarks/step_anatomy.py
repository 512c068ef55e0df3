"""Where a co-executed step's time goes, next to the expert's partial-jit version.

    python benchmarks/step_anatomy.py profile   [--programs mlp,gpt2,faster_rcnn] [--steps 8]
    python benchmarks/step_anatomy.py evalshape [--programs gpt2] [--steps 8] [--rounds 3]
    python benchmarks/step_anatomy.py dispatch  [--programs mlp] [--steps 8]
    python benchmarks/step_anatomy.py gc        [--programs gpt2] [--steps 8] [--rounds 3]

Every experiment first runs the program under `terra.function` until its graph
covers the loop (TERRA_SYNC_COMPILE=1), then measures `--steps` co-executed steps.

* profile: cProfile of the steps, own time per step grouped by where the code
  lives (terra, jax, flax, optax, numpy, the program, builtins), for terra and
  for the expert version (`EXPERT_STEPS`); plus both modes' wall time per step
  without the profiler.
* evalshape: `jax.eval_shape` calls per step and the time inside them; then the
  step time with a guarded memo of pure shape-only retraces (key: the
  function's code, its closure's values -- functions by identity, plain values
  by equality -- and the arguments' avals), rounds interleaved.
* dispatch: every segment executable call in situ (wall and thread CPU time,
  whether its inputs were computed yet), the same call with its inputs made
  ready first, and the same executable called alone on those inputs, back to
  back and after 2 ms of Python busy work (as a step's Python runs between).
* gc: time in the cyclic garbage collector per step and the objects it
  tracks, with and without `gc.freeze()` after the graph is built, rounds
  interleaved.

Ratios within one run are the figures; absolute times depend on the load.
"""
from __future__ import annotations

import argparse
import cProfile
import functools
import gc
import os
import pstats
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TERRA_SYNC_COMPILE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from terra import bench  # noqa: E402

ROOT = str(Path(__file__).resolve().parent.parent)


def prepared(name: str, mode: str = "terra", warmup: int = 14):
    """The program's module and a `Wrap` whose steps co-execute (or are compiled)."""
    module = bench.load(name, bench.discover()[name])
    wrap = bench.Wrap(mode, getattr(module, "EXPERT_STEPS", None))
    for _ in range(2):
        bench.run_once(module, wrap, warmup)
        if mode == "terra":
            wrap.wait_for_graphs()
    return module, wrap


def step_ms(module, wrap, steps: int) -> float:
    out = bench.run_once(module, wrap, steps)
    if out.error is not None:
        raise out.error
    return out.steady_ms()


# -- profile -------------------------------------------------------------------------

def where(filename: str) -> str:
    if filename.startswith("~") or filename.startswith("<"):
        return "builtins/C"
    if filename.startswith(ROOT):
        rel = filename[len(ROOT) + 1:]
        return "program" if rel.startswith("examples") else "terra"
    for part in ("flax", "optax", "numpy", "jaxlib", "jax"):
        if f"/{part}/" in filename:
            return "jax" if part == "jaxlib" else part
    return "other Python"


class Profiled:
    """`wrap(fn)` whose step-function calls (only those) run under the profiler."""

    def __init__(self, wrap: bench.Wrap, prof: cProfile.Profile):
        self.wrap, self.prof = wrap, prof

    def __call__(self, fn):
        step = self.wrap(fn)

        def profiled(*args, **kwargs):
            self.prof.enable()
            try:
                return step(*args, **kwargs)
            finally:
                self.prof.disable()
        return profiled


def profile(name: str, steps: int) -> None:
    for mode in ("terra", "expert"):
        module, wrap = prepared(name, mode)
        wall = statistics.median(step_ms(module, wrap, steps) for _ in range(2))
        prof = cProfile.Profile()
        out = bench.run_once(module, Profiled(wrap, prof), steps)
        if out.error is not None:
            raise out.error
        stats = pstats.Stats(prof)
        groups: dict = {}
        for (filename, _, _), (_, _, tottime, _, _) in stats.stats.items():
            groups[where(filename)] = groups.get(where(filename), 0.0) + tottime
        total = sum(groups.values())
        print(f"{name} {mode}: {wall:.2f} ms/step wall (no profiler); profiled own time "
              f"inside the step calls {1e3 * total / steps:.2f} ms/step:")
        for group, t in sorted(groups.items(), key=lambda kv: -kv[1]):
            print(f"    {group:14} {1e3 * t / steps:8.2f} ms/step  {100 * t / total:5.1f}%")
        top = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:12]
        for (filename, line, fn), (_, calls, tottime, cumtime, _) in top:
            print(f"      {1e3 * tottime / steps:7.3f} ms {calls / steps:6.1f} calls/step  "
                  f"{fn} ({where(filename)}: {Path(filename).name}:{line})")


# -- evalshape -----------------------------------------------------------------------

class ShapeMemo:
    """`jax.eval_shape` with a memo of pure shape-only retraces; None keys call through."""

    def __init__(self, original):
        self.original, self.memo, self.hits, self.misses, self.seconds = original, {}, 0, 0, 0.0
        self.calls = 0
        self.enabled = False

    def key(self, fun, args, kwargs):
        fun_key = _value_key(fun)
        if fun_key is None or kwargs:
            return None
        avals = []
        for x in jax.tree.leaves(args):
            if not hasattr(x, "shape") or not hasattr(x, "dtype"):
                return None
            avals.append((tuple(x.shape), str(x.dtype), getattr(x, "weak_type", False)))
        return fun_key, jax.tree.structure(args), tuple(avals)

    def __call__(self, fun, *args, **kwargs):
        start = time.perf_counter()
        self.calls += 1
        try:
            key = self.key(fun, args, kwargs) if self.enabled else None
            if key is None:
                return self.original(fun, *args, **kwargs)
            hit = self.memo.get(key)
            if hit is not None:
                self.hits += 1
                return hit[0]
            self.misses += 1
            out = self.original(fun, *args, **kwargs)
            # the function is kept alive so the ids in its key stay its own
            self.memo[key] = (out, fun)
            return out
        finally:
            self.seconds += time.perf_counter() - start


def _value_key(v, depth: int = 0):
    """A hashable stand-in for a closure value that decides a shape-only trace.

    A function is keyed by its code, defaults, globals' identity and its closure's
    values (recursively): flax makes a fresh lambda, and often a fresh initializer,
    per call. None: not a value the memo can key on.
    """
    if depth > 6:
        return None
    if hasattr(v, "__code__") and hasattr(v, "__closure__"):
        cells = tuple(_value_key(c.cell_contents, depth + 1) for c in v.__closure__ or ())
        defaults = _value_key(v.__defaults__, depth + 1)
        if any(c is None for c in cells) or (v.__defaults__ and defaults is None):
            return None
        return ("fn", v.__code__, id(v.__globals__), defaults, cells)
    if v is None or isinstance(v, (bool, int, float, str, np.dtype, type)):
        return (type(v), v)
    if isinstance(v, (tuple, list)):
        keys = [_value_key(x, depth + 1) for x in v]
        return None if any(k is None for k in keys) else (type(v), tuple(keys))
    if isinstance(v, dict):
        keys = [(k, _value_key(x, depth + 1)) for k, x in v.items()]
        return None if any(k[1] is None for k in keys) else (dict, tuple(sorted(keys, key=repr)))
    if isinstance(v, functools.partial):
        keys = (_value_key(v.func, depth + 1), _value_key(v.args, depth + 1),
                _value_key(v.keywords, depth + 1))
        return None if None in keys else ("partial",) + keys
    if callable(v) and hasattr(v, "__name__") and hasattr(v, "__module__"):
        return ("callable", id(v))   # a builtin or class-level callable: by identity
    if hasattr(v, "dtype") and not hasattr(v, "shape"):   # a jax/numpy scalar type
        return ("dtype", str(v))
    return None


def evalshape(name: str, steps: int, rounds: int) -> None:
    module, wrap = prepared(name)
    memo = ShapeMemo(jax.eval_shape)
    jax.eval_shape = memo
    try:
        bench.run_once(module, wrap, steps)   # counts and times, memo off
        calls, seconds = memo.calls, memo.seconds
        times = {"off": [], "on": []}
        for _ in range(rounds):
            for state in ("off", "on"):
                memo.enabled = state == "on"
                times[state].append(step_ms(module, wrap, steps))
        memo.enabled = True
        check = bench.run_once(module, wrap, steps)
        memo.enabled = False
        reference = bench.run_once(module, wrap, steps)
    finally:
        jax.eval_shape = memo.original
    off, on = statistics.median(times["off"]), statistics.median(times["on"])
    print(f"{name}: {calls / steps:.0f} jax.eval_shape calls/step, "
          f"{1e3 * seconds / steps:.2f} ms/step inside them; step {off:.2f} ms -> {on:.2f} ms "
          f"with the memo ({off / on:.2f}x; {memo.hits} hits, {memo.misses} misses); "
          f"memo run equal to the plain one: "
          f"{bench.logs_match(reference.log, check.log) and bench.params_match(reference.params, check.params)}")


# -- dispatch ------------------------------------------------------------------------

class TimedExecutable:
    """A segment executable that notes each call's wall/CPU time and input readiness."""

    def __init__(self, executable, index: int, make_ready: bool):
        self.executable, self.index, self.make_ready = executable, index, make_ready
        self.calls: list = []

    def __call__(self, *xs):
        if self.make_ready:
            jax.block_until_ready(xs)
        ready = all(x.is_ready() for x in xs if isinstance(x, jax.Array))
        start, cpu = time.perf_counter(), time.thread_time()
        outs = self.executable(*xs)
        self.calls.append((1e3 * (time.perf_counter() - start), 1e3 * (time.thread_time() - cpu),
                           ready, xs))
        return outs


def busy(ms: float) -> None:
    end = time.perf_counter() + ms / 1e3
    while time.perf_counter() < end:
        pass


def dispatch(name: str, steps: int) -> None:
    module, wrap = prepared(name)
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    segments = [seg for f in wrap.wrapped.values() for seg in f._program.segments]
    for make_ready in (False, True):
        timed = []
        for i, seg in enumerate(segments):
            seg.executable = TimedExecutable(seg.executable, i, make_ready)
            timed.append(seg.executable)
        bench.run_once(module, wrap, steps)
        label = "inputs made ready first" if make_ready else "in situ"
        for t in timed:
            wall = [c[0] for c in t.calls]
            if not wall:
                continue
            print(f"{name} segment {t.index} ({label}): {len(wall)} calls, wall median "
                  f"{statistics.median(wall):.3f} ms (max {max(wall):.3f}), thread CPU median "
                  f"{statistics.median(c[1] for c in t.calls):.3f} ms, inputs ready at the call "
                  f"{sum(c[2] for c in t.calls)}/{len(wall)}")
            if make_ready:   # the same executable alone, on the last call's inputs
                xs = jax.block_until_ready(t.calls[-1][3])
                for gap_ms in (0.0, 2.0):   # back to back; after Python work, as in a step
                    call, done = [], []
                    for _ in range(20):
                        busy(gap_ms)
                        start, cpu = time.perf_counter(), time.thread_time()
                        outs = t.executable(*xs)
                        call.append((1e3 * (time.perf_counter() - start),
                                     1e3 * (time.thread_time() - cpu)))
                        jax.block_until_ready(outs)
                        done.append(1e3 * (time.perf_counter() - start))
                    print(f"{name} segment {t.index} (alone, {gap_ms:.0f} ms of Python before "
                          f"each call): the call returns after "
                          f"{statistics.median(c[0] for c in call):.3f} ms wall, "
                          f"{statistics.median(c[1] for c in call):.3f} ms thread CPU; "
                          f"done after {statistics.median(done):.3f} ms")
        for seg, t in zip(segments, timed):
            seg.executable = t.executable


# -- gc ------------------------------------------------------------------------------

class GcClock:
    """A `gc.callbacks` entry: time in collections, their count per generation, and
    the unreachable objects they freed."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.seconds, self.collections, self.collected, self._start = 0.0, [0, 0, 0], 0, None

    def __call__(self, phase, info):
        if phase == "start":
            self._start = time.perf_counter()
        elif self._start is not None:
            self.seconds += time.perf_counter() - self._start
            self.collections[info["generation"]] += 1
            self.collected += info["collected"]


def full_collection_ms() -> float:
    start = time.perf_counter()
    gc.collect()
    return 1e3 * (time.perf_counter() - start)


def gc_cost(name: str, steps: int, rounds: int) -> None:
    module, wrap = prepared(name)
    clock = GcClock()
    gc.callbacks.append(clock)
    results = {"plain": [], "frozen": []}
    try:
        for _ in range(rounds):
            for state in ("plain", "frozen"):
                if state == "frozen":
                    gc.freeze()
                clock.reset()
                ms = step_ms(module, wrap, steps)
                tracked = len(gc.get_objects())
                stats = (ms, 1e3 * clock.seconds / steps, list(clock.collections), tracked,
                         gc.get_freeze_count(), clock.collected // steps)
                results[state].append(stats + (full_collection_ms(),))
                gc.unfreeze()
    finally:
        gc.callbacks.remove(clock)
    for state, rows in results.items():
        ms = statistics.median(r[0] for r in rows)
        gc_ms = statistics.median(r[1] for r in rows)
        print(f"{name} {state}: step {ms:.2f} ms, gc {gc_ms:.2f} ms/step, collections in "
              f"{steps} steps (gen0, gen1, gen2) {rows[-1][2]}, freeing {rows[-1][5]} "
              f"unreachable objects/step; tracked objects {rows[-1][3]}, frozen {rows[-1][4]}; "
              f"a full gc.collect() {statistics.median(r[6] for r in rows):.1f} ms")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment", choices=("profile", "evalshape", "dispatch", "gc"))
    parser.add_argument("--programs")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    default = {"profile": "mlp,gpt2,faster_rcnn", "evalshape": "gpt2", "dispatch": "mlp",
               "gc": "gpt2"}[args.experiment]
    for name in (args.programs or default).split(","):
        if args.experiment == "profile":
            profile(name, args.steps)
        elif args.experiment == "evalshape":
            evalshape(name, args.steps, args.rounds)
        elif args.experiment == "dispatch":
            dispatch(name, args.steps)
        else:
            gc_cost(name, args.steps, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
