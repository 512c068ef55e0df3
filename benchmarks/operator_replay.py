"""Operator replay on vs off: the co-executed MLP step, side by side in one process.

    python benchmarks/operator_replay.py [--rounds 12] [--window 20]

One `terra.function(train_step)` of examples/mlp.py co-executes; rounds
alternate 20-step windows with operator replay on (the default) and off
(`StepRun.replay_operator` answering "run it the usual way"), plus a short
eager window, order reversed every other round; medians. The final sync of
each window is inside it, so asynchronous work is counted.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

import jax  # noqa: E402

import mlp  # noqa: E402
import terra  # noqa: E402
from terra import coexec  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--window", type=int, default=20)
    args = parser.parse_args(argv)

    step = terra.function(mlp.train_step)
    data = mlp.make_dataset(0)
    state = {"params": mlp.init_params(0)}
    state["opt"] = mlp.optimizer.init(state["params"])

    def window(fn, n: int) -> float:
        start = time.perf_counter()
        for i in range(n):
            x, y = data[i % len(data)]
            state["params"], state["opt"], loss = fn(state["params"], state["opt"], x, y)
        jax.block_until_ready(state["params"])
        return (time.perf_counter() - start) / n * 1e3

    for _ in range(3):
        window(step, 5)
    step.wait_for_graph()
    window(step, 10)
    replay = coexec.StepRun.replay_operator
    settings = {"on": replay, "off": lambda self, name, values: None}
    times: dict = {"on": [], "off": [], "eager": []}
    replayed_before = step.stats().operators_replayed
    for r in range(args.rounds):
        for mode in (["on", "off", "eager"] if r % 2 else ["eager", "off", "on"]):
            if mode == "eager":
                times[mode].append(window(mlp.train_step, max(3, args.window // 4)))
                continue
            coexec.StepRun.replay_operator = settings[mode]
            times[mode].append(window(step, args.window))
    coexec.StepRun.replay_operator = replay
    med = {k: statistics.median(v) for k, v in times.items()}
    s = step.stats()
    print(f"MLP co-executed step: replay on {med['on']:.2f} ms, off {med['off']:.2f} ms "
          f"({med['on'] / med['off'] - 1:+.0%}); eager {med['eager']:.2f} ms "
          f"-> {med['eager'] / med['on']:.2f}x eager on, {med['eager'] / med['off']:.2f}x off")
    per_step = (s.operators_replayed - replayed_before) / (args.rounds * args.window)
    print(f"steps {s.steps}, co-executed {s.coexecuted}, fallbacks {s.fallbacks}, "
          f"operators replayed per step (on) {per_step:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
