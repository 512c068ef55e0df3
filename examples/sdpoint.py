"""Train a CNN with stochastic downsampling points (SDPoint) on synthetic CIFAR data.

SDPoint (Kuen et al., CVPR 2018): at every training step the network picks, at
random, WHERE (before which layer) to downsample its feature maps and by HOW
MUCH (ratio 0.5 or 0.75), or not to downsample at all; the model learns to work
at all of these cost/resolution points. The choice is an ordinary Python random
draw (`random.Random`) made inside the step, so the sequence of ops -- and the
shapes flowing through the network -- changes from step to step among a few
variants. Everything else is a standard imperative JAX program: eager
`jax.lax` convolutions, `jax.image.resize`, `jax.value_and_grad`, optax adam,
numpy data, a Python loop that logs. Nothing in it knows about Terra.

`jax.jit(train_step)` traces the step once: the random draw happens at trace
time, so every later call silently reuses that one variant -- the run prints
different results than eager.

    python examples/sdpoint.py --steps 20                  # eager JAX
    python examples/sdpoint.py --steps 20 --mode jit       # jax.jit(train_step)
    python examples/sdpoint.py --steps 20 --mode terra     # terra.function(train_step)
    python examples/sdpoint.py --steps 20 --mode expert    # the hand partial-jit version
"""

import collections
import random
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
# (out channels, stride) of the convolution layers
LAYERS = ((16, 1), (32, 2), (32, 1), (64, 2))
# SDPoint candidates: downsample before layer index `point` by `ratio`;
# (0, 1.0) means "no downsampling this step".
CHOICES = ((0, 1.0), (1, 0.5), (3, 0.75))
LEARNING_RATE = 1e-3
LOG_EVERY = 5

STEP_FUNCTIONS = ("train_step",)

optimizer = optax.adam(LEARNING_RATE)

# The Python RNG that draws the downsampling point; `run` reseeds it.
sdpoint_rng = random.Random(0)


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
    rng = np.random.default_rng(seed + 1000)  # numpy init: no per-shape XLA compiles
    params = {"convs": []}
    c_in = IMAGE[2]
    for c_out, _ in LAYERS:
        w = rng.normal(0.0, np.sqrt(2.0 / (9 * c_in)), size=(3, 3, c_in, c_out))
        params["convs"].append({"w": jnp.asarray(w, jnp.float32),
                                "b": jnp.zeros((c_out,), jnp.float32)})
        c_in = c_out
    params["dense"] = {
        "w": jnp.asarray(rng.normal(0.0, 1.0 / np.sqrt(c_in), size=(c_in, NUM_CLASSES)),
                         jnp.float32),
        "b": jnp.zeros((NUM_CLASSES,), jnp.float32),
    }
    return params


def downsample(h, ratio):
    """Bilinear (anti-aliased) resize of the spatial dims by `ratio`."""
    b, height, width, c = h.shape
    new_shape = (b, max(1, int(round(height * ratio))), max(1, int(round(width * ratio))), c)
    return jax.image.resize(h, new_shape, method="linear")


def predict(params, x, point=0, ratio=1.0):
    h = x
    for i, (layer, (_, stride)) in enumerate(zip(params["convs"], LAYERS)):
        if i == point and ratio < 1.0:
            h = downsample(h, ratio)
        h = jax.lax.conv_general_dilated(
            h, layer["w"], window_strides=(stride, stride), padding="SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"))
        h = jax.nn.relu(h + layer["b"])
    h = jnp.mean(h, axis=(1, 2))  # global average pool: any resolution works
    return h @ params["dense"]["w"] + params["dense"]["b"]


def loss_fn(params, x, y, point, ratio):
    logits = predict(params, x, point, ratio)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def train_step(params, opt_state, x, y):
    # The stochastic downsampling point: a fresh Python draw every step.
    point, ratio = sdpoint_rng.choice(CHOICES)
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y, point, ratio)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, opt_state, loss, point, ratio


# The expert's version: the draw in Python, loss + gradient + update in one jit with
# the downsampling point static (compiled once per choice).
_expert_update = _common.jit_update(loss_fn, optimizer, static_argnums=(3, 4))


def expert_train_step(params, opt_state, x, y):
    point, ratio = sdpoint_rng.choice(CHOICES)
    params, opt_state, loss = _expert_update(params, opt_state, x, y, point, ratio)
    return params, opt_state, loss, point, ratio


EXPERT_STEPS = {"train_step": expert_train_step}


def run(wrap, steps, log=print, seed=0, timings=None):
    """Train for `steps` steps from fresh state; returns the final parameters."""
    sdpoint_rng.seed(seed)
    data = make_dataset(seed)
    params = init_params(seed)
    opt_state = optimizer.init(params)
    step_fn = wrap(globals()["train_step"])
    used = collections.Counter()
    for step in range(1, steps + 1):
        start = time.perf_counter()
        x, y = data[(step - 1) % len(data)]
        params, opt_state, loss, point, ratio = step_fn(params, opt_state, x, y)
        point, ratio = int(point), float(ratio)
        used["full" if point == 0 else f"p{point}@{ratio:g}"] += 1
        if step % LOG_EVERY == 0:
            counts = " ".join(f"{k}={v}" for k, v in sorted(used.items()))
            log(f"step {step} loss {float(loss):.4f} sdpoint p{point} r{ratio:g} "
                f"variants [{counts}]")
        if timings is not None:
            timings.append(time.perf_counter() - start)
    return params


def main(argv=None):
    return _common.cli(run, __doc__, argv, experts=EXPERT_STEPS)


if __name__ == "__main__":
    sys.exit(main())
