"""What latency tracing costs: step time with telemetry off vs on.

    python benchmarks/telemetry_overhead.py [--steps N] [--repeats R] [--programs mlp,cnn]

Settings: off; "explain" (events collected and aggregated for the explain
report); "timeline" (plus a Chrome trace file written); "all" (plus the live
gRPC stream served, no subscriber). One terra step function per program; the
setting is switched between windows of N steps (interleaved, R rounds, the
order rotated each round), so all settings run the same steps of the same process.
Short windows, many rounds: settings measured far apart in time differ for
reasons of their own on a shared machine (and a co-executed step used to
drift slower over hundreds of steps; see benchmarks/RESULTS.md). Reported: medians of the
per-step time (each step fetches its loss, as a logging loop does) and the
overhead in percent, for co-executed steps and for tracing steps (the first,
recorded call of a fresh step function, off vs all).

Off, each instrumented site costs one read of a module global
(`events.recorder is None`).
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


SETTINGS = ("off", "explain", "timeline", "all")


def switch(setting: str, trace_path: str) -> None:
    telemetry.disable()
    if setting == "explain":
        telemetry.enable()
    elif setting == "timeline":
        telemetry.enable(trace=trace_path)
    elif setting == "all":
        telemetry.enable(trace=trace_path, stream="127.0.0.1:0")


def coexecuted_overhead(module, steps: int, repeats: int, trace_path: str, log) -> dict:
    runner = Runner(module, "terra", terra.function(module.train_step))
    while runner.step_fn.stats().coexecuted < 5:
        float(runner.step())
    times: dict = {k: [] for k in SETTINGS}
    for rnd in range(repeats):
        # Rotate the order: a setting always run first (or last) in a round is
        # biased (measured: up to 9% on this machine).
        for setting in SETTINGS[rnd % len(SETTINGS):] + SETTINGS[:rnd % len(SETTINGS)]:
            switch(setting, trace_path)
            times[setting].append(runner.window_sync_every_step(steps))
        log(f"  round {rnd + 1}/{repeats}: " + ", ".join(f"{k} {v[-1]:.3f}" for k, v in times.items()))
    switch("off", trace_path)
    s = runner.step_fn.stats()
    assert s.fallbacks == 0 and s.coexecuted >= len(SETTINGS) * steps * repeats, s
    return {k: statistics.median(v) for k, v in times.items()}


def tracing_overhead(module, repeats: int, trace_path: str) -> dict:
    times: dict = {"off": [], "all": []}
    for rnd in range(repeats):
        for setting in (("off", "all") if rnd % 2 == 0 else ("all", "off")):
            switch(setting, trace_path)
            runner = Runner(module, "terra", terra.function(module.train_step))
            start = time.perf_counter()
            float(runner.step())  # the first call records the trace
            times[setting].append(1e3 * (time.perf_counter() - start))
            assert runner.step_fn.stats().traced == 1
    switch("off", trace_path)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=40)
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
    print(f"\ntelemetry overhead (median ms per step, {ns.repeats} interleaved rounds x "
          f"{ns.steps} steps; overhead vs off in %)")
    print(f"{'program':8} {'phase':8} " + " ".join(f"{k:>16}" for k in SETTINGS))
    for name, co, tr in rows:
        for phase, t in (("coexec", co), ("tracing", tr)):
            cells = [f"{t[k]:8.3f} ({100 * (t[k] / t['off'] - 1):+5.1f}%)" if k in t else ""
                     for k in SETTINGS]
            cells[0] = f"{t['off']:8.3f}"
            print(f"{name:8} {phase:8} " + " ".join(f"{c:>16}" for c in cells))


if __name__ == "__main__":
    main()
