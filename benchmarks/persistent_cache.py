"""Time to the first co-executed step: a cold start vs a restart with TERRA_CACHE_DIR.

    python benchmarks/persistent_cache.py [--programs mlp gpt2 ...] [--repeats 3]

Each measurement is a fresh process running a suite program (examples/*.py)
under `terra.function` with the production settings (graphs compile in the
background while the first steps run eagerly). *cold*: an empty cache
directory (record, compile, save); *warm*: the same directory again (load the
TraceGraph and the executables, co-execute from the first step). Cold and
warm alternate, each pair with a new directory; medians over the repeats.
Reported: the step that first co-executed, seconds from the start of the
first step to the end of that step (the program's own setup before its first
step is the same either way), and the steps traced (run eagerly) in the
warm run.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PROGRAMS = ("mlp", "cnn", "gpt2", "music_transformer", "faster_rcnn")


def child(name: str, steps: int) -> None:
    """One run: print the first co-executed step and the time to reach it, as JSON."""
    sys.path.insert(0, str(ROOT))
    from terra.bench import Wrap, discover, load, run_once

    module = load(name, discover()[name])
    wrap = Wrap("terra")
    first: dict = {}

    def on_step(step: int) -> None:
        if not first and wrap.terra_stats().get("coexecuted"):
            first.update(step=step, ended=time.perf_counter())

    out = run_once(module, wrap, steps, on_step=on_step)
    if out.error is not None:
        raise out.error
    if first:  # from the start of the first step (the program's setup is not Terra's)
        first["seconds"] = first.pop("ended") - (out.step_ends[0] - out.timings[0])
    stats = wrap.terra_stats()
    print(json.dumps({**first, "traced": stats.get("traced", 0), "resumed": stats.get("resumed", 0),
                      "coexecuted": stats.get("coexecuted", 0)}))


def fmt(value, spec: str) -> str:
    return "never" if value is None else format(value, spec)


def measure(name: str, steps: int, cache_dir: str) -> dict:
    env = dict(os.environ, TERRA_CACHE_DIR=cache_dir, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, __file__, "--child", name, "--steps", str(steps)],
                          env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--programs", nargs="+", default=list(DEFAULT_PROGRAMS))
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.steps)
        return 0

    rows = []
    print(f"{'program':18} {'cold: step':>10} {'s':>7} {'warm: step':>11} {'s':>7} "
          f"{'cold/warm':>9}  warm traced")
    for name in args.programs:
        runs: dict = {"cold": [], "warm": []}
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory(prefix="terra-cache-") as cache_dir:
                runs["cold"].append(measure(name, args.steps, cache_dir))
                runs["warm"].append(measure(name, args.steps, cache_dir))
        row = {"program": name}
        for kind, results in runs.items():
            reached = [r for r in results if "step" in r]
            row[kind] = {
                "first_coexecuted_step": statistics.median(r["step"] for r in reached) if reached else None,
                "seconds": statistics.median(r["seconds"] for r in reached) if reached else None,
                "traced": statistics.median(r["traced"] for r in results),
                "resumed": all(r["resumed"] for r in results),
                "reached": f"{len(reached)}/{len(results)}"}
        cold, warm = row["cold"], row["warm"]
        ratio = (cold["seconds"] / warm["seconds"]
                 if cold["seconds"] and warm["seconds"] else None)
        row["cold_over_warm"] = ratio
        ratio_text = "" if ratio is None else f"{ratio:.1f}x"
        print(f"{name:18} {fmt(cold['first_coexecuted_step'], '>10.0f')} {fmt(cold['seconds'], '>7.2f')} "
              f"{fmt(warm['first_coexecuted_step'], '>11.0f')} {fmt(warm['seconds'], '>7.2f')} "
              f"{ratio_text:>9}  {warm['traced']:.0f}", flush=True)
        rows.append(row)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"command": " ".join(sys.argv), "steps": args.steps,
                                               "repeats": args.repeats, "programs": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
