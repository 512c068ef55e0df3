"""Does the hybridization report agree with what `terra bench` observes for jax.jit?

For each suite program (examples/ with STEP_FUNCTIONS): run it eagerly and
with jax.jit of its step functions, compared as `terra bench` compares them
(printed output and final parameters) -> matches / fails / runs but differs;
then run it under terra with events on and take the verdict of the explain
report of each step function (a program fails if one of its steps fails,
else differs if one differs). Also shown: the verdict Terra's observations
alone predict, before the report's jit check.

    python benchmarks/hybrid_check.py [--programs a,b] [--steps N]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from terra import bench, telemetry                  # noqa: E402
from terra.telemetry import hybrid                  # noqa: E402

STEPS = 6


class Check(NamedTuple):
    program: str
    bench: str          # what jax.jit did, compared as terra bench compares
    report: str         # the explain report's verdict (checked under jax.jit)
    inferred: str       # the verdict from Terra's observations alone
    jit_error: str
    seconds: float

    @property
    def agrees(self) -> bool:
        return self.bench == self.report


def bench_verdict(module, steps: int) -> tuple[str, str]:
    reference = bench.run_once(module, bench.Wrap("eager"), steps)
    if reference.error is not None:
        raise RuntimeError(f"fails eagerly: {bench._failure(reference.error)}")
    out = bench.run_once(module, bench.Wrap("jit"), steps)
    if out.error is not None:
        return hybrid.FAILS, bench._failure(out.error)
    if not (bench.logs_match(reference.log, out.log)
            and bench.params_match(reference.params, out.params)):
        return hybrid.DIFFERS, ""
    return hybrid.MATCHES, ""


def report_verdicts(module, steps: int) -> tuple[str, str]:
    """(checked, inferred) program verdicts from the report of each step function."""
    telemetry.enable()
    try:
        wrap = bench.Wrap("terra")
        out = bench.run_once(module, wrap, steps)
        if out.error is not None:
            raise RuntimeError(f"fails under terra: {bench._failure(out.error)}")
        checked, inferred = [], []
        for step in wrap.wrapped.values():
            a = hybrid.assess(telemetry._explain.aggregate(step.telemetry_name), step._calls,
                              hybrid.probe(step._calls), step._graph)
            checked.append(a.verdict)
            inferred.append(a.inferred)
    finally:
        telemetry.disable()
    return _program(checked), _program(inferred)


def _program(verdicts: list) -> str:
    for v in (hybrid.FAILS, hybrid.DIFFERS):
        if v in verdicts:
            return v
    return hybrid.MATCHES


def check(name: str, steps: int = STEPS) -> Check:
    start = time.perf_counter()
    module = bench.load(name, bench.discover()[name])
    jit, error = bench_verdict(module, steps)
    checked, inferred = report_verdicts(module, steps)
    return Check(name, jit, checked, inferred, error, time.perf_counter() - start)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--programs", help="comma-separated (default: all)")
    parser.add_argument("--steps", type=int, default=STEPS)
    args = parser.parse_args(argv)
    names = args.programs.split(",") if args.programs else list(bench.discover())
    print(f"{'program':18} {'terra bench: jax.jit':22} {'report (checked)':18} "
          f"{'observed only':18} agree")
    results = []
    for name in names:
        c = check(name, args.steps)
        results.append(c)
        print(f"{c.program:18} {c.bench:22} {c.report:18} {c.inferred:18} "
              f"{'yes' if c.agrees else 'NO'}   ({c.seconds:.0f} s)", flush=True)
    agree = sum(c.agrees for c in results)
    observed = sum(c.inferred == c.bench for c in results)
    print(f"report agrees with terra bench on {agree}/{len(results)} programs; "
          f"Terra's observations alone on {observed}/{len(results)} ({args.steps} steps each)")
    return 0 if agree == len(results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
