"""Training programs written the way each model library's documentation writes them.

Every program follows the differential-harness contract (``tests/harness.py``):
``program(wrap, steps)`` builds fresh state, wraps its step with ``wrap``, runs
its loop (printing what a user would log) and returns ``(results, state)``, the
state being the library objects' state after the loop as plain pytrees. The
same functions are the tests (``tests/test_libraries_*.py``) and the benchmark
(``benchmarks/libraries.py``); ``PROGRAMS`` names them.

The data comes from a numpy loader (``batches``): shuffled minibatches of a
fixed synthetic data set, numpy arrays fed to the step as a real input
pipeline feeds them.
"""
from __future__ import annotations

import json
import linecache
import os
import re
from importlib import metadata
from typing import Callable, Iterator, NamedTuple

import harness
import jax
import jax.numpy as jnp
import numpy as np
import optax

FEATURES, CLASSES, BATCH = 8, 4, 16
STATE_DIGEST = True   # the benchmark turns the per-step state digest off (it times training)


def dataset(n: int = 128, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, FEATURES)).astype(np.float32)
    w = rng.normal(size=(FEATURES, CLASSES)).astype(np.float32)
    return x, np.argmax(x @ w, axis=1).astype(np.int32)


def batches(steps: int, batch: int = BATCH, seed: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """A numpy data loader: reshuffles every epoch, yields `steps` minibatches."""
    x, y = dataset(seed=seed)
    rng = np.random.default_rng(seed + 1)
    order: np.ndarray = np.empty(0, np.int64)
    for _ in range(steps):
        if len(order) < batch:
            order = rng.permutation(len(x))
        idx, order = order[:batch], order[batch:]
        yield x[idx], y[idx]


def by_path(tree) -> dict:
    """A pytree's leaves keyed by their path: comparable across runs even where
    each run defines its own module classes."""
    return {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def digest(tree) -> str:
    """A one-line summary of a state pytree (float sum, integer sum), printed
    after every step so the state is compared step by step, not only at the end."""
    if not STATE_DIGEST:
        return "-"
    leaves = [v for v in jax.tree.leaves(tree)
              if hasattr(v, "dtype") and not jax.dtypes.issubdtype(v.dtype, jax.dtypes.prng_key)]
    values = [np.asarray(v) for v in leaves]
    floats = sum(float(np.abs(v).sum()) for v in values if np.issubdtype(v.dtype, np.inexact))
    ints = sum(int(v.sum()) for v in values if np.issubdtype(v.dtype, np.integer))
    return f"{floats:.5f}/{ints}"


# ---------------------------------------------------------------- Flax NNX

def _nnx_model(rngs, width: int = 16):
    from flax import nnx

    class MLP(nnx.Module):
        def __init__(self, rngs: nnx.Rngs):
            self.hidden = nnx.Linear(FEATURES, width, use_bias=False, rngs=rngs)
            self.bn = nnx.BatchNorm(width, rngs=rngs)
            self.dropout = nnx.Dropout(0.2, rngs=rngs)
            self.head = nnx.Linear(width, CLASSES, rngs=rngs)

        def __call__(self, x):
            return self.head(self.dropout(nnx.relu(self.bn(self.hidden(x)))))

    return MLP(rngs)


def _nnx_state(*objs):
    from flax import nnx
    return [nnx.to_pure_dict(nnx.state(o)) for o in objs]


def nnx_train(wrap, steps: int = 10):
    """nnx.Module/Optimizer/MultiMetric mutated in the step (BatchNorm, Dropout rngs)."""
    from flax import nnx

    model = _nnx_model(nnx.Rngs(params=0, dropout=1))
    optimizer = nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.Param)
    metrics = nnx.MultiMetric(loss=nnx.metrics.Average("loss"),
                              accuracy=nnx.metrics.Accuracy())

    @wrap
    def train_step(model, optimizer, metrics, x, y):
        def loss_fn(model):
            logits = model(x)
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return loss, logits

        (loss, logits), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        optimizer.update(model, grads)
        metrics.update(loss=loss, logits=logits, labels=y)
        return loss

    losses = []
    model.train()
    for i, (x, y) in enumerate(batches(steps)):
        loss = train_step(model, optimizer, metrics, x, y)
        losses.append(loss)
        print(f"step {i} loss {float(loss):.5f} state {digest(nnx.state((model, optimizer)))}")
        if i % 4 == 3:
            print({k: f"{float(v):.5f}" for k, v in metrics.compute().items()})
            metrics.reset()
    return losses, _nnx_state(model, optimizer, metrics)


def nnx_functional(wrap, steps: int = 10):
    """nnx.split outside, nnx.merge / nnx.grad / nnx.jit / nnx.scan inside the step."""
    from flax import nnx

    graphdef, state = nnx.split(_nnx_model(nnx.Rngs(params=0, dropout=1)))
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.05, momentum=0.9))
    opt_state = tx.init(nnx.filter_state(state, nnx.Param))

    @nnx.jit
    def evaluate(model, x, y):
        model.eval()
        return (jnp.argmax(model(x), -1) == y).mean()

    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0))
    def smooth(total, loss):
        total = 0.9 * total + 0.1 * loss
        return total, total

    @wrap
    def train_step(state, opt_state, x, y):
        model = nnx.merge(graphdef, state)
        model.train()

        def loss_fn(model):
            per_example = optax.softmax_cross_entropy_with_integer_labels(model(x), y)
            return per_example.mean(), per_example

        grads, per_example = nnx.grad(loss_fn, has_aux=True)(model)
        params = nnx.state(model, nnx.Param)
        updates, opt_state = tx.update(grads, opt_state, params)
        nnx.update(model, optax.apply_updates(params, updates))
        accuracy = evaluate(model, x, y)
        _, smoothed = smooth(jnp.zeros(()), per_example)
        return nnx.split(model)[1], opt_state, smoothed[-1], accuracy

    out = []
    for i, (x, y) in enumerate(batches(steps)):
        state, opt_state, smoothed, accuracy = train_step(state, opt_state, x, y)
        out.append((smoothed, accuracy))
        print(f"step {i} smoothed {float(smoothed):.5f} accuracy {float(accuracy):.3f}")
    return out, [nnx.to_pure_dict(state), opt_state]


def nnx_branch_on_loss(wrap, steps: int = 12):
    """A module mutated inside a Python branch on the fetched loss."""
    from flax import nnx

    model = _nnx_model(nnx.Rngs(params=0, dropout=1))
    optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)

    @wrap
    def train_step(model, optimizer, x, y):
        def loss_fn(model):
            return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        if loss > 1.5:          # a fetch: the branch Python takes depends on the value
            optimizer.update(model, grads)
            model.bn.momentum = 0.5
        else:
            model.bn.momentum = 0.99
            print("skipped update at loss", f"{float(loss):.4f}")
        return loss

    losses = []
    for x, y in batches(steps):
        losses.append(train_step(model, optimizer, x, y))
    return losses, _nnx_state(model, optimizer) + [model.bn.momentum]


def nnx_shape_change(wrap, steps: int = 12):
    """A step that replaces a layer by a wider one (new Variables, new shapes)."""
    from flax import nnx

    model = _nnx_model(nnx.Rngs(params=0, dropout=1), width=8)
    rngs = nnx.Rngs(7)

    @wrap
    def train_step(model, x, y, i):
        if i == steps // 2:
            model.hidden = nnx.Linear(FEATURES, 12, use_bias=False, rngs=rngs)
            model.bn = nnx.BatchNorm(12, rngs=rngs)
            model.head = nnx.Linear(12, CLASSES, rngs=rngs)

        def loss_fn(model):
            return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        params = nnx.state(model, nnx.Param)
        nnx.update(model, jax.tree.map(lambda p, g: p - 0.1 * g, params, grads))
        return loss

    losses = []
    for i, (x, y) in enumerate(batches(steps)):
        losses.append(train_step(model, x, y, i))
        print(f"step {i} loss {float(losses[-1]):.5f} width {model.hidden.out_features}")
    return losses, _nnx_state(model)


def nnx_hijax(wrap, steps: int = 4):
    """Variables created with hijax=True (mutable hijax state) read and written in the step."""
    from flax import nnx

    with nnx.var_defaults(hijax=True):
        model = nnx.Linear(FEATURES, CLASSES, rngs=nnx.Rngs(0))

    @wrap(strict=False)
    def train_step(model, x):
        out = model(x).mean()
        model.kernel[...] = model.kernel[...] * 0.9
        return out

    outs = []
    for x, _ in batches(steps):
        outs.append(train_step(model, x))
        print(f"out {float(outs[-1]):.5f}")
    return outs, [by_path(nnx.to_pure_dict(nnx.state(model)))]


# ---------------------------------------------------------------- Equinox

def _eqx_model(key, width: int = 16):
    import equinox as eqx

    class MLP(eqx.Module):
        hidden: eqx.nn.Linear
        bn: eqx.nn.BatchNorm
        dropout: eqx.nn.Dropout
        head: eqx.nn.Linear

        def __init__(self, key):
            k1, k2 = jax.random.split(key)
            self.hidden = eqx.nn.Linear(FEATURES, width, use_bias=False, key=k1)
            self.bn = eqx.nn.BatchNorm(width, axis_name="batch", mode="batch")
            self.dropout = eqx.nn.Dropout(0.2)
            self.head = eqx.nn.Linear(width, CLASSES, key=k2)

        def __call__(self, x, state, key):
            x, state = self.bn(self.hidden(x), state)
            return self.head(self.dropout(jax.nn.relu(x), key=key)), state

    return eqx.nn.make_with_state(MLP)(key)


def eqx_train(wrap, steps: int = 10):
    """filter_value_and_grad, eqx.nn.State/BatchNorm, Dropout keys, filter_jit nested."""
    import equinox as eqx

    model, state = _eqx_model(jax.random.PRNGKey(0))
    opt = optax.adam(1e-2)
    opt_state = opt.init(eqx.filter(model, eqx.is_inexact_array))

    @eqx.filter_jit
    def accuracy(model, state, x, y):
        model = eqx.nn.inference_mode(model)
        logits, _ = jax.vmap(model, axis_name="batch", in_axes=(0, None, None),
                             out_axes=(0, None))(x, state, None)
        return (jnp.argmax(logits, -1) == y).mean()

    @wrap
    def train_step(model, state, opt_state, x, y, key):
        def loss_fn(model, state):
            keys = jax.random.split(key, x.shape[0])
            logits, state = jax.vmap(model, axis_name="batch", in_axes=(0, None, 0),
                                     out_axes=(0, None))(x, state, keys)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), state

        (loss, state), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(model, state)
        updates, opt_state = opt.update(grads, opt_state, eqx.filter(model, eqx.is_inexact_array))
        model = eqx.apply_updates(model, updates)
        return model, state, opt_state, loss, accuracy(model, state, x, y)

    key = jax.random.PRNGKey(1)
    out = []
    for i, (x, y) in enumerate(batches(steps)):
        key, sub = jax.random.split(key)
        model, state, opt_state, loss, acc = train_step(model, state, opt_state, x, y, sub)
        out.append((loss, acc))
        print(f"step {i} loss {float(loss):.5f} accuracy {float(acc):.3f} "
              f"state {digest((eqx.filter(model, eqx.is_array), state, opt_state))}")
    return out, by_path([eqx.filter(model, eqx.is_array), state, opt_state])


def eqx_branch_on_loss(wrap, steps: int = 12):
    """eqx.tree_at replacing a layer inside a Python branch on the fetched loss."""
    import equinox as eqx

    model, state = _eqx_model(jax.random.PRNGKey(0))

    @wrap
    def train_step(model, state, x, y, key):
        def loss_fn(model, state):
            logits, state = jax.vmap(model, axis_name="batch", in_axes=(0, None, None),
                                     out_axes=(0, None))(x, state, key)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), state

        (loss, state), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(model, state)
        model = eqx.apply_updates(model, jax.tree.map(lambda g: -0.2 * g, grads))
        if loss < 1.1:
            model = eqx.tree_at(lambda m: m.dropout, model, eqx.nn.Dropout(0.0))
            print("dropout off at loss", f"{float(loss):.4f}")
        return model, state, loss

    losses = []
    for i, (x, y) in enumerate(batches(steps)):
        model, state, loss = train_step(model, state, x, y, jax.random.PRNGKey(i))
        losses.append(loss)
    return losses, [by_path([eqx.filter(model, eqx.is_array), state]), model.dropout.p]


# ---------------------------------------------------------------- Haiku

def haiku_train(wrap, steps: int = 10):
    """hk.transform_with_state (BatchNorm state, dropout), hk.PRNGSequence in and out of the step."""
    import haiku as hk

    def forward(x, is_training):
        x = hk.Linear(16, with_bias=False)(x)
        x = hk.BatchNorm(create_scale=True, create_offset=True, decay_rate=0.9)(x, is_training)
        x = jax.nn.relu(x)
        if is_training:
            x = hk.dropout(hk.next_rng_key(), 0.2, x)
        return hk.Linear(CLASSES)(x)

    net = hk.transform_with_state(forward)
    rng = hk.PRNGSequence(0)
    x0, _ = next(batches(1))
    params, state = net.init(next(rng), x0, True)
    opt = optax.adam(1e-2)
    opt_state = opt.init(params)

    @wrap
    def train_step(params, state, opt_state, x, y, key):
        keys = hk.PRNGSequence(key)

        def loss_fn(params, state):
            logits, state = net.apply(params, state, next(keys), x, True)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), state

        (loss, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, state)
        updates, opt_state = opt.update(grads, opt_state, params)
        logits, _ = net.apply(params, state, None, x, False)
        return optax.apply_updates(params, updates), state, opt_state, loss, logits

    out = []
    for i, (x, y) in enumerate(batches(steps)):
        params, state, opt_state, loss, logits = train_step(params, state, opt_state, x, y,
                                                            next(rng))
        out.append(loss)
        print(f"step {i} loss {float(loss):.5f} top {int(jnp.argmax(logits[0]))} "
              f"state {digest((params, state, opt_state))}")
    return out, [params, state, opt_state, next(rng)]


# ---------------------------------------------------------------- Optax

def _mlp_params(key, width: int = 16) -> dict:
    k1, k2 = jax.random.split(key)
    return {"hidden": {"w": jax.random.normal(k1, (FEATURES, width)) * 0.3, "b": jnp.zeros(width)},
            "head": {"w": jax.random.normal(k2, (width, CLASSES)) * 0.3, "b": jnp.zeros(CLASSES)}}


def _mlp_loss(params, x, y):
    h = jax.nn.relu(x @ params["hidden"]["w"] + params["hidden"]["b"])
    logits = h @ params["head"]["w"] + params["head"]["b"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def optax_train(wrap, steps: int = 12):
    """chain + schedule, multi_transform, MultiSteps, inject_hyperparams with a Python lr."""
    params = _mlp_params(jax.random.PRNGKey(0))
    schedule = optax.warmup_cosine_decay_schedule(0.0, 0.05, 3, steps)
    labels = jax.tree.map_with_path(
        lambda path, _: "bias" if path[-1].key == "b" else "weight", params)
    inner = optax.multi_transform(
        {"weight": optax.chain(optax.clip_by_global_norm(1.0), optax.scale_by_adam(),
                               optax.add_decayed_weights(1e-4),
                               optax.scale_by_schedule(lambda n: -schedule(n))),
         "bias": optax.inject_hyperparams(optax.sgd)(learning_rate=0.1, momentum=0.9)},
        labels)
    opt = optax.MultiSteps(inner, every_k_schedule=2)
    opt_state = opt.init(params)

    @wrap
    def train_step(params, opt_state, x, y, bias_lr):
        opt_state.inner_opt_state.inner_states["bias"].inner_state.hyperparams[
            "learning_rate"] = bias_lr
        loss, grads = jax.value_and_grad(_mlp_loss)(params, x, y)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    losses = []
    for i, (x, y) in enumerate(batches(steps)):
        bias_lr = 0.1 / (1 + i)          # a Python float that changes every step
        params, opt_state, loss = train_step(params, opt_state, x, y, bias_lr)
        losses.append(loss)
        print(f"step {i} loss {float(loss):.5f} lr {bias_lr:.4f} "
              f"mini-step {int(opt_state.mini_step)}")
    return losses, [params, opt_state]


# ---------------------------------------------------------------- Orbax

def orbax_checkpoint(wrap, steps: int = 12):
    """Checkpoint the step's outputs mid-loop, restore them, continue training."""
    import tempfile

    import orbax.checkpoint as ocp

    params = _mlp_params(jax.random.PRNGKey(0))
    opt = optax.adam(1e-2)
    opt_state = opt.init(params)

    @wrap
    def train_step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(_mlp_loss)(params, x, y)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    losses = []
    with tempfile.TemporaryDirectory() as root, ocp.StandardCheckpointer() as ckpt:
        for i, (x, y) in enumerate(batches(steps)):
            params, opt_state, loss = train_step(params, opt_state, x, y)
            losses.append(loss)
            if i % 4 == 3:
                path = f"{root}/step_{i}"
                ckpt.save(path, {"params": params, "opt_state": opt_state})
                ckpt.wait_until_finished()
                target = jax.tree.map(ocp.utils.to_shape_dtype_struct,
                                      {"params": params, "opt_state": opt_state})
                restored = ckpt.restore(path, target)
                params, opt_state = restored["params"], restored["opt_state"]
                print(f"step {i} loss {float(loss):.5f} restored from {path[len(root):]}")
    return losses, [params, opt_state]


class Program(NamedTuple):
    library: str        # the distribution name (its version goes in the table)
    feature: str        # what the program exercises
    run: Callable
    steps: int
    jit: str | None = None   # the hand-jitted version of its step (benchmark), if stageable


PROGRAMS: dict[str, Program] = {
    "nnx_train": Program("flax", nnx_train.__doc__, nnx_train, 8, "nnx.jit"),
    "nnx_functional": Program("flax", nnx_functional.__doc__, nnx_functional, 8, "jax.jit"),
    "nnx_branch_on_loss": Program("flax", nnx_branch_on_loss.__doc__, nnx_branch_on_loss, 10),
    "nnx_shape_change": Program("flax", nnx_shape_change.__doc__, nnx_shape_change, 8),
    "nnx_hijax": Program("flax", nnx_hijax.__doc__, nnx_hijax, 4),
    "eqx_train": Program("equinox", eqx_train.__doc__, eqx_train, 8, "eqx.filter_jit"),
    "eqx_branch_on_loss": Program("equinox", eqx_branch_on_loss.__doc__, eqx_branch_on_loss, 10),
    "haiku_train": Program("dm-haiku", haiku_train.__doc__, haiku_train, 8, "jax.jit"),
    "optax_train": Program("optax", optax_train.__doc__, optax_train, 10, "jax.jit"),
    "orbax_checkpoint": Program("orbax-checkpoint", orbax_checkpoint.__doc__, orbax_checkpoint,
                                10, "jax.jit"),
}


def check(name: str, **options) -> harness.Differential:
    """Run program `name` eagerly and under Terra, demand the same; record the outcome."""
    program = PROGRAMS[name]
    res = harness.differential(program.run, steps=program.steps, **options)
    _record(name, program, res)
    return res


def _record(name: str, program: Program, res: harness.Differential) -> None:
    # One JSON line per checked program, for the compatibility table
    # (`python benchmarks/libraries.py --table` sets TERRA_COMPAT_RECORD).
    path = os.environ.get("TERRA_COMPAT_RECORD")
    if not path:
        return
    stats = [f.stats() for f in res.functions]
    row = dict(
        program=name, library=program.library, version=metadata.version(program.library),
        feature=program.feature, steps=res.eager.wrap.calls,
        coexecuted=res.stats.coexecuted, fallbacks=res.stats.fallbacks,
        eager=res.eager.wrap.calls - res.stats.coexecuted - res.stats.traced - res.stats.fallbacks,
        divergences=sorted({_short(s.last_divergence) for s in stats if s.last_divergence}),
        warnings=sorted({w for w in res.terra.warnings if w.startswith("TerraWarning")}),
    )
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def _short(divergence: str) -> str:
    """`/abs/path/file.py:12: reason` -> `file.py:12 `<source line>`: reason`."""
    match = re.match(r"^(\S*/)?([^/\s]+):(\d+): (.*)$", divergence)
    if match is None:
        return divergence
    folder, file, line, reason = match.groups()
    source = linecache.getline(f"{folder or ''}{file}", int(line)).strip()
    return f"{file}:{line} {source!r}: {reason}"
