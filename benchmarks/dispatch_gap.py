"""What a jitted op costs the Python thread, by the gap since the previous dispatch.

    python benchmarks/dispatch_gap.py [--gaps 0,20,40,50,60,80,150] [--ops 300] [--repeats 3]

A chain of jitted 64x64 multiplies, each dispatched after `gap` microseconds
of Python busy work. Reported per gap: the call's wall time and the calling
thread's CPU time (medians over the repeats of the per-call mean). On the
2-core VM this was measured on, a dispatch that follows the previous one
within ~40 us costs 10-20 us; after a gap of >= 50 us it costs 60-190 us of
wall time while its CPU time stays ~18 us: the caller sleeps while XLA's idle
worker threads wake up. Any per-op Python (eager's own, or a tracer's)
pushes an op stream towards the expensive side of that line.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp


def busy(us: float) -> None:
    end = time.perf_counter_ns() + us * 1000
    while time.perf_counter_ns() < end:
        pass


def call_cost(gap: float, ops: int) -> tuple[float, float]:
    """Mean (wall us, thread CPU us) of one dispatch `gap` us after the previous one."""
    multiply = jax.jit(lambda a, b: a * b)
    x, y = jnp.ones((64, 64)), jnp.full((64, 64), 1.0001)
    jax.block_until_ready(multiply(x, y))
    z, wall, cpu = x, 0, 0
    for _ in range(ops):
        busy(gap)
        start, start_cpu = time.perf_counter_ns(), time.thread_time_ns()
        z = multiply(z, y)
        cpu += time.thread_time_ns() - start_cpu
        wall += time.perf_counter_ns() - start
    jax.block_until_ready(z)
    return wall / ops / 1e3, cpu / ops / 1e3


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gaps", default="0,20,40,50,60,80,150", help="microseconds")
    parser.add_argument("--ops", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    print(f"{'gap us':>7} {'call wall us':>13} {'call cpu us':>12}")
    for gap in (float(g) for g in args.gaps.split(",")):
        runs = [call_cost(gap, args.ops) for _ in range(args.repeats)]
        print(f"{gap:7.0f} {statistics.median(r[0] for r in runs):13.1f}"
              f" {statistics.median(r[1] for r in runs):12.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
