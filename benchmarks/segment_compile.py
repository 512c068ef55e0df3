"""Why a graph's segments compile slower than `jax.jit` of the whole step.

    python benchmarks/segment_compile.py [--programs mlp cnn gpt2] [--repeats 2]

In one process per program: record the step under Terra (3 steps,
synchronous compile), then compile, side by side and alternating, (a)
`jax.jit` of the whole step on its first arguments, (b) the Terra graph's
segments one by one, (c) the same segments in parallel (as the compile thread
does). Reported: segments, ops per segment, lowered text size, lowering and
XLA compile seconds (medians). Fresh function objects each time, so no
in-memory cache of JAX's serves a repeat.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ["TERRA_SYNC_COMPILE"] = "1"
os.environ["TERRA_CACHE"] = "0"
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402

from terra import generate  # noqa: E402
from terra.bench import discover, load  # noqa: E402


def lower_segment(seg):
    specs = [jax.ShapeDtypeStruct(a.shape, a.dtype, weak_type=getattr(a, "weak_type", False),
                                  sharding=p) for a, p in zip(seg.in_avals, seg.in_placements)]
    return jax.jit(generate.segment_function(seg), keep_unused=True).lower(*specs)


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def measure(name: str, repeats: int) -> dict:
    import terra
    module = load(name, discover(ROOT / "examples")[name])
    first_args, functions = {}, {}

    def wrap(fn):
        if fn not in functions:
            functions[fn] = terra.function(fn)

        def call(*args, **kwargs):
            first_args.setdefault(fn, (args, kwargs))
            return functions[fn](*args, **kwargs)
        return call

    module.run(wrap, 3, log=lambda *_: None)
    fn, step = next(iter(functions.items()))
    segments = step._program.segments
    args, kwargs = first_args[fn]
    rows = {"jit": [], "serial": [], "parallel": []}
    for _ in range(repeats):
        lowered, lower_s = timed(lambda: jax.jit(lambda *a, **k: fn(*a, **k)).lower(*args, **kwargs))
        _, compile_s = timed(lowered.compile)
        rows["jit"].append((lower_s, compile_s, len(lowered.as_text())))
        lowereds, lower_s = timed(lambda: [lower_segment(s) for s in segments])
        _, compile_s = timed(lambda: [lo.compile() for lo in lowereds])
        rows["serial"].append((lower_s, compile_s, sum(len(lo.as_text()) for lo in lowereds)))
        lowereds, lower_s = timed(lambda: [lower_segment(s) for s in segments])
        with ThreadPoolExecutor(os.cpu_count()) as pool:
            _, compile_s = timed(lambda: list(pool.map(lambda lo: lo.compile(), lowereds)))
        rows["parallel"].append((lower_s, compile_s, 0))
    med = {k: [statistics.median(col) for col in zip(*v)] for k, v in rows.items()}
    return {"segments": len(segments), "ops": [len(s.nodes) for s in segments], **med}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--programs", nargs="+", default=["mlp", "cnn", "gpt2"])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    print("| program | segments (ops each) | jit: lower / compile s, text KB | segments serial: "
          "lower / compile s, text KB | segments parallel: compile s |")
    print("|---|---|---|---|---|")
    for name in args.programs:
        r = measure(name, args.repeats)
        j, s, p = r["jit"], r["serial"], r["parallel"]
        print(f"| {name} | {r['segments']} ({', '.join(map(str, r['ops']))}) | "
              f"{j[0]:.2f} / {j[1]:.2f}, {j[2] / 1e3:.0f} | {s[0]:.2f} / {s[1]:.2f}, "
              f"{s[2] / 1e3:.0f} | {p[1]:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
