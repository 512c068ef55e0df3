"""Step time of the MLP step: terra with the in-process executor vs a remote one.

    python benchmarks/remote.py [--steps N] [--repeats R] [--json FILE]

The remote executor is a `python -m terra serve` process on loopback, started
here; both modes run examples/mlp.py's `train_step` from identical state on
the same data. Each mode is warmed up until it co-executes, then measured in
interleaved rounds (in-process window, remote window; R times), medians, the
same two windows as benchmarks/step_time.py:

  sync every step  one step plus `float(loss)` (a loop that logs), median step
  sync at end      N steps, then `float(loss)` and the final parameters
                   (downloaded, for the remote mode), per step

Reported: the medians, remote / in-process (target <= 1.3), and the server's
counters over the measured windows (Execute calls, fetches, uploads).
"""

import argparse
import json
import os
import platform
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
sys.path.insert(0, os.path.join(ROOT, "examples"))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import numpy as np  # noqa: E402

import mlp  # noqa: E402  (examples/mlp.py)
import terra  # noqa: E402
from runtime.server import ServerProcess  # noqa: E402
from step_time import Runner, stats_dict  # noqa: E402  (benchmarks/step_time.py)

WARMUP_MAX_STEPS = 300
EXTRA_WARMUP = 5
MODES = ("in-process", "remote")


def warm_up(runner: Runner) -> None:
    while runner.step_fn.stats().coexecuted == 0 and runner.steps < WARMUP_MAX_STEPS:
        float(runner.step())
    for _ in range(EXTRA_WARMUP):
        float(runner.step())
    runner.sync()


def counters(executor) -> dict:
    s = executor.status()
    return {"executes": s.executes, "fetches": s.fetches, "puts": s.puts, "handles": s.handles}


def bench(address: str, steps: int, repeats: int) -> dict:
    runners = {
        "in-process": Runner(mlp, "in-process", terra.function(mlp.train_step, executor="")),
        "remote": Runner(mlp, "remote", terra.function(mlp.train_step, executor=address)),
    }
    for r in runners.values():
        warm_up(r)
    target = max(r.steps for r in runners.values())
    for r in runners.values():  # same number of steps: comparable final parameters
        while r.steps < target:
            float(r.step())
        r.sync()
    remote = runners["remote"].step_fn._executor
    before = {m: stats_dict(r.step_fn) for m, r in runners.items()}
    server_before = counters(remote)
    every = {m: [] for m in MODES}
    at_end = {m: [] for m in MODES}
    for rnd in range(repeats):
        for m in MODES:
            every[m].append(runners[m].window_sync_every_step(steps))
        for m in MODES:
            at_end[m].append(runners[m].window_sync_at_end(steps))
        print(f"  round {rnd + 1}/{repeats}: " + "  ".join(
            f"{m} {every[m][-1]:.2f}/{at_end[m][-1]:.2f} ms" for m in MODES), flush=True)
    server_after = counters(remote)
    measured = {m: {k: v - before[m][k] for k, v in stats_dict(r.step_fn).items()
                    if isinstance(v, int) and not isinstance(v, bool)}
                for m, r in runners.items()}
    a, b = (jax.tree.leaves(runners[m].params) for m in MODES)
    diff = max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(a, b))
    return {
        "modes": {m: {"sync_every_step_ms": statistics.median(every[m]),
                      "sync_at_end_ms": statistics.median(at_end[m]),
                      "sync_every_step_rounds_ms": every[m],
                      "sync_at_end_rounds_ms": at_end[m]} for m in MODES},
        "terra_measured": measured,
        "server_measured": {k: server_after[k] - server_before[k] for k in server_after},
        "server_handles_after": server_after["handles"],
        "max_abs_param_diff": diff,
        "steps_measured": 2 * steps * repeats,
    }


def report(res: dict, args) -> None:
    m = res["modes"]
    print()
    print(f"MLP step time, ms (median of {args.repeats} rounds of {args.steps} steps; "
          f"{jax.devices()[0].platform}, {os.cpu_count()} cores; server on loopback)")
    print(f"{'executor':11} {'sync every step':>16} {'sync at end':>12}")
    for mode in MODES:
        print(f"{mode:11} {m[mode]['sync_every_step_ms']:16.2f} {m[mode]['sync_at_end_ms']:12.2f}")
    for key in ("sync_every_step_ms", "sync_at_end_ms"):
        res[f"ratio_{key[:-3]}"] = m["remote"][key] / m["in-process"][key]
    print(f"remote / in-process: {res['ratio_sync_every_step']:.2f}x (every step), "
          f"{res['ratio_sync_at_end']:.2f}x (at end); target <= 1.3x")
    t, s = res["terra_measured"]["remote"], res["server_measured"]
    print(f"remote, measured windows: {t['coexecuted']} of {t['steps']} steps co-executed, "
          f"{t['segments_dispatched']} segments dispatched; server: {s['executes']} executes, "
          f"{s['fetches']} fetches, {s['puts']} uploads, {res['server_handles_after']} handles held")
    print(f"final parameters, max abs diff in-process vs remote: {res['max_abs_param_diff']:.2e}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="steps per window")
    parser.add_argument("--repeats", type=int, default=5, help="rounds per mode")
    parser.add_argument("--json", metavar="FILE", help="write results as JSON")
    args = parser.parse_args(argv)
    with ServerProcess() as server:
        print(f"server: {server.address}; warming up ...", flush=True)
        res = bench(server.address, args.steps, args.repeats)
    report(res, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": vars(args), "machine": {
                "platform": platform.platform(), "cpu_count": os.cpu_count(),
                "jax": jax.__version__}, "results": res}, f, indent=2)
        print(f"wrote {args.json}")
    coexecuted = all(res["terra_measured"][m]["coexecuted"] == res["terra_measured"][m]["steps"]
                     for m in MODES)
    return 0 if coexecuted and res["server_measured"]["executes"] > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
