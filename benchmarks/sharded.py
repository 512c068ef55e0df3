"""Step time of a sharded training step on several CPU devices: eager vs jax.jit vs terra.

    python benchmarks/sharded.py [--devices 8] [--steps 20] [--repeats 5] [--json FILE]

The step is `examples/sharded_mlp.py`'s (MLP 128-256-256-10, global batch 64,
adam), in two placements over a mesh of host CPU devices (XLA_FLAGS
--xla_force_host_platform_device_count; the script re-executes itself with it):

  data parallel   parameters replicated, batch sharded over 'data' (8)
  model parallel  mesh data 4 x model 2; the hidden layer's units sharded over
                  'model', batch over 'data'

The three modes start from the same state and data. Terra is warmed up until it
co-executes; all modes then run the same warm-up steps, so their final
parameters can be compared. Measured in rounds, modes interleaved (eager
window, jit window, terra window; R rounds), each a window of N steps:

  sync every step  one `step(...)` call plus `float(loss)` (a loop that logs);
                   the window's median step
  sync at end      N steps, then `float(loss)` and `block_until_ready(params)`;
                   window time / N

Reported: medians over rounds, ratios side by side, terra's statistics.
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

import sharded_mlp  # noqa: E402  (examples/sharded_mlp.py)

MODES = ("eager", "jit", "terra")
WARMUP_MAX_STEPS = 200
EXTRA_WARMUP = 3


class Runner:
    """One mode: its step function and its own training state on the mesh."""

    def __init__(self, mode, step_fn, parallel):
        mesh = sharded_mlp.make_mesh(parallel)
        self.mode, self.step_fn = mode, step_fn
        self.data = sharded_mlp.make_dataset(mesh)
        self.params = sharded_mlp.init_params(mesh, parallel)
        self.opt_state = sharded_mlp.optimizer.init(self.params)
        self.steps, self.loss = 0, None

    def step(self):
        x, y = self.data[self.steps % len(self.data)]
        self.params, self.opt_state, self.loss = self.step_fn(self.params, self.opt_state, x, y)
        self.steps += 1

    def window_sync_every_step(self, n):
        times = []
        for _ in range(n):
            start = time.perf_counter()
            self.step()
            float(self.loss)
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    def window_sync_at_end(self, n):
        start = time.perf_counter()
        for _ in range(n):
            self.step()
        float(self.loss)
        jax.block_until_ready(self.params)
        return (time.perf_counter() - start) / n


def make_runners(parallel):
    import terra
    wrappers = {"eager": lambda f: f, "jit": jax.jit, "terra": terra.function}
    return {m: Runner(m, wrappers[m](sharded_mlp.train_step), parallel) for m in MODES}


def warm_up(runners):
    """Terra until it co-executes (plus a few steps); the others the same number of steps."""
    terra_runner = runners["terra"]
    while terra_runner.step_fn.stats().coexecuted == 0 and terra_runner.steps < WARMUP_MAX_STEPS:
        terra_runner.step()
        terra_runner.step_fn.wait_for_graph(timeout=120)
    for _ in range(EXTRA_WARMUP):
        terra_runner.step()
    for runner in runners.values():
        while runner.steps < terra_runner.steps:
            runner.step()
    return terra_runner.steps


def bench(parallel, steps, repeats):
    runners = make_runners(parallel)
    warmup = warm_up(runners)
    before = runners["terra"].step_fn.stats().as_dict()
    per = {(m, kind): [] for m in MODES for kind in ("every", "end")}
    for _ in range(repeats):
        for kind in ("every", "end"):
            for mode, runner in runners.items():
                window = (runner.window_sync_every_step if kind == "every"
                          else runner.window_sync_at_end)
                per[(mode, kind)].append(window(steps))
    after = runners["terra"].step_fn.stats().as_dict()
    measured = after["steps"] - before["steps"]
    coexecuted = after["coexecuted"] - before["coexecuted"]
    if coexecuted != measured or after["fallbacks"] != before["fallbacks"]:
        raise SystemExit(f"terra did not co-execute every measured step: {after}")
    worst = max(float(np.max(np.abs(np.asarray(e) - np.asarray(t))))
                for e, t in zip(jax.tree.leaves(runners["eager"].params),
                                jax.tree.leaves(runners["terra"].params)))
    mesh = sharded_mlp.make_mesh(parallel)
    return {"parallel": parallel, "mesh": dict(mesh.shape), "warmup_steps": warmup,
            "ms": {f"{m} {k}": 1e3 * statistics.median(v) for (m, k), v in per.items()},
            "terra_coexecuted": f"{coexecuted}/{measured}",
            "terra_vs_eager_max_abs_diff": worst,
            "shardings_equal": all(e.sharding == t.sharding for e, t in zip(
                jax.tree.leaves(runners["eager"].params), jax.tree.leaves(runners["terra"].params)))}


def print_report(results, args):
    print(f"sharded step time, {jax.device_count()} CPU devices ({platform.processor() or 'cpu'}, "
          f"{os.cpu_count()} cores), jax {jax.__version__}; {args.repeats} rounds of "
          f"{args.steps}-step windows, medians")
    print(f"{'placement':16} {'sync':6} {'eager ms':>9} {'jit ms':>8} {'terra ms':>9} "
          f"{'terra vs eager':>15} {'terra vs jit':>13}")
    for r in results:
        for kind in ("every", "end"):
            e, j, t = (r["ms"][f"{m} {kind}"] for m in MODES)
            print(f"{r['parallel'] + ' parallel':16} {kind:6} {e:9.2f} {j:8.2f} {t:9.2f} "
                  f"{e / t:14.2f}x {j / t:12.2f}x")
    for r in results:
        print(f"{r['parallel']} parallel, mesh {r['mesh']}: terra co-executed "
              f"{r['terra_coexecuted']} measured steps after {r['warmup_steps']} warm-up steps; "
              f"final params vs eager max abs diff {r['terra_vs_eager_max_abs_diff']:.1e}, "
              f"shardings equal: {r['shardings_equal']}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--parallel", default="data,model")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    sharded_mlp.ensure_devices(args.devices)
    results = [bench(p, args.steps, args.repeats) for p in args.parallel.split(",")]
    print_report(results, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
