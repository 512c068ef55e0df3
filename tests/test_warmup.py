"""Warm-up: a step function co-executes from its first steps.

The first graph compiles right after the first step, and until one step has
co-executed to its end the next step waits for it (bounded, TERRA_WARMUP_WAIT);
a Python number that changes now and then costs the step that saw it change;
a step function that never co-executed says so once at exit.
"""
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax

import terra
from harness import differential

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _mlp_params(key=0):
    k1, k2 = jax.random.split(jax.random.PRNGKey(key))
    return {"w1": jax.random.normal(k1, (8, 16)) * 0.3, "b1": jnp.zeros(16),
            "w2": jax.random.normal(k2, (16, 1)) * 0.3}


def _mse(p, x, y):
    h = jnp.tanh(x @ p["w1"] + p["b1"])
    return jnp.mean((h @ p["w2"] - y) ** 2)


def _data(steps, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.normal(size=(16, 8)).astype(np.float32),
             rng.normal(size=(16, 1)).astype(np.float32)) for _ in range(steps)]


def test_second_step_coexecutes_with_background_compile(monkeypatch):
    """Production settings (graphs compile in the background): step 1 is recorded,
    step 2 waits for its graph and co-executes, and so does every later step."""
    monkeypatch.delenv("TERRA_WARMUP_WAIT", raising=False)
    opt = optax.adam(1e-2)

    def program(wrap, steps):
        params = _mlp_params()
        opt_state = opt.init(params)

        @wrap
        def step(params, opt_state, x, y):
            loss, grads = jax.value_and_grad(_mse)(params, x, y)
            updates, opt_state = opt.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        losses = []
        for x, y in _data(steps):
            params, opt_state, loss = step(params, opt_state, x, y)
            losses.append(float(loss))
        return params, losses

    res = differential(program, steps=8, sync_compile=False)
    stats = res.stats
    assert stats.traced == 1 and stats.coexecuted == 7 and stats.fallbacks == 0, res.describe()
    assert stats.compiles == 1, res.describe()


def test_plateau_schedule_costs_one_fallback_per_change(monkeypatch):
    """A plateau rule halves a Python learning-rate factor three times, applied per
    parameter leaf with jax.tree.map: each change costs at most the step that saw it
    (the graph in use takes the new value), never a fallback per leaf or per step
    while a graph compiles."""
    monkeypatch.delenv("TERRA_WARMUP_WAIT", raising=False)
    opt = optax.sgd(1.0)

    def program(wrap, steps):
        params = _mlp_params()
        opt_state = opt.init(params)

        @wrap
        def step(params, opt_state, x, y, factor):
            loss, grads = jax.value_and_grad(_mse)(params, x, y)
            grads = jax.tree.map(lambda g: g * factor, grads)
            updates, opt_state = opt.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        factor, losses = 0.2, []
        for i, (x, y) in enumerate(_data(steps)):
            if i in (10, 20, 30):            # the plateau rule fired
                factor /= 2
            params, opt_state, loss = step(params, opt_state, x, y, factor)
            losses.append(float(loss))
        return params, losses

    res = differential(program, steps=40, sync_compile=False)
    stats = res.stats
    assert stats.fallbacks <= 3 and stats.compiles <= 2, res.describe()
    assert stats.coexecuted >= 40 - 1 - 3, res.describe()  # (fallbacks are not co-executed)


def test_cache_false_writes_nothing(monkeypatch, tmp_path):
    monkeypatch.setenv("TERRA_CACHE", "1")
    monkeypatch.setenv("TERRA_CACHE_DIR", str(tmp_path))

    @terra.function(cache=False)
    def step(w, x):
        return w - 0.1 * jnp.mean(jnp.sin(w * x))

    w = jnp.ones(4)
    for i in range(4):
        w = step(w, jnp.arange(4.0) + i)
    assert step.stats().coexecuted == 3
    assert not any(tmp_path.iterdir())


def _run_script(source: str, **env) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", TERRA_CACHE="0", **env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(source)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=240)


def test_step_function_that_never_coexecuted_says_so_once_at_exit():
    proc = _run_script("""
        import jax.numpy as jnp, terra

        @terra.function
        def step(n):
            return jnp.sum(jnp.ones(n))      # a new shape, a new path, every step

        @terra.function
        def fine(w):
            return w * 0.5

        w = jnp.ones(3)
        for n in range(1, 6):
            step(n)
            w = fine(w)
        print("done")
    """, TERRA_SYNC_COMPILE="1")
    assert proc.returncode == 0 and proc.stdout.strip() == "done", proc.stderr
    notes = [line for line in proc.stderr.splitlines() if "never co-executed" in line]
    assert len(notes) == 1, proc.stderr
    assert "'step' ran 5 step(s)" in notes[0] and "diverged" in notes[0], notes
    assert "TERRA_EXPLAIN=1" in notes[0], notes
