"""Differential fuzzer: random imperative step functions, eager vs terra.

A generated program is Python source for a step function `step(w, x, i, lr, hist, ctx)`
plus a driver schedule. The step mixes jnp ops, `jax.grad` / `value_and_grad`,
nested `jax.jit`, Python branches on fetched values, NumPy on values, Python
numbers that change between steps (live feeds), prints, list appends (kept
across steps and read back later: placeholders of earlier steps), exceptions
raised and caught inside the step, exceptions escaping it, loops whose trip
count depends on a value, and batch shapes that change between steps; and
int/bool/float16/bfloat16 intermediates, indexing and `.at[]` updates, lax
loops (fori/scan/while), a PRNG key carried across steps (`ctx["key"]`),
vmap/jacrev/hessian/checkpoint, a NumPy feed buffer the driver reuses and
mutates (`ctx["buf"]`), a value kept in `ctx` for the next step, `np.array`
copies mutated in place, and JAX's debugging flags (debug_nans/debug_infs with
the FloatingPointError caught, disable_jit).

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


# Statements defining K from A and B (float32 vectors of WIDTH).
DTYPES = ["K = (A.astype(jnp.bfloat16) * B.astype(jnp.bfloat16) + 1).astype(jnp.float32)",
          "K = (A.astype(jnp.float16) @ B.astype(jnp.float16)) * A",
          "K = A + (jnp.round(B * 3).astype(jnp.int32) % 3).astype(jnp.float32)",
          "K = jnp.where((A > 0) & (B < 0.5), A, -B)",
          "K = A * jnp.sum(A > B) - jnp.argmax(B).astype(jnp.float32)",
          "K = A + jnp.cumsum((B > 0).astype(jnp.int32)) * 0.5"]
AT = [f"K = A.at[i % {WIDTH}].set(B[0])", "K = A.at[1:3].add(B[:2])",
      "K = A.at[jnp.argmin(B)].multiply(0.5)", "K = A[jnp.array([3, 0, 1, 2])] + B[-1]",
      f"K = A.at[::2].set(0.0) + B[i % {WIDTH}]", "K = jnp.where(A > 0, A, B)[::-1]"]
LAX_LOOPS = ["K = jax.lax.fori_loop(0, 3, lambda j, c: c * 0.9 + B * 0.1, A)",
             "K = jax.lax.scan(lambda c, t: (c + t, c * t), 0.0, A)[1] + B",
             "K = jax.lax.while_loop(lambda c: c[0] < 3, lambda c: (c[0] + 1, jnp.tanh(c[1] + B)),"
             " (0, A))[1]",
             "K = jax.lax.cond(A[0] > 0, lambda: A * 2.0, lambda: B - 1.0)"]
TRANSFORMS = ["K = jax.vmap(lambda a, b: a * b + jnp.sin(a))(A, B)",
              "K = jax.jacrev(lambda z: jnp.tanh(z) * B)(A).sum(axis=0)",
              "K = jax.hessian(lambda z: jnp.sum(jnp.sin(z) * B))(A).diagonal()",
              "K = jax.checkpoint(lambda z: jnp.sin(z) * B)(A)",
              "K = jax.grad(jax.checkpoint(lambda z: jnp.sum(jnp.cos(z) * B)))(A)"]


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

    def statement(self, kinds: list) -> None:
        getattr(self, "_" + self.draw(st.sampled_from(kinds)))()

    def _pick(self, templates: list) -> str:
        """A template with A and B filled, the new variable's name last (operands exist)."""
        a, b = self.var(), self.var()
        return fill(self.draw(st.sampled_from(templates)), a, b).replace("K", self.new())

    def _dtype(self):  # low-precision, integer and boolean intermediates
        self.emit(self._pick(DTYPES))

    def _at(self):  # indexing and functional updates
        self.emit(self._pick(AT))

    def _lax_loop(self):
        self.emit(self._pick(LAX_LOOPS))

    def _prng(self):  # a key split every step: the next step gets this step's key
        a = self.var()
        k = self.new()
        dist = self.draw(st.sampled_from(
            [f"jax.random.normal(sub, ({WIDTH},))", f"jax.random.uniform(sub, ({WIDTH},))",
             f"jax.random.bernoulli(sub, 0.5, ({WIDTH},)).astype(jnp.float32)"]))
        self.emit(f"""
            ctx["key"], sub = jax.random.split(ctx["key"])
            {k} = {a} + 0.1 * {dist}""")

    def _transform(self):
        self.emit(self._pick(TRANSFORMS))

    def _buffer(self):  # the driver's numpy buffer, mutated here and fed
        a, b = self.var(), self.var()
        self.emit(f"""
            ctx["buf"][i % {WIDTH}] += float({a}[0])
            {self.new()} = {b} + 0.1 * jnp.asarray(ctx["buf"])""")

    def _kept(self):  # a placeholder kept for the next step
        a = self.var()
        k = self.new()
        self.emit(f"""
            {k} = {a} * 0.5 + ctx.get("kept", {a}) * 0.5
            ctx["kept"] = {k}""")

    def _copy(self):  # np.array copies: writable, independent of the array
        a, b = self.var(), self.var()
        self.emit(f"""
            q = np.array({a})
            q[i % {WIDTH}] += 1.0
            {self.new()} = {b} + jnp.asarray(q) * 0.25""")

    def _debug(self):
        a, b = self.var(), self.var()
        k = self.new()
        flag = self.draw(st.sampled_from(["debug_nans", "debug_infs"]))
        op = "jnp.log" if flag == "debug_nans" else "1.0 / "
        self.emit(self.draw(st.sampled_from([f"""
            try:
                with jax.{flag}(True):
                    {k} = jnp.tanh({op}({a} - {b}.mean()))
            except FloatingPointError as err:
                print("caught", err)
                {k} = {b}""", f"""
            with jax.disable_jit():
                {k} = jax.jit(lambda p, q: p * q - 0.5)({a}, {b})"""])))

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


# Statement kinds: the first fuzzer's, and the feature classes of issue 19.
CLASSIC = ["op", "op", "op", "feed", "index", "grad", "value_and_grad", "jit", "branch", "print",
           "append", "history", "catch", "loop", "numpy", "escape"]
STATEMENTS = CLASSIC + ["dtype", "at", "lax_loop", "prng", "transform", "buffer", "kept", "copy",
                        "debug"]


@st.composite
def programs(draw, kinds: list = CLASSIC) -> Program:
    w = _Writer(draw)
    for _ in range(draw(st.integers(1, 8))):
        w.statement(kinds)
    last = f"v{w.n - 1}"
    body = "\n".join(w.lines)
    source = (
        "def step(w, x, i, lr, hist, ctx):\n"
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
        ctx = {"key": jax.random.key(prog.seed), "buf": np.zeros(WIDTH, np.float32)}
        outs = []
        for i in range(STEPS):
            x = rng.normal(size=(prog.shapes[i], WIDTH)).astype(np.float32)
            ctx["buf"] *= 0.5  # the driver reuses and mutates the buffer it feeds
            try:
                w, out = step(w, x, i, prog.lrs[i], hist, ctx)
                outs.append(out)
            except RuntimeError as err:  # escaped the step: the loop goes on
                outs.append(f"raised: {err}")
        return (w, outs), (list(hist), ctx)

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


def _figures(start: float) -> str:
    t = TALLY
    return (f"{t.programs} programs passed, {t.programs_coexecuted} co-executed, "
            f"{t.steps_coexecuted}/{t.steps} steps co-executed, {time.perf_counter() - start:.0f} s")


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
    @given(programs(STATEMENTS))
    def fuzz(prog):
        with contextlib.redirect_stdout(io.StringIO()):  # the harness reports each run
            check(prog)
        if TALLY.programs % 100 == 0:  # a long run's figures so far
            print(f"fuzz: {_figures(start)}", file=sys.stderr, flush=True)

    start = time.perf_counter()
    failure = None
    try:
        fuzz()
    except AssertionError as err:
        failure = err
    print(f"fuzz: {_figures(start)}, {1 if failure else 0} mismatches")
    if failure:
        print(f"minimal failing program:\n{failure}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
