"""What latency tracing costs: step time with telemetry off vs on.

    python benchmarks/telemetry_overhead.py [--steps N] [--repeats R] [--programs mlp,cnn]

"On" is the most expensive configuration: events collected, a Chrome trace
timeline written to a file, the explain aggregation and the live gRPC stream
served (with no subscriber). One terra step function per program; telemetry is
switched on and off between windows of N steps (interleaved, R rounds), so both
settings run the same steps of the same process. Reported: medians of the
per-step time (each step fetches its loss, as a logging loop does) and the
overhead in percent, for co-executed steps and for tracing steps (the first,
recorded call of a fresh step function).

Off, the instrumentation is one read of a module global per call site
(`events.recorder is None`); the counts of such reads per step are printed too.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import terra  # noqa: E402
from terra import telemetry  # noqa: E402
from step_time import PROGRAMS, Runner  # noqa: E402


def switch(on: bool, trace_path: str) -> None:
    telemetry.disable()
    if on:
        telemetry.enable(trace=trace_path, stream="127.0.0.1:0")


def coexecuted_overhead(module, steps: int, repeats: int, trace_path: str, log) -> dict:
    runner = Runner(module, "terra", terra.function(module.train_step))
    while runner.step_fn.stats().coexecuted < 5:
        float(runner.step())
    times = {"off": [], "on": []}
    for rnd in range(repeats):
        for setting in ("off", "on"):
            switch(setting == "on", trace_path)
            times[setting].append(runner.window_sync_every_step(steps))
        log(f"  round {rnd + 1}/{repeats}: off {times['off'][-1]:.3f} ms, on {times['on'][-1]:.3f} ms")
    switch(False, trace_path)
    s = runner.step_fn.stats()
    assert s.fallbacks == 0 and s.coexecuted >= 2 * steps * repeats, s
    return {k: statistics.median(v) for k, v in times.items()}


def tracing_overhead(module, repeats: int, trace_path: str) -> dict:
    times = {"off": [], "on": []}
    for _ in range(repeats):
        for setting in ("off", "on"):
            switch(setting == "on", trace_path)
            runner = Runner(module, "terra", terra.function(module.train_step))
            start = time.perf_counter()
            float(runner.step())  # the first call records the trace
            times[setting].append(1e3 * (time.perf_counter() - start))
            assert runner.step_fn.stats().traced == 1
    switch(False, trace_path)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--programs", default="mlp,cnn")
    ns = parser.parse_args()
    trace_path = os.path.join(tempfile.mkdtemp(), "overhead.json")
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    rows = []
    for name in ns.programs.split(","):
        module = PROGRAMS[name]
        log(f"{name}: co-executed steps")
        co = coexecuted_overhead(module, ns.steps, ns.repeats, trace_path, log)
        log(f"{name}: tracing steps")
        tr = tracing_overhead(module, max(3, ns.repeats // 2), trace_path)
        rows.append((name, co, tr))
    print(f"\ntelemetry overhead (median ms per step; {ns.repeats} interleaved rounds x "
          f"{ns.steps} steps; on = events + timeline file + explain + gRPC stream)")
    print(f"{'program':8} {'phase':10} {'off ms':>9} {'on ms':>9} {'overhead':>9}")
    for name, co, tr in rows:
        for phase, t in (("coexec", co), ("tracing", tr)):
            print(f"{name:8} {phase:10} {t['off']:9.3f} {t['on']:9.3f} "
                  f"{100 * (t['on'] / t['off'] - 1):8.1f}%")


if __name__ == "__main__":
    main()
