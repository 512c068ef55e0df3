"""Terra's own CPU per co-executed op, against the floor, on the suite programs.

    python benchmarks/per_op.py [--programs mlp,gpt2] [--steps 6] [--warmup 14]

Each program's loop runs under `terra.function` until its graph covers the
loop's path (TERRA_SYNC_COMPILE=1), then for `--steps` co-executed steps every
step-function call is timed twice, back to back, on the same arguments:

* **co-exec**: the real co-executed call (the calling thread's CPU time, so
  waiting for the graph does not count);
* **floor**: the same step's Python under Terra's trace, with a handler that
  only returns placeholders with the avals the real call recorded: no
  validation of ops, feeds or placements, no dispatch; fetches are answered
  with the values the real call fetched. It is what any co-execution must
  pay: the step's own Python, JAX's Python above the trace, and one
  placeholder per op.

The program's random number generators (numpy's and Python's, global and
module-level) are rewound before the floor call, so it draws what the real
call drew and takes the same path. Reported per step (medians): nodes (ops on
the path), of which intercepted primitives and replayed operators (`x + y`
entered from the graph), feeds, the two CPU times, and Terra's own CPU per node:
(co-exec - floor) / nodes. Figures are ratios within one run; absolute times
depend on the machine's load.
"""
from __future__ import annotations

import argparse
import copy
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

os.environ.setdefault("TERRA_SYNC_COMPILE", "1")   # deterministic switch to co-execution
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from terra import api, bench, coexec  # noqa: E402
from terra.intercept import Placeholder, install  # noqa: E402


class RecordingRun(coexec.StepRun):
    """A real step run that also keeps what the floor needs: the values Python read."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.read: dict = {}

    def resolve(self, pos: int, out: int) -> Any:
        v = super().resolve(pos, out)
        self.read[(pos, out)] = v
        return v

    def fetch(self, ph: Placeholder) -> Any:
        v = super().fetch(ph)
        if ph._run is self:
            self.read[(ph._pos, ph._out)] = v
        return v

    def finish(self, out: Any) -> Any:
        api_runs.append(self)
        return super().finish(out)


api_runs: list = []   # the runs that finished, for the timing wrapper to take


class FloorRun(coexec.StepRun):
    """Replays a recorded path: every op returns placeholders of its recorded avals."""

    def __init__(self, real: RecordingRun, arg_leaves: list):
        super().__init__(real.owner, coexec.COEXEC, real.program, arg_leaves)
        self.path = real.nodes
        self.read = real.read

    def _next(self):
        if len(self.nodes) >= len(self.path):
            raise RuntimeError("the floor call applied more ops than the real call")
        return self.path[len(self.nodes)]

    def _enter(self, trace, child, args):
        op, pos = child.op, child.pos
        self.nodes.append(child)
        self.rec.ops.append(op)
        self.node = child
        region = self._differentiated_region(args)
        phs = [Placeholder(trace, aval, self, pos, o, None, region)
               for o, aval in enumerate(op.out_avals)]
        return phs if op.multiple_results else phs[0]

    def _apply_coexec(self, trace, prim, args, params):
        return self._enter(trace, self._next(), args)

    def _replay_from_graph(self, name: str, values: tuple) -> Any:
        child = self._next()
        via = child.op.via
        if via is None or via[0] != name:
            return None
        outs = self._enter(values[0]._trace, child, [values[i] for i in via[1]])
        return outs[via[4]] if child.op.multiple_results else outs

    def _gradient_op(self, region, outs, cotangents, copies) -> list:
        return self._enter(copies[0]._trace, self._next(), ())

    def resolve(self, pos: int, out: int) -> Any:
        return self.read[(pos, out)]

    def fetch(self, ph: Placeholder) -> Any:
        return self.read[(ph._pos, ph._out)]

    def finish(self, out: Any) -> Any:
        self.active = False
        return out


def floor_call(step: api.StepFunction, real: RecordingRun, args: tuple, kwargs: dict) -> None:
    """The step's Python once more, under the floor handler (as `StepFunction._call` runs it)."""
    run = FloorRun(real, jax.tree.leaves((args, kwargs)))
    step._trace.handler = run
    with install(step._trace):
        api._active.run = run
        try:
            run.finish(step._fn(*args, **kwargs))
        finally:
            api._active.run = None


# -- the program's random state, rewound for the floor call -------------------------

_RNG_TYPES = (np.random.RandomState, np.random.Generator, random.Random)


def rng_state(module) -> dict:
    state = {name: copy.deepcopy(v) for name, v in vars(module).items()
             if isinstance(v, _RNG_TYPES)}
    state[" np"], state[" random"] = np.random.get_state(), random.getstate()
    return state


def set_rng_state(module, state: dict) -> None:
    np.random.set_state(state[" np"])
    random.setstate(state[" random"])
    for name, v in state.items():
        target = getattr(module, name, None)
        if isinstance(v, np.random.Generator):
            target.bit_generator.state = v.bit_generator.state
        elif isinstance(v, np.random.RandomState):
            target.set_state(v.get_state())
        elif isinstance(v, random.Random):
            target.setstate(v.getstate())


# -- measuring ------------------------------------------------------------------------

class StepCost(NamedTuple):
    nodes: int
    replayed: int
    feeds: int
    coexec_ms: float
    floor_ms: float


class Timed:
    """`wrap(fn)` for the measured round: each call co-executes, then runs at the floor."""

    def __init__(self, module, wrap: bench.Wrap):
        self.module, self.wrap, self.costs = module, wrap, []

    def __call__(self, fn):
        step = self.wrap(fn)

        def timed(*args, **kwargs):
            before = rng_state(self.module)
            stats = step.stats()
            replayed, feeds, fallbacks = stats.operators_replayed, stats.feeds, stats.fallbacks
            start = time.thread_time()
            out = step(*args, **kwargs)
            coexec_s = time.thread_time() - start
            real = api_runs.pop()
            if real.mode != coexec.COEXEC or stats.fallbacks != fallbacks:
                return out   # not a co-executed step: nothing to compare
            after = rng_state(self.module)
            set_rng_state(self.module, before)
            start = time.thread_time()
            floor_call(step, real, args, kwargs)
            floor_s = time.thread_time() - start
            set_rng_state(self.module, after)
            self.costs.append(StepCost(len(real.nodes), stats.operators_replayed - replayed,
                                       stats.feeds - feeds, 1e3 * coexec_s, 1e3 * floor_s))
            return out
        return timed


def measure(name: str, path: Path, steps: int, warmup: int) -> list[StepCost]:
    module = bench.load(name, path)
    wrap = bench.Wrap("terra")
    bench.run_once(module, wrap, warmup)
    wrap.wait_for_graphs()
    bench.run_once(module, wrap, warmup)     # the data a measured round sees, co-executed
    wrap.wait_for_graphs()
    timed = Timed(module, wrap)
    out = bench.run_once(module, timed, steps)
    if out.error is not None:
        raise out.error
    return timed.costs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--programs", help="comma-separated suite programs (default: all)")
    parser.add_argument("--steps", type=int, default=6, help="measured steps per program")
    parser.add_argument("--warmup", type=int, default=14, help="steps before measuring")
    args = parser.parse_args(argv)
    available = bench.discover()
    names = args.programs.split(",") if args.programs else list(available)
    api.StepRun = RecordingRun
    print(f"per step-function call, medians over {args.steps} steps "
          f"({jax.default_backend()}, {os.cpu_count()} cores)")
    print(f"{'program':18} {'nodes':>6} {'prims':>6} {'replayed':>8} {'feeds':>6} "
          f"{'co-exec ms':>10} {'floor ms':>9} {'terra us/node':>13} {'floor us/node':>13}")
    for name in names:
        try:
            costs = measure(name, available[name], args.steps, args.warmup)
        except Exception as err:  # one program's failure does not end the table
            print(f"{name:18} failed: {type(err).__name__}: {err}")
            continue
        if not costs:
            print(f"{name:18} no co-executed steps")
            continue
        med = {f: statistics.median(getattr(c, f) for c in costs) for f in StepCost._fields}
        own = 1e3 * (med["coexec_ms"] - med["floor_ms"]) / med["nodes"]
        print(f"{name:18} {med['nodes']:6.0f} {med['nodes'] - med['replayed']:6.0f} "
              f"{med['replayed']:8.0f} {med['feeds']:6.0f} {med['coexec_ms']:10.2f} "
              f"{med['floor_ms']:9.2f} {own:13.1f} {1e3 * med['floor_ms'] / med['nodes']:13.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
