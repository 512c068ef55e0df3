"""Train a small CNN on synthetic CIFAR-shaped data, the ordinary imperative way.

A plain JAX program (eager `jax.lax` convolutions, `jax.value_and_grad`, optax
SGD with momentum, numpy data); nothing in it knows about Terra. The convolutions
dominate the step, so the step is graph-bound: XLA compute, not Python, sets its
speed, and `jax.jit` is not much faster than eager.

    python examples/cnn.py --steps 50                  # eager JAX
    python examples/cnn.py --steps 50 --mode jit       # jax.jit(train_step)
    python examples/cnn.py --steps 50 --mode terra     # terra.function(train_step)
    python examples/cnn.py --steps 50 --mode expert    # what an expert writes: jax.jit
    python -m terra run --step train_step examples/cnn.py --steps 50
    python examples/cnn.py --compare --steps 40        # eager vs terra, side by side
"""

import argparse
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
CHANNELS = (64, 128)
NUM_CLASSES = 10

optimizer = optax.sgd(learning_rate=0.01, momentum=0.9)


def make_dataset(seed=0, n_batches=16):
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
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    c_in, c1, c2 = IMAGE[2], CHANNELS[0], CHANNELS[1]

    def he(key, shape, fan_in):
        return jax.random.normal(key, shape, jnp.float32) * jnp.sqrt(2.0 / fan_in)

    return {
        "conv1": {"w": he(k1, (3, 3, c_in, c1), 9 * c_in), "b": jnp.zeros((c1,))},
        "conv2": {"w": he(k2, (3, 3, c1, c2), 9 * c1), "b": jnp.zeros((c2,))},
        "dense": {"w": he(k3, (c2, NUM_CLASSES), c2), "b": jnp.zeros((NUM_CLASSES,))},
    }


def conv(x, layer, stride):
    y = jax.lax.conv_general_dilated(
        x, layer["w"], window_strides=(stride, stride), padding="SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + layer["b"]


def predict(params, x):
    h = jax.nn.relu(conv(x, params["conv1"], stride=1))
    h = jax.nn.relu(conv(h, params["conv2"], stride=2))
    h = jnp.mean(h, axis=(1, 2))  # global average pool
    return h @ params["dense"]["w"] + params["dense"]["b"]


def loss_fn(params, x, y):
    logits = predict(params, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def train_step(params, opt_state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, opt_state, loss


STEP_FUNCTIONS = ("train_step",)  # for `python -m terra bench`
# The whole step is pure, so an expert jits all of it.
EXPERT_STEPS = {"train_step": jax.jit(train_step)}


def run(wrap, steps, log=print, seed=0, timings=None):
    """The benchmark entry point: the training loop with `wrap(train_step)`."""
    return train(wrap(train_step), steps, log=log, seed=seed, timings=timings)


def train(step_fn, steps, log=print, seed=0, timings=None):
    """The training loop. `timings`, if given, collects each step's wall time."""
    data = make_dataset(seed)
    params = init_params(seed)
    opt_state = optimizer.init(params)
    for step in range(1, steps + 1):
        start = time.perf_counter()
        x, y = data[(step - 1) % len(data)]
        params, opt_state, loss = step_fn(params, opt_state, x, y)
        if step % 10 == 0:
            log(f"step {step} loss {float(loss):.4f}")
        if timings is not None:
            timings.append(time.perf_counter() - start)
    return params


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--mode", choices=_common.MODES, default="eager")
    parser.add_argument("--compare", action="store_true",
                        help="run eager and terra side by side and compare")
    args = parser.parse_args(argv)

    if args.compare:
        return _common.compare(sys.modules[__name__], "cnn", args.steps)

    train(_common.mode_wrap(args.mode, EXPERT_STEPS)(train_step), args.steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
