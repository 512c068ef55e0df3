"""Step time of the example training steps: eager JAX vs jax.jit vs terra.

    python benchmarks/step_time.py [--steps N] [--repeats R] [--json FILE]
                                   [--programs mlp,cnn] [--modes eager,jit,terra]

For each program (examples/mlp.py, examples/cnn.py) the three modes start from
identical state (same init, same data order) and are measured side by side in one
process. Terra is warmed up until it co-executes (`stats().coexecuted > 0`);
eager and jit are then warmed up for the same number of steps, so all modes have
run the same steps on the same data and their final parameters can be compared.

Two measurements, each over a window of N steps, modes interleaved in rounds
(eager window, jit window, terra window; repeat R times):

  sync every step  wall time of one `step(...)` call plus `float(loss)`, i.e. a
                   loop that logs every step; per window the median step.
  sync at end      N steps with no fetch, then `float(loss)` and
                   `block_until_ready(params)`; window time / N.

Reported: medians over the R rounds, terra's speedup over eager, terra's time
relative to jit, and terra's statistics (the run fails unless terra co-executed
during the measured windows).
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import numpy as np  # noqa: E402

import cnn  # noqa: E402  (examples/cnn.py)
import mlp  # noqa: E402  (examples/mlp.py)

PROGRAMS = {"mlp": mlp, "cnn": cnn}
TERRA_WARMUP_MAX_STEPS = 300
TERRA_WARMUP_MAX_SECONDS = 120.0
EXTRA_WARMUP = 5  # steps after the first co-executed one, before measuring


class Runner:
    """One mode of one program: its step function and its own training state."""

    def __init__(self, module, mode, step_fn):
        self.mode = mode
        self.step_fn = step_fn
        self.data = module.make_dataset(0)
        self.params = module.init_params(0)
        self.opt_state = module.optimizer.init(self.params)
        self.steps = 0
        self.loss = None

    def step(self):
        x, y = self.data[self.steps % len(self.data)]
        self.steps += 1
        self.params, self.opt_state, self.loss = self.step_fn(
            self.params, self.opt_state, x, y)
        return self.loss

    def sync(self):
        float(self.loss)
        jax.block_until_ready(self.params)

    def window_sync_every_step(self, n):
        """Median ms of n steps, each timed with its float(loss) fetch."""
        times = []
        for _ in range(n):
            start = time.perf_counter()
            float(self.step())
            times.append(time.perf_counter() - start)
        self.sync()
        return 1e3 * statistics.median(times)

    def window_sync_at_end(self, n):
        """Mean ms per step of n steps fetched only at the end."""
        start = time.perf_counter()
        for _ in range(n):
            self.step()
        self.sync()
        return 1e3 * (time.perf_counter() - start) / n


def stats_dict(step_fn):
    return {k: (v if isinstance(v, (int, float, str, bool, type(None))) else str(v))
            for k, v in step_fn.stats().as_dict().items()}


def bench_program(name, module, modes, steps, repeats, log):
    runners = {}
    if "terra" in modes:
        import terra
        runners["terra"] = Runner(module, "terra", terra.function(module.train_step))
    if "eager" in modes:
        runners["eager"] = Runner(module, "eager", module.train_step)
    if "jit" in modes:
        runners["jit"] = Runner(module, "jit", jax.jit(module.train_step))

    # Warm-up: terra until it co-executes, then everyone to the same step count.
    result = {"warmup_steps": 0}
    warmup = EXTRA_WARMUP
    if "terra" in runners:
        r = runners["terra"]
        start = time.perf_counter()
        while (r.step_fn.stats().coexecuted == 0
               and r.steps < TERRA_WARMUP_MAX_STEPS
               and time.perf_counter() - start < TERRA_WARMUP_MAX_SECONDS):
            float(r.step())
        first = r.steps
        for _ in range(EXTRA_WARMUP):
            float(r.step())
        r.sync()
        warmup = r.steps
        result["terra_warmup_seconds"] = time.perf_counter() - start
        result["terra_first_coexecuted_by_step"] = first
        result["terra_stats_after_warmup"] = stats_dict(r.step_fn)
        log(f"  terra warm-up: {warmup} steps, {result['terra_warmup_seconds']:.1f} s,"
            f" co-executing by step {first}"
            f" (coexecuted={r.step_fn.stats().coexecuted})")
    result["warmup_steps"] = warmup
    for mode, r in runners.items():
        while r.steps < warmup:
            float(r.step())
        r.sync()

    every = {m: [] for m in modes}
    at_end = {m: [] for m in modes}
    for rnd in range(repeats):
        for mode in modes:
            every[mode].append(runners[mode].window_sync_every_step(steps))
        for mode in modes:
            at_end[mode].append(runners[mode].window_sync_at_end(steps))
        log(f"  round {rnd + 1}/{repeats}: " + "  ".join(
            f"{m} {every[m][-1]:.2f}/{at_end[m][-1]:.2f} ms" for m in modes))

    result["modes"] = {
        m: {
            "sync_every_step_ms": statistics.median(every[m]),
            "sync_at_end_ms": statistics.median(at_end[m]),
            "sync_every_step_rounds_ms": every[m],
            "sync_at_end_rounds_ms": at_end[m],
        }
        for m in modes
    }
    result["steps_per_mode"] = {m: r.steps for m, r in runners.items()}

    # Same steps on the same data from the same init: the results should agree.
    if "eager" in runners:
        ref = jax.tree_util.tree_leaves(runners["eager"].params)
        for mode in modes:
            if mode == "eager":
                continue
            leaves = jax.tree_util.tree_leaves(runners[mode].params)
            diff = max(float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b))))
                       for a, b in zip(ref, leaves))
            result.setdefault("max_abs_param_diff_vs_eager", {})[mode] = diff

    if "terra" in runners:
        after = stats_dict(runners["terra"].step_fn)
        before = result["terra_stats_after_warmup"]
        result["terra_stats"] = after
        result["terra_measured"] = {
            k: v - before.get(k, 0) for k, v in after.items()
            if isinstance(v, int) and not isinstance(v, bool)}
    return result


def ratio(a, b):
    return a / b if b else float("nan")


def print_report(results, modes, args):
    print()
    print(f"Step time, ms (median of {args.repeats} rounds of {args.steps} steps;"
          f" {jax.devices()[0].platform}, {os.cpu_count()} cores)")
    header = f"{'program':8} {'mode':6} {'sync every step':>16} {'sync at end':>12}"
    print(header)
    print("-" * len(header))
    for name, res in results.items():
        for mode in modes:
            m = res["modes"][mode]
            print(f"{name:8} {mode:6} {m['sync_every_step_ms']:16.2f}"
                  f" {m['sync_at_end_ms']:12.2f}")
        if "terra" in modes:
            t = res["modes"]["terra"]
            for other in ("eager", "jit"):
                if other in modes:
                    o = res["modes"][other]
                    res.setdefault("ratios", {})[f"{other}/terra"] = {
                        "sync_every_step": ratio(o["sync_every_step_ms"],
                                                 t["sync_every_step_ms"]),
                        "sync_at_end": ratio(o["sync_at_end_ms"], t["sync_at_end_ms"]),
                    }
            if "eager" in modes:
                r = res["ratios"]["eager/terra"]
                print(f"{'':8} terra speedup over eager: {r['sync_every_step']:.2f}x"
                      f" (every step), {r['sync_at_end']:.2f}x (at end)")
            if "jit" in modes:
                r = res["ratios"]["jit/terra"]
                print(f"{'':8} terra time / jit time:    {1 / r['sync_every_step']:.2f}"
                      f" (every step), {1 / r['sync_at_end']:.2f} (at end)")
        print()
    for name, res in results.items():
        if "terra_stats" in res:
            s, d = res["terra_stats"], res["terra_measured"]
            print(f"terra stats {name}: " + " ".join(f"{k}={v}" for k, v in s.items()))
            print(f"  measured windows: {d.get('coexecuted', 0)} of {d.get('steps', 0)}"
                  f" steps co-executed, fallbacks={d.get('fallbacks', 0)},"
                  f" compiles={d.get('compiles', 0)}, fetch_waits={d.get('fetch_waits', 0)}")
        if "max_abs_param_diff_vs_eager" in res:
            print(f"  {name} params after {res['steps_per_mode'].get('eager')} steps,"
                  " max abs diff vs eager: " + ", ".join(
                      f"{m} {v:.2e}" for m, v in res["max_abs_param_diff_vs_eager"].items()))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="steps per window")
    parser.add_argument("--repeats", type=int, default=3, help="rounds per mode")
    parser.add_argument("--json", metavar="FILE", help="write results as JSON")
    parser.add_argument("--programs", default="mlp,cnn")
    parser.add_argument("--modes", default="eager,jit,terra")
    args = parser.parse_args(argv)
    programs = [p for p in args.programs.split(",") if p]
    modes = [m for m in args.modes.split(",") if m]
    for p in programs:
        if p not in PROGRAMS:
            parser.error(f"unknown program {p!r}; choose from {sorted(PROGRAMS)}")
    for m in modes:
        if m not in ("eager", "jit", "terra"):
            parser.error(f"unknown mode {m!r}")

    results = {}
    for name in programs:
        print(f"{name}: warming up {', '.join(modes)} ...", flush=True)
        results[name] = bench_program(name, PROGRAMS[name], modes, args.steps,
                                      args.repeats, log=lambda s: print(s, flush=True))
    print_report(results, modes, args)

    if args.json:
        with open(args.json, "w") as f:
            json.dump({
                "config": {"steps": args.steps, "repeats": args.repeats,
                           "programs": programs, "modes": modes},
                "machine": {"platform": platform.platform(),
                            "cpu_count": os.cpu_count(),
                            "jax": jax.__version__,
                            "devices": [str(d) for d in jax.devices()]},
                "results": results,
            }, f, indent=2)
        print(f"wrote {args.json}")

    failed = [name for name, res in results.items()
              if "terra" in modes and res["terra_measured"].get("coexecuted", 0) == 0]
    if failed:
        print(f"FAIL: terra did not co-execute during measurement: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
