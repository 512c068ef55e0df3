"""Feature catalogue: every Python/JAX feature a training step may use runs under
Terra exactly as it runs eagerly (see ``harness.py`` for what "exactly" means and
for the float tolerance), and Terra really co-executes it.

Each test is a small but real training step (tiny MLP / linear regression, a few
optimizer steps). ``differential`` runs the program eagerly and under
``terra.function`` and compares printed output, results, side effects and
exceptions; then it checks ``stats.coexecuted``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import pickle
import sys
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

from harness import differential

STEPS = 10

# ----------------------------------------------------------------------- helpers


def make_data(seed=0, n=16, din=8, dout=1):
    rng = np.random.RandomState(seed)
    x = rng.normal(size=(n, din)).astype(np.float32)
    w = rng.normal(size=(din, dout)).astype(np.float32)
    y = (np.tanh(x @ w) + 0.1 * rng.normal(size=(n, dout))).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(y)


def init_mlp(seed=0, sizes=(8, 16, 1)):
    key = jax.random.PRNGKey(seed)
    params = []
    for din, dout in zip(sizes[:-1], sizes[1:]):
        key, k = jax.random.split(key)
        params.append({"w": jax.random.normal(k, (din, dout)) / math.sqrt(din),
                       "b": jnp.zeros((dout,))})
    return params


def mlp(params, x, act=jnp.tanh):
    for layer in params[:-1]:
        x = act(x @ layer["w"] + layer["b"])
    return x @ params[-1]["w"] + params[-1]["b"]


def mse(params, x, y, act=jnp.tanh):
    return jnp.mean((mlp(params, x, act) - y) ** 2)


def sgd(params, grads, lr):
    return jax.tree.map(lambda p, g: p - lr * g, params, grads)


def coexec_steps(history):
    """Per-step 'was this call co-executed' from wrap.note('stats', ...) snapshots."""
    out, prev = [], 0
    for h in history:
        out.append(h["coexecuted"] > prev)
        prev = h["coexecuted"]
    return out


# ------------------------------------------------------ numpy / third-party calls


@pytest.mark.parametrize("where", ["noise_fed_as_input", "numpy_inside_step"])
def test_numpy_and_third_party_calls(where):
    def program(wrap, steps):
        rng = np.random.RandomState(0)  # fresh, seeded: same stream in both runs
        params = init_mlp()
        x, y = make_data()
        log_losses, scales = [], []

        @wrap
        def step(params, x, y, noise):
            if noise is None:  # numpy called inside the step
                noise = rng.normal(scale=0.1, size=x.shape).astype(np.float32)
            loss, grads = jax.value_and_grad(mse)(params, x + noise, y)
            log_losses.append(np.log(float(loss)))  # third-party call on a fetched value
            # numpy round trip mid-step: fetch, process on the host, feed back
            gw = np.asarray(grads[0]["w"])
            gw = np.clip(gw, -0.5, 0.5)
            grads[0]["w"] = jnp.asarray(gw)
            scale = math.sqrt(1.0 + float(np.abs(noise).mean()))
            scales.append(scale)
            return sgd(params, grads, 0.2 / scale), loss

        for _ in range(steps):
            noise = (rng.normal(scale=0.1, size=x.shape).astype(np.float32)
                     if where == "noise_fed_as_input" else None)
            params, loss = step(params, x, y, noise)
        return (params, loss), (log_losses, scales)

    differential(program, steps=STEPS)


def test_jnp_asarray_of_a_numpy_batch_is_a_device_array():
    """`jnp.asarray(batch)` gives a jax.Array as in eager, so what the step derives
    from it is graph data: small per-batch values (lengths) are fed live, never
    mispredicted as constants, also on a path (shape) seen only once while tracing."""
    def program(wrap, steps):
        params = init_mlp(sizes=(8, 16, 1))
        rng = np.random.RandomState(0)
        kinds = []

        @wrap
        def step(params, x, lengths):
            lengths = jnp.asarray(lengths)
            kinds.append(isinstance(lengths, jax.Array))
            first = lengths.at[0].set(lengths[0] + 0)      # jax.Array API, not NumPy's
            mask = (jnp.arange(x.shape[0])[:, None] < first[:, None] - 1).astype(jnp.float32)
            loss, grads = jax.value_and_grad(
                lambda p: jnp.mean((mlp(p, jnp.asarray(x)) * mask[:, :1]) ** 2))(params)
            return sgd(params, grads, 0.1), loss

        for i in range(steps):
            n = (4, 6)[i % 2]                                # two shapes: two paths
            x = rng.normal(size=(n, 8)).astype(np.float32)
            lengths = rng.randint(1, n + 1, size=n).astype(np.int32)   # new every batch
            params, loss = step(params, x, lengths)
        return (params, loss), kinds

    res = differential(program, steps=STEPS)
    assert res.terra.side_effects == [True] * STEPS
    # The first graph is compiled after the first step: the second shape's first
    # step falls back as a new path, never because a length was predicted.
    stats = res.stats
    (step,) = res.terra.wrap.functions
    assert stats.fallbacks == 1 and stats.paths == 2, res.describe()
    assert "changed value" not in step.stats().last_divergence, res.describe()


# ------------------------------------------------------ Python control flow on tensors


@pytest.mark.parametrize("pattern", ["flip_once", "alternating", "best_checkpoint"])
def test_if_on_tensor_value(pattern):
    def program(wrap, steps):
        params = init_mlp()
        data = [make_data(0), make_data(1)]  # two batches: the loss is not monotone
        taken = []

        @wrap
        def step(params, count, best, best_params, x, y):
            loss, grads = jax.value_and_grad(mse)(params, x, y)
            if pattern == "flip_once":
                cond = count >= 6  # tensor: the branch flips at step 6
            elif pattern == "alternating":
                cond = count % 2 == 0
            else:
                cond = loss < best  # loss-driven
            if cond:
                taken.append("A")
                grads = jax.tree.map(lambda g, p: g + 0.01 * p, grads, params)  # + L2
                best_params = jax.tree.map(jnp.copy, params)
                best = jnp.minimum(best, loss)
            else:
                taken.append("B")
                grads = jax.tree.map(lambda g: 0.5 * g, grads)
            return sgd(params, grads, 0.3), count + 1, best, best_params, loss

        count = jnp.asarray(0)
        best = jnp.asarray(jnp.inf)
        best_params = params
        for i in range(steps):
            x, y = data[i % 2]
            params, count, best, best_params, loss = step(params, count, best, best_params,
                                                          x, y)
        return (params, count, best, best_params), taken

    res = differential(program, steps=12, min_coexecuted=4)
    taken = res.eager.side_effects
    if pattern == "flip_once":
        assert taken[:6] == ["B"] * 6 and taken[6:] == ["A"] * 6
        assert res.stats.divergences >= 1, res.describe()
    elif pattern == "alternating":
        assert set(taken) == {"A", "B"}


@pytest.mark.parametrize("kind", ["line_search", "halving_norm"])
def test_while_on_tensor_value(kind):
    def program(wrap, steps):
        params = init_mlp()
        x, y = make_data()
        trips = []

        @wrap
        def step(params, lr0):
            loss, grads = jax.value_and_grad(mse)(params, x, y)
            n = 0
            if kind == "line_search":  # backtracking: data-dependent trip count
                lr = lr0
                new = sgd(params, grads, lr)
                while mse(new, x, y) > loss - 1e-4 * lr * optax.tree.norm(grads) ** 2:
                    lr = lr * 0.5
                    new = sgd(params, grads, lr)
                    n += 1
            else:  # shrink the gradient until its norm is small enough
                while optax.tree.norm(grads) > 0.05:
                    grads = jax.tree.map(lambda g: g * 0.5, grads)
                    n += 1
                new = sgd(params, grads, lr0)
            trips.append(n)
            return new, loss

        for i in range(steps):
            params, loss = step(params, 4.0 if kind == "line_search" else 1.0)
        return (params, loss), trips

    res = differential(program, steps=12, min_coexecuted=3)
    assert len(set(res.eager.side_effects)) >= 2, res.eager.side_effects  # trip count varied


# --------------------------------------------------------------------------- prints


def test_prints():
    def program(wrap, steps):
        params = init_mlp()
        x, y = make_data()

        @wrap
        def step(params, i):
            loss, grads = jax.value_and_grad(mse)(params, x, y)
            print(loss)
            print(f"{loss:.4f}")
            print(float(loss))
            print("step", i, "loss", loss, "b", params[-1]["b"])
            print(f"step {i:3d} | loss {loss:10.6f} | |g| {optax.tree.norm(grads):.3e}")
            print(grads[-1]["b"], file=sys.stdout)
            return sgd(params, grads, 0.2)

        for i in range(steps):
            params = step(params, i)
        print("final", mse(params, x, y))
        return params, None

    res = differential(program, steps=STEPS)
    assert len(res.eager.lines) == 6 * STEPS + 1


# --------------------------------------------------------------------- list appends


def test_list_appends_of_placeholders():
    def program(wrap, steps):
        params = init_mlp()
        x, y = make_data()
        losses, norms, preds = [], [], []

        @wrap
        def step(params):
            loss, grads = jax.value_and_grad(mse)(params, x, y)
            losses.append(loss)  # never fetched inside the step
            norms.append(optax.tree.norm(grads))
            preds.append(mlp(params, x[:2]))
            return sgd(params, grads, 0.2)

        for _ in range(steps):
            params = step(params)
        # read only after the loop
        summary = {
            "mean_loss": float(jnp.mean(jnp.stack(losses))),
            "floats": [float(l) for l in losses],
            "np": np.asarray(norms),
            "max_norm": max(norms),
            "preds": jnp.concatenate(preds),
        }
        return params, (summary, losses, norms)

    differential(program, steps=STEPS)


# -------------------------------------------------------------- global state mutation

GLOBAL_COUNTER = 0
GLOBAL_LOG: list = []
GLOBAL_SCALE = 1.0


def test_global_state_mutation():
    def program(wrap, steps):
        global GLOBAL_COUNTER, GLOBAL_LOG, GLOBAL_SCALE
        GLOBAL_COUNTER, GLOBAL_LOG, GLOBAL_SCALE = 0, [], 1.0
        params = init_mlp()
        x, y = make_data()

        @wrap
        def step(params):
            global GLOBAL_COUNTER
            GLOBAL_COUNTER += 1
            loss, grads = jax.value_and_grad(mse)(params, x * GLOBAL_SCALE, y)
            GLOBAL_LOG.append((GLOBAL_COUNTER, float(loss)))
            return sgd(params, grads, 0.2)

        for i in range(steps):
            GLOBAL_SCALE = 1.0 + 0.01 * i  # module-level float read inside the step
            params = step(params)
        return params, (GLOBAL_COUNTER, list(GLOBAL_LOG), GLOBAL_SCALE)

    differential(program, steps=STEPS)


# ---------------------------------------------------------------------- object state


@pytest.mark.parametrize("how", ["bound_method", "decorated_method"])
def test_object_state(how):
    def program(wrap, steps):
        x, y = make_data()

        class Trainer:
            def __init__(self):
                self.params = init_mlp()
                self.opt = optax.sgd(0.1, momentum=0.9)
                self.opt_state = self.opt.init(self.params)
                self.history = []
                self.step_count = 0
                if how == "bound_method":
                    self.train_step = wrap(self._train_step)

            def _train_step(self, x, y):
                loss, grads = jax.value_and_grad(mse)(self.params, x, y)
                updates, self.opt_state = self.opt.update(grads, self.opt_state, self.params)
                self.params = optax.apply_updates(self.params, updates)
                self.step_count += 1
                self.history.append(loss)
                return loss

            if how == "decorated_method":
                train_step = wrap(_train_step)

        trainer = Trainer()
        for _ in range(steps):
            trainer.train_step(x, y)
        return ((trainer.params, trainer.opt_state),
                (trainer.step_count, [float(h) for h in trainer.history]))

    differential(program, steps=STEPS)


# ------------------------------------------------------------------------ exceptions


class BadBatch(Exception):
    pass


def test_exceptions_raised_and_caught_inside_step():
    def program(wrap, steps):
        params = init_mlp()
        x, y = make_data()
        events = []

        def check(i):
            if i % 4 == 3:
                raise BadBatch(f"batch {i} rejected")

        @wrap
        def step(params, i):
            xs = x
            try:
                check(i)
            except BadBatch as e:
                events.append(str(e))
                xs = x * 0.5
            try:
                z = xs.reshape(3, -1)  # JAX itself raises: 128 elements, not divisible
            except TypeError as e:
                events.append(type(e).__name__)
                z = xs.reshape(-1)
            loss, grads = jax.value_and_grad(mse)(params, xs, y)
            try:
                if not bool(jnp.isfinite(loss)):
                    raise FloatingPointError("non-finite loss")
                ratio = float(loss) / float(jnp.mean(z ** 2))
            except (FloatingPointError, ZeroDivisionError) as e:
                events.append(repr(e))
                ratio = 0.0
            finally:
                events.append("finally")
            return sgd(params, grads, 0.2), ratio

        ratios = []
        for i in range(steps):
            params, ratio = step(params, i)
            ratios.append(ratio)
        return params, (events, ratios)

    differential(program, steps=12, min_coexecuted=4)


@pytest.mark.parametrize("where", ["before_ops", "after_fetch", "mid_graph"])
def test_exception_escapes_step(where):
    BAD = 5

    def program(wrap, steps):
        params = init_mlp()
        x, y = make_data()
        errors, losses = [], []

        @wrap
        def step(params, i):
            if where == "before_ops" and i == BAD:
                raise ValueError(f"bad step {i}")
            loss, grads = jax.value_and_grad(mse)(params, x, y)
            if where == "after_fetch" and i == BAD:
                raise ValueError(f"step {i}: loss={float(loss):.4f}")
            new = sgd(params, grads, 0.2)
            if where == "mid_graph" and i == BAD:
                raise ValueError(f"bad step {i}")
            return new, loss

        for i in range(steps):
            try:
                params, loss = step(params, i)
                losses.append(loss)
            except ValueError as e:
                errors.append((type(e).__name__, str(e)))
            wrap.note("stats", wrap.stats())
        return params, (errors, losses)

    steps = 12
    res = differential(program, steps=steps)
    assert len(res.eager.side_effects[0]) == 1
    # the steps after the raising one are still co-executed
    flags = coexec_steps(res.history)
    after = flags[BAD + 1:]
    assert sum(after) >= len(after) - 2 and after[-1], (flags, res.describe())


def test_exception_escapes_program():
    def program(wrap, steps):
        params = init_mlp()
        x, y = make_data()

        @wrap
        def step(params, i):
            loss, grads = jax.value_and_grad(mse)(params, x, y)
            if i == 7:
                raise RuntimeError(f"giving up at step {i}, loss {float(loss):.5f}")
            return sgd(params, grads, 0.2), loss

        for i in range(steps):
            params, loss = step(params, i)
            print(i, loss)
        return params, None

    res = differential(program, steps=STEPS, min_coexecuted=3)
    assert isinstance(res.eager.exception, RuntimeError)


# ---------------------------------------------------------- generators and closures


def test_generators_and_closures():
    def program(wrap, steps):
        params = init_mlp(sizes=(8, 16, 16, 1))
        x, y = make_data(n=32)

        def batches(bs):  # data pipeline generator (outside the step)
            while True:
                for s in range(0, x.shape[0], bs):
                    yield x[s:s + bs], y[s:s + bs]

        def make_schedule(base):
            calls = 0

            def lr():  # closure with nonlocal state
                nonlocal calls
                calls += 1
                return base / (1.0 + 0.1 * calls)

            return lr, lambda: calls

        lr, ncalls = make_schedule(0.3)

        def layers(p):  # generator used inside the step (and under grad)
            for i, layer in enumerate(p):
                yield i == len(p) - 1, layer

        def forward(p, xb):
            h = xb
            for last, layer in layers(p):
                h = h @ layer["w"] + layer["b"]
                if not last:
                    h = jnp.tanh(h)
            return h

        scale = jnp.float32(1.0)
        loss_fn = lambda p, xb, yb: jnp.mean((forward(p, xb) * scale - yb) ** 2)  # noqa: E731

        @wrap
        def step(params, batch):
            xb, yb = batch
            loss, grads = jax.value_and_grad(loss_fn)(params, xb, yb)
            sq = list(g ** 2 for g in jax.tree.leaves(grads))  # generator expression
            gnorm = jnp.sqrt(sum(jnp.sum(s) for s in sq))
            return sgd(params, grads, lr()), loss, gnorm

        it = batches(16)
        out = []
        for _ in range(steps):
            params, loss, gnorm = step(params, next(it))
            out.append((loss, gnorm))
        return params, (out, ncalls())

    differential(program, steps=STEPS)


# ------------------------------------------------------------------------- recursion


def test_recursion():
    def program(wrap, steps):
        params = init_mlp(sizes=(8, 16, 16, 16, 1))
        x, y = make_data()

        def apply(layers, h):  # recursive forward pass
            if len(layers) == 1:
                return h @ layers[0]["w"] + layers[0]["b"]
            return apply(layers[1:], jnp.tanh(h @ layers[0]["w"] + layers[0]["b"]))

        def sq_norm(tree):  # recursive pytree reduction
            if isinstance(tree, dict):
                return sum(sq_norm(v) for _, v in sorted(tree.items()))
            if isinstance(tree, (list, tuple)):
                return sum(sq_norm(v) for v in tree)
            return jnp.sum(tree ** 2)

        def shrink(g, depth=0):  # data-dependent recursion on a tensor value
            if sq_norm(g) > 0.01 and depth < 10:
                return shrink(jax.tree.map(lambda t: t * 0.7, g), depth + 1)
            return g, depth

        def loss_fn(p):
            return jnp.mean((apply(p, x) - y) ** 2) + 1e-3 * sq_norm(p)

        @wrap
        def step(params):
            loss, grads = jax.value_and_grad(loss_fn)(params)
            grads, depth = shrink(grads)
            return sgd(params, grads, 0.5), loss, depth

        depths = []
        for _ in range(steps):
            params, loss, depth = step(params)
            depths.append(depth)
        return (params, loss), depths

    differential(program, steps=12, min_coexecuted=3)


# ----------------------------------------------------------------------- nested jit


def test_nested_jit():
    def program(wrap, steps):
        params = init_mlp()
        x, y = make_data()
        opt = optax.adam(1e-2)
        opt_state = opt.init(params)

        @jax.jit
        def dense(layer, h):
            return h @ layer["w"] + layer["b"]

        @functools.partial(jax.jit, static_argnums=1)
        def activation(h, kind):
            return jnp.tanh(h) if kind == "tanh" else jax.nn.relu(h)

        def loss_fn(p, kind):
            h = activation(dense(p[0], x), kind)
            return jnp.mean((dense(p[1], h) - y) ** 2)

        update = jax.jit(opt.update)
        grad_fn = jax.jit(jax.value_and_grad(loss_fn), static_argnums=1)

        @wrap
        def step(params, opt_state, i):
            kind = "tanh" if i % 2 == 0 else "relu"  # static arg of a nested jit changes
            loss, grads = grad_fn(params, kind)
            loss2 = loss_fn(params, kind)  # the un-jitted path, same values
            updates, opt_state = update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss, loss2

        out = []
        for i in range(steps):
            params, opt_state, loss, loss2 = step(params, opt_state, i)
            out.append((loss, loss2))
        return (params, opt_state), out

    differential(program, steps=STEPS)


# -------------------------------------------------------- value_and_grad(has_aux=True)


def test_value_and_grad_has_aux():
    def program(wrap, steps):
        params = init_mlp(sizes=(8, 16, 3))
        x, _ = make_data()
        labels = jnp.asarray(np.random.RandomState(1).randint(0, 3, size=(16,)))

        def loss_fn(p):
            logits = mlp(p, x)
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            acc = jnp.mean(jnp.argmax(logits, -1) == labels)
            return loss, {"acc": acc, "logit_mean": logits.mean()}

        @wrap
        def step(params):
            (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
            print(f"loss {loss:.5f} acc {aux['acc']:.3f}")
            return sgd(params, grads, 0.5), loss, aux

        for _ in range(steps):
            params, loss, aux = step(params)
        return (params, loss, aux), None

    differential(program, steps=STEPS)


# ------------------------------------------------------------- lax control flow


@pytest.mark.parametrize("prim", ["scan", "cond", "while_loop", "fori_loop"])
def test_lax_control_flow_in_loss(prim):
    def program(wrap, steps):
        params = {"wx": jax.random.normal(jax.random.PRNGKey(0), (4, 8)) * 0.3,
                  "wh": jax.random.normal(jax.random.PRNGKey(1), (8, 8)) * 0.3,
                  "wo": jax.random.normal(jax.random.PRNGKey(2), (8, 1)) * 0.3}
        rng = np.random.RandomState(3)
        xs = jnp.asarray(rng.normal(size=(4, 16, 4)).astype(np.float32))  # (time, batch, feat)
        y = jnp.asarray(rng.normal(size=(16, 1)).astype(np.float32))

        def loss_fn(p, sign):
            if prim == "scan":
                def cell(h, xt):
                    h = jnp.tanh(xt @ p["wx"] + h @ p["wh"])
                    return h, h.mean()
                h, means = lax.scan(cell, jnp.zeros((16, 8)), xs)
                extra = 0.01 * jnp.sum(means ** 2)
            elif prim == "cond":
                h = jnp.tanh(xs[0] @ p["wx"])
                h = lax.cond(sign > 0, lambda h: jnp.tanh(h @ p["wh"]),
                             lambda h: jax.nn.sigmoid(h @ p["wh"]), h)
                extra = 0.0
            elif prim == "while_loop":
                h = jnp.tanh(xs[0] @ p["wx"])
                # fixed point of a normaliser, computed on stopped values
                c = lax.stop_gradient(jnp.mean(h ** 2))

                def body(s):
                    k, v = s
                    return k + 1, 0.5 * (v + c / v)

                k, norm = lax.while_loop(lambda s: jnp.abs(s[1] ** 2 - c) > 1e-6,
                                         body, (0, jnp.float32(1.0)))
                h = jnp.tanh((h / norm) @ p["wh"])
                extra = 0.0 * k
            else:
                h = lax.fori_loop(0, 3, lambda i, h: jnp.tanh(h @ p["wh"] + 0.1 * i),
                                  jnp.tanh(xs[0] @ p["wx"]))
                extra = 0.0
            return jnp.mean((h @ p["wo"] - y) ** 2) + extra

        @wrap
        def step(params, sign):
            loss, grads = jax.value_and_grad(loss_fn)(params, sign)
            return sgd(params, grads, 0.3), loss

        losses = []
        for i in range(steps):
            params, loss = step(params, jnp.float32((-1) ** i))
            losses.append(loss)
        return params, losses

    differential(program, steps=8)  # eager lax control flow under grad is slow


# -------------------------------------------------------- custom_jvp / custom_vjp


@jax.custom_vjp
def clip_gradient(x, lo, hi):
    return x


def _clip_fwd(x, lo, hi):
    return x, (lo, hi)


def _clip_bwd(res, g):
    lo, hi = res
    return jnp.clip(g, lo, hi), None, None


clip_gradient.defvjp(_clip_fwd, _clip_bwd)


@jax.custom_jvp
def safe_log1p_exp(x):
    return jnp.logaddexp(x, 0.0)


@safe_log1p_exp.defjvp
def _safe_log1p_exp_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    return safe_log1p_exp(x), jax.nn.sigmoid(x) * t


@pytest.mark.parametrize("act", ["relu", "gelu", "softplus", "user_custom_jvp",
                                 "user_custom_vjp_clip"])
def test_custom_derivatives(act):
    acts = {"relu": jax.nn.relu, "gelu": jax.nn.gelu, "softplus": jax.nn.softplus,
            "user_custom_jvp": safe_log1p_exp,
            "user_custom_vjp_clip": lambda h: jnp.tanh(clip_gradient(h, -0.01, 0.01))}

    def program(wrap, steps):
        params = init_mlp()
        x, y = make_data()
        fn = acts[act]

        @wrap
        def step(params):
            loss, grads = jax.value_and_grad(mse)(params, x, y, fn)
            return sgd(params, grads, 0.2), loss

        losses = []
        for _ in range(steps):
            params, loss = step(params)
            losses.append(loss)
        return params, losses

    differential(program, steps=STEPS)


# ------------------------------------------------------------------------ PRNG keys


@pytest.mark.parametrize("keys", ["typed_key", "legacy_PRNGKey"])
def test_prng_keys_carried_across_steps(keys):
    def program(wrap, steps):
        params = init_mlp(sizes=(8, 32, 1))
        x, y = make_data()

        def loss_fn(p, key):
            h = jnp.tanh(x @ p[0]["w"] + p[0]["b"])
            keep = jax.random.bernoulli(key, 0.8, h.shape)  # dropout
            h = jnp.where(keep, h / 0.8, 0.0)
            return jnp.mean((h @ p[1]["w"] + p[1]["b"] - y) ** 2)

        @wrap
        def step(params, key):
            key, k_drop, k_noise = jax.random.split(key, 3)
            noise = 0.01 * jax.random.normal(k_noise, x.shape)
            loss, grads = jax.value_and_grad(loss_fn)(params, k_drop)
            return sgd(params, grads, 0.2), key, loss + 0.0 * noise.sum()

        key = jax.random.key(0) if keys == "typed_key" else jax.random.PRNGKey(0)
        losses = []
        for _ in range(steps):
            params, key, loss = step(params, key)
            losses.append(loss)
        return (params, key), losses

    differential(program, steps=STEPS)


# -------------------------------------------------------------------------- pytrees


class Layer(NamedTuple):
    w: jax.Array
    b: jax.Array


def test_pytrees_dicts_lists_namedtuples():
    def program(wrap, steps):
        raw = init_mlp(sizes=(8, 16, 16, 1))
        params = {"body": [Layer(l["w"], l["b"]) for l in raw[:-1]],
                  "head": {"w": raw[-1]["w"], "b": raw[-1]["b"]},
                  "scale": (jnp.float32(1.0),)}
        x, y = make_data()
        opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2))
        opt_state = opt.init(params)

        def loss_fn(p):
            h = x
            for layer in p["body"]:
                h = jnp.tanh(h @ layer.w + layer.b)
            out = (h @ p["head"]["w"] + p["head"]["b"]) * p["scale"][0]
            return jnp.mean((out - y) ** 2)

        @wrap
        def step(state):
            params, opt_state = state["params"], state["opt"]
            loss, grads = jax.value_and_grad(loss_fn)(params)
            updates, opt_state = opt.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            return {"params": params, "opt": opt_state}, {"loss": loss, "n": [loss * 2]}

        state = {"params": params, "opt": opt_state}
        metrics = []
        for _ in range(steps):
            state, m = step(state)
            metrics.append(m)
        return state, metrics

    differential(program, steps=STEPS)


# ----------------------------------------------------------------- changing shapes


def test_changing_shapes_ragged_last_batch():
    def program(wrap, steps):
        params = init_mlp()
        x, y = make_data(n=55)  # batches of 16, 16, 16, 7, repeating
        opt = optax.adam(1e-2)
        opt_state = opt.init(params)

        @wrap
        def step(params, opt_state, xb, yb):
            loss, grads = jax.value_and_grad(mse)(params, xb, yb)
            updates, opt_state = opt.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        sizes, losses = [], []
        i = 0
        while len(losses) < steps:
            xb, yb = x[i:i + 16], y[i:i + 16]
            i = i + 16 if i + 16 < x.shape[0] else 0
            params, opt_state, loss = step(params, opt_state, xb, yb)
            sizes.append(xb.shape[0])
            losses.append(loss)
        return (params, opt_state), (sizes, losses)

    res = differential(program, steps=12, min_coexecuted=5)
    assert res.eager.side_effects[0][:4] == [16, 16, 16, 7]


# ------------------------------------------------- Python numbers are data


@pytest.mark.parametrize("how", ["lr_argument", "lr_and_step_in_jnp_ops",
                                 "lr_with_alternating_batch_shape"])
def test_python_float_learning_rate_is_data(how):
    def program(wrap, steps):
        params = init_mlp()
        x, y = make_data()

        @wrap
        def step(params, lr, i):
            if how == "lr_with_alternating_batch_shape":
                # two paths, each seen only once while tracing: the lr must still
                # be fed on both, not baked in from that single observation
                xb, yb = (x, y) if i % 2 == 0 else (x[:7], y[:7])
            else:
                xb, yb = x, y
            loss, grads = jax.value_and_grad(mse)(params, xb, yb)
            if how == "lr_and_step_in_jnp_ops":
                warm = jnp.minimum(1.0, (i + 1) / 5.0)  # Python int in a jnp op
                lr = lr * warm * (1.0 - 0.9 ** (i + 1))  # Python math on Python numbers
            return sgd(params, grads, lr), loss

        losses = []
        for i in range(steps):
            params, loss = step(params, 0.1 / (1 + i), i)
            losses.append(loss)
        return params, losses

    steps = 12
    res = differential(program, steps=steps, min_coexecuted=steps - 4)
    # "a Python number is data, never a recompile" (the second shape may cost one)
    max_compiles = 3 if how == "lr_with_alternating_batch_shape" else 2
    assert res.stats.compiles <= max_compiles, res.describe()


# ------------------------------------------ operators replayed from the graph


@pytest.mark.parametrize("change", ["none", "exponent", "scalar_type", "rank_promotion"])
def test_operators_replayed_only_when_they_would_apply_the_same_op(change):
    """`x + y`, `2.0 * x`, `x ** k`... are entered from the graph when co-executing;
    a change that makes jnp apply another op (a new exponent, an int where a float
    was, a config that rejects broadcasting) must run the operator for real."""
    def program(wrap, steps):
        params = init_mlp()
        x, y = make_data()

        @wrap
        def step(params, i):
            loss, grads = jax.value_and_grad(mse)(params, x, y)
            k = 3 if change == "exponent" and i >= 6 else 2
            scale = 1 if change == "scalar_type" and i >= 6 else 1.0
            new = jax.tree.map(lambda p, g: p - 0.1 * g + 1e-4 * (-p) ** k * scale, params, grads)
            strict = change == "rank_promotion" and i >= 6
            with jax.numpy_rank_promotion("raise" if strict else "allow"):
                try:
                    print("broadcast", (new[0]["w"] + new[0]["b"]).shape)
                except ValueError as err:
                    print("rank promotion:", type(err).__name__)
            print(f"step {i}: {float(loss):.5f}", loss < 0.5, abs(loss - 1.0) / 2)
            return new, loss

        losses = []
        for i in range(steps):
            params, loss = step(params, i)
            losses.append(loss)
        return params, losses

    res = differential(program, steps=STEPS, min_coexecuted=5)
    assert res.stats.operators_replayed >= 5 * 20, res.describe()
    if change in ("exponent", "scalar_type"):  # another op: the step diverged once
        assert res.stats.divergences >= 1, res.describe()


# -------------------------------------------------- placeholders escaping the step


def test_placeholders_escape_the_step():
    def program(wrap, steps):
        params = init_mlp()
        x, y = make_data()
        kept = []

        @wrap
        def step(params, prev_pred):
            loss, grads = jax.value_and_grad(mse)(params, x, y)
            pred = mlp(params, x[:4])
            drift = jnp.mean((pred - prev_pred) ** 2)  # escaped placeholder fed back in
            return sgd(params, grads, 0.2), loss, pred, drift

        pred = jnp.zeros((4, 1))
        for _ in range(steps):
            params, loss, pred, drift = step(params, pred)
            kept.append({"loss": loss, "pred": pred, "drift": drift})
        # used after the loop, with jnp ops and numpy
        losses = jnp.stack([k["loss"] for k in kept])
        after = {
            "delta": losses[1:] - losses[:-1],
            "np_pred": np.asarray(kept[3]["pred"]),
            "np_mean": np.mean(np.asarray(losses)),
            "sum": sum(float(k["drift"]) for k in kept),
            "last_pred_plus": kept[-1]["pred"] + 1.0,
        }
        return params, (after, kept)

    differential(program, steps=STEPS)


# --------------------------------------------------- Python objects as arguments


@dataclasses.dataclass(frozen=True)
class Config:
    lr: float
    l2: float
    act: str = "tanh"


def test_python_objects_as_arguments():
    def program(wrap, steps):
        params = init_mlp()
        x, y = make_data()
        acts = {"tanh": jnp.tanh, "relu": jax.nn.relu}

        @wrap
        def step(params, batch, *, config, mode="train"):
            xb, yb = batch
            fn = acts[config.act]
            if mode == "eval":
                return params, mse(params, xb, yb, fn)
            loss, grads = jax.value_and_grad(
                lambda p: mse(p, xb, yb, fn) + config.l2 * optax.tree.norm(p) ** 2)(params)
            return sgd(params, grads, config.lr), loss

        out = []
        for i in range(steps):
            cfg = Config(lr=0.2 / (1 + 0.1 * i), l2=1e-3)
            mode = "eval" if i % 4 == 3 else "train"
            params, loss = step(params, (x, y), config=cfg, mode=mode)
            out.append((mode, loss))
        return params, out

    differential(program, steps=12, min_coexecuted=4)


# ------------------------------------------------------------- value conversions


CONVERSIONS = ["item", "tolist", "int", "bool", "repr", "format", "np_asarray",
               "block_until_ready", "arange_of_int"]


@pytest.mark.parametrize("conv", CONVERSIONS)
def test_value_conversions(conv):
    def program(wrap, steps):
        params = init_mlp()
        x, y = make_data()
        seen = []

        @wrap
        def step(params, i):
            loss, grads = jax.value_and_grad(mse)(params, x, y)
            w = params[0]["w"]
            extra = 0.0
            if conv == "item":
                seen.append(loss.item())
                seen.append(w[0, 0].item())
            elif conv == "tolist":
                seen.append(w[:2, :3].tolist())
                seen.append(loss.tolist())
            elif conv == "int":
                seen.append(int(loss * 1000))
                seen.append(int(jnp.argmax(w[0])))
            elif conv == "bool":
                seen.append(bool(loss > 0.3))
                seen.append(bool(jnp.all(w[0] > -10)))
            elif conv == "repr":
                seen.append(repr(loss))
                seen.append(repr(params[-1]["b"]))
                seen.append(str(w[0, :3]))
            elif conv == "format":
                seen.append(format(loss, ".5f"))
                seen.append(f"{loss:10.3e}|{w[0, 0]:+.4f}|{loss}")
            elif conv == "np_asarray":
                a = np.asarray(w)
                seen.append(a[:2, :2].copy())
                seen.append(np.array(loss).dtype.name)
                extra = jnp.asarray(a.sum() * 1e-3)  # numpy result fed back
            elif conv == "block_until_ready":
                loss = jax.block_until_ready(loss)
                grads = jax.block_until_ready(grads)
                extra = loss * 0.0
            elif conv == "arange_of_int":
                n = int(jnp.sum(y[: 6 + (i % 2) * 4] > -100))  # 6 or 10
                idx = jnp.arange(n)
                extra = 0.01 * jnp.mean(mlp(params, x[idx]) ** 2)
                seen.append(n)
            new = sgd(params, grads, 0.2)
            return new, loss + extra

        losses = []
        for i in range(steps):
            params, loss = step(params, i)
            losses.append(loss)
        return (params, losses), seen

    differential(program, steps=STEPS)


# -------------------------------------------------------------------------- pickle


def test_pickle_returned_and_escaped_values():
    def program(wrap, steps):
        params = init_mlp()
        x, y = make_data()
        checkpoints = []

        @wrap
        def step(params, i):
            loss, grads = jax.value_and_grad(mse)(params, x, y)
            new = sgd(params, grads, 0.2)
            if i % 3 == 0:
                checkpoints.append(pickle.dumps({"params": new, "loss": loss}))  # inside step
            return new, loss

        kept = []
        for i in range(steps):
            params, loss = step(params, i)
            kept.append(loss)
        restored = [pickle.loads(c) for c in checkpoints]
        blob = pickle.loads(pickle.dumps((params, kept[-1], kept[2])))  # after the loop
        kinds = [isinstance(v, jax.Array) for v in jax.tree.leaves(blob)]
        return (restored, blob), kinds

    differential(program, steps=STEPS)


# ----------------------------------------------------------------------------- flax


@pytest.mark.parametrize("model", ["mlp", "batchnorm_dropout"])
def test_flax_linen_with_optax(model):
    from flax import linen as nn

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool = True):
            # No bias before BatchNorm (as real models do): its gradient is exactly
            # zero in math, and adam would amplify the roundoff noise in it.
            x = nn.Dense(16, use_bias=model != "batchnorm_dropout")(x)
            if model == "batchnorm_dropout":
                x = nn.BatchNorm(use_running_average=not train)(x)
            x = nn.relu(x)
            if model == "batchnorm_dropout":
                x = nn.Dropout(0.2, deterministic=not train)(x)
            return nn.Dense(1)(x)

    def program(wrap, steps):
        x, y = make_data()
        net = MLP()
        variables = net.init({"params": jax.random.PRNGKey(0)}, x, train=False)
        params = variables["params"]
        extra = {k: v for k, v in variables.items() if k != "params"}
        opt = optax.adam(1e-2)
        opt_state = opt.init(params)

        @wrap
        def step(params, extra, opt_state, key):
            key, k = jax.random.split(key)

            def loss_fn(p):
                out, new_extra = net.apply({"params": p, **extra}, x, train=True,
                                           rngs={"dropout": k}, mutable=list(extra))
                return jnp.mean((out - y) ** 2), new_extra

            (loss, new_extra), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
            updates, opt_state = opt.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), dict(new_extra), opt_state, key, loss

        key = jax.random.PRNGKey(1)
        losses = []
        for _ in range(steps):
            params, extra, opt_state, key, loss = step(params, extra, opt_state, key)
            losses.append(loss)
        evald = net.apply({"params": params, **extra}, x, train=False)
        return (params, extra, opt_state, evald), losses

    differential(program, steps=STEPS)


# ------------------------------------------------ background (asynchronous) compile


@pytest.mark.parametrize("kind", ["branch_flip_ragged_lr", "flax_batchnorm_dropout"])
def test_async_compilation_is_transparent(kind):
    """The production path: graphs compile in the compile thread while Python keeps
    running eagerly (conftest's TERRA_SYNC_COMPILE=1 is switched off here). The
    switch to co-execution, and back to eager after a divergence while the new
    graph compiles, may happen at any step and must never change a result."""

    def branch_program(wrap, steps):
        params = init_mlp()
        x, y = make_data(n=55)  # batches 16, 16, 16, 7
        opt = optax.adam(1e-2)
        opt_state = opt.init(params)

        @wrap
        def step(params, opt_state, count, xb, yb, lr):
            loss, grads = jax.value_and_grad(mse)(params, xb, yb)
            if count >= steps // 2:  # tensor branch flips half way
                grads = jax.tree.map(lambda g, p: g + 0.01 * p, grads, params)
            updates, opt_state = opt.update(grads, opt_state, params)
            updates = jax.tree.map(lambda u: u * lr, updates)  # Python float: data
            print(f"{int(count):2d} {xb.shape[0]:2d} {loss:.5f}")
            return optax.apply_updates(params, updates), opt_state, count + 1, loss

        count, losses, i = jnp.asarray(0), [], 0
        for s in range(steps):
            xb, yb = x[i:i + 16], y[i:i + 16]
            i = i + 16 if i + 16 < x.shape[0] else 0
            params, opt_state, count, loss = step(params, opt_state, count, xb, yb,
                                                  1.0 / (1 + 0.05 * s))
            losses.append(loss)
        return (params, opt_state, count), losses

    def flax_program(wrap, steps):
        from flax import linen as nn

        class Net(nn.Module):
            @nn.compact
            def __call__(self, x, train: bool = True):
                x = nn.Dense(16, use_bias=False)(x)  # no bias before BatchNorm
                x = nn.BatchNorm(use_running_average=not train)(x)
                x = nn.Dropout(0.2, deterministic=not train)(nn.relu(x))
                return nn.Dense(1)(x)

        x, y = make_data()
        net = Net()
        variables = net.init({"params": jax.random.PRNGKey(0)}, x, train=False)
        params, stats = variables["params"], {"batch_stats": variables["batch_stats"]}
        opt = optax.adam(1e-2)
        opt_state = opt.init(params)

        @wrap
        def step(params, stats, opt_state, key):
            key, k = jax.random.split(key)

            def loss_fn(p):
                out, new = net.apply({"params": p, **stats}, x, train=True,
                                     rngs={"dropout": k}, mutable=["batch_stats"])
                return jnp.mean((out - y) ** 2), new

            (loss, new), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
            updates, opt_state = opt.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), dict(new), opt_state, key, loss

        key, losses = jax.random.PRNGKey(1), []
        for _ in range(steps):
            params, stats, opt_state, key, loss = step(params, stats, opt_state, key)
            losses.append(loss)
        return (params, stats, opt_state), losses

    program = branch_program if kind == "branch_flip_ragged_lr" else flax_program
    # 24 steps, 0.25 s of wall time after each: ample for a background compile of
    # these tiny graphs even on a loaded machine (0.1 s was not, at a load of 5
    # on 2 cores), so several steps co-execute, yet timing decides which.
    differential(program, steps=24, min_coexecuted=4, sync_compile=False, pace=0.25)
