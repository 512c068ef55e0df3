"""Co-execution mechanics: autodiff elision semantics, divergence and fallback,
predicted feeds, the internal-failure policy, the retrace bound, background
compilation, run-ahead and interruptible fetches.

Each test compares against eager execution and asserts what Terra did (stats),
so a silent fall-back to eager cannot pass.
"""
from __future__ import annotations

import _thread
import functools
import json
import threading
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import terra
from harness import differential
from terra import autodiff, coexec, generate


def linear_data(seed=0, n=16, d=4):
    rng = np.random.RandomState(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = (x @ rng.normal(size=(d,)).astype(np.float32)).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(y)


def train_from_zeros(step, steps, log=float):
    """The loop of the `step(w) -> (w, loss)` programs: w from zeros, `log(loss)` kept per step."""
    w = jnp.zeros(4)
    losses = []
    for _ in range(steps):
        w, loss = step(w)
        losses.append(log(loss))
    return w, losses


# -- autodiff elision keeps eager's semantics inside the differentiated function --

def test_inside_grad_values_behave_like_eager_grad_tracers():
    """print/bool/int work on a value being differentiated; float() raises, as in eager."""

    def program(wrap, steps):
        x, y = linear_data()

        @wrap
        def step(w):
            def loss_fn(w):
                pred = x @ w
                err = jnp.mean((pred - y) ** 2)
                print("inside", err)                 # eager prints a GradTracer
                if err > 1.0:                         # bool() sees the primal value
                    err = err * 1.0
                n = int(jnp.sum(w > 0))               # int() too
                try:
                    float(err)                        # float() raises in eager
                except Exception as e:
                    print("float raised", type(e).__name__)
                return err + 0.0 * n

            loss, g = jax.value_and_grad(loss_fn)(w)
            return w - 0.05 * g, loss

        return train_from_zeros(step, steps)

    differential(program, steps=8)


def test_custom_jvp_rule_kept_by_elision():
    """relu's custom JVP gives gradient 0 at exactly 0; the replayed graph must too."""

    def program(wrap, steps):
        @wrap
        def step(w):
            z = jnp.zeros(3)
            g = jax.grad(lambda w: jnp.sum(jax.nn.relu(w * z)) + jnp.sum(jax.nn.relu(w)))(w)
            return w - 0.1 * g, g

        w = jnp.array([1.0, -1.0, 0.0])
        grads = []
        for _ in range(steps):
            w, g = step(w)
            grads.append(g)
        return w, grads

    res = differential(program, steps=8)
    # The gradient at exactly 0 is relu's custom rule (0), not max's tie rule (0.5).
    np.testing.assert_allclose(np.asarray(res.terra.side_effects[-1]), [1.0, 0.0, 0.0])


def test_grad_of_non_scalar_raises_like_eager():
    def program(wrap, steps):
        @wrap
        def step(w):
            try:
                jax.grad(lambda w: w * 2.0)(w)
            except TypeError as e:
                print("TypeError:", e)
            return w + 1.0

        w = jnp.ones(2)
        for _ in range(steps):
            w = step(w)
        return w, None

    differential(program, steps=6)


def test_grad_of_a_value_computed_before_the_function_is_zero():
    """The differentiated function returns a value of the step computed before it."""
    def program(wrap, steps):
        @wrap
        def step(w):
            c = jnp.sum(w * 2.0)
            g = jax.grad(lambda v: c)(w)        # does not depend on v: zeros
            return w - 0.1 * (g + 1.0), c

        w, cs = jnp.ones(3), []
        for _ in range(steps):
            w, c = step(w)
            cs.append(c)
        return w, cs

    differential(program, steps=6)


# -- divergence, fallback, new paths ----------------------------------------------

def test_new_branch_diverges_falls_back_and_is_learned():
    def program(wrap, steps):
        x, y = linear_data()
        opt = optax.sgd(0.05)

        @wrap
        def step(w, state, i):
            loss, g = jax.value_and_grad(lambda w: jnp.mean((x @ w - y) ** 2))(w)
            if i >= 6:                      # a path never seen while tracing
                g = jax.tree.map(lambda t: jnp.clip(t, -0.1, 0.1), g)
            updates, state = opt.update(g, state)
            return optax.apply_updates(w, updates), state, loss

        w = jnp.zeros(4)
        state = opt.init(w)
        losses = []
        for i in range(steps):
            w, state, loss = step(w, state, i)
            losses.append(loss)
        return w, losses

    res = differential(program, steps=16, min_coexecuted=10)
    stats = res.terra.wrap.functions[0].stats()
    assert stats.divergences >= 1 and stats.fallbacks >= 1
    assert "test_coexec.py" in stats.last_divergence   # points at the user's line
    assert stats.compiles == 2, stats          # the new path was compiled once
    assert stats.paths == 2, stats


def test_new_path_compiles_only_its_own_segments():
    """Learning a new path regenerates the graph, but the segments of the paths
    it already had are the same computations: their executables are reused."""
    def program(wrap, steps):
        rng = np.random.RandomState(0)

        @wrap
        def step(w, x):
            loss, g = jax.value_and_grad(lambda w: jnp.mean(jnp.tanh(x @ w) ** 2))(w)
            return w - 0.1 * g, loss

        w, losses = jnp.ones((4, 3)), []
        for i in range(steps):
            n = (4, 8, 12)[min(i // 4, 2)]        # a new batch size (path) every 4 steps
            w, loss = step(w, rng.normal(size=(n, 4)).astype(np.float32))
            losses.append(loss)
            wrap.note("stats", wrap.stats())
        return w, losses

    res = differential(program, steps=12, min_coexecuted=6)
    compiled_by = {}                        # compile count -> segments compiled so far
    for h in res.history:
        if h["compiles"]:
            compiled_by[h["compiles"]] = h["segments_compiled"]
    assert sorted(compiled_by) == [1, 2, 3] and res.stats.paths == 3, res.describe()
    first = compiled_by[1]
    # The step's first op (copying w to differentiate it) does not depend on x: it
    # is a segment of its own, shared by all paths; each path adds one segment.
    assert first == 2, res.describe()
    assert compiled_by[2] - compiled_by[1] == 1 and compiled_by[3] - compiled_by[2] == 1


def test_placeholder_kept_after_divergence_and_across_steps():
    """Intermediate values held by Python stay resolvable after a fallback."""

    def program(wrap, steps):
        kept = []

        @wrap
        def step(w, i):
            h = jnp.tanh(w * 3.0)           # an intermediate, not a step output
            kept.append(h)
            out = h.sum()
            if i == 7:
                out = out + jnp.cos(w).sum()   # new op: divergence after h exists
            return w * 0.9, out

        w = jnp.arange(4.0)
        outs = []
        for i in range(steps):
            w, o = step(w, i)
            outs.append(o)
        return (w, [np.asarray(h) for h in kept]), outs

    res = differential(program, steps=10, min_coexecuted=6)
    assert res.terra.wrap.functions[0].stats().divergences >= 1


def test_predicted_feed_that_changes_falls_back_once_then_is_live():
    def program(wrap, steps):
        @wrap
        def step(w, scale):
            return w * scale + 1.0

        w = jnp.ones(3)
        for i in range(steps):
            scale = 0.5 if i < 8 else 0.25      # constant while tracing, then changes
            w = step(w, scale)
        return w, None

    res = differential(program, steps=14, min_coexecuted=10)
    stats = res.terra.wrap.functions[0].stats()
    assert stats.fallbacks == 1, stats
    assert "a Python value passed to `multiply` (jit) (argument 2) changed" in stats.last_divergence
    assert stats.compiles <= 2, stats


# -- failure policy and bounds -------------------------------------------------------

def _step(w, x):
    return w - 0.1 * jnp.mean(w * x), jnp.sum(w)


def test_internal_failure_falls_back_with_one_warning(monkeypatch):
    def broken(seg, executor):
        raise RuntimeError("simulated compiler bug")

    monkeypatch.setattr(generate, "compile_segment", broken)
    step = terra.function(_step, strict=False)
    w_t = w_e = jnp.ones(3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(6):
            x = jnp.arange(3.0) + i
            w_t, s_t = step(w_t, x)
            w_e, s_e = _step(w_e, x)
    np.testing.assert_allclose(w_t, w_e, rtol=1e-6)
    terra_warnings = [w for w in caught if issubclass(w.category, terra.TerraWarning)]
    assert len(terra_warnings) == 1
    assert "simulated compiler bug" in str(terra_warnings[0].message)
    assert step.stats().eager >= 1 and step.stats().gave_up


def test_internal_failure_raises_in_strict_mode(monkeypatch):
    def broken(seg, executor):
        raise RuntimeError("simulated compiler bug")

    monkeypatch.setattr(generate, "compile_segment", broken)
    step = terra.function(_step, strict=True)
    w = jnp.ones(3)
    with pytest.raises(terra.TerraInternalError, match="simulated compiler bug"):
        for i in range(6):
            w, _ = step(w, jnp.arange(3.0))


def test_retrace_limit_stays_eager_and_warns_once():
    step = terra.function(lambda x: (x * 2.0).sum(), max_graphs=2)
    expected = []
    got = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for n in range(1, 25):                       # a new shape every other step
            x = jnp.ones(n // 2 + 1)
            got.append(float(step(x)))
            expected.append(float((x * 2.0).sum()))
    assert got == expected
    terra_warnings = [w for w in caught if issubclass(w.category, terra.TerraWarning)]
    assert len(terra_warnings) == 1
    assert "max_graphs=2" in str(terra_warnings[0].message)
    assert step.stats().eager > 0


# -- compilation in the background, run-ahead, interruptible fetches ------------------

def _hold_compiles(monkeypatch) -> threading.Event:
    """Background compiles wait (up to 30 s) until the returned event is set; steps run
    eagerly beside them (no warm-up wait)."""
    monkeypatch.setenv("TERRA_SYNC_COMPILE", "0")
    monkeypatch.setenv("TERRA_WARMUP_WAIT", "0")
    real_compile = generate.compile_segment
    release = threading.Event()

    def held_compile(seg, executor):
        release.wait(30)
        return real_compile(seg, executor)

    monkeypatch.setattr(generate, "compile_segment", held_compile)
    return release


def test_compilation_never_stalls_python(monkeypatch):
    release = _hold_compiles(monkeypatch)
    step = terra.function(_step)
    w = jnp.ones(3)
    for i in range(8):                       # compile is blocked: steps keep running eagerly
        w, _ = step(w, jnp.arange(3.0))
    assert step.stats().traced == 8 and step.stats().compiles == 1
    release.set()
    deadline = time.time() + 30
    while step.stats().coexecuted == 0 and time.time() < deadline:
        w, _ = step(w, jnp.arange(3.0))
        time.sleep(0.01)
    assert step.stats().coexecuted > 0


def test_wait_for_graph_covers_paths_learned_while_compiling(monkeypatch):
    """A path first taken while the first graph compiles is in the graph that
    `wait_for_graph` leaves in use: its next step co-executes, no fallback."""
    release = _hold_compiles(monkeypatch)

    def body(w, x):
        return w - 0.1 * jnp.mean(jnp.tanh(x @ w[:, None])) * w

    step = terra.function(body)
    w_t = w_e = jnp.ones(4)
    rng = np.random.RandomState(0)
    widths = [8, 8, 16]             # the graph of path 8 is compiling when path 16 is taken
    widths += [8, 16, 16, 8]        # ... then both co-execute
    for i, n in enumerate(widths):
        x = rng.normal(size=(n, 4)).astype(np.float32)
        w_t, w_e = step(w_t, x), body(w_e, x)
        if i == 2:
            release.set()
            assert step.wait_for_graph(30)
            assert step.stats().traced == 3 and step.stats().paths == 2
        np.testing.assert_allclose(np.asarray(w_t), np.asarray(w_e), rtol=1e-5,
                                   err_msg=f"step {i}")
    stats = step.stats()
    assert stats.coexecuted == 4 and stats.fallbacks == 0, stats
    assert stats.compiles == 2, stats


def test_new_path_falls_back_while_its_graph_compiles(monkeypatch):
    """The first graph compiles right after the first step. A path taken later runs
    eagerly while the graph that covers it compiles in the background; the path the
    graph in use covers keeps co-executing meanwhile."""
    monkeypatch.setenv("TERRA_SYNC_COMPILE", "0")
    real_compile = generate.compile_segment
    release = threading.Event()

    def wide_path_held(seg, executor):
        if any(getattr(a, "shape", None) == (16, 4) for a in seg.in_avals):
            release.wait(30)
        return real_compile(seg, executor)

    monkeypatch.setattr(generate, "compile_segment", wide_path_held)

    def body(w, x):
        return w - 0.1 * jnp.mean(jnp.tanh(x @ w[:, None])) * w

    step = terra.function(body)
    w_t = w_e = jnp.ones(4)
    rng = np.random.RandomState(0)

    def run(n):
        nonlocal w_t, w_e
        x = rng.normal(size=(n, 4)).astype(np.float32)
        w_t, w_e = step(w_t, x), body(w_e, x)
        np.testing.assert_allclose(np.asarray(w_t), np.asarray(w_e), rtol=1e-5)

    try:
        run(8)                                # recorded; its graph compiles now
        assert step.wait_for_graph(30)
        run(8)
        assert step.stats().coexecuted == 1 and step.stats().fallbacks == 0
        run(16)                               # a new path: falls back, and is learned
        run(8)                                # co-executes; the graph of both compiles
        run(16)                               # its segments still compiling: falls back
        stats = step.stats()
        assert stats.fallbacks == 2 and stats.compiles == 2 and stats.coexecuted == 2, stats
    finally:
        release.set()
    assert step.wait_for_graph(30)
    for n in (16, 8, 16):
        run(n)
    stats = step.stats()
    assert stats.coexecuted == 5 and stats.fallbacks == 2, stats


def test_graph_runs_ahead_of_python():
    """The segment is dispatched when its inputs exist: a fetch after slow Python does not wait."""
    a = jnp.asarray(np.random.RandomState(0).normal(size=(256, 256)).astype(np.float32) / 16)

    @terra.function
    def step(m):
        for _ in range(8):
            m = jnp.tanh(m @ a)
        time.sleep(0.3)          # Python busy (data loading, logging, ...)
        return m, float(m.sum())  # fetch

    m = a
    for _ in range(3):
        m, _ = step(m)
    waits_before = step.stats().fetch_waits
    m, _ = step(m)
    stats = step.stats()
    assert stats.coexecuted >= 1 and stats.segments_dispatched >= 1
    assert stats.fetch_waits == waits_before


def test_ctrl_c_interrupts_a_fetch_and_terra_recovers():
    big = jnp.ones((700, 700), jnp.float32) / 700

    @terra.function
    def step(m, n_slow):
        for _ in range(n_slow):
            m = jnp.sin(m @ big @ big @ big)
        return m, m.sum()

    m = big
    for _ in range(3):
        m, s = step(m, 40)
    float(s)
    timer = threading.Timer(0.05, _thread.interrupt_main)
    start = time.time()
    with pytest.raises(KeyboardInterrupt):
        timer.start()
        for _ in range(50):                   # ~seconds of graph work, interrupted
            m, s = step(m, 40)
            float(s)
    assert time.time() - start < 10
    assert step.stats().coexecuted >= 1
    m2, s2 = step(big, 40)                    # still consistent afterwards
    m3 = big
    for _ in range(40):
        m3 = jnp.sin(m3 @ big @ big @ big)
    np.testing.assert_allclose(np.asarray(m2), np.asarray(m3), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["vjp", "grad_of_grad", "argnums_tuple"])
def test_other_autodiff_entry_points(kind):
    def program(wrap, steps):
        x, y = linear_data()

        def loss(w, b):
            return jnp.mean((jnp.tanh(x @ w) + b - y) ** 2)

        @wrap
        def step(w, b):
            if kind == "vjp":
                value, pullback = jax.vjp(loss, w, b)
                gw, gb = pullback(jnp.ones_like(value))
            elif kind == "grad_of_grad":
                value = loss(w, b)
                gb = jax.grad(jax.grad(loss, argnums=1), argnums=1)(w, b) * 0.01
                gw = jax.grad(loss)(w, b)
            else:
                value, (gw, gb) = jax.value_and_grad(loss, argnums=(0, 1))(w, b)
            return w - 0.1 * gw, b - 0.1 * gb, value

        w, b = jnp.zeros(4), jnp.float32(0.0)
        losses = []
        for _ in range(steps):
            w, b, value = step(w, b)
            losses.append(value)
        return (w, b), losses

    differential(program, steps=8)


@pytest.mark.parametrize("has_aux", [False, True])
def test_vjp_pullback_is_one_gradient_op(has_aux, tmp_path):
    """`jax.vjp` with its predictions fetched to numpy in the middle, then the
    pullback (the YOLO pattern): f's primal ops run, and each pullback call is
    one gradient op, as for `jax.grad`; no fallbacks."""
    def program(wrap, steps):
        x, y = linear_data()

        def forward(w, b):
            pred = jnp.tanh(x @ w) + b
            return (pred, {"mean": jnp.mean(pred)}) if has_aux else pred

        @wrap
        def step(w, b):
            pred, pullback, *aux = jax.vjp(forward, w, b, has_aux=has_aux)
            target = np.sign(np.asarray(pred)) * np.abs(np.asarray(y))    # host work on it
            loss, g = jax.value_and_grad(lambda p: jnp.mean((p - target) ** 2))(pred)
            gw, gb = pullback(g)
            return w - 0.1 * gw, b - 0.1 * gb, loss, aux

        w, b, losses = jnp.zeros(4) + 0.1, jnp.float32(0.0), []
        for _ in range(steps):
            w, b, loss, aux = step(w, b)
            losses.append((loss, aux))
        return (w, b), losses

    path = str(tmp_path / "trace.json")
    with terra.timeline(path):
        res = differential(program, steps=8)
    assert res.stats.fallbacks == 0, res.describe()
    recorded = [e["args"]["op"] for e in json.load(open(path)) if e.get("cat") == "record"]
    # value_and_grad's and the pullback's: one gradient op each per traced step,
    # and none of the ops JAX's linearize and transpose would have recorded
    assert recorded.count("terra_grad") == 2 * res.stats.traced, recorded
    assert "transpose" not in recorded and not any("jvp" in op for op in recorded), recorded


@pytest.mark.parametrize("use", ["twice", "after_the_step", "numpy_cotangent", "constant_output",
                                 "wrong_cotangent", "integer_primal", "inside_grad"])
def test_vjp_pullback_behaves_as_in_eager(use):
    def program(wrap, steps):
        x, y = linear_data()
        printed = []

        def f(w, b):
            out = jnp.tanh(x @ w) + b
            return (out, jnp.ones(3)) if use == "constant_output" else out

        @wrap
        def step(w, b, n):
            if use == "integer_primal":
                out, pullback = jax.vjp(lambda w, n: f(w, b) * n, w, n)
                gw, _ = pullback(jnp.ones_like(out))
                return w - 0.01 * gw, b, None
            out, pullback = jax.vjp(f, w, b)
            if use == "after_the_step":
                return w, b, pullback
            if use == "twice":
                gw, gb = pullback(out - y)
                gw2, _ = pullback(jnp.ones_like(out))
                gw = gw + 0.1 * gw2
            elif use == "numpy_cotangent":
                gw, gb = pullback(np.asarray(out) - np.asarray(y, np.float64))
            elif use == "constant_output":
                gw, gb = pullback((out[0] - y, jnp.ones(3)))
            elif use == "wrong_cotangent":
                try:
                    pullback(jnp.ones(3))
                except ValueError as err:
                    printed.append(str(err).splitlines()[0])
                gw, gb = pullback(out - y)
            else:   # the pullback differentiated again, by a grad taken after it
                def scaled(s):
                    gw, gb = pullback(s * (out - y))
                    return jnp.sum(gw ** 2) + gb ** 2
                ds = jax.grad(scaled)(jnp.float32(1.0))
                gw, gb = pullback((1.0 + 0.01 * ds) * (out - y))
            return w - 0.01 * gw, b - 0.01 * gb, None

        w, b = jnp.zeros(4) + 0.1, jnp.float32(0.0)
        for i in range(steps):
            w, b, pullback = step(w, b, jnp.int32(2))
            if pullback is not None:    # called after the step returned
                gw, gb = pullback(jnp.ones((16,)))
                w, b = w - 0.01 * gw, b - 0.01 * gb
        return (w, b), printed

    res = differential(program, steps=8)
    if use == "wrong_cotangent":
        assert "unexpected JAX type" in res.terra.side_effects[0]


def test_prediction_checked_against_the_program_in_use(monkeypatch):
    """A feed the running graph predicted must be checked even after the TraceGraph
    learned (from a fallback) that it varies, while the new graph still compiles."""
    monkeypatch.setenv("TERRA_SYNC_COMPILE", "0")
    real_compile = generate.compile_segment
    gate = threading.Event()
    compiled = []

    def gated_compile(seg, executor):
        if len(compiled) >= 1:          # the first graph compiles; later ones wait
            gate.wait(30)
        compiled.append(seg)
        return real_compile(seg, executor)

    monkeypatch.setattr(generate, "compile_segment", gated_compile)

    def body(w, lr):
        return w - lr * jnp.sin(w)

    step = terra.function(body)
    w_t = w_e = jnp.linspace(0.0, 1.0, 4)
    lrs = [0.1, 0.1, 0.1, 0.1, 0.1, 0.05, 0.02, 0.01, 0.3]
    try:
        for i, lr in enumerate(lrs):
            if i == 2:                            # let the first graph arrive
                deadline = time.time() + 30
                while not compiled and time.time() < deadline:
                    time.sleep(0.01)
                time.sleep(0.2)
            w_t = step(w_t, lr)
            w_e = body(w_e, lr)
            np.testing.assert_allclose(np.asarray(w_t), np.asarray(w_e), rtol=1e-6,
                                       err_msg=f"step {i}")
    finally:
        gate.set()
    stats = step.stats()
    assert stats.coexecuted + stats.fallbacks >= 4 and stats.coexecuted >= 1, stats
    assert stats.fallbacks >= 2, stats


@pytest.mark.parametrize("size", [4, 4096])   # predicted-size and live-size feeds
def test_numpy_buffer_mutated_after_feeding(size):
    """A fed numpy array is read when Python applies the op, whatever Python does to it later.

    (Eager JAX on CPU may alias the buffer and read it after the mutation, so its own
    result varies from run to run; Terra's is the program-order value, checked with numpy.)
    """
    buf = np.zeros((size,), np.float32)

    @terra.function
    def step(w):
        y = w + buf
        buf[:] += 1.0            # reuse the buffer, as data loaders do
        return y * 0.5

    w = jnp.zeros(size)
    outputs = []
    for _ in range(10):          # no sync inside the loop: reads must not race
        w = step(w)
        outputs.append(w)
    expected = np.zeros(size, np.float32)
    for i, w in enumerate(outputs):
        expected = (expected + np.float32(i)) * np.float32(0.5)
        np.testing.assert_allclose(np.asarray(w), expected, rtol=1e-6, err_msg=f"step {i}")
    assert step.stats().coexecuted >= 5


# -- nested jits: the short path under a Terra trace keeps jit's semantics ----------

@functools.partial(jax.jit, static_argnums=1)
def _power_sum(x, k):
    return jnp.sum(x ** k)


@jax.jit
def _affine(p, x):
    return p["w"] * x + p["b"]


def test_nested_jits_keep_semantics_and_never_fetch():
    """Static arguments keyed by value, pytree arguments (of placeholders) unflattened
    without formatting them (a fetch), Python scalars canonicalized as bind does."""

    def program(wrap, steps):
        @wrap
        def step(w):
            y = _affine({"w": w * 0.5, "b": jnp.cos(w)}, w)
            # same jit, same avals, a different static value each call
            a = _power_sum(y, 1) + _power_sum(y, 2) * 0.5 + _power_sum(y, 3) / 3.0
            z = jnp.multiply(y, 2.0) + jnp.multiply(y, np.float32(2.0))  # weak vs strong
            return jnp.tanh(w + a * 1e-3) + 1e-3 * z, a

        w = jnp.linspace(-1.0, 1.0, 4)
        outs = []
        for _ in range(steps):
            w, a = step(w)
            outs.append(a)
        return w, outs

    res = differential(program, steps=8, min_coexecuted=5)
    stats = res.terra.wrap.functions[0].stats()
    assert stats.fetches == 0 and stats.fallbacks == 0, stats


def test_nested_jit_with_new_avals_in_a_step_diverges_like_a_new_op():
    """A jitted function cached for one shape, called with another, is a new op."""

    def program(wrap, steps):
        @wrap
        def step(w, i):
            x = jnp.ones(4 if i < 5 else 3)
            return w + _power_sum(x, 2), _power_sum(w, 2)

        w = jnp.zeros(())
        outs = []
        for i in range(steps):
            w, s = step(w, i)
            outs.append(s)
        return w, outs

    res = differential(program, steps=10, min_coexecuted=4)
    assert res.terra.wrap.functions[0].stats().divergences >= 1


def test_steps_reuse_one_jax_trace():
    """JAX's per-call cost grows with every Trace object ever created (a fresh trace
    per step made a co-executed MLP step drift from 8 to 14 ms over 700 steps), so
    every step of a step function runs under the same TerraTrace."""
    traces = []

    def fn(w):
        y = w * 0.5
        traces.append(y._trace)  # the JAX trace the step's values belong to
        return (y + jnp.sin(w)).sum()

    step = terra.function(fn)
    w = jnp.ones(4)
    for _ in range(8):
        float(step(w))
    assert step.stats().coexecuted >= 5
    assert all(t is traces[0] for t in traces)


# -- tracing steps: a differentiated function's ops are recorded, not run ------
# (their values come from the gradient op's replay, see coexec.StepRun._defer)

def _mlp_step(opt):
    x, y = linear_data(n=8, d=6)

    def loss_fn(params):
        h = jax.nn.relu(x @ params["w1"])               # custom_jvp inside
        logits = h @ params["w2"]
        loss = jnp.mean(jax.nn.logsumexp(logits, axis=1) - logits[:, 0] * y)
        return loss, {"h_mean": jnp.mean(h), "top": jnp.argmax(logits, axis=1)}

    def step(params, state):
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss, aux
    return step


def _mlp_params():
    return {"w1": jnp.full((6, 5), 0.1), "w2": jnp.linspace(-1.0, 1.0, 15).reshape(5, 3)}


def test_deferred_ops_record_the_trace_that_running_them_records(monkeypatch):
    """Recording a differentiated function's ops without running them must give the
    trace that running them gives: same op keys, output avals and placements."""
    opt = optax.adam(0.1)

    def recorded_ops() -> list:
        step = terra.function(_mlp_step(opt))
        params = _mlp_params()
        step(params, opt.init(params))
        node, ops = step._graph.root, []
        while node.children:
            (node,) = node.children
            ops.append(node.op)
        return ops

    deferred = []
    with monkeypatch.context() as m:
        m.setattr(coexec.StepRun, "_defer", _counted(coexec.StepRun._defer, deferred))
        with_deferral = recorded_ops()
    assert len(deferred) >= 10
    with monkeypatch.context() as m:
        m.setattr(coexec, "deferrable", lambda prim, params: False)
        without = recorded_ops()
    assert len(with_deferral) == len(without)
    for a, b in zip(with_deferral, without):
        assert a.same_as(b), (a.label, b.label)
        assert (a.out_avals, a.out_placements) == (b.out_avals, b.out_placements), a.label


def _counted(method, calls: list):
    def counted(*args, **kwargs):
        calls.append(1)
        return method(*args, **kwargs)
    return counted


def test_tracing_steps_take_a_seen_regions_gradient_from_its_traced_jaxpr(monkeypatch):
    """While tracing, a region seen before gets its gradient from a jaxpr traced
    once (no JAX autodiff in Python per step); a region whose ops differ only in
    params (another exponent) gets its own. Every step equals eager's."""
    release = _hold_compiles(monkeypatch)   # every step traces
    built = []
    monkeypatch.setattr(autodiff, "trace_function", _counted(autodiff.trace_function, built))
    x, y = linear_data(n=8, d=6)
    opt = optax.adam(0.1)

    def step(params, state, k):
        def loss_fn(p):
            h = jax.nn.relu(x @ p["w1"])
            err = h @ p["w2"] - y[:, None]
            unused = jnp.sum(p["w1"]) * 3.0   # an input the gradient never reads
            return jnp.mean(err ** k), unused

        (loss, unused), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss, unused

    params = {"w1": jnp.full((6, 5), 0.1, jnp.float32),  # not weakly typed, as after a step
              "w2": jnp.linspace(-1.0, 1.0, 5).reshape(5, 1)}
    terra_step = terra.function(step)
    (p_t, s_t), (p_e, s_e) = (params, opt.init(params)), (params, opt.init(params))
    try:
        for i, k in enumerate([2, 2, 4, 2, 4, 4, 2]):
            p_t, s_t, loss_t, unused_t = terra_step(p_t, s_t, k)
            p_e, s_e, loss_e, unused_e = step(p_e, s_e, k)
            for a, b in zip(jax.tree.leaves((p_t, loss_t, unused_t)),
                            jax.tree.leaves((p_e, loss_e, unused_e))):
                np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5,
                                           err_msg=f"step {i}")
    finally:
        release.set()
    assert terra_step.stats().traced == 7 and terra_step.stats().coexecuted == 0
    assert len(built) == 2, built   # one jaxpr per exponent, reused by the other 5 steps


def test_deferred_values_equal_eager_ones_through_aux_and_optimizer():
    opt = optax.adam(0.1)

    def program(wrap, steps):
        step = wrap(_mlp_step(opt))
        params = _mlp_params()
        state = opt.init(params)
        out = []
        for _ in range(steps):
            params, state, loss, aux = step(params, state)
            out.append((loss, aux))
        return params, out

    differential(program, steps=6)


def test_deferred_value_kept_by_a_differentiated_function_that_raises():
    """A value f computes (not from what it differentiates, so eager lets it
    escape) and stashes away before raising is still the eager value."""

    def program(wrap, steps):
        x, y = linear_data()

        @wrap
        def step(w):
            stash = []

            def loss_fn(w):
                err = (x @ w - y) ** 2
                stash.append(jnp.tanh(jnp.asarray(y) * 2.0))
                if err.shape:
                    raise ValueError("not today")
                return err

            try:
                jax.grad(lambda w: jnp.sum(loss_fn(w)))(w)
            except ValueError as e:
                print("caught", e)
            loss, g = jax.value_and_grad(lambda w: jnp.mean((x @ w - y) ** 2))(w)
            return w - 0.1 * g, loss + jnp.sum(stash[0])

        return train_from_zeros(step, steps)

    differential(program, steps=6)


def test_gradient_of_a_value_computed_by_deferred_ops_and_a_debug_print():
    """A second gradient reads the first one's aux (deferred values); a host
    callback inside a differentiated function runs in place with its inputs."""

    def program(wrap, steps):
        x, y = linear_data()

        @wrap
        def step(w):
            def first(w):
                pred = x @ w
                jax.debug.print("pred0 {}", pred[0])
                return jnp.mean((pred - y) ** 2), pred

            (loss, pred), g1 = jax.value_and_grad(first, has_aux=True)(w)
            g2 = jax.grad(lambda p: jnp.sum(jnp.sin(p) * pred))(pred)
            return w - 0.1 * g1 - 0.01 * (x.T @ g2), loss

        return train_from_zeros(step, steps, log=lambda loss: loss)

    differential(program, steps=6)
