"""How far Terra and jax.jit are from eager on examples/resnet.py (docs/numerics.md).

Per step: jax.jit and Terra run the training step on eager's state; along a
trajectory: each runs its own training loop. Printed is the largest |x - eager| over
the state arrays, relative to each array's largest value (and, for trajectories,
the array where it is largest).

    PYTHONPATH=$PWD python benchmarks/numerics.py --steps 10
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TERRA_SYNC_COMPILE", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import harness  # noqa: E402
import terra  # noqa: E402


def drift(reference, other) -> tuple[float, str]:
    """max |other - reference| / max |reference| over the arrays, and where."""
    worst, where = 0.0, ""
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(reference)[0],
                            jax.tree.leaves(other)):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        d = float(np.max(np.abs(a - b)) / (np.max(np.abs(a)) + 1e-30))
        if d > worst:
            worst, where = d, jax.tree_util.keystr(path)
    return worst, where


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    ns = parser.parse_args()
    module = harness.load_program("resnet")
    data = module.make_dataset(0)
    jitted = jax.jit(module.train_step)
    runs = {"jit": jitted, "terra": terra.function(module.train_step)}
    along = {"jit": jitted, "terra": terra.function(module.train_step)}  # its own trajectory
    per_step = {"eager": module.init_state(0)}
    trajectory = {k: module.init_state(0) for k in ("eager", *runs)}
    for i in range(ns.steps):
        x, y = data[i % len(data)]
        state = per_step["eager"]
        eager = module.train_step(*state, x, y)[:3]
        line = [f"step {i}"]
        for name, fn in runs.items():
            d, where = drift(eager, fn(*state, x, y)[:3])
            line.append(f"{name} per step {d:.2e}")
        trajectory["eager"] = module.train_step(*trajectory["eager"], x, y)[:3]
        for name, fn in along.items():
            trajectory[name] = fn(*trajectory[name], x, y)[:3]
            d, where = drift(trajectory["eager"], trajectory[name])
            line.append(f"{name} trajectory {d:.2e} {where}")
        per_step["eager"] = eager
        print(" | ".join(line), flush=True)
    print(runs["terra"].stats(), along["terra"].stats(), sep="\n")


if __name__ == "__main__":
    main()
