"""Differential fuzzer: random imperative step functions, eager vs terra.

A generated program is Python source for a step function `step(w, x, i, lr, hist)`
plus a driver schedule. The step mixes jnp ops, `jax.grad` / `value_and_grad`,
nested `jax.jit`, Python branches on fetched values, NumPy on values, Python
numbers that change between steps (live feeds), prints, list appends (kept
across steps and read back later: placeholders of earlier steps), exceptions
raised and caught inside the step, exceptions escaping it, loops whose trip
count depends on a value, and batch shapes that change between steps.

`check(program)` runs it for several steps eagerly and under terra through the
differential harness: same prints, same returned values, same side effects,
same exceptions (float tolerance: harness.RTOL/ATOL). Hypothesis generates
the programs and, on a mismatch, shrinks to a minimal failing one.

    python tests/fuzz.py --programs 2000      # the long profile (`make fuzz`)
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import os
import sys
import textwrap
import time

from hypothesis import strategies as st

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

STEPS = 6
WIDTH = 4  # every value is a float32 vector of this length

# Templates: A and B stand for variables.
UNARY = ["jnp.tanh(A)", "jnp.sin(A)", "jnp.cos(A)", "jnp.abs(A)", "-A", "0.5 * A * A",
         "jnp.clip(A, -1.0, 1.0)", "jnp.cumsum(A) * 0.25", "jnp.sort(A)", "A[::-1]",
         "A.reshape(2, 2).T.reshape(-1)", "A - A.mean()", "A.clip(-0.5, 0.5)",
         f"jnp.full(({WIDTH},), A.max())"]
BINARY = ["A + B", "A - B", "A * B", "jnp.maximum(A, B)", "jnp.where(A > B, A, B * 0.5)"]
PRINTS = ['print(f"p {i} {float(jnp.sum(A)):.4f}")', 'print("arr", i, A)',
          'print("mean", jnp.mean(A))']


def fill(template: str, a: str, b: str = "") -> str:
    return template.replace("A", a).replace("B", b)


@dataclasses.dataclass(frozen=True)
class Program:
    source: str           # the step function
    shapes: tuple         # batch size of x per step (changes = new shapes)
    lrs: tuple            # the Python float `lr` per step (changes = live feed)
    seed: int

    def describe(self) -> str:
        return (f"# shapes={self.shapes} lrs={self.lrs} seed={self.seed}\n{self.source}")


class _Writer:
    """Builds the step's body: statements that each define a new vK."""

    def __init__(self, draw):
        self.draw = draw
        self.lines: list[str] = []
        self.n = 2  # v0 = w, v1 = mean of the batch

    def var(self) -> str:
        return f"v{self.draw(st.integers(0, self.n - 1))}"

    def new(self) -> str:
        """A fresh variable; draw the operands first (they must exist already)."""
        self.n += 1
        return f"v{self.n - 1}"

    def const(self) -> str:
        return repr(self.draw(st.sampled_from([0.5, -0.25, 1.5, 2.0, 0.1])))

    def expr(self) -> str:
        kind = self.draw(st.sampled_from(["unary", "binary", "scale"]))
        if kind == "unary":
            return fill(self.draw(st.sampled_from(UNARY)), self.var())
        if kind == "binary":
            return fill(self.draw(st.sampled_from(BINARY)), self.var(), self.var())
        return f"{self.var()} * {self.const()}"

    def emit(self, text: str) -> None:
        self.lines.append(textwrap.dedent(text).strip("\n"))

    def statement(self) -> None:
        kind = self.draw(st.sampled_from(
            ["op", "op", "op", "feed", "index", "grad", "value_and_grad", "jit", "branch", "print",
             "append", "history", "catch", "loop", "numpy", "escape"]))
        getattr(self, "_" + kind)()

    def _op(self):
        e = self.expr()
        self.emit(f"{self.new()} = {e}")

    def _feed(self):  # a Python float that may change between steps
        a = self.var()
        self.emit(f"{self.new()} = {a} * lr")

    def _index(self):  # the step index: a new Python int every step
        a = self.var()
        self.emit(f"{self.new()} = {a} + 0.01 * i")

    def _grad(self):
        a, b = self.var(), self.var()
        self.emit(f"{self.new()} = jax.grad(lambda z: jnp.sum(jnp.tanh(z * {b})))({a})")

    def _value_and_grad(self):
        a, b = self.var(), self.var()
        k = self.new()
        self.emit(f"""
            loss_{k}, {k} = jax.value_and_grad(lambda z: jnp.sum(jnp.sin(z) * {b}))({a})
            {k} = {k} + 0.1 * loss_{k}""")

    def _jit(self):
        a, b = self.var(), self.var()
        self.emit(f"{self.new()} = jax.jit(lambda p, q: p * q + 1.0)({a}, {b})")

    def _branch(self):
        a = self.var()
        t = self.draw(st.sampled_from([-0.5, 0.0, 0.5, 1.0]))
        e1, e2 = self.expr(), self.expr()
        k = self.new()
        self.emit(f"""
            if float(jnp.sum({a})) > {t}:
                {k} = {e1}
            else:
                {k} = {e2}""")

    def _print(self):
        self.emit(fill(self.draw(st.sampled_from(PRINTS)), self.var()))

    def _append(self):
        self.emit(f"hist.append({self.var()})")

    def _history(self):  # values of earlier steps (placeholders kept across steps)
        a = self.var()
        self.emit(f"{self.new()} = {a} + (hist[-1] * 0.5 if hist else 0.0)")

    def _catch(self):
        a = self.var()
        k = self.new()
        t = self.draw(st.sampled_from([0.0, 0.5, 1.0]))
        self.emit(f"""
            try:
                if float(jnp.max({a})) > {t}:
                    raise ValueError("too big")
                {k} = {a} * 2.0
            except ValueError as err:
                print("caught", err)
                {k} = {a} * 0.5""")

    def _loop(self):  # trip count from a value
        a = self.var()
        k = self.new()
        self.emit(f"""
            {k} = {a}
            for _ in range(int(jnp.sum(jnp.abs({a}))) % 3):
                {k} = jnp.tanh({k}) * 0.9""")

    def _numpy(self):  # a third-party (NumPy) computation on a value
        a, b = self.var(), self.var()
        self.emit(f"{self.new()} = {a} + float(np.asarray({b}).std())")

    def _escape(self):  # an exception leaves the step
        at = self.draw(st.integers(1, STEPS - 1))
        self.emit(f"""
            if i == {at} and float(jnp.sum({self.var()})) > -100.0:
                raise RuntimeError(f"step {{i}} failed")""")


@st.composite
def programs(draw) -> Program:
    w = _Writer(draw)
    for _ in range(draw(st.integers(1, 8))):
        w.statement()
    last = f"v{w.n - 1}"
    body = "\n".join(w.lines)
    source = (
        "def step(w, x, i, lr, hist):\n"
        "    v0 = w\n"
        "    v1 = jnp.mean(x, axis=0)\n"
        + textwrap.indent(body, "    ") + "\n"
        f"    return w - 0.1 * jnp.tanh({last}), jnp.sum({last})\n")
    shapes = draw(st.sampled_from([(8,) * STEPS, (8, 8, 8, 6, 6, 6), (8, 6) * (STEPS // 2)]))
    lrs = draw(st.sampled_from([(0.1,) * STEPS, (0.1, 0.1, 0.1, 0.05, 0.05, 0.05),
                                tuple(0.1 / (k + 1) for k in range(STEPS))]))
    return Program(source, shapes, lrs, draw(st.integers(0, 3)))


def make_driver(prog: Program):
    """`program(wrap)` for harness.differential: fresh state, the loop, its outputs."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    namespace = {"jax": jax, "jnp": jnp, "np": np}
    exec(compile(prog.source, "<fuzzed step>", "exec"), namespace)

    def program(wrap):
        step = wrap(namespace["step"])
        rng = np.random.RandomState(prog.seed)
        w = jnp.linspace(-1.0, 1.0, WIDTH, dtype=jnp.float32)
        hist: list = []
        outs = []
        for i in range(STEPS):
            x = rng.normal(size=(prog.shapes[i], WIDTH)).astype(np.float32)
            try:
                w, out = step(w, x, i, prog.lrs[i], hist)
                outs.append(out)
            except RuntimeError as err:  # escaped the step: the loop goes on
                outs.append(f"raised: {err}")
        return (w, outs), list(hist)

    return program


@dataclasses.dataclass
class Tally:
    programs: int = 0
    steps_coexecuted: int = 0
    steps: int = 0
    programs_coexecuted: int = 0


TALLY = Tally()


def check(prog: Program) -> None:
    """Eager vs terra on one program; raises AssertionError (with the source) on a mismatch."""
    import harness

    try:
        res = harness.differential(make_driver(prog), steps=None, min_coexecuted=0)
    except AssertionError as err:
        raise AssertionError(f"{err}\n--- program ---\n{prog.describe()}") from None
    s = res.stats
    TALLY.programs += 1
    TALLY.steps += s.steps
    TALLY.steps_coexecuted += s.coexecuted
    TALLY.programs_coexecuted += s.coexecuted > 0


def main() -> int:
    from hypothesis import HealthCheck, given, settings

    parser = argparse.ArgumentParser(description="the long fuzzing profile")
    parser.add_argument("--programs", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=None)
    ns = parser.parse_args()
    os.environ.setdefault("TERRA_STRICT", "1")
    os.environ.setdefault("TERRA_SYNC_COMPILE", "1")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import warnings

    warnings.simplefilter("ignore")  # retrace-limit warnings are expected on shape-churning programs

    @settings(max_examples=ns.programs, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(programs())
    def fuzz(prog):
        with contextlib.redirect_stdout(io.StringIO()):  # the harness reports each run
            check(prog)

    start = time.perf_counter()
    failure = None
    try:
        fuzz()
    except AssertionError as err:
        failure = err
    print(f"fuzz: {TALLY.programs} programs tried, {1 if failure else 0} mismatches, "
          f"{TALLY.programs_coexecuted} co-executed, {TALLY.steps_coexecuted}/{TALLY.steps} "
          f"steps co-executed, {time.perf_counter() - start:.0f} s")
    if failure:
        print(f"minimal failing program:\n{failure}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
