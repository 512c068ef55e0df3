"""Tracing-step time vs eager step time, side by side.

    python benchmarks/tracing.py [--programs mlp,cnn,dropblock,sdpoint]
                                 [--steps 10] [--repeats 6] [--json FILE]

A *tracing step* is a step Terra runs eagerly while it records it: the first
steps of every step function (until its first graph is compiled, about 18 MLP
steps) and the fallback steps after a divergence. The goal is a tracing step
no more than 10% slower than the same step run eagerly.

For each program (an `examples/*.py` with `run(wrap, steps, log, seed,
timings)`), two processes run the same training loop from the same initial
state on the same data:

  eager     `wrap` is the identity: plain JAX (Terra is not even imported)
  tracing   `wrap` is `terra.function` with an executor whose compilations
            never finish (`HeldCompiles`), so every step is a tracing step, as
            while the first graph compiles in the background, but with no
            background compile competing for the CPU. One step function per
            program is reused by every run, as in a real training loop.

The two processes take turns, one step each: only one of them runs at any
time (the other waits for its turn in a pipe), so both see the same machine
load, step after step; this matters on a shared machine, where the load of
other jobs changes within seconds. A step's time is that of the call of the
step function until its outputs are computed (`jax.block_until_ready`), in
wall time and in the process's CPU time (all its threads). Each process runs
the loop `--repeats` times from a fresh state, `--steps` steps each, after one
warm-up run; the first step of a run is not timed. Reported: medians over the
timed steps, and the tracing/eager ratio as the median of the ratios of steps
that ran next to each other. The run fails unless every tracing step was
traced and the final parameters of both settings agree.

A second table shows where a tracing step saves on eager: its gradient op.
After the timed runs the tracing process runs the loop once more, timing each
gradient op three ways: from the jaxpr Terra traced at the region's first
sight (what the timed steps ran), at a first sight (tracing that jaxpr, then
running it), and as `jax.vjp` of the region's replay (JAX's autodiff in
Python, what eager's `value_and_grad` runs).
"""
from __future__ import annotations

import argparse
import importlib
import json
import multiprocessing
import os
import platform
import statistics
import sys
import time
from concurrent.futures import Future

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

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


# -- one setting, in its own process -------------------------------------------

def run_setting(name: str, setting: str, steps: int, repeats: int, conn) -> None:
    """Runs the program's loop, handing the turn back to the parent at every step."""
    os.environ["TERRA_SYNC_COMPILE"] = "0"  # a synchronous compile would wait forever
    os.environ["TERRA_WARMUP_WAIT"] = "0"   # ... and so would the warm-up's wait
    import jax
    module = importlib.import_module(name)
    step_functions: dict = {}  # the user's step function -> what runs it

    def step_function(fn):
        if fn not in step_functions:
            if setting == "eager":
                step_functions[fn] = fn
            else:
                import terra
                step_functions[fn] = terra.function(fn, executor=HeldCompiles())
        return step_functions[fn]

    def wrap(fn):
        step_fn = step_function(fn)

        def timed(*args, **kwargs):
            conn.send(None)  # my turn ends here ...
            conn.recv()      # ... and starts again for this step
            wall, cpu = time.perf_counter(), time.process_time()
            out = jax.block_until_ready(step_fn(*args, **kwargs))
            times.append((time.perf_counter() - wall, time.process_time() - cpu))
            return out
        return timed

    conn.recv()
    for run in range(repeats + 1):  # the first run warms up
        times: list = []
        params = module.run(wrap, steps, log=lambda line: None)
        if run:
            conn.send(("times", times[1:]))
            conn.recv()
    stats = [fn.stats().as_dict() for fn in step_functions.values() if fn is not None
             and hasattr(fn, "stats")]
    leaves = [np.asarray(x) for x in jax.tree.leaves(params)]
    costs = gradient_op_costs(module, wrap, steps) if setting == "tracing" else None
    conn.send(("done", leaves, stats, costs))


def gradient_op_costs(module, wrap, steps: int) -> dict:
    """One more (untimed) run, timing every gradient op three ways, ms medians:
    from the jaxpr traced at its first sight (what tracing steps run), at first
    sight (tracing that jaxpr, then running it), and as `jax.vjp` of the replay
    (what tracing steps ran before the jaxpr was kept)."""
    import jax
    from terra import autodiff, coexec
    from terra.intercept import eager
    cached = coexec.run_gradient
    times: dict = {"jaxpr": [], "first_sight": [], "jax_vjp": []}

    def vjp_replay(op, vals, keep):
        with eager():  # below the step's trace, where the gradient op runs
            return autodiff._gradient_function(op, keep)(*autodiff._gradient_args(op, vals))

    def three_ways(op, vals, keep=()):
        runs = {"jax_vjp": lambda: vjp_replay(op, vals, keep),
                "first_sight": lambda: (autodiff._programs.clear(), cached(op, vals, keep))[1],
                "jaxpr": lambda: cached(op, vals, keep)}
        for how, run in runs.items():
            start = time.perf_counter()
            out = jax.block_until_ready(run())
            times[how].append(time.perf_counter() - start)
        return out

    coexec.run_gradient = three_ways
    try:
        module.run(wrap, steps, log=lambda line: None)
    finally:
        coexec.run_gradient = cached
    return {how: 1e3 * statistics.median(t) for how, t in times.items() if t}


# -- the parent: turns and results ---------------------------------------------

def bench(name: str, steps: int, repeats: int) -> dict:
    ctx = multiprocessing.get_context("spawn")
    conns, procs = {}, {}
    for setting in SETTINGS:
        parent, child = ctx.Pipe()
        procs[setting] = ctx.Process(target=run_setting,
                                     args=(name, setting, steps, repeats, child))
        procs[setting].start()
        conns[setting] = parent
    times = {s: [] for s in SETTINGS}
    final = {}
    turn = 0
    while len(final) < len(SETTINGS):
        for setting in SETTINGS:  # one step each, in turn
            if setting in final:
                continue
            conns[setting].send(None)
            message = conns[setting].recv()
            while message is not None:  # a run ended, or the last one did
                if message[0] == "times":
                    times[setting].append(message[1])
                    conns[setting].send(None)
                    message = conns[setting].recv()
                else:
                    final[setting] = message[1:]
                    break
        turn += 1
    for p in procs.values():
        p.join()
    return summarize(name, times, final)


def summarize(name: str, times: dict, final: dict) -> dict:
    eager = [t for run in times["eager"] for t in run]
    tracing = [t for run in times["tracing"] for t in run]
    (eager_params, _, _), (tracing_params, stats, costs) = final["eager"], final["tracing"]
    traced = sum(s["traced"] for s in stats)
    if not stats or traced != sum(s["steps"] for s in stats):
        raise SystemExit(f"FAIL {name}: not every step traced: {stats}")
    same = all(np.allclose(a, b, rtol=RTOL, atol=ATOL)
               for a, b in zip(eager_params, tracing_params))
    worst = max((float(np.max(np.abs(a.astype(np.float64) - b)))
                 for a, b in zip(eager_params, tracing_params) if a.size), default=0.0)
    if not same or len(eager_params) != len(tracing_params):
        raise SystemExit(f"FAIL {name}: tracing params differ from eager's ({worst:.2e})")
    result = {"steps_timed": len(eager), "tracing_steps": traced, "max_abs_param_diff": worst,
              "gradient_op_ms": costs}
    for k, clock in enumerate(("wall", "cpu")):
        ratios = [t[k] / e[k] for e, t in zip(eager, tracing)]
        result[clock] = {"eager_ms": 1e3 * statistics.median(e[k] for e in eager),
                         "tracing_ms": 1e3 * statistics.median(t[k] for t in tracing),
                         "ratio": statistics.median(ratios),
                         "ratio_quartiles": statistics.quantiles(ratios, n=4)}
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--programs", default="mlp,cnn,dropblock,sdpoint")
    parser.add_argument("--steps", type=int, default=10, help="steps per run")
    parser.add_argument("--repeats", type=int, default=6, help="timed runs per setting")
    parser.add_argument("--json", metavar="FILE", help="write results as JSON")
    args = parser.parse_args(argv)
    if args.steps < 3:
        parser.error("--steps must be at least 3 (a run's first step is not timed)")

    results = {}
    for name in [p for p in args.programs.split(",") if p]:
        print(f"{name}: {args.repeats} runs of {args.steps} steps per setting, in turns",
              flush=True)
        results[name] = bench(name, args.steps, args.repeats)

    import jax
    print(f"\nTracing step vs eager step, ms (medians over steps;"
          f" {jax.devices()[0].platform}, {os.cpu_count()} cores)")
    header = (f"{'program':12} {'eager':>8} {'tracing':>8} {'tracing/eager':>14}"
              f" {'cpu: eager':>11} {'tracing':>8} {'tracing/eager':>14}")
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        w, c = r["wall"], r["cpu"]
        print(f"{name:12} {w['eager_ms']:8.2f} {w['tracing_ms']:8.2f} {w['ratio']:14.2f}"
              f" {c['eager_ms']:11.2f} {c['tracing_ms']:8.2f} {c['ratio']:14.2f}")
    print("\nThe gradient op of a tracing step, ms (medians; an extra untimed run):")
    header = f"{'program':12} {'traced jaxpr':>13} {'first sight':>12} {'jax.vjp replay':>15}"
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        g = r["gradient_op_ms"]
        if g:
            print(f"{name:12} {g['jaxpr']:13.2f} {g['first_sight']:12.2f} {g['jax_vjp']:15.2f}")
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
