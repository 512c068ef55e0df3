"""Where a co-executed step's time goes, and how close Terra is to the co-execution limit.

    python benchmarks/limits.py [--programs mlp,gpt2] [--steps 12] [--rounds 3]
                                [--json out/limits.json]

The limit of co-execution is max(Python skeleton, compiled graph): with a free
runtime, a step can take no less than the Python the program itself runs (the
user's code, flax/optax/numpy, jnp's dispatch Python) nor less than the graph's
device time. For each program of the suite (examples/*.py), in one process:

  eager     the program's loop, plain JAX (rounds interleaved with terra's)
  jit       `jax.jit` of the step, where it runs and matches eager
  terra     `terra.function`, after warm-up and `wait_for_graph`, co-executing

During terra's timed rounds a sampling thread looks at the Python thread's
stack every millisecond and charges the time since its last look to the
innermost frame that is not the standard library (so C calls count for the
Python code calling them):

  user       the program's file
  libraries  flax, optax, numpy, ... (site-packages other than JAX)
  jax        JAX's Python (jnp wrappers, pjit, tracing for eval_shape)
  terra      Terra's runtime (validation, placeholders, dispatch, fetch glue)
  waiting    blocked on the graph (a fetch, the end-of-step sync)

and each compiled segment is timed alone afterwards (its inputs from a timed
step, dispatched and waited for, median of 5): graph = the sum over the
segments a step dispatches, the graph's device time with no Python competing
for the CPU.

Reported per program: step times and the speedup vs eager; the shares above;
the Python floor = terra's step x (user + libraries + jax shares), the Python
the step would still run with a free runtime; graph; limit = eager /
max(floor, graph); and terra's speedup as a fraction of the limit. On a CPU
the graph and Python share the same cores, so the limit is optimistic there. A sample is taken only when the sampler gets the GIL (at least every
switch interval, 5 ms), so shares are estimates of wall time.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import sysconfig
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402

from terra.bench import Wrap, discover, geomean, load, logs_match, params_match, run_once  # noqa: E402

CATEGORIES = ("user", "libraries", "jax", "terra", "waiting")
_STDLIB = sysconfig.get_paths()["stdlib"]
_WAITS = ("threading.py", "concurrent/futures/")  # a Python thread blocked on a future


_JAX_WAITS = frozenset({"block_until_ready", "_value"})  # jax.Array waiting for its buffer


def classify(frame, examples: str) -> str:
    """The category of a stack sample (see the module docstring)."""
    innermost = frame
    while frame is not None:
        code = frame.f_code
        if code.co_filename.startswith((_STDLIB, "<")):
            frame = frame.f_back
            continue
        package = _package(code.co_filename, examples)
        if package == "jax" and code.co_name in _JAX_WAITS:
            return "waiting"
        if package == "terra" and frame is not innermost \
                and innermost.f_code.co_filename.endswith(_WAITS):
            return "waiting"
        return package
    return "user"


def _package(path: str, examples: str) -> str:
    if path.startswith(examples):
        return "user"
    if "/site-packages/jax/" in path or "/site-packages/jaxlib/" in path:
        return "jax"
    if "site-packages" in path:
        return "libraries"
    if path.startswith(str(ROOT / "terra")) or path.startswith(str(ROOT / "runtime")):
        return "terra"
    return "user"


class Sampler:
    """Samples one thread's stack every `interval_s` while `on` is set: seconds per category."""

    def __init__(self, thread_id: int, examples: str, interval_s: float = 0.001):
        self.counts: Counter = Counter()
        self.on = False
        self._tid, self._examples, self._interval = thread_id, examples, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="limits-sampler", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        # The sampler runs only when it gets the GIL: every `interval_s` while the
        # sampled thread waits, but only at a switch interval (5 ms) while it runs
        # Python. So a sample counts for the time since the previous one.
        last = time.perf_counter()
        while not self._stop.wait(self._interval):
            now = time.perf_counter()
            frame = sys._current_frames().get(self._tid) if self.on else None
            if frame is not None:
                self.counts[classify(frame, self._examples)] += now - last
            last = now

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


class TimedSegment:
    """Stands in for a segment's executable: counts calls, keeps one call's inputs."""

    def __init__(self, executable):
        self.executable, self.calls, self.inputs = executable, 0, None

    def __call__(self, *vals):
        self.calls += 1
        if self.inputs is None:
            self.inputs = vals
        return self.executable(*vals)

    def device_ms(self, repeats: int = 5) -> float:
        """Median time of one dispatch of the segment alone, until its outputs are ready."""
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(self.executable(*self.inputs))
            times.append(time.perf_counter() - start)
        return 1e3 * statistics.median(times)


def time_segments(wrap: Wrap) -> list:
    """Put a TimedSegment in place of every executable of the wrapped step functions."""
    timed = []
    for step_fn in wrap.wrapped.values():
        for seg in (step_fn._program.segments if step_fn._program else ()):
            seg.executable = TimedSegment(seg.executable)
            timed.append(seg.executable)
    return timed


def graph_ms(timed: list, steps: int) -> float:
    """Device time per step: each segment alone, times how often a step dispatched it."""
    used = [t for t in timed if t.calls]
    return sum(t.device_ms() * t.calls for t in used) / max(1, steps)


@dataclass
class Limit:
    program: str
    eager_ms: float = 0.0
    jit_ms: float | None = None
    terra_ms: float = 0.0
    speedup: float = 0.0
    shares: dict = field(default_factory=dict)   # category -> fraction of terra's wall time
    floor_ms: float = 0.0                         # Python the step runs with a free runtime
    graph_ms: float = 0.0                         # segments' device time per step
    limit: float = 0.0                            # eager / max(floor, graph)
    of_limit: float = 0.0                         # speedup / limit
    coexecuted: int = 0                           # co-executed steps in terra's rounds
    steps: int = 0                                # steps in terra's timed rounds


def measure(name: str, path: Path, steps: int, rounds: int, sampler: Sampler) -> Limit:
    module = load(name, path)
    wraps = {m: Wrap(m) for m in ("eager", "jit", "terra")}
    result = Limit(name)
    reference = run_once(module, wraps["eager"], steps)
    if reference.error is not None:
        raise RuntimeError(f"{name} fails eagerly: {reference.error!r}")
    modes = ["eager", "terra"]
    jit_out = run_once(module, wraps["jit"], steps)
    if jit_out.error is None and logs_match(reference.log, jit_out.log) \
            and params_match(reference.params, jit_out.params):
        modes.append("jit")
    for _ in range(2):      # learn every path a round takes, then compile them
        run_once(module, wraps["terra"], steps)
        wraps["terra"].wait_for_graphs()
    times: dict = {m: [] for m in modes}
    timed = time_segments(wraps["terra"])
    before = wraps["terra"].terra_stats()

    def steady(_: int) -> None:   # a round's timed window starts when its first step ends
        sampler.on = True

    for r in range(rounds):
        for mode in (modes if r % 2 == 0 else modes[::-1]):
            if mode != "terra":
                times[mode].append(run_once(module, wraps[mode], steps).steady_ms())
                continue
            out = run_once(module, wraps["terra"], steps, on_step=steady)
            sampler.on = False
            if out.error is not None or not logs_match(reference.log, out.log):
                raise RuntimeError(f"{name}: terra's round differs from eager ({out.error!r})")
            times["terra"].append(out.steady_ms())
            result.steps += steps
    after = wraps["terra"].terra_stats()
    result.coexecuted = int(after["coexecuted"] - before["coexecuted"]
                            - (after["fallbacks"] - before["fallbacks"]))
    result.eager_ms = statistics.median(times["eager"])
    result.terra_ms = statistics.median(times["terra"])
    result.jit_ms = statistics.median(times["jit"]) if "jit" in times else None
    result.speedup = result.eager_ms / result.terra_ms
    result.graph_ms = graph_ms(timed, result.steps)
    return result


def finish(result: Limit, counts: Counter) -> None:
    total = sum(counts.values()) or 1
    result.shares = {c: counts[c] / total for c in CATEGORIES}
    python = sum(result.shares[c] for c in ("user", "libraries", "jax"))
    result.floor_ms = result.terra_ms * python
    result.limit = result.eager_ms / max(result.floor_ms, result.graph_ms)
    result.of_limit = result.speedup / result.limit


def format_table(results: list[Limit]) -> str:
    head = ("| program | eager ms | jit ms | terra ms | vs eager | user | libs | jax | terra "
            "| waiting | floor ms | graph ms | limit | of limit |")
    rows = [head, "|" + "---|" * 14]
    for r in results:
        s = r.shares
        jit = f"{r.jit_ms:.1f}" if r.jit_ms else "-"
        rows.append(f"| {r.program} | {r.eager_ms:.1f} | {jit} | {r.terra_ms:.1f} | "
                    f"{r.speedup:.2f}x | " + " | ".join(f"{s[c]:.0%}" for c in CATEGORIES)
                    + f" | {r.floor_ms:.1f} | {r.graph_ms:.1f} | {r.limit:.2f}x | "
                    f"{r.of_limit:.0%} |")
    rows.append(f"\ngeomean: terra {geomean([r.speedup for r in results]):.2f}x, "
                f"limit {geomean([r.limit for r in results]):.2f}x")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--programs", help="comma-separated program names (default: all)")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)
    available = discover()
    names = args.programs.split(",") if args.programs else list(available)
    sampler = Sampler(threading.get_ident(), str(ROOT / "examples"))
    results = []
    for name in names:
        print(f"[{names.index(name) + 1}/{len(names)}] {name}", file=sys.stderr, flush=True)
        sampler.counts.clear()
        result = measure(name, available[name], args.steps, args.rounds, sampler)
        finish(result, sampler.counts)
        results.append(result)
    sampler.close()
    print(f"\nCo-executed step vs the co-execution limit ({jax.default_backend()}, "
          f"{os.cpu_count()} cores; medians of {args.rounds} rounds of {args.steps} steps)\n")
    print(format_table(results))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(
            {"command": "python benchmarks/limits.py " + " ".join(argv or sys.argv[1:]),
             "programs": [asdict(r) for r in results]}, indent=2))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
