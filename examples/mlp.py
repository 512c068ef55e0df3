"""Train a small MLP on synthetic MNIST-shaped data, the ordinary imperative way.

This is a plain JAX program: eager `jax.numpy`, `jax.value_and_grad`, optax,
numpy data, a Python loop that logs. Nothing in it knows about Terra.

    python examples/mlp.py --steps 100                 # eager JAX
    python examples/mlp.py --steps 100 --mode jit      # jax.jit(train_step)
    python examples/mlp.py --steps 100 --mode terra    # terra.function(train_step)
    python examples/mlp.py --steps 100 --mode expert   # what an expert writes: jax.jit
    python -m terra run --step train_step examples/mlp.py --steps 100
    python examples/mlp.py --compare --steps 60        # eager vs terra, side by side
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

BATCH = 64
LAYERS = (784, 256, 256, 10)
LEARNING_RATE = 1e-3

optimizer = optax.adam(LEARNING_RATE)


def make_dataset(seed=0, n_batches=32):
    """Synthetic MNIST: 10 class prototypes in [0, 1]^784 plus noise."""
    rng = np.random.default_rng(seed)
    prototypes = rng.uniform(0.3, 0.7, size=(10, 784)).astype(np.float32)
    batches = []
    for _ in range(n_batches):
        y = rng.integers(0, 10, size=BATCH).astype(np.int32)
        noise = rng.normal(0.0, 0.5, size=(BATCH, 784)).astype(np.float32)
        x = np.clip(prototypes[y] + noise, 0.0, 1.0).astype(np.float32)
        batches.append((x, y))
    return batches


def init_params(seed=0):
    key = jax.random.PRNGKey(seed)
    params = []
    for n_in, n_out in zip(LAYERS[:-1], LAYERS[1:]):
        key, sub = jax.random.split(key)
        w = jax.random.normal(sub, (n_in, n_out), jnp.float32) * jnp.sqrt(2.0 / n_in)
        params.append({"w": w, "b": jnp.zeros((n_out,), jnp.float32)})
    return params


def predict(params, x):
    h = x
    for layer in params[:-1]:
        h = jax.nn.relu(h @ layer["w"] + layer["b"])
    return h @ params[-1]["w"] + params[-1]["b"]


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
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--mode", choices=_common.MODES, default="eager")
    parser.add_argument("--compare", action="store_true",
                        help="run eager and terra side by side and compare")
    args = parser.parse_args(argv)

    if args.compare:
        return _common.compare(sys.modules[__name__], "mlp", args.steps)

    train(_common.mode_wrap(args.mode, EXPERT_STEPS)(train_step), args.steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
