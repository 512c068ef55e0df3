"""How Terra's costs scale: ops per step, and paths in a TraceGraph.

    python benchmarks/scaling.py [--ops 100,1000,10000] [--paths 1,2,4,8,16,32,64]
                                 [--repeats 5] [--json FILE] [--plot out/scaling.png]

Table 1, ops per step. A step of N ops on small arrays (8 floats), so the
step's time is Terra's per-op Python work, not XLA's: a chain of
`jnp.sin(x)`, `x * w`, `x + b` (each one nested-jit op, as jnp applies them;
`w`, `b` are step arguments, so nothing is fed). Per N:

  eager ms     the step without Terra (median of `--repeats` calls)
  tracing ms   the step under Terra while it records (each repeat is the first,
               tracing call of a fresh terra.function: eager + recording)
  coexec ms    a co-executed step (validation against the graph + placeholders
               + one segment dispatch; fetched at the end), median of repeats
  jit ms       jax.jit of the same step, for reference
  generate s   build_program: TraceGraph -> segments (Python)
  compile s    lowering + XLA compile of the segments

Table 2, paths. A step whose Python picks one of P op sequences from an int
argument: a 20-op prefix, then bit b of the int picks `sin` or `cos` for 6
levels (a binary prefix tree), then a 20-op tail (repeated under every leaf,
as a prefix tree stores it). P paths are traced; then

  nodes        GraphNodes in the TraceGraph
  memory KiB   tracemalloc growth while tracing the P paths (JAX's own caches
               warmed first by running every path eagerly), the graph alive
  generate ms  build_program of the P-path graph
  compile s    compiling all its segments
  coexec ms    a co-executed step, cycling through the P paths (median)

Medians of interleaved repeats; the machine is shared, so expect noise.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
import tracemalloc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("TERRA_SYNC_COMPILE", "1")  # deterministic switch to co-execution

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import terra  # noqa: E402
from terra import api, generate  # noqa: E402

PREFIX_OPS, LEVELS, TAIL_OPS = 20, 6, 20


# -- timing what Terra generates and compiles (wrapping its two phases) -------

class PhaseTimer:
    """Accumulates the time spent in build_program and compile_segment."""

    def __init__(self):
        self.generate_s = self.compile_s = 0.0
        self._build, self._compile = api.build_program, generate.compile_segment
        api.build_program = self._timed(self._build, "generate_s")
        generate.compile_segment = self._timed(self._compile, "compile_s")

    def _timed(self, fn, field):
        def timed(*args):
            start = time.perf_counter()
            try:
                return fn(*args)
            finally:
                setattr(self, field, getattr(self, field) + time.perf_counter() - start)
        return timed

    def reset(self):
        self.generate_s = self.compile_s = 0.0


def median_ms(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


# -- table 1: ops per step ------------------------------------------------------

def chain_step(n_ops):
    """A step of `n_ops` jnp ops (each a nested jit) on small arrays."""
    def step(x, w, b):
        for i in range(n_ops):
            k = i % 3
            x = jnp.sin(x) if k == 0 else (x * w if k == 1 else x + b)
        return x
    return step


def synced(fn, *args):
    return lambda: jax.block_until_ready(fn(*args))


def bench_ops(n_ops, repeats, timer, log):
    step = chain_step(n_ops)
    args = (jnp.linspace(0.0, 1.0, 8), jnp.full(8, 0.999), jnp.full(8, 1e-3))
    eager = synced(step, *args)
    eager()  # JAX's per-primitive caches
    jitted = jax.jit(step)
    start = time.perf_counter()
    jax.block_until_ready(jitted(*args))
    jit_compile_s = time.perf_counter() - start

    tracing = []
    for _ in range(repeats):  # each: the first (tracing) call of a fresh terra.function
        fresh = terra.function(step)
        start = time.perf_counter()
        jax.block_until_ready(fresh(*args))
        tracing.append(1e3 * (time.perf_counter() - start))
    coexec_fn = fresh
    timer.reset()
    jax.block_until_ready(coexec_fn(*args))  # nothing new: generate + compile (synchronously)
    generate_s, compile_s = timer.generate_s, timer.compile_s
    coexec = synced(coexec_fn, *args)
    coexec()
    before = coexec_fn.stats().coexecuted
    row = {"ops": n_ops, "tracing_ms": statistics.median(tracing)}
    eager_ms, jit_ms, coexec_ms = [], [], []
    for _ in range(repeats):  # interleaved rounds
        eager_ms.append(median_ms(eager, 3))
        jit_ms.append(median_ms(synced(jitted, *args), 3))
        coexec_ms.append(median_ms(coexec, 3))
    s = coexec_fn.stats()
    assert s.coexecuted - before == 3 * repeats and s.fallbacks == 0, s
    row.update(eager_ms=statistics.median(eager_ms), jit_ms=statistics.median(jit_ms),
               coexec_ms=statistics.median(coexec_ms), generate_s=generate_s,
               compile_s=compile_s, jit_compile_s=jit_compile_s,
               segments=s.segments_compiled)
    log(f"  {n_ops} ops: " + ", ".join(f"{k}={v:.4g}" for k, v in row.items()))
    return row


# -- table 2: paths -----------------------------------------------------------------

def branching_step(x, choice):
    """Python picks one of 2**LEVELS op sequences from the int `choice`."""
    for _ in range(PREFIX_OPS):
        x = jnp.sin(x)
    for level in range(LEVELS):
        x = jnp.cos(x) if (choice >> level) & 1 else jnp.sin(x)
    for _ in range(TAIL_OPS):
        x = x * 0.999
    return x


def bench_paths(n_paths, repeats, timer, log):
    x = jnp.linspace(0.0, 1.0, 8)
    choices = [c * (2 ** LEVELS // n_paths) for c in range(n_paths)]  # spread over the tree
    for c in choices:
        jax.block_until_ready(branching_step(x, c))  # warm JAX's caches, outside the measure
    gc.collect()
    step = terra.function(branching_step, max_paths=max(64, n_paths))
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for c in choices:
        jax.block_until_ready(step(x, c))
    gc.collect()
    memory_kib = (tracemalloc.get_traced_memory()[0] - before) / 1024
    tracemalloc.stop()
    nodes = step._graph.num_nodes
    timer.reset()
    jax.block_until_ready(step(x, choices[0]))  # a known path: generate + compile
    generate_ms, compile_s = 1e3 * timer.generate_s, timer.compile_s
    cycle = iter(range(10 ** 9))

    def one_step():
        jax.block_until_ready(step(x, choices[next(cycle) % n_paths]))

    one_step()
    before = step.stats().coexecuted
    coexec_ms = median_ms(one_step, max(repeats * 3, n_paths))
    s = step.stats()
    assert s.coexecuted > before and s.fallbacks == 0 and s.paths == n_paths, s
    row = {"paths": n_paths, "nodes": nodes, "memory_kib": memory_kib,
           "generate_ms": generate_ms, "compile_s": compile_s, "segments": s.segments_compiled,
           "coexec_ms": coexec_ms}
    log(f"  {n_paths} paths: " + ", ".join(f"{k}={v:.4g}" for k, v in row.items()))
    return row


# -- report -------------------------------------------------------------------------

def print_tables(ops_rows, path_rows):
    print("\nOps per step (chain of jnp ops on 8 floats; ms per step, medians)")
    print(f"{'ops':>6} {'eager ms':>9} {'tracing ms':>10} {'trace/eager':>11} {'coexec ms':>9}"
          f" {'us/op':>6} {'jit ms':>7} {'generate s':>10} {'compile s':>9} {'jit compile s':>13}")
    for r in ops_rows:
        print(f"{r['ops']:>6} {r['eager_ms']:9.2f} {r['tracing_ms']:10.2f}"
              f" {r['tracing_ms'] / r['eager_ms']:11.2f} {r['coexec_ms']:9.2f}"
              f" {1e3 * r['coexec_ms'] / r['ops']:6.1f} {r['jit_ms']:7.3f}"
              f" {r['generate_s']:10.3f} {r['compile_s']:9.2f} {r['jit_compile_s']:13.2f}")
    print(f"\nPaths in one TraceGraph ({PREFIX_OPS}-op prefix, {LEVELS} binary levels,"
          f" {TAIL_OPS}-op tail per path)")
    print(f"{'paths':>6} {'nodes':>6} {'memory KiB':>10} {'KiB/node':>8} {'generate ms':>11}"
          f" {'segments':>8} {'compile s':>9} {'coexec ms':>9}")
    for r in path_rows:
        print(f"{r['paths']:>6} {r['nodes']:>6} {r['memory_kib']:10.1f}"
              f" {r['memory_kib'] / r['nodes']:8.2f} {r['generate_ms']:11.2f}"
              f" {r['segments']:>8} {r['compile_s']:9.2f} {r['coexec_ms']:9.3f}")


def plot(ops_rows, path_rows, filename):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    ops = [r["ops"] for r in ops_rows]
    for key, label in (("eager_ms", "eager step"), ("tracing_ms", "tracing step"),
                       ("coexec_ms", "co-executed step"), ("jit_ms", "jax.jit step")):
        a.loglog(ops, [r[key] for r in ops_rows], "o-", label=label)
    a.loglog(ops, [1e3 * r["compile_s"] for r in ops_rows], "s--", label="compile (once)")
    a.loglog(ops, [1e3 * r["generate_s"] for r in ops_rows], "s:", label="generate (once)")
    a.set_xlabel("ops per step")
    a.set_ylabel("ms")
    a.set_title("time vs ops per step")
    a.legend(fontsize=8)
    paths = [r["paths"] for r in path_rows]
    b.plot(paths, [r["memory_kib"] for r in path_rows], "o-", label="TraceGraph memory (KiB)")
    b.plot(paths, [r["generate_ms"] for r in path_rows], "s-", label="generate (ms)")
    b.plot(paths, [1e3 * r["coexec_ms"] for r in path_rows], "^-", label="co-executed step (us)")
    b.set_xlabel("paths in the TraceGraph")
    b.set_title("cost vs paths")
    b.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(filename) or ".", exist_ok=True)
    fig.savefig(filename, dpi=110)
    print(f"wrote {filename}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", default="100,1000,10000")
    parser.add_argument("--paths", default="1,2,4,8,16,32,64")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", metavar="FILE")
    parser.add_argument("--plot", metavar="FILE", default="out/scaling.png")
    args = parser.parse_args(argv)
    log = lambda s: print(s, flush=True)  # noqa: E731
    timer = PhaseTimer()
    ops_rows = [bench_ops(int(n), args.repeats, timer, log) for n in args.ops.split(",") if n]
    path_rows = [bench_paths(int(p), args.repeats, timer, log)
                 for p in args.paths.split(",") if p]
    print_tables(ops_rows, path_rows)
    if args.plot:
        plot(ops_rows, path_rows, args.plot)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                                   "jax": jax.__version__},
                       "ops": ops_rows, "paths": path_rows}, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
