"""Reliability: faults injected at every point of a step, failing segments and
compiles, clean exit, two threads, and bounded resources over a long run.

After each fault the exception reaches the user as eager raises it (or Terra
falls back and warns), the next steps give eager's results, nothing deadlocks.
"""
from __future__ import annotations

import functools
import os
import subprocess
import sys
import textwrap
import threading
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import harness
import terra
from terra import generate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 8


class Injected(Exception):
    pass


def _fault_program(point: str, at: int):
    """A small training loop whose step raises `Injected` at `point` in step `at`."""

    def program(wrap):
        @functools.partial(jax.jit, static_argnums=2)
        def inner(a, b, faulty):  # `faulty` is static: True retraces, running this Python
            if faulty and point == "nested_jit_python":
                raise Injected(f"in jit python at step {FAULT['step']}")
            return a * b + 1.0

        def loss_fn(w, x):
            if FAULT["now"] and point == "inside_grad":
                raise Injected(f"inside grad at step {FAULT['step']}")
            return jnp.sum(jnp.tanh(x @ w) ** 2)

        def step(w, x):
            if FAULT["now"] and point == "step_start":
                raise Injected("at the start")
            loss, g = jax.value_and_grad(loss_fn)(w, x)
            if FAULT["now"] and point == "before_fetch":
                raise Injected("before the fetch")
            if loss > 1.0:                          # a fetch (sync point)
                g = g * 0.5
            if FAULT["now"] and point == "after_fetch":
                raise Injected(f"after the fetch, loss {float(loss):.4f}")
            w = inner(w, 1.0 - 0.1 * g, FAULT["now"]) - 1.0
            if FAULT["now"] and point == "before_return":
                raise Injected("before return")
            return w, loss

        FAULT = {"now": False, "step": 0}
        step = wrap(step)
        w = jnp.linspace(-0.5, 0.5, 12).reshape(4, 3)
        rng = np.random.RandomState(0)
        outcomes = []
        for i in range(STEPS):
            FAULT["now"], FAULT["step"] = i == at, i
            x = jnp.asarray(rng.normal(size=(5, 4)).astype(np.float32))
            try:
                w, loss = step(w, x)
                outcomes.append(loss)
            except Injected as err:
                outcomes.append(f"Injected: {err}")
        return w, outcomes  # results, side effects

    return program


POINTS = ["step_start", "inside_grad", "before_fetch", "after_fetch", "nested_jit_python",
          "before_return"]


@pytest.mark.parametrize("point", POINTS)
@pytest.mark.parametrize("phase,at", [("tracing", 0), ("coexec", 4)])
def test_exception_at_every_point_of_a_step(point, phase, at):
    res = harness.differential(_fault_program(point, at), steps=None, min_coexecuted=STEPS // 2)
    # The user saw the exception (as eager did), and Terra co-executed after it.
    assert any(isinstance(o, str) and o.startswith("Injected") for o in res.terra.side_effects)
    assert res.stats.coexecuted >= STEPS - at - 3  # two steps to learn, one to fail


def _run_with_failing_segment(strict: bool):
    """Co-execute until a graph is in use, then make its first segment fail once."""
    def step(w, x):
        return w - 0.1 * jnp.tanh(w * x), jnp.sum(w * x)

    fn = terra.function(step, strict=strict)
    w_t = w_e = jnp.ones(6)
    for i in range(3):
        x = jnp.arange(6.0) + i
        w_t, _ = fn(w_t, x)
        w_e, _ = step(w_e, x)
    assert fn._program is not None
    seg = fn._program.segments[0]
    real, calls = seg.executable, []

    def failing(*args):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected segment failure")
        return real(*args)

    seg.executable = failing
    return fn, step, w_t, w_e


def continue_after_failing_segment(fn, step, w_t, w_e) -> list[str]:
    """Steps 3-7 under terra and eagerly, compared; returns Terra's warnings."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(3, 8):
            x = jnp.arange(6.0) + i
            w_t, s_t = fn(w_t, x)
            w_e, s_e = step(w_e, x)
            np.testing.assert_allclose(s_t, s_e, rtol=1e-5)
    np.testing.assert_allclose(w_t, w_e, rtol=1e-5)
    return [str(w.message) for w in caught if issubclass(w.category, terra.TerraWarning)]


def test_failing_segment_falls_back_and_warns():
    fn, step, w_t, w_e = _run_with_failing_segment(strict=False)
    msgs = continue_after_failing_segment(fn, step, w_t, w_e)
    assert len(msgs) == 1 and "injected segment failure" in msgs[0]
    assert fn.stats().internal_errors == 1 and fn.stats().coexecuted >= 4


def test_failing_segment_in_strict_mode_raises_then_recovers():
    fn, step, w_t, w_e = _run_with_failing_segment(strict=True)
    x = jnp.arange(6.0) + 3
    with pytest.raises(terra.TerraInternalError, match="injected segment failure"):
        fn(w_t, x)
    for i in range(3, 7):  # the caller's state is intact: go on from w_t
        x = jnp.arange(6.0) + i
        w_t, _ = fn(w_t, x)
        w_e, _ = step(w_e, x)
    np.testing.assert_allclose(w_t, w_e, rtol=1e-5)
    assert fn.stats().coexecuted >= 4


def test_failing_compile_stays_eager_with_one_warning(monkeypatch):
    def broken(seg, executor):
        raise RuntimeError("injected compile failure")

    monkeypatch.setattr(generate, "compile_segment", broken)
    res = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn = terra.function(lambda w: (w * 0.5 + 1.0, jnp.sum(w)), strict=False)
        w = jnp.ones(3)
        for _ in range(5):
            w, res = fn(w)
    expected = jnp.ones(3)
    for _ in range(4):
        expected = expected * 0.5 + 1.0
    np.testing.assert_allclose(res, jnp.sum(expected), rtol=1e-6)
    msgs = [str(w.message) for w in caught if issubclass(w.category, terra.TerraWarning)]
    assert len(msgs) == 1 and "injected compile failure" in msgs[0]


def test_process_exits_cleanly_with_no_thread_left():
    """After faults, telemetry and a Ctrl-C, the interpreter exits promptly and no
    Terra thread is alive when the last exit handler runs."""
    script = textwrap.dedent("""
        import atexit, threading
        def check():  # registered first: runs after Terra's own exit handlers
            alive = [t.name for t in threading.enumerate()
                     if t is not threading.main_thread() and t.is_alive()]
            print("threads at exit:", sorted(alive))
        atexit.register(check)
        import _thread, jax.numpy as jnp, terra
        terra.telemetry.enable(stream="127.0.0.1:0")

        @terra.function
        def step(w, i):
            if i == 3:
                raise ValueError("boom")
            return w * 0.9 + 1.0

        w = jnp.ones(4)
        for i in range(8):
            try:
                w = step(w, i)
            except ValueError:
                pass
        print("w", [round(float(v), 4) for v in w])
    """)
    env = {**os.environ, "PYTHONPATH": ROOT, "TERRA_STRICT": "1", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert "threads at exit: []" in out.stdout, out.stdout
    expected = np.ones(4)
    for i in range(8):
        if i != 3:
            expected = expected * 0.9 + 1.0
    assert f"w {[round(float(v), 4) for v in expected]}" in out.stdout


def test_two_threads_calling_one_step_function():
    """Concurrent calls either co-execute or run eagerly; every result equals eager's."""
    def step(w, x):
        return w - 0.05 * jnp.tanh(w * x), jnp.sum(w)

    fn = terra.function(step)
    results: dict = {}
    errors: list = []

    def worker(k: int):
        try:
            w_t = w_e = jnp.ones(5) * (k + 1)
            for i in range(60):
                x = jnp.arange(5.0) + i
                w_t, _ = fn(w_t, x)
                w_e, _ = step(w_e, x)
            results[k] = (w_t, w_e)
        except BaseException as err:  # reported below
            errors.append(err)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", terra.TerraWarning)
        threads = [threading.Thread(target=worker, args=(k,)) for k in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    assert not errors and len(results) == 2
    for w_t, w_e in results.values():
        np.testing.assert_allclose(w_t, w_e, rtol=1e-5)
    s = fn.stats()
    assert s.steps == 120 and s.coexecuted + s.traced + s.eager == 120
    assert s.coexecuted > 0 and s.internal_errors == 0


def test_long_run_with_changing_paths_stays_bounded():
    """Shapes that repeat (50 of them) are learned as 50 paths of one graph; shapes
    that never repeat hit the path limit: one warning, the graph is freed, and the
    function stays eager. Results are eager's throughout."""
    def step(w, n):
        v = jnp.full((n + 1,), 0.5)  # the shape, so the path, is decided by n
        return w * 0.99 + jnp.mean(v)

    repeating = terra.function(step)
    never = terra.function(step, max_paths=32)
    w_r = w_n = w_e = jnp.linspace(-1, 1, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(1000):
            w_r = repeating(w_r, i % 50)
            w_e = step(w_e, i % 50)
            if i < 100:  # (each new shape costs an XLA compile in eager too)
                w_n = never(w_n, i)
    np.testing.assert_allclose(w_r, w_e, rtol=1e-5)
    r, n = repeating.stats(), never.stats()
    # Two graphs: the first step's, then all 50 paths once no step added one.
    assert r.paths == 50 and r.compiles == 2 and r.coexecuted > 900 and not r.gave_up
    # Only the live program's executables are held: one segment per path plus
    # the prefix the 50 paths share.
    live = {seg.signature for seg in repeating._program.segments}
    assert set(repeating._executables) == live and len(live) <= 51
    msgs = [str(w.message) for w in caught if issubclass(w.category, terra.TerraWarning)]
    assert len(msgs) == 1 and "max_paths=32" in msgs[0]
    assert n.gave_up and n.eager >= 100 - 33 and never._graph.num_nodes == 0
