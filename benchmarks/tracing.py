"""Tracing-step time vs eager step time, side by side.

    python benchmarks/tracing.py [--programs mlp,cnn,dropblock,sdpoint]
                                 [--steps 6] [--repeats 7] [--json FILE]

A *tracing step* is a step Terra runs eagerly while it records it: the first
steps of every step function (until its first graph is compiled, about 18 MLP
steps) and the fallback steps after a divergence. The goal is a tracing step
no more than 10% slower than the same step run eagerly.

For each program (an `examples/*.py` with `run(wrap, steps, log, seed,
timings)`), two settings run the same training loop from the same initial
state on the same data:

  eager     `wrap` is the identity: plain JAX
  tracing   `wrap` is `terra.function` with an executor whose compilations
            never finish (`HeldCompiles`), so every step is a tracing step, as
            while the first graph compiles in the background — without a
            background compile competing for the CPU. One step function per
            program is reused by every window, as in a real run.

A step's time is that of the call of the step function until its outputs are
computed (`jax.block_until_ready`), in wall time and in process CPU time (all
threads; less disturbed by other jobs on a shared machine). A round runs one
window of each setting (`--steps` steps of a fresh training run), in an order
rotated every round; a window's step time is the median of its steps after
the first. Reported: medians over `--repeats` rounds (after a warm-up round),
and the tracing/eager ratio as the median of the per-round ratios (each
measured side by side, so machine load mostly cancels out). The run fails
unless every tracing step was traced and the final parameters of both
settings agree.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import statistics
import sys
import time
from concurrent.futures import Future

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))
sys.path.insert(0, ROOT)
os.environ["TERRA_SYNC_COMPILE"] = "0"  # a synchronous compile would wait forever below

import jax  # noqa: E402
import numpy as np  # noqa: E402

import terra  # noqa: E402

RTOL, ATOL = 1e-4, 1e-5  # as in examples/_common.py
SETTINGS = ("eager", "tracing")


class HeldCompiles:
    """An executor whose graph compilations never finish: its step functions keep tracing."""

    def compile(self, job):
        return Future()  # never completed: the graph is "still compiling"

    def dispatch(self, job):
        raise AssertionError("a tracing step dispatched a segment")

    def compile_function(self, fn, specs, out_shardings=None):
        raise AssertionError("a tracing step compiled a segment")

    def shutdown(self):
        pass


class Program:
    """One example program: its module, and its step functions kept in tracing."""

    def __init__(self, name: str):
        self.name = name
        self.module = importlib.import_module(name)
        self.tracing: dict = {}  # the user's step function -> its terra.function

    def step_function(self, setting: str, fn):
        if setting == "eager":
            return fn
        if fn not in self.tracing:
            self.tracing[fn] = terra.function(fn, executor=HeldCompiles())
        return self.tracing[fn]

    def window(self, setting: str, steps: int):
        """((wall, cpu) median step seconds after the first, final parameters) of a fresh run."""
        wall, cpu = [], []

        def wrap(fn):
            step_fn = self.step_function(setting, fn)

            def timed(*args, **kwargs):
                w, c = time.perf_counter(), time.process_time()
                out = jax.block_until_ready(step_fn(*args, **kwargs))
                cpu.append(time.process_time() - c)
                wall.append(time.perf_counter() - w)
                return out
            return timed

        params = self.module.run(wrap, steps, log=lambda line: None)
        return ((statistics.median(wall[1:]), statistics.median(cpu[1:])),
                jax.block_until_ready(params))

    def check(self, steps: int) -> dict:
        """Every tracing step traced; the two settings' parameters agree."""
        stats = [fn.stats() for fn in self.tracing.values()]
        traced = sum(s.traced for s in stats)
        others = sum(s.coexecuted + s.eager + s.internal_errors for s in stats)
        if not stats or others or traced != sum(s.steps for s in stats):
            raise SystemExit(f"FAIL {self.name}: not every step traced: {stats}")
        _, eager = self.window("eager", steps)
        _, traced_params = self.window("tracing", steps)
        worst = max((float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b))))
                     for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(traced_params))
                     if np.size(a)), default=0.0)
        same = all(np.allclose(a, b, rtol=RTOL, atol=ATOL)
                   for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(traced_params)))
        if not same:
            raise SystemExit(f"FAIL {self.name}: tracing params differ from eager's ({worst:.2e})")
        return {"tracing_steps": traced, "max_abs_param_diff": worst}


def bench(program: Program, steps: int, repeats: int, log) -> dict:
    for setting in SETTINGS:  # warm-up: JAX's caches, the TraceGraph's one path
        program.window(setting, steps)
    wall = {s: [] for s in SETTINGS}
    cpu = {s: [] for s in SETTINGS}
    for rnd in range(repeats):
        order = SETTINGS if rnd % 2 == 0 else SETTINGS[::-1]
        for setting in order:
            (w, c), _ = program.window(setting, steps)
            wall[setting].append(w)
            cpu[setting].append(c)
        log(f"  round {rnd + 1}/{repeats}: " + "  ".join(
            f"{s} {1e3 * wall[s][-1]:.2f} ms (cpu {1e3 * cpu[s][-1]:.2f})" for s in SETTINGS))
    result = {}
    for clock, times in (("wall", wall), ("cpu", cpu)):
        ratios = [t / e for e, t in zip(times["eager"], times["tracing"])]
        result[clock] = {"eager_ms": 1e3 * statistics.median(times["eager"]),
                         "tracing_ms": 1e3 * statistics.median(times["tracing"]),
                         "ratio": statistics.median(ratios),
                         "ratio_rounds": ratios,
                         "rounds_ms": {s: [1e3 * t for t in ts] for s, ts in times.items()}}
    return {**result, **program.check(steps)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--programs", default="mlp,cnn,dropblock,sdpoint")
    parser.add_argument("--steps", type=int, default=6, help="steps per window")
    parser.add_argument("--repeats", type=int, default=7, help="rounds")
    parser.add_argument("--json", metavar="FILE", help="write results as JSON")
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be at least 2 (a window's first step is not timed)")

    results = {}
    for name in [p for p in args.programs.split(",") if p]:
        print(f"{name}: {args.repeats} rounds of {args.steps}-step windows", flush=True)
        results[name] = bench(Program(name), args.steps, args.repeats,
                              log=lambda line: print(line, flush=True))

    print(f"\nTracing step vs eager step, ms (medians of {args.repeats} rounds;"
          f" {jax.devices()[0].platform}, {os.cpu_count()} cores)")
    header = (f"{'program':12} {'eager':>8} {'tracing':>8} {'tracing/eager':>14}"
              f" {'cpu: eager':>11} {'tracing':>8} {'tracing/eager':>14}")
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        w, c = r["wall"], r["cpu"]
        print(f"{name:12} {w['eager_ms']:8.2f} {w['tracing_ms']:8.2f} {w['ratio']:14.2f}"
              f" {c['eager_ms']:11.2f} {c['tracing_ms']:8.2f} {c['ratio']:14.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": vars(args),
                       "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                                   "jax": jax.__version__,
                                   "devices": [str(d) for d in jax.devices()]},
                       "time": time.strftime("%Y-%m-%d %H:%M:%S"),
                       "results": results}, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
