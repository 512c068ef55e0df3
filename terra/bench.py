"""The benchmark suite: eager vs `jax.jit` vs terra vs an expert's hand partial jit.

    python -m terra bench [--quick] [--programs a,b] [--json FILE] [--plot FILE]

Every program in `examples/` that defines `STEP_FUNCTIONS` and
`run(wrap, steps, log, seed, timings)` is run eagerly (the baseline), with each
step function wrapped by `jax.jit` (whole-step staging, as AutoGraph does),
with `terra.function`, and, where the program defines `EXPERT_STEPS` (step
function name -> the version an expert JAX user writes by hand: its Python,
numpy and third-party calls as they are, its pure parts in `jax.jit`), with
each step function replaced by its expert version. A mode is *correct* when its
printed log and final parameters equal eager's within float tolerance (over
`CHECK_STEPS` steps; terra also on every timed round); a mode that raises or
differs *fails*, with the exception and a category.

Timing measures the steady state. Warm-up, untimed: the correctness run, and
if a timed round is longer, one more round as long as a timed round; then
terra waits for its graph to cover every path the warm-up took (its time to
the first co-executed step is reported separately). Every program runs the same
data in every round, so the timed rounds take paths the graph knows. Then rounds
of `steps` steps are run mode after mode, interleaved. A round's step time is
its wall time from the end of its first step until the final parameters are
computed, divided by the steps; a mode's step time is the median over rounds.
The co-exec column counts timed steps that co-executed to their end (a step
that diverged and fell back to eager is not one).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import linecache
import math
import os
import platform
import re
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

from terra import config

RTOL, ATOL = 1e-4, 1e-5   # equal to eager within what XLA fusion explains
# Verdicts for all modes come from a run this long: over longer runs float
# reassociation compounds. Terra is also checked on every timed round, at full
# length, with the tolerance scaled by LONG_ROUND_SCALE: after 30 steps jax.jit
# of the resnet step is 40x past RTOL/ATOL (elementwise), terra 4.5x (resnet)
# and 3.8x (sdpoint); printed output is compared as strictly as ever.
CHECK_STEPS = 12
LONG_ROUND_SCALE = 10.0
MODES = ("eager", "jit", "terra", "expert")
CHECKED = MODES[1:]   # the modes whose output is compared with eager's
CATEGORIES = ("third-party call", "data-dependent control flow", "side effect lost or repeated",
              "retracing / shape change", "other")
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


# -- comparing a mode's output with eager's ----------------------------------------

_NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?|nan|inf")


def _numbers(line: str) -> tuple[str, list]:
    found = []
    for m in _NUMBER.findall(line):
        mantissa, _, exponent = m.lower().partition("e")
        decimals = len(mantissa.partition(".")[2])
        # a printed decimal may differ by one unit in its last place; integers must match
        unit = 10.0 ** (int(exponent or 0) - decimals) if "." in mantissa else 0.0
        found.append((float(m), unit))
    return _NUMBER.sub("#", line), found


def logs_match(a: list[str], b: list[str]) -> bool:
    """Equal printed output, numbers within float tolerance."""
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        (tx, nx), (ty, ny) = _numbers(x), _numbers(y)
        if tx.split() != ty.split() or len(nx) != len(ny):
            return False
        for (u, unit), (v, _) in zip(nx, ny):
            if not (u == v or abs(u - v) <= ATOL + RTOL * abs(v) + unit * 1.0001):
                return False
    return True


def params_match(a: Any, b: Any, scale: float = 1.0) -> bool:
    """Same tree, shapes and values within `scale` times RTOL/ATOL."""
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    if ta != tb:
        return False
    for x, y in zip(la, lb):
        x, y = np.asarray(x), np.asarray(y)
        if x.shape != y.shape or not np.allclose(x, y, rtol=scale * RTOL, atol=scale * ATOL,
                                                 equal_nan=True):
            return False
    return True


def categorize(err: BaseException, program_file: str) -> str:
    """Which Python feature defeated whole-step staging, from the error and the user's line."""
    name = type(err).__name__
    line = ""
    for frame in traceback.extract_tb(err.__traceback__):
        if frame.filename == program_file:
            line = (linecache.getline(frame.filename, frame.lineno) or "").strip()
    if name == "TracerArrayConversionError" or re.search(r"\bnp\.|numpy", line):
        return "third-party call"
    if name in ("TracerBoolConversionError", "TracerIntegerConversionError") or \
            re.match(r"(if|elif|while|for)\b", line):
        return "data-dependent control flow"
    if name == "UnexpectedTracerError" or "print" in line:
        return "side effect lost or repeated"
    if name == "ConcretizationTypeError":
        return "data-dependent control flow" if re.search(r"\b(int|float|bool)\(", line) \
            else "retracing / shape change"
    return "other"


# -- running one program in one mode ---------------------------------------------------

@dataclass
class Outcome:
    log: list = field(default_factory=list)
    params: Any = None
    timings: list = field(default_factory=list)
    step_ends: list = field(default_factory=list)   # perf_counter() at the end of each step
    finished: float = 0.0                            # ... once the final params are computed
    error: BaseException | None = None

    def steady_ms(self) -> float:
        """Mean time per step after the first, up to the final parameters being ready.

        Asynchronous modes (jit, terra) return before their work is done, so per-step
        wall times alone would measure dispatch only; the final sync closes the window.
        """
        n = len(self.step_ends)
        if n < 2:
            return 1e3 * sum(self.timings) / max(1, len(self.timings))
        return 1e3 * (self.finished - self.step_ends[0]) / (n - 1)


class Wrap:
    """`wrap(fn)` for one mode; the same wrapped function is reused across rounds.

    `experts` (the program's `EXPERT_STEPS`) gives the expert mode's functions.
    """

    def __init__(self, mode: str, experts: dict | None = None):
        self.mode = mode
        self.experts = experts or {}
        self.wrapped: dict = {}

    def __call__(self, fn: Callable) -> Callable:
        if self.mode == "eager":
            return fn
        if self.mode == "expert":
            return self.experts[fn.__name__]
        if fn not in self.wrapped:
            if self.mode == "jit":
                self.wrapped[fn] = jax.jit(fn)
            else:
                import terra
                self.wrapped[fn] = terra.function(fn)
        return self.wrapped[fn]

    def terra_stats(self) -> dict:
        total: dict = {}
        for f in self.wrapped.values():
            for k, v in f.stats().as_dict().items():
                if isinstance(v, (int, float)):
                    total[k] = total.get(k, 0) + v
        return total

    def wait_for_graphs(self, timeout: float = 120.0) -> None:
        for f in self.wrapped.values():
            f.wait_for_graph(timeout)


def run_once(module, wrap: Wrap, steps: int, seed: int = 0,
             on_step: Callable | None = None) -> Outcome:
    out = Outcome()
    timings = _Timings(out, on_step)
    printed = io.StringIO()   # what the step functions print themselves is output too
    try:
        with contextlib.redirect_stdout(printed):
            out.params = module.run(wrap, steps, log=out.log.append, seed=seed, timings=timings)
            jax.block_until_ready(out.params)
        out.finished = time.perf_counter()
    except Exception as err:  # a mode that raises fails for this program
        out.error = err
    out.log.extend(printed.getvalue().splitlines())
    return out


class _Timings(list):
    """The `timings` list a program appends to; also notes when each step ended."""

    def __init__(self, outcome: Outcome, on_step: Callable | None):
        super().__init__()
        self.outcome, self.on_step = outcome, on_step

    def append(self, seconds: float) -> None:
        self.outcome.step_ends.append(time.perf_counter())
        self.outcome.timings.append(seconds)
        if self.on_step is not None:
            self.on_step(len(self.outcome.timings))


# -- the suite ---------------------------------------------------------------------------

@dataclass
class ProgramResult:
    name: str
    eager_ms: float | None = None
    jit_ms: float | None = None
    terra_ms: float | None = None
    expert_ms: float | None = None
    jit_correct: bool = False
    terra_correct: bool = False
    expert_correct: bool = False
    jit_failure: str = ""
    jit_category: str = ""
    terra_failure: str = ""
    expert_failure: str = ""              # "no EXPERT_STEPS" where the program has none
    speedup: float | None = None          # eager time / terra time
    terra_vs_jit: float | None = None     # jit time / terra time (1.0 = jit's speed)
    terra_vs_expert: float | None = None  # expert time / terra time (1.0 = the expert's speed)
    coexecuted_steps: int = 0
    measured_steps: int = 0
    compiles: int = 0
    fallbacks: int = 0
    first_coexecuted_step: int | None = None
    first_coexecuted_s: float | None = None
    skeleton_ms: float | None = None      # Python time per co-executed step, not waiting
    bound: str = ""


def discover(examples: Path = EXAMPLES) -> dict[str, Path]:
    found = {}
    for path in sorted(examples.glob("*.py")):
        if not path.name.startswith("_") and "STEP_FUNCTIONS" in path.read_text():
            found[path.stem] = path
    return found


def load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(f"terra_bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _failure(err: BaseException) -> str:
    first = (str(err).strip().splitlines() or [""])[0]
    return f"{type(err).__name__}: {first[:160]}"


def bench_program(name: str, path: Path, steps: int, rounds: int, progress) -> ProgramResult:
    module = load(name, path)
    result = ProgramResult(name)
    experts = getattr(module, "EXPERT_STEPS", None)
    wraps = {mode: Wrap(mode, experts) for mode in MODES}

    # Round 0: correctness against eager, and terra's time to its first co-executed step.
    check_steps = min(steps, CHECK_STEPS)
    progress(name, "eager (reference)")
    reference = run_once(module, wraps["eager"], check_steps)
    if reference.error is not None:
        raise RuntimeError(f"{name} fails eagerly: {_failure(reference.error)}") from reference.error
    # Time to the first co-executed step counts terra's own wall time only:
    # its steps, and waiting for its first graph, not the other modes' rounds.
    terra_steps, terra_clock = [0], {"spent": 0.0, "since": 0.0}

    def first_coexec(_: int) -> None:
        terra_steps[0] += 1
        if result.first_coexecuted_step is None and wraps["terra"].terra_stats().get("coexecuted"):
            result.first_coexecuted_step = terra_steps[0]
            result.first_coexecuted_s = (terra_clock["spent"] + time.perf_counter()
                                         - terra_clock["since"])

    def run_terra(n: int, wait: bool = False) -> Outcome:
        terra_clock["since"] = time.perf_counter()
        out = run_once(module, wraps["terra"], n, on_step=first_coexec)
        if wait:
            wraps["terra"].wait_for_graphs()
        terra_clock["spent"] += time.perf_counter() - terra_clock["since"]
        return out

    for mode in CHECKED:
        if mode == "expert" and experts is None:
            result.expert_failure = "no EXPERT_STEPS"
            continue
        progress(name, f"{mode} (correctness)")
        out = (run_terra(check_steps, wait=True) if mode == "terra"
               else run_once(module, wraps[mode], check_steps))
        if out.error is not None:
            failure, correct = _failure(out.error), False
            category = categorize(out.error, str(path))
        elif not logs_match(reference.log, out.log):
            failure, correct = "printed output differs from eager", False
            category = ("side effect lost or repeated" if len(out.log) != len(reference.log)
                        else "other")
        elif not params_match(reference.params, out.params):
            failure, correct, category = "final parameters differ from eager", False, "other"
        else:
            failure, correct, category = "", True, ""
        setattr(result, f"{mode}_correct", correct)
        setattr(result, f"{mode}_failure", failure)
        if mode == "jit":
            result.jit_category = category

    # Timed rounds, modes interleaved; a failing mode is not timed.
    timed = ["eager"] + [m for m in CHECKED if getattr(result, f"{m}_correct")]
    if steps > check_steps:   # warm up on all the data a timed round sees
        for mode in timed:
            progress(name, f"{mode} (warm-up)")
            if mode == "terra":
                run_terra(steps, wait=True)
            else:
                run_once(module, wraps[mode], steps)
    per_mode: dict[str, list] = {m: [] for m in timed}
    before = wraps["terra"].terra_stats()
    for r in range(rounds):
        for mode in timed:
            progress(name, f"{mode} round {r + 1}/{rounds}")
            out = run_terra(steps) if mode == "terra" else run_once(module, wraps[mode], steps)
            per_mode[mode].append(out.steady_ms())
            if mode == "eager" and r == 0:
                long_reference = out
            elif mode == "terra" and result.terra_correct and not (
                    out.error is None and logs_match(long_reference.log, out.log)
                    and params_match(long_reference.params, out.params,
                                     LONG_ROUND_SCALE if steps > CHECK_STEPS else 1.0)):
                result.terra_correct = False   # co-executed rounds are checked too
                result.terra_failure = (_failure(out.error) if out.error is not None else
                                        f"a co-executed {steps}-step round differs from eager")
    after = wraps["terra"].terra_stats()
    for mode, values in per_mode.items():
        setattr(result, f"{mode}_ms", statistics.median(values))
    if result.terra_ms:
        result.speedup = result.eager_ms / result.terra_ms
        if result.jit_ms:
            result.terra_vs_jit = result.jit_ms / result.terra_ms
        if result.expert_ms:
            result.terra_vs_expert = result.expert_ms / result.terra_ms
        delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
        result.fallbacks = int(delta.get("fallbacks", 0))
        result.coexecuted_steps = int(delta.get("coexecuted", 0))
        result.measured_steps = int(delta.get("steps", 0))     # step-function calls
        started = delta.get("coexecuted", 0) + delta.get("fallbacks", 0)
        if started:
            python_s = delta["step_seconds"] - delta["wait_seconds"]
            result.skeleton_ms = 1e3 * python_s / started
            result.bound = "python" if result.skeleton_ms >= 0.8 * result.terra_ms else "graph"
    result.compiles = int(wraps["terra"].terra_stats().get("compiles", 0))
    return result


def geomean(values: list) -> float | None:
    values = [v for v in values if v]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


def format_table(results: list[ProgramResult]) -> str:
    def ms(v):
        return f"{v:8.1f}" if v is not None else "       -"

    def ratio(v):
        return f"{v:8.2f}x" if v else "        -"

    head = (f"{'program':18} {'eager ms':>8} {'jit ms':>8} {'expert ms':>9} {'terra ms':>8} "
            f"{'speedup':>7} {'vs expert':>9} {'vs jit':>9}  {'jax.jit':32} {'terra':5} "
            f"{'expert':6} {'co-exec':>9} {'1st co-exec':>13} {'bound':6}")
    lines = [head, "-" * len(head)]
    for r in results:
        jit = "ok" if r.jit_correct else f"FAIL: {r.jit_category}"
        terra_s = "ok" if r.terra_correct else "FAIL"
        expert = "ok" if r.expert_correct else ("-" if r.expert_failure == "no EXPERT_STEPS"
                                                else "FAIL")
        speed = f"{r.speedup:6.2f}x" if r.speedup else "      -"
        co = f"{r.coexecuted_steps}/{r.measured_steps}"
        first = (f"#{r.first_coexecuted_step} {r.first_coexecuted_s:5.1f}s"
                 if r.first_coexecuted_step else "never")
        lines.append(f"{r.name:18} {ms(r.eager_ms)} {ms(r.jit_ms)} {ms(r.expert_ms):>9} "
                     f"{ms(r.terra_ms)} {speed} {ratio(r.terra_vs_expert)} "
                     f"{ratio(r.terra_vs_jit)}  {jit[:32]:32} {terra_s:5} {expert:6} {co:>9} "
                     f"{first:>13} {r.bound:6}")
    g = geomean([r.speedup for r in results if r.terra_correct])
    ok = sum(r.terra_correct for r in results)
    jit_ok = sum(r.jit_correct for r in results)
    lines.append("-" * len(head))
    expert_ok = sum(r.expert_correct for r in results)
    lines.append(f"terra correct on {ok}/{len(results)}, jax.jit on {jit_ok}/{len(results)}, "
                 f"expert on {expert_ok}/{len(results)}; geomean speedup of terra over eager: "
                 f"{g:.2f}x" if g else "no terra timings")
    vs_expert = geomean([r.terra_vs_expert for r in results if r.terra_correct])
    if vs_expert:
        lines.append(f"geomean terra vs expert: {vs_expert:.2f}x (1.0 = the expert's speed)")
    for r in results:
        if not r.jit_correct and r.jit_failure:
            lines.append(f"  jax.jit on {r.name}: [{r.jit_category}] {r.jit_failure}")
        if not r.terra_correct and r.terra_failure:
            lines.append(f"  terra on {r.name}: {r.terra_failure}")
        if not r.expert_correct and r.expert_failure not in ("", "no EXPERT_STEPS"):
            lines.append(f"  expert version of {r.name}: {r.expert_failure}")
    return "\n".join(lines)


def plot(results: list[ProgramResult], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r.name for r in results]
    x = np.arange(len(names))
    terra_s = [r.speedup or 0 for r in results]
    jit_s = [(r.eager_ms / r.jit_ms) if r.jit_correct and r.jit_ms else 0 for r in results]
    expert_s = [(r.eager_ms / r.expert_ms) if r.expert_correct and r.expert_ms else 0
                for r in results]
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(names)), 4))
    ax.bar(x - 0.27, jit_s, 0.27, label="jax.jit", color="#9aa5b1")
    ax.bar(x, expert_s, 0.27, label="expert partial jit", color="#f0a030")
    ax.bar(x + 0.27, terra_s, 0.27, label="terra", color="#2f7ed8")
    for i, r in enumerate(results):
        if not r.jit_correct:
            ax.text(i - 0.27, 1.0, "jit\nfails", ha="center", va="bottom", fontsize=7, color="#b00")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set_ylabel("speedup over eager (log)")
    ax.set_title("Step time speedup over eager JAX")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def machine() -> dict:
    return {"platform": platform.platform(), "python": platform.python_version(),
            "jax": jax.__version__, "backend": jax.default_backend(),
            "devices": [str(d) for d in jax.devices()], "cpus": os.cpu_count()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m terra bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and rounds")
    parser.add_argument("--programs", help="comma-separated program names (default: all)")
    parser.add_argument("--steps", type=config.positive(int), help="steps per round")
    parser.add_argument("--rounds", type=config.positive(int), help="timed rounds per mode")
    parser.add_argument("--json", metavar="FILE", help="write results as JSON")
    parser.add_argument("--plot", metavar="FILE", help="write a PNG plot of speedups")
    args = parser.parse_args(argv)
    # "1st co-exec" is a cold start's: a graph saved by an earlier run must not serve it.
    os.environ.setdefault("TERRA_CACHE", "0")
    steps = args.steps or (12 if args.quick else 30)
    rounds = args.rounds or (2 if args.quick else 3)
    available = discover()
    names = args.programs.split(",") if args.programs else list(available)
    unknown = [n for n in names if n not in available]
    if unknown:
        parser.error(f"unknown program(s) {', '.join(unknown)}; available: {', '.join(available)}")

    tty = sys.stderr.isatty()

    def progress(name: str, what: str, i=[0]) -> None:
        msg = f"[{names.index(name) + 1}/{len(names)}] {name}: {what}"
        sys.stderr.write(("\r" + msg.ljust(70)) if tty else msg + "\n")
        sys.stderr.flush()

    results = []
    for name in names:
        results.append(bench_program(name, available[name], steps, rounds, progress))
    if tty:
        sys.stderr.write("\r" + " " * 70 + "\r")
    print(f"\nStep time per mode, median over {rounds} interleaved rounds of {steps} steps "
          f"({jax.default_backend()}, {os.cpu_count()} cores)\n")
    print(format_table(results))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        payload = {"command": "python -m terra bench " + " ".join(argv or sys.argv[1:]),
                   "machine": machine(), "steps": steps, "rounds": rounds,
                   "geomean_speedup": geomean([r.speedup for r in results if r.terra_correct]),
                   "geomean_vs_expert": geomean([r.terra_vs_expert for r in results
                                                 if r.terra_correct]),
                   "programs": [asdict(r) for r in results]}
        Path(args.json).write_text(json.dumps(payload, indent=2))
        print(f"\nwrote {args.json}")
    if args.plot:
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        plot(results, args.plot)
        print(f"wrote {args.plot}")
    return 0 if all(r.terra_correct for r in results) else 1
