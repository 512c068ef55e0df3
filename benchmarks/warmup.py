"""Warm-up: how soon a cold process co-executes, Terra vs jax.jit, before vs after.

    python benchmarks/warmup.py [--programs mlp cnn gpt2] [--steps 30] [--before /work/main]

Each measurement is a fresh process running a suite program (examples/*.py)
with production settings (graphs compile in the background). Reported per
program: the first step that co-executed to its end and the seconds from the
start of the first step to the end of that step; Terra's total segment compile
time (summed over segments, on the compile thread); `jax.jit`'s first step
(its compile included) in its own process. "before" runs the Terra of another
checkout (`--before`, e.g. main) the same way; "warm" runs this checkout a
second time with the same persistent cache folder (cold: an empty one).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def child(name: str, mode: str, steps: int) -> None:
    """One run; prints a JSON line: first co-executed step, seconds, compile seconds."""
    from terra import generate
    from terra.bench import Wrap, discover, load, run_once

    compile_s = [0.0]
    real_compile = generate.compile_segment

    def timed_compile(seg, executor):
        start = time.perf_counter()
        try:
            return real_compile(seg, executor)
        finally:
            compile_s[0] += time.perf_counter() - start

    generate.compile_segment = timed_compile
    module = load(name, discover(ROOT / "examples")[name])
    wrap = Wrap(mode)
    first: dict = {}

    def on_step(step: int) -> None:
        if mode == "terra" and not first:
            s = wrap.terra_stats()
            if s.get("coexecuted", 0) - s.get("fallbacks", 0) > 0:
                first.update(step=step, ended=time.perf_counter())

    out = run_once(module, wrap, steps, on_step=on_step)
    if out.error is not None:
        raise out.error
    start = out.step_ends[0] - out.timings[0]
    report = {"first_step_s": out.timings[0]}
    if first:
        report.update(step=first["step"], seconds=first["ended"] - start)
    if mode == "terra":
        stats = wrap.terra_stats()
        report.update(compile_s=compile_s[0], coexecuted=stats.get("coexecuted", 0) -
                      stats.get("fallbacks", 0), compiles=stats.get("compiles", 0))
    print(json.dumps(report))


def measure(checkout: Path, name: str, mode: str, steps: int, cache: str | None) -> dict:
    env = dict(os.environ, PYTHONPATH=str(checkout), TERRA_CACHE="0" if cache is None else "1")
    env.pop("TERRA_SYNC_COMPILE", None)
    if cache is not None:
        env["TERRA_CACHE_DIR"] = cache
    proc = subprocess.run([sys.executable, __file__, "--child", name, "--mode", mode,
                           "--steps", str(steps)], env=env, capture_output=True, text=True,
                          timeout=900, cwd=checkout)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} {mode} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def first(r: dict) -> str:
    return f"#{r['step']} {r['seconds']:.1f}s" if "step" in r else "never"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--programs", nargs="+", default=["mlp", "cnn", "gpt2"])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--before", type=Path, help="another checkout to compare (e.g. main)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="terra", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.mode, args.steps)
        return 0
    print(f"| program | jax.jit 1st step | before: 1st co-exec | before: compile s | "
          f"after: 1st co-exec | after: compile s | after: co-executed | warm: 1st co-exec |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.programs:
        jit = measure(ROOT, name, "jit", 3, None)
        before = measure(args.before, name, "terra", args.steps, None) if args.before else {}
        with tempfile.TemporaryDirectory() as cache:
            after = measure(ROOT, name, "terra", args.steps, cache)
            warm = measure(ROOT, name, "terra", args.steps, cache)
        old = (f"{first(before)} | {before['compile_s']:.1f}" if before else "- | -")
        print(f"| {name} | {jit['first_step_s']:.1f}s | {old} | {first(after)} | "
              f"{after['compile_s']:.1f} | {after['coexecuted']}/{args.steps} | {first(warm)} |",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
