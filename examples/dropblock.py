"""Train a ResNet-like CNN with DropBlock regularisation on synthetic CIFAR data.

DropBlock (Ghiasi et al., NeurIPS 2018) drops contiguous square blocks of a
feature map instead of single units, and its keep probability is scheduled:
it decays linearly from 1.0 to `KEEP_PROB_FINAL` over the first
`KEEP_PROB_DECAY_STEPS` steps. Here, as in many reference implementations,
the schedule and the block masks are computed in numpy inside the step: the
step number is a Python int, the seed points are sampled with `np.random` on
the feature map's shape, grown into blocks with a numpy sliding-window max,
and the renormalisation factor `mask.size / mask.sum()` is a numpy number;
the mask enters the network as a `jnp` array. Everything else is a standard
imperative JAX program (eager `jax.lax` convolutions, `jax.value_and_grad`,
optax SGD with momentum, a Python loop that logs). Nothing in it knows about
Terra.

`jax.jit(train_step)` cannot stage this step: the step number becomes a tracer
and the numpy schedule turns it into a numpy array -- it raises
`TracerArrayConversionError`.

    python examples/dropblock.py --steps 20                  # eager JAX
    python examples/dropblock.py --steps 20 --mode jit       # jax.jit(train_step): raises
    python examples/dropblock.py --steps 20 --mode terra     # terra.function(train_step)
    python examples/dropblock.py --steps 20 --mode expert    # the hand partial-jit version
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
STAGES = (16, 32, 64)       # one residual block per stage; stages 2 and 3 downsample
DROPBLOCK_SIZES = (5, 3)    # DropBlock after stage 1 (16x16) and stage 2 (8x8)
KEEP_PROB_FINAL = 0.85
KEEP_PROB_DECAY_STEPS = 20
LEARNING_RATE = 0.01
LOG_EVERY = 5

STEP_FUNCTIONS = ("train_step",)

optimizer = optax.sgd(LEARNING_RATE, momentum=0.9)

# numpy RNG for the DropBlock masks; `run` replaces it with a seeded one.
mask_rng = np.random.default_rng(0)


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

    def conv(k, c_in, c_out, gain=1.0):
        fan_in = k * k * c_in
        w = rng.normal(0.0, gain * np.sqrt(2.0 / fan_in), size=(k, k, c_in, c_out))
        return {"w": jnp.asarray(w, jnp.float32), "b": jnp.zeros((c_out,), jnp.float32)}

    params = {"stem": conv(3, IMAGE[2], STAGES[0])}
    c_in = STAGES[0]
    for i, c in enumerate(STAGES):
        # the residual branch starts small so the un-normalised sum stays tame
        block = {"conv1": conv(3, c_in, c), "conv2": conv(3, c, c, gain=0.5)}
        if c_in != c:
            block["proj"] = conv(1, c_in, c)
        params[f"block{i + 1}"] = block
        c_in = c
    params["dense"] = {
        "w": jnp.asarray(rng.normal(0.0, 1.0 / np.sqrt(c_in), size=(c_in, NUM_CLASSES)),
                         jnp.float32),
        "b": jnp.zeros((NUM_CLASSES,), jnp.float32),
    }
    return params


def conv2d(x, layer, stride=1):
    y = jax.lax.conv_general_dilated(
        x, layer["w"], window_strides=(stride, stride), padding="SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + layer["b"]


def residual_block(x, p, stride):
    y = jax.nn.relu(conv2d(x, p["conv1"], stride))
    y = conv2d(y, p["conv2"])
    if "proj" in p:
        x = conv2d(x, p["proj"], stride)
    return jax.nn.relu(x + y)


def keep_prob_schedule(step):
    """Linear decay 1.0 -> KEEP_PROB_FINAL over KEEP_PROB_DECAY_STEPS steps (numpy)."""
    return float(np.interp(step, [0, KEEP_PROB_DECAY_STEPS], [1.0, KEEP_PROB_FINAL]))


def dropblock_mask(shape, keep_prob, block_size):
    """numpy DropBlock mask (1 = keep) for an NHWC feature map, and its scale."""
    _, height, width, _ = shape
    block_size = min(block_size, height, width)
    # seed rate so that about (1 - keep_prob) of the units end up dropped
    gamma = ((1.0 - keep_prob) / block_size ** 2 * (height * width)
             / ((height - block_size + 1) * (width - block_size + 1)))
    valid = np.zeros(shape, dtype=bool)  # block centres must keep the block inside
    lo = block_size // 2
    hi_h, hi_w = lo + height - block_size + 1, lo + width - block_size + 1
    valid[:, lo:hi_h, lo:hi_w, :] = True
    seeds = (mask_rng.random(shape) < gamma) & valid
    # grow every seed into a block_size x block_size square (sliding-window max)
    pad = ((0, 0), (lo, block_size - 1 - lo), (lo, block_size - 1 - lo), (0, 0))
    windows = np.lib.stride_tricks.sliding_window_view(
        np.pad(seeds, pad), (block_size, block_size), axis=(1, 2))
    mask = 1.0 - windows.max(axis=(-2, -1)).astype(np.float32)
    scale = np.float32(mask.size / max(mask.sum(), 1.0))
    return mask.astype(np.float32), scale


def sample_mask(shape, keep_prob, block_size, stats):
    """(mask, scale) for one DropBlock layer, None when nothing drops; notes the fraction."""
    if keep_prob >= 1.0:
        stats.append(0.0)
        return None
    mask, scale = dropblock_mask(shape, keep_prob, block_size)
    stats.append(float(1.0 - mask.mean()))
    return mask, scale


def dropblock(h, keep_prob, block_size, stats):
    drop = sample_mask(h.shape, keep_prob, block_size, stats)
    return h if drop is None else h * jnp.asarray(drop[0]) * drop[1]


def predict(params, x, drop):
    """The network; `drop(h, i)` applies the i-th DropBlock layer."""
    h = jax.nn.relu(conv2d(x, params["stem"], stride=2))  # 16x16
    for i in range(len(STAGES)):
        h = residual_block(h, params[f"block{i + 1}"], 1 if i == 0 else 2)
        if i < len(DROPBLOCK_SIZES):
            h = drop(h, i)
    h = jnp.mean(h, axis=(1, 2))  # global average pool
    return h @ params["dense"]["w"] + params["dense"]["b"]


def loss_fn(params, x, y, keep_prob, stats):
    logits = predict(params, x, lambda h, i: dropblock(h, keep_prob, DROPBLOCK_SIZES[i], stats))
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def train_step(params, opt_state, x, y, step):
    keep_prob = keep_prob_schedule(step)
    dropped = []  # fraction of units each DropBlock layer dropped (Python floats)
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y, keep_prob, dropped)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, opt_state, loss, keep_prob, dropped


# The expert's version: the schedule and the masks in numpy up front (the feature map
# shapes follow from the architecture), loss + gradient + update in one jit.
def masked_loss(params, x, y, masks):
    def drop(h, i):
        return h if masks[i] is None else h * masks[i][0] * masks[i][1]

    logits = predict(params, x, drop)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


_expert_update = _common.jit_update(masked_loss, optimizer)


def expert_train_step(params, opt_state, x, y, step):
    keep_prob = keep_prob_schedule(step)
    dropped = []
    # stage i's output: the stem halves the image, every later stage halves it again
    masks = [sample_mask((x.shape[0], IMAGE[0] // 2 ** (i + 1), IMAGE[1] // 2 ** (i + 1),
                          STAGES[i]), keep_prob, size, dropped)
             for i, size in enumerate(DROPBLOCK_SIZES)]
    params, opt_state, loss = _expert_update(params, opt_state, x, y, masks)
    return params, opt_state, loss, keep_prob, dropped


EXPERT_STEPS = {"train_step": expert_train_step}


def run(wrap, steps, log=print, seed=0, timings=None):
    """Train for `steps` steps from fresh state; returns the final parameters."""
    global mask_rng
    mask_rng = np.random.default_rng(seed + 1)
    data = make_dataset(seed)
    params = init_params(seed)
    opt_state = optimizer.init(params)
    step_fn = wrap(globals()["train_step"])
    dropped_sum = np.zeros(len(DROPBLOCK_SIZES))
    for step in range(1, steps + 1):
        start = time.perf_counter()
        x, y = data[(step - 1) % len(data)]
        params, opt_state, loss, keep_prob, dropped = step_fn(params, opt_state, x, y, step)
        dropped_sum += np.asarray(dropped, dtype=np.float64)
        if step % LOG_EVERY == 0:
            frac = " ".join(f"{d:.4f}" for d in dropped)
            mean = " ".join(f"{d:.4f}" for d in dropped_sum / step)
            log(f"step {step} loss {float(loss):.4f} keep_prob {float(keep_prob):.4f} "
                f"dropped {frac} (mean {mean})")
        if timings is not None:
            timings.append(time.perf_counter() - start)
    return params


def main(argv=None):
    return _common.cli(run, __doc__, argv, experts=EXPERT_STEPS)


if __name__ == "__main__":
    sys.exit(main())
