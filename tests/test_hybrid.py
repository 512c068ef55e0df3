"""The hybridization report: would whole-step jax.jit give eager's results, and why not.

Checked against reality: on suite programs its verdict must be what
`terra bench`'s comparison observes for jax.jit (benchmarks/hybrid_check.py
runs the whole suite); on small programs, each reason is named at its line.
"""
from __future__ import annotations

import os
import random
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

import terra
from terra import telemetry
from terra.telemetry import events, hybrid

import harness

HERE = os.path.abspath(__file__)
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import hybrid_check  # noqa: E402


def _line_of(text: str) -> str:
    return harness.source_line(HERE, text)


@pytest.fixture(autouse=True)
def events_on():
    telemetry.disable()
    telemetry.enable()
    yield
    telemetry.disable()
    assert events.recorder is None


@pytest.mark.parametrize("program", ["mlp", "dropblock"])  # jit matches / fails
def test_verdict_agrees_with_terra_bench(program):
    telemetry.disable()  # hybrid_check switches events on for terra's run only
    c = hybrid_check.check(program, steps=4)
    assert c.agrees, c
    assert c.bench == {"mlp": hybrid.MATCHES, "dropblock": hybrid.FAILS}[program], c


W = jnp.ones((4, 4)) * 0.1
chooser = random.Random(0)


def host_step(w, x):
    y = jnp.tanh(x @ w)
    scale = np.abs(np.asarray(y)).max()          # numpy on a tensor
    return w - 0.01 * y.T @ x / scale, jnp.mean(y)


def print_step(w, x):
    y = jnp.tanh(x @ w)
    print("mean", jnp.mean(y))                   # a print of a tensor
    return w - 0.01 * y.T @ x


def choice_step(w, x):
    if chooser.random() < 0.5:                   # a Python random choice
        x = x * 2.0
    else:
        x = jnp.flip(x, axis=0)
    return w - 0.01 * jnp.tanh(x @ w).T @ x


def _explain(fn, steps=6) -> str:
    step = terra.function(fn)
    w, x = W, jnp.arange(16.0).reshape(4, 4) / 16
    for _ in range(steps):
        out = step(w, x)
        w = out[0] if isinstance(out, tuple) else out
    return terra.explain(step, jit=True)


def test_numpy_on_a_tensor_fails_jit_at_its_line(capsys):
    text = _explain(host_step)
    assert "whole-step jax.jit: no: jax.jit of the whole step fails (checked" in text, text
    where = _line_of("scale = np.abs(np.asarray(y)).max()")
    assert f"- [{hybrid.THIRD_PARTY}] {where}" in text, text
    assert "write it with jax.numpy" in text
    assert "jax.jit does not run" in text


def test_print_in_the_step_runs_but_differs(capsys):
    text = _explain(print_step)
    assert "runs but gives different results (checked" in text, text
    where = _line_of('print("mean", jnp.mean(y))')
    assert f"- [{hybrid.SIDE_EFFECT}] {where}" in text and "jax.debug.print" in text, text
    assert "printed 1 lines in 4 calls where eager printed 4" in text, text


def test_python_random_choice_runs_but_differs(capsys):
    text = _explain(choice_step, steps=10)
    assert "runs but gives different results (checked" in text, text
    assert "without reading a tensor" in text and "jax.lax.switch" in text, text
    lines = (_line_of("x = x * 2.0"), _line_of("x = jnp.flip(x, axis=0)"))
    assert any(f"[{hybrid.SIDE_EFFECT}] {where}" in text for where in lines), text


def test_stageable_step_matches_and_is_timed(capsys):
    def plain_step(w, x):
        return w - 0.01 * jnp.tanh(x @ w).T @ x

    text = _explain(plain_step)
    assert "whole-step jax.jit: yes: jax.jit of the whole step gives the same results" in text
    speed = next(line for line in text.splitlines() if "speed:" in line)
    assert "eager" in speed and "jax.jit" in speed, speed


def test_explain_subcommand(tmp_path):
    script = tmp_path / "prog.py"
    script.write_text(
        "import numpy as np, jax.numpy as jnp\n"
        "def train_step(w, lr):\n"
        "    g = jnp.tanh(w)\n"
        "    return w - lr * g, float(np.mean(np.asarray(g)))\n"
        "w = jnp.ones(8)\n"
        "for i in range(6):\n"
        "    w, m = train_step(w, 0.1)\n"
        "print('done', round(m, 3))\n")
    env = {**os.environ, "PYTHONPATH": ROOT}
    out = subprocess.run([sys.executable, "-m", "terra", "explain", str(script), "--step",
                          "train_step"], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("done")
    assert "terra explain: train_step" in out.stderr
    assert "whole-step jax.jit: no: jax.jit of the whole step fails" in out.stderr
    assert f"[{hybrid.THIRD_PARTY}] {script}:4" in out.stderr, out.stderr
