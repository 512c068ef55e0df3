"""Train a small ResNet (batch norm) on synthetic CIFAR-shaped data.

A plain imperative JAX program: a 3-stage ResNet (one basic block per
stage, 16/32/64 channels) with batch normalisation whose running statistics are
carried between steps as state, `jax.value_and_grad` with an auxiliary output,
optax SGD with momentum, numpy data, a Python loop that logs. Nothing in it
knows about Terra.

This is a *stageable baseline*: the step has no Python feature that stops
`jax.jit` -- `jax.jit(train_step)` runs and gives eager's results.

    python examples/resnet.py --steps 20                  # eager JAX
    python examples/resnet.py --steps 20 --mode jit       # jax.jit(train_step)
    python examples/resnet.py --steps 20 --mode terra     # terra.function(train_step)
    python examples/resnet.py --steps 20 --mode expert    # the hand partial-jit version
"""

import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402  (examples/ is not a package)

BATCH = 32
IMAGE = (32, 32, 3)
NUM_CLASSES = 10
STAGES = (16, 32, 64)  # one basic block per stage; stages 2 and 3 downsample
LEARNING_RATE = 0.02
BN_MOMENTUM = 0.9
BN_EPS = 1e-5
LOG_EVERY = 5

STEP_FUNCTIONS = ("train_step",)


def make_dataset(seed=0, n_batches=8):
    """Synthetic CIFAR: per-class smooth colour patterns plus pixel noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.linspace(0, 1, IMAGE[0]), np.linspace(0, 1, IMAGE[1]),
                         indexing="ij")
    freq = rng.uniform(1.0, 6.0, size=(NUM_CLASSES, 3, 2))
    phase = rng.uniform(0.0, 2 * np.pi, size=(NUM_CLASSES, 3))
    patterns = np.stack(
        [np.stack([np.sin(2 * np.pi * (f[c, 0] * yy + f[c, 1] * xx) + p[c])
                   for c in range(3)], axis=-1)
         for f, p in zip(freq, phase)]).astype(np.float32)
    batches = []
    for _ in range(n_batches):
        y = rng.integers(0, NUM_CLASSES, size=BATCH).astype(np.int32)
        noise = rng.normal(0.0, 0.5, size=(BATCH,) + IMAGE).astype(np.float32)
        batches.append(((patterns[y] + noise).astype(np.float32), y))
    return batches


def init_params(seed=0):
    """He-initialised convolutions, batch-norm scale 1 / bias 0, running stats 0 / 1."""
    rng = np.random.default_rng(seed + 1000)  # numpy init: no per-shape XLA compiles

    def conv(k, c_in, c_out):
        fan_in = k * k * c_in
        w = rng.normal(0.0, np.sqrt(2.0 / fan_in), size=(k, k, c_in, c_out))
        return jnp.asarray(w, jnp.float32)

    def bn(c):
        return {"scale": jnp.ones((c,), jnp.float32), "bias": jnp.zeros((c,), jnp.float32)}

    def bn_stats(c):
        return {"mean": jnp.zeros((c,), jnp.float32), "var": jnp.ones((c,), jnp.float32)}

    params = {"stem": {"w": conv(3, IMAGE[2], STAGES[0]), "bn": bn(STAGES[0])}}
    stats = {"stem": bn_stats(STAGES[0])}
    c_in = STAGES[0]
    for i, c in enumerate(STAGES):
        block = {"conv1": conv(3, c_in, c), "bn1": bn(c), "conv2": conv(3, c, c), "bn2": bn(c)}
        block_stats = {"bn1": bn_stats(c), "bn2": bn_stats(c)}
        if c_in != c:  # projection shortcut
            block["proj"] = conv(1, c_in, c)
            block["bn_proj"] = bn(c)
            block_stats["bn_proj"] = bn_stats(c)
        params[f"block{i + 1}"] = block
        stats[f"block{i + 1}"] = block_stats
        c_in = c
    params["dense"] = {
        "w": jnp.asarray(rng.normal(0.0, 1.0 / np.sqrt(c_in), size=(c_in, NUM_CLASSES)),
                         jnp.float32),
        "b": jnp.zeros((NUM_CLASSES,), jnp.float32),
    }
    return params, stats


def conv2d(x, w, stride=1):
    return jax.lax.conv_general_dilated(
        x, w, window_strides=(stride, stride), padding="SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def batch_norm(x, p, stats, train):
    """Returns (normalised x, updated running statistics)."""
    if train:
        mean = jnp.mean(x, axis=(0, 1, 2))
        var = jnp.var(x, axis=(0, 1, 2))
        stats = {"mean": BN_MOMENTUM * stats["mean"] + (1 - BN_MOMENTUM) * mean,
                 "var": BN_MOMENTUM * stats["var"] + (1 - BN_MOMENTUM) * var}
    else:
        mean, var = stats["mean"], stats["var"]
    y = (x - mean) * jax.lax.rsqrt(var + BN_EPS)
    return y * p["scale"] + p["bias"], stats


def basic_block(x, p, stats, stride, train):
    new = {}
    y = conv2d(x, p["conv1"], stride)
    y, new["bn1"] = batch_norm(y, p["bn1"], stats["bn1"], train)
    y = jax.nn.relu(y)
    y = conv2d(y, p["conv2"])
    y, new["bn2"] = batch_norm(y, p["bn2"], stats["bn2"], train)
    if "proj" in p:
        x = conv2d(x, p["proj"], stride)
        x, new["bn_proj"] = batch_norm(x, p["bn_proj"], stats["bn_proj"], train)
    return jax.nn.relu(x + y), new


def predict(params, stats, x, train=True):
    new = {"stem": None}
    # stride-2 stem: the three stages run at 16x16, 8x8 and 4x4
    h = conv2d(x, params["stem"]["w"], stride=2)
    h, new["stem"] = batch_norm(h, params["stem"]["bn"], stats["stem"], train)
    h = jax.nn.relu(h)
    for i in range(len(STAGES)):
        name = f"block{i + 1}"
        h, new[name] = basic_block(h, params[name], stats[name], 1 if i == 0 else 2, train)
    h = jnp.mean(h, axis=(1, 2))  # global average pool
    return h @ params["dense"]["w"] + params["dense"]["b"], new


optimizer = optax.sgd(LEARNING_RATE, momentum=0.9)


def init_state(seed=0):
    params, batch_stats = init_params(seed)
    return params, batch_stats, optimizer.init(params)


def train_step(params, batch_stats, opt_state, x, y):
    def loss_fn(params):
        logits, new_stats = predict(params, batch_stats, x, train=True)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, (logits, new_stats)

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    accuracy = jnp.mean(jnp.argmax(logits, axis=-1) == y)
    return params, batch_stats, opt_state, loss, accuracy


# The whole step is pure, so an expert jits all of it.
EXPERT_STEPS = {"train_step": jax.jit(train_step)}


def run(wrap, steps, log=print, seed=0, timings=None):
    """Train for `steps` steps from fresh state; returns the final variables."""
    data = make_dataset(seed)
    params, batch_stats, opt_state = init_state(seed)
    step_fn = wrap(globals()["train_step"])
    loss_sum, n = 0.0, 0
    for step in range(1, steps + 1):
        start = time.perf_counter()
        x, y = data[(step - 1) % len(data)]
        params, batch_stats, opt_state, loss, acc = step_fn(params, batch_stats,
                                                            opt_state, x, y)
        if step % LOG_EVERY == 0:
            loss_sum += float(loss)
            n += 1
            log(f"step {step} loss {float(loss):.4f} acc {float(acc):.3f} "
                f"mean logged loss {loss_sum / n:.4f}")
        if timings is not None:
            timings.append(time.perf_counter() - start)
    return {"params": params, "batch_stats": batch_stats}


def main(argv=None):
    return _common.cli(run, __doc__, argv, experts=EXPERT_STEPS)


if __name__ == "__main__":
    sys.exit(main())
