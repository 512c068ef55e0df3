"""Reliability figures: faults injected and survived, RSS growth over long runs.

    python benchmarks/reliability.py [--steps 5000]        (part of `make fuzz`)

Faults: an exception at every point of a step (start, inside jax.grad, before /
after a fetch, inside a nested jit's Python, before return) in a tracing and in
a co-executed step; a segment failing at run time; a compile failing; Ctrl-C
while Python waits on a fetch. "Survived" = the user saw eager's exception (or
Terra fell back with its warning) and the program's results equal eager's.

Long runs: a training step with a learning rate that changes every step (a live
feed) and a step whose shapes change (new paths until the path limit): RSS after
warm-up vs at the end, compiles, cached executables.
"""
import _thread
import argparse
import os
import sys
import threading
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TERRA_SYNC_COMPILE", "1")  # faults hit the step numbers they aim at

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import harness  # noqa: E402
import terra  # noqa: E402
from test_reliability import (  # noqa: E402
    POINTS, _fault_program, _run_with_failing_segment, continue_after_failing_segment,
)


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def faults() -> tuple[int, int, list]:
    injected, survived, failed = 0, 0, []

    def attempt(name, fn):
        nonlocal injected, survived
        injected += 1
        try:
            fn()
            survived += 1
        except Exception as err:  # noqa: BLE001 - a figure, not a crash
            failed.append(f"{name}: {err!r}"[:300])

    for point in POINTS:
        for at in (0, 4):
            attempt(f"{point}@step{at}", lambda p=point, a=at: harness.differential(
                _fault_program(p, a), steps=None, min_coexecuted=3))

    def failing_segment():
        continue_after_failing_segment(*_run_with_failing_segment(strict=False))

    def failing_compile():
        from terra import generate
        real = generate.compile_segment
        generate.compile_segment = lambda seg, executor: (_ for _ in ()).throw(
            RuntimeError("injected"))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fn = terra.function(lambda w: w * 0.5 + 1.0, strict=False)
                w = jnp.ones(3)
                for _ in range(5):
                    w = fn(w)
            assert fn.stats().gave_up
        finally:
            generate.compile_segment = real

    def ctrl_c_during_fetch():
        big = jnp.ones((600, 600), jnp.float32) / 600

        @terra.function
        def step(m):
            for _ in range(30):
                m = jnp.sin(m @ big @ big)
            return m, m.sum()

        m = big
        for _ in range(3):
            m, s = step(m)
        float(s)
        timer = threading.Timer(0.05, _thread.interrupt_main)
        try:
            timer.start()
            for _ in range(100):
                m, s = step(m)
                float(s)
            raise AssertionError("no KeyboardInterrupt")
        except KeyboardInterrupt:
            pass
        m2, _ = step(big)  # consistent afterwards
        ref = big
        for _ in range(30):
            ref = jnp.sin(ref @ big @ big)
        np.testing.assert_allclose(np.asarray(m2), np.asarray(ref), rtol=1e-4, atol=1e-5)

    attempt("failing segment", failing_segment)
    attempt("failing compile", failing_compile)
    attempt("Ctrl-C during a fetch", ctrl_c_during_fetch)
    return injected, survived, failed


class _Eager:
    """The plain function with a terra-like stats() (for the eager baseline row)."""

    def __init__(self, fn):
        self.fn, self.calls, self._executables = fn, 0, {}

    def __call__(self, *args):
        self.calls += 1
        return self.fn(*args)

    def stats(self):
        return terra.Stats(steps=self.calls, eager=self.calls)


def long_run(steps: int) -> list[tuple]:
    rows = []
    w0 = jax.random.normal(jax.random.PRNGKey(0), (64, 64)) * 0.1

    def train(w, x, lr):
        loss, g = jax.value_and_grad(lambda w: jnp.mean(jnp.tanh(x @ w) ** 2))(w)
        return w - lr * g, loss

    def shapes(w, n):
        return w * 0.999 + jnp.mean(jnp.full((n % 500 + 1,), 0.5)), jnp.sum(w)

    rng = np.random.RandomState(0)
    for name, fn, args in (
        ("live lr feed, one path", terra.function(train),
         lambda i: (rng.normal(size=(32, 64)).astype(np.float32), 0.1 / (1 + i))),
        # JAX's own caches grow with every new shape: the eager run shows how much.
        ("new shapes, plain eager", _Eager(shapes), lambda i: (i,)),
        ("new shapes, terra", terra.function(shapes), lambda i: (i,)),
    ):
        w = w0
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for i in range(steps):
                w, loss = fn(w, *args(i))
                if i == steps // 10:
                    float(loss)
                    base = rss_mb()
            float(loss)
        s = fn.stats()
        rows.append((name, steps, base, rss_mb(), s.compiles, len(fn._executables), s.coexecuted,
                     s.eager, time.perf_counter() - start))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5000)
    ns = parser.parse_args()
    injected, survived, failed = faults()
    print(f"faults: {injected} injected, {survived} survived")
    for f in failed:
        print(f"  NOT SURVIVED {f}")
    print("long runs (RSS after the first 10% of steps vs at the end; the new-shapes runs "
          "repeat 500 shapes, JAX compiles each once):")
    print(f"  {'run':28} {'steps':>6} {'RSS MB':>8} {'end MB':>8} {'growth':>7} {'compiles':>8} "
          f"{'executables':>11} {'coexec':>7} {'eager':>6} {'s':>5}")
    for name, steps, base, end, compiles, exes, co, eager, secs in long_run(ns.steps):
        print(f"  {name:28} {steps:6d} {base:8.1f} {end:8.1f} {end - base:+7.1f} {compiles:8d} "
              f"{exes:11d} {co:7d} {eager:6d} {secs:5.0f}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
