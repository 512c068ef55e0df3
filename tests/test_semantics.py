"""Eager's semantics at the edges (issue 19): NumPy's array protocol, JAX's
debugging flags, deleted and donated arguments, an interrupted fetch, low-precision
numerics. Every test is differential: the Terra run must be indistinguishable
from the eager one (harness.differential).
"""
import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import harness

STEPS = 6


def _steps(body, steps=STEPS, x=None):
    """A program calling `body(x, i)` for `steps` steps; each step's result or exception."""
    def program(wrap):
        step = wrap(body)
        outs = []
        for i in range(steps):
            try:
                outs.append(step(jnp.arange(1.0, 5.0) if x is None else x, i))
            except Exception as err:  # compared as eager's: type and message
                outs.append(f"{type(err).__module__}.{type(err).__qualname__}: {err}")
        return outs, None
    return program


# -- 1. NumPy's array protocol -------------------------------------------------

def test_numpy_protocol_of_placeholders_is_the_arrays():
    def body(x, i):
        y = x * 2
        q = np.array(y)          # a copy: writable
        q[0] += 1
        views = [np.asarray(y), np.asarray(y, copy=False), np.asarray(y, dtype=np.float32)]
        copies = [np.asarray(y, copy=True), np.copy(y), np.array(y, dtype=np.float64),
                  np.asarray(y, dtype=np.int32)]
        mixed = np.ones(4, np.float32) + y   # NumPy defers to the array's operator
        return (q, [(v.flags.writeable, v.dtype.name) for v in views + copies],
                copies, type(mixed) is type(y) or isinstance(mixed, jax.Array), mixed)

    res = harness.differential(_steps(body), steps=None, min_coexecuted=STEPS - 3)
    assert res.stats.fallbacks == 0, res.describe()


def _steps_entered_the_graph(res) -> None:
    """A debugging flag sends a step to eager at the first op it covers: those steps
    followed the graph up to there and finished eagerly (fallbacks, not co-executed)."""
    st = res.stats
    assert st.coexecuted + st.fallbacks >= STEPS - 3, res.describe()


# -- 2. JAX's debugging flags ----------------------------------------------------

def _nan_at(i, at):
    return 10.0 if i == at else 0.0


def nan_body(x, i):
    y = x * 2
    try:
        a = jnp.log(y - _nan_at(i, 4))                            # a jnp function (a jit)
        b = jax.jit(lambda v: jnp.log(v) * 2)(y - _nan_at(i, 5))  # the user's jit
        c = 1.0 / (y - (2.0 if i == 3 else -1.0))                 # an operator (inf)
    except FloatingPointError as err:
        print("caught", type(err).__name__, err)
        a = b = c = y
    return a.sum() + b.sum() + c.sum()


@pytest.mark.parametrize("flag", ["debug_nans", "debug_infs"])
def test_debug_nans_context_raises_eagers_floating_point_error(flag):
    def body(x, i):
        with getattr(jax, flag)(True):
            return nan_body(x, i)

    res = harness.differential(_steps(body), steps=None, min_coexecuted=0)
    _steps_entered_the_graph(res)
    assert "caught FloatingPointError invalid value" in res.eager.stdout
    assert res.functions[0].stats().last_divergence.endswith("ops run eagerly")


def test_debug_nans_global_flag_raises_eagers_floating_point_error():
    def program(wrap):
        jax.config.update("jax_debug_nans", True)
        try:
            return _steps(nan_body)(wrap)
        finally:
            jax.config.update("jax_debug_nans", False)

    res = harness.differential(program, steps=None, min_coexecuted=0)
    _steps_entered_the_graph(res)
    assert "caught FloatingPointError" in res.eager.stdout


def test_a_nan_in_a_gradient_under_debug_nans_is_eagers():
    def body(x, i):
        with jax.debug_nans(True):
            try:
                return jax.grad(lambda a: jnp.sum(jnp.sqrt(a * (0.0 if i == 4 else 1.0))))(x)
            except FloatingPointError as err:
                print("caught", err)
                return x

    res = harness.differential(_steps(body), steps=None, min_coexecuted=0)
    _steps_entered_the_graph(res)
    assert "caught" in res.eager.stdout


@pytest.mark.parametrize("flag", ["disable_jit", "checking_leaks"])
def test_debugging_contexts_inside_a_step(flag):
    def body(x, i):
        y = jnp.sin(x) * 2
        with getattr(jax, flag)():
            z = jax.jit(lambda a: a * 2 + 1)(y)
            g = jax.grad(lambda a: jnp.sum(a ** 2))(z)
            print(flag, z.sum())
        return y + g

    res = harness.differential(_steps(body), steps=None, min_coexecuted=0)
    _steps_entered_the_graph(res)
    assert res.stats.internal_errors == 0


def test_debug_print_and_callback_run_in_program_order():
    def show(v):
        print("callback", np.asarray(v).tolist())

    inner = jax.jit(lambda a: (jax.debug.print("in jit {}", a.sum()), a + 1)[1])

    def body(x, i):
        y = x * 2
        jax.debug.print("step {} {y}", i, y=y)
        z = inner(y)
        jax.debug.callback(show, z)
        print("after", float(z.sum()))
        return z

    res = harness.differential(_steps(body), steps=None, min_coexecuted=0)
    assert res.eager.lines[:3] == ["step 0 [2. 4. 6. 8.]", "in jit 20.0", "callback [3.0, 5.0, 7.0, 9.0]"]


# -- 3. deleted and donated arguments -------------------------------------------

@pytest.mark.parametrize("how", ["deleted", "donated"])
def test_a_deleted_or_donated_argument_raises_eagers_error(how):
    donate = jax.jit(lambda a: a + 1, donate_argnums=0)

    def body(w, x):
        print("before")
        y = x * 2
        print("fetched", float(y.sum()))
        return jnp.tanh(w) + y       # eager raises here

    def program(wrap):
        step = wrap(body)
        outs = []
        for i in range(STEPS):
            w = jnp.ones(4) * i
            if i == STEPS - 2:
                if how == "deleted":
                    w.delete()
                else:
                    donate(w)
            try:
                outs.append(step(w, jnp.arange(4.0)))
            except Exception as err:
                outs.append(f"{type(err).__qualname__}: {err}")
        return outs, None

    res = harness.differential(program, steps=None, min_coexecuted=STEPS - 3)
    assert "deleted" in str(res.eager.results[-2])
    assert res.stats.internal_errors == 0


# -- 5. low-precision intermediates ----------------------------------------------

@pytest.mark.parametrize("low", [jnp.bfloat16, jnp.float16])
def test_low_precision_intermediates_round_as_in_eager(low):
    """Fused, XLA would keep the bf16/f16 product in f32 (jax.jit does): Terra rounds."""
    def body(m, b):
        h = (m.astype(low) @ b.astype(low)).astype(jnp.float32)
        return m + 0.01 * jnp.tanh(h + m * 0.5), h

    def program(wrap, steps):
        step = wrap(body)
        m = jax.random.normal(jax.random.key(0), (32, 32))
        b = jax.random.normal(jax.random.key(1), (32, 32)) * 0.1
        hs = []
        for _ in range(steps):
            m, h = step(m, b)
            hs.append(h)
        return m, hs

    res = harness.differential(program, steps=5, jit_reference=False)  # the float32 bound
    if low is not jnp.bfloat16:
        return  # XLA:CPU keeps f16 products rounded even when allowed not to
    jitted = harness.run_program(program, "jit", 5)
    assert not np.array_equal(np.asarray(jitted.results[0]), np.asarray(res.eager.results[0])), \
        "jax.jit keeps the excess precision: the test would not tell"


# -- 6. the numerics contract (harness.assert_close_to_eager, docs/numerics.md) -----

def test_numerics_contract_per_dtype_bound():
    e = np.linspace(-1, 1, 64, dtype=np.float32)
    harness.assert_close_to_eager(e * (1 + 5e-5), e, "f32")            # within 1e-4
    with pytest.raises(AssertionError):
        harness.assert_close_to_eager(e * (1 + 5e-4), e, "f32")
    b = e.astype(jnp.bfloat16)
    harness.assert_close_to_eager((e * (1 + 2e-2)).astype(jnp.bfloat16), b, "bf16")  # ~2 ulps
    with pytest.raises(AssertionError):
        harness.assert_close_to_eager((e * 1.1).astype(jnp.bfloat16), b, "bf16")


def test_numerics_contract_no_further_than_jit():
    e = np.linspace(-1, 1, 64, dtype=np.float32)
    jit = e + 1e-3
    harness.assert_close_to_eager(e - 1.5e-3, e, "near jit", reference=jit)
    with pytest.raises(AssertionError, match="jit - eager"):
        harness.assert_close_to_eager(e - 5e-3, e, "beyond jit", reference=jit)


# -- 4. Ctrl-C while Python waits for the graph --------------------------------------

def test_ctrl_c_during_a_fetch_raises_and_the_next_steps_are_eagers():
    """SIGINT arrives while Python waits for a long segment: KeyboardInterrupt reaches
    Python (XLA cannot cancel the running executable, docs/semantics.md), and the
    steps after it co-execute with eager's results."""
    import os
    import signal
    import threading

    import terra

    @jax.jit
    def heavy(a):
        return jax.lax.fori_loop(0, 500, lambda k, c: jnp.tanh(c @ c * 0.01), a)

    def body(x, n):
        y = heavy(x) if n else x * 2      # the long path: one big segment, then a fetch
        return float(y.sum())

    step = terra.function(body)
    xs = [jnp.full((256, 256), 0.1 * i) for i in range(STEPS)]
    expected = [body(x, 0) for x in xs]
    for n in (1, 1, 1):
        step(xs[0], n)
    got = [step(x, 0) for x in xs[:2]]

    waits = step.stats().fetch_waits

    def interrupt():  # once Python waits for the graph
        for _ in range(6000):
            if step.stats().fetch_waits > waits:
                os.kill(os.getpid(), signal.SIGINT)
                return
            threading.Event().wait(0.005)

    threading.Thread(target=interrupt, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        step(xs[2], 1)
    got += [step(x, 0) for x in xs[2:]]
    assert got == expected
    assert step.stats().coexecuted >= STEPS, step.stats()
