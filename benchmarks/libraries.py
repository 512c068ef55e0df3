"""Model libraries under Terra: step time per library program, and the compatibility table.

    python benchmarks/libraries.py [--steps 24] [--repeats 2] [--programs nnx_train,eqx_train]
    python benchmarks/libraries.py --table

The benchmark runs each stageable training program of tests/library_programs.py
(one per library) three ways, side by side in one process: eagerly, with its step
hand-jitted by the library's own transform (`nnx.jit`, `eqx.filter_jit`,
`jax.jit`), and under `terra.function`. A step's time is the interval between
the starts of consecutive steps (the loop's own prints and fetches included),
median over the second half of the steps, median over the repeats, modes
rotated each repeat.

`--table` runs tests/test_libraries_*.py, which record each program's outcome
(TERRA_COMPAT_RECORD), and renders docs/compatibility.md from those records;
README.md's block between `<!-- compat:begin -->` and `<!-- compat:end -->` is
rewritten too when present.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Callable, NamedTuple

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
os.environ.setdefault("TERRA_SYNC_COMPILE", "1")   # co-execution from the third step

BEGIN, END = "<!-- compat:begin -->", "<!-- compat:end -->"


# ------------------------------------------------------------------ benchmark

class Timed:
    """The `wrap` a program receives: applies one mode's wrapper, notes each step's start."""

    def __init__(self, wrapper: Callable):
        self.wrapper = wrapper
        self.functions: list = []
        self.starts: list[float] = []

    def __call__(self, fn):
        wrapped = self.wrapper(fn)
        self.functions.append(wrapped)

        def timed(*args, **kwargs):
            self.starts.append(time.perf_counter())
            return wrapped(*args, **kwargs)
        return timed


class Measurement(NamedTuple):
    step_ms: float
    coexecuted: int | None


def _hand_jit(name: str) -> Callable:
    if name == "nnx.jit":
        from flax import nnx
        return nnx.jit
    if name == "eqx.filter_jit":
        import equinox as eqx
        return eqx.filter_jit
    import jax
    return jax.jit


def _wrapper(mode: str, program) -> Callable:
    if mode == "eager":
        return lambda fn: fn
    if mode == "jit":
        return _hand_jit(program.jit)
    import terra
    return terra.function


def measure(program, mode: str, steps: int) -> Measurement:
    wrap = Timed(_wrapper(mode, program))
    with contextlib.redirect_stdout(io.StringIO()):
        program.run(wrap, steps)
    ends = wrap.starts[1:] + [time.perf_counter()]
    intervals = [b - a for a, b in zip(wrap.starts, ends)][steps // 2:]
    coexecuted = (sum(f.stats().coexecuted for f in wrap.functions)
                  if mode == "terra" else None)
    return Measurement(1e3 * statistics.median(intervals), coexecuted)


def bench(names: list[str], steps: int, repeats: int) -> list[dict]:
    import library_programs
    from library_programs import PROGRAMS

    library_programs.STATE_DIGEST = False

    modes = ["eager", "jit", "terra"]
    rows = []
    for name in names:
        program = PROGRAMS[name]
        times: dict[str, list[float]] = {m: [] for m in modes}
        coexecuted = []
        for r in range(repeats):
            for mode in modes[r % 3:] + modes[:r % 3]:
                m = measure(program, mode, steps)
                times[mode].append(m.step_ms)
                if m.coexecuted is not None:
                    coexecuted.append(m.coexecuted)
        ms = {m: statistics.median(t) for m, t in times.items()}
        rows.append(dict(program=name, library=program.library, hand_jit=program.jit,
                         steps=steps, coexecuted=min(coexecuted), **ms))
        print(_bench_line(rows[-1]), flush=True)
    return rows


def _bench_line(row: dict) -> str:
    return (f"| {row['program']} | {row['library']} | {row['coexecuted']}/{row['steps']} "
            f"| {row['eager']:.2f} | {row['jit']:.2f} ({row['hand_jit']}) | {row['terra']:.2f} "
            f"| {row['eager'] / row['terra']:.2f}x | {row['jit'] / row['terra']:.2f}x |")


BENCH_HEADER = ("| program | library | co-executed | eager ms | hand-jit ms | terra ms "
                "| terra vs eager | terra vs hand-jit |\n|---|---|---|---|---|---|---|---|")


# ---------------------------------------------------------- compatibility table

def run_library_tests(record: Path, junit: Path) -> int:
    tests = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_libraries_*.py"))
    env = dict(os.environ, TERRA_COMPAT_RECORD=str(record),
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH"))
                                          if p))
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           f"--junitxml={junit}", *tests], cwd=ROOT, env=env).returncode


def failed_tests(junit: Path) -> list[str]:
    cases = ElementTree.parse(junit).getroot().iter("testcase")
    return [f"{c.get('classname')}::{c.get('name')}" for c in cases
            if c.find("failure") is not None or c.find("error") is not None]


def render(rows: list[dict], failures: list[str]) -> str:
    libraries: dict[str, list[dict]] = {}
    for row in rows:
        libraries.setdefault(row["library"], []).append(row)
    lines = ["| library | version | works: equal to eager (steps co-executed) "
             "| falls back: steps finished eagerly (why) |", "|---|---|---|---|"]
    for library, programs in libraries.items():
        works = "<br>".join(f"{_feature(r)} ({r['coexecuted']}/{r['steps']})"
                            for r in programs if r["coexecuted"]) or "none"
        falls = "<br>".join(_fallback(r) for r in programs if r["fallbacks"] or r["eager"])
        lines.append(f"| {library} | {programs[0]['version']} | {works} | {falls or 'none'} |")
    if failures:
        lines += ["", "Failing: " + ", ".join(f"`{f}`" for f in failures)]
    return "\n".join(lines)


def _feature(row: dict) -> str:
    return f"`{row['program']}`: {row['feature'].rstrip('.')}"


def _fallback(row: dict) -> str:
    parts = []
    if row["fallbacks"]:
        why = "; ".join(row["divergences"])
        parts.append(f"{row['fallbacks']} of {row['steps']} steps finished eagerly ({why})")
    if row["eager"]:
        why = "; ".join(w.split("; finishing this step eagerly")[0] for w in row["warnings"])
        parts.append(f"{row['eager']} of {row['steps']} steps ran eagerly ({why})")
    return f"`{row['program']}`: " + ", ".join(parts).replace("|", "\\|")


def write_table(table: str) -> None:
    doc = ROOT / "docs" / "compatibility.md"
    doc.write_text(
        "# Model libraries under Terra\n\n"
        "Generated by `python benchmarks/libraries.py --table` from the outcomes that\n"
        "`tests/test_libraries_*.py` record; do not edit by hand. Each program is a\n"
        "training loop written as the library's documentation writes it\n"
        "(`tests/library_programs.py`, fed by a numpy data loader), run eagerly and under\n"
        "`terra.function` (strict mode, `TERRA_SYNC_COMPILE=1`) and found equal on printed\n"
        "output (with a digest of the objects' state after every step), returned values\n"
        "and the library objects' final state. \"co-executed\" counts the steps that ran\n"
        "on the graph; the first of every program is traced. A step that falls back\n"
        "finishes eagerly, with eager's results, and the graph learns its path.\n\n"
        f"{table}\n\n"
        "## How\n\n"
        "Libraries reject values from another trace level by comparing the opaque\n"
        "trace state a value was created under with the current one (Flax NNX's\n"
        "Variables, graph nodes and `nnx.jit`; Haiku's frames), through\n"
        "`jax.extend.core.get_opaque_trace_state`. Inside a step Terra's trace reports the\n"
        "trace the step was called under, which is what eager execution reports, so a\n"
        "module created outside the step can be differentiated, split, merged and\n"
        "mutated inside it (`terra/intercept.py`, `install_trace_state_hook`).\n\n"
        "Why the listed steps fall back: a Python branch that first takes its other side,\n"
        "or a layer replaced by one of another shape, is a path the graph has not seen\n"
        "(it is learned, then co-executes); arrays restored by Orbax are committed to a\n"
        "device, unlike the step's own outputs, so the first step after a restore is a\n"
        "new path too.\n")
    readme = ROOT / "README.md"
    text = readme.read_text()
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        readme.write_text(f"{head}{BEGIN}\n{table}\n{END}{rest.split(END, 1)[1]}")


def table(outcomes: tuple[str, str] | None) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        if outcomes is None:
            record, junit = Path(tmp) / "compat.jsonl", Path(tmp) / "junit.xml"
            code = run_library_tests(record, junit)
        else:  # a pytest run that already recorded them
            (record, junit), code = map(Path, outcomes), 0
        rows = [json.loads(line) for line in record.read_text().splitlines()] \
            if record.exists() else []
        failures = failed_tests(junit) if junit.exists() else ["(pytest did not run)"]
    rendered = render(rows, failures)
    write_table(rendered)
    print(rendered)
    return code


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", action="store_true",
                        help="run tests/test_libraries_*.py and write docs/compatibility.md")
    parser.add_argument("--outcomes", nargs=2, metavar=("RECORD", "JUNIT"),
                        help="with --table: render what a pytest run with "
                             "TERRA_COMPAT_RECORD=RECORD --junitxml=JUNIT recorded")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--programs", default="", help="comma-separated (default: all stageable)")
    args = parser.parse_args()
    if args.table:
        sys.exit(table(args.outcomes))
    from library_programs import PROGRAMS
    names = args.programs.split(",") if args.programs else [
        n for n, p in PROGRAMS.items() if p.jit is not None]
    print(BENCH_HEADER, flush=True)
    bench(names, args.steps, args.repeats)


if __name__ == "__main__":
    main()
