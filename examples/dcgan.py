"""Train a small DCGAN on synthetic 16x16 "digit" images, the ordinary imperative way.

A plain JAX program: flax.linen generator and discriminator, two optax adam
optimizers, two step functions (`d_step`, `g_step`) and a Python training loop
that decides, from fetched losses, how many discriminator updates to run and
whether to run the generator update at all. Nothing in it knows about Terra.

What makes whole-step staging hard, inside the step functions:

* both steps draw their latent noise from a `np.random.RandomState` every call
  (under `jax.jit` the noise would be drawn once, at trace time, and frozen);
* `d_step` adds numpy instance noise of a Python-float strength to the real
  images and computes the discriminator's batch accuracy in numpy on the
  fetched logits (`np.asarray(logits)`), returned as a Python float.

    python examples/dcgan.py --steps 20                 # eager JAX
    python examples/dcgan.py --steps 20 --mode jit      # jax.jit(d_step), jax.jit(g_step)
    python examples/dcgan.py --steps 20 --mode terra    # terra.function(...)
    python examples/dcgan.py --steps 20 --mode expert   # the hand partial-jit version
"""

import os
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402  (examples/ is not a package)

BATCH = 32
IMAGE = 16
LATENT = 32
LOG_EVERY = 4

# Alternation heuristics (the user's, chosen by looking at the losses).
G_STRONG = 0.69     # previous G loss below this: G fools D, train D twice
D_CONFUSED = 1.25   # D loss above this: D has learned nothing yet, skip the G step

STEP_FUNCTIONS = ("d_step", "g_step")


class Generator(nn.Module):
    @nn.compact
    def __call__(self, z):
        x = nn.Dense(4 * 4 * 64)(z)
        x = nn.relu(x).reshape((z.shape[0], 4, 4, 64))
        x = nn.relu(nn.ConvTranspose(32, (4, 4), strides=(2, 2), padding="SAME")(x))  # 8x8
        x = nn.ConvTranspose(1, (4, 4), strides=(2, 2), padding="SAME")(x)            # 16x16
        return jnp.tanh(x)


class Discriminator(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.leaky_relu(nn.Conv(32, (4, 4), strides=(2, 2), padding="SAME")(x), 0.2)
        x = nn.leaky_relu(nn.Conv(64, (4, 4), strides=(2, 2), padding="SAME")(x), 0.2)
        x = x.reshape((x.shape[0], -1))
        return nn.Dense(1)(x)[:, 0]


generator = Generator()
discriminator = Discriminator()
d_optimizer = optax.adam(2e-4, b1=0.5)
g_optimizer = optax.adam(2e-4, b1=0.5)

# The program's noise source (a numpy RandomState, as in many GAN scripts);
# `run` reseeds it so every run is reproducible.
noise_rng = np.random.RandomState(0)


def sample_latent(n):
    return noise_rng.normal(size=(n, LATENT)).astype(np.float32)


def make_dataset(seed=0, n_batches=16):
    """Synthetic 'digits': anti-aliased rings and bars in [-1, 1], 16x16x1."""
    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.arange(IMAGE) + 0.5, np.arange(IMAGE) + 0.5, indexing="ij")
    batches = []
    for _ in range(n_batches):
        imgs = np.empty((BATCH, IMAGE, IMAGE, 1), np.float32)
        for i in range(BATCH):
            cy, cx = rng.uniform(5, 11, size=2)
            if rng.uniform() < 0.5:   # a "zero": a ring
                r = rng.uniform(3.0, 5.5)
                d = np.abs(np.hypot(yy - cy, xx - cx) - r)
            else:                     # a "one": a slanted bar
                a = rng.uniform(-0.4, 0.4)
                d = np.abs((xx - cx) - a * (yy - cy))
                d = np.where(np.abs(yy - cy) < 5.5, d, 9.0)
            ink = np.clip(1.5 - d, 0.0, 1.0)
            imgs[i, :, :, 0] = 2.0 * ink - 1.0
        batches.append(imgs)
    return batches


def bce_with_logits(logits, target):
    return optax.sigmoid_binary_cross_entropy(logits, jnp.full_like(logits, target)).mean()


def d_loss(dp, real, fake):
    real_logits = discriminator.apply(dp, real)
    fake_logits = discriminator.apply(dp, fake)
    # one-sided label smoothing on the real side
    loss = bce_with_logits(real_logits, 0.9) + bce_with_logits(fake_logits, 0.0)
    return loss, (real_logits, fake_logits)


def g_loss(gp, d_params, z):
    fake = generator.apply(gp, z)
    return bce_with_logits(discriminator.apply(d_params, fake), 1.0)  # non-saturating


def d_accuracy(real_logits, fake_logits):
    """Python-side metric on the fetched logits."""
    return float(0.5 * (np.mean(np.asarray(real_logits) > 0)
                        + np.mean(np.asarray(fake_logits) < 0)))


def d_step(d_params, d_opt_state, g_params, real, instance_noise):
    # numpy noise every step: latent codes and instance noise on the real batch
    z = sample_latent(real.shape[0])
    real = real + instance_noise * noise_rng.normal(size=real.shape).astype(np.float32)
    fake = generator.apply(g_params, z)
    (loss, (real_logits, fake_logits)), grads = jax.value_and_grad(
        d_loss, has_aux=True)(d_params, real, fake)
    updates, d_opt_state = d_optimizer.update(grads, d_opt_state, d_params)
    d_params = optax.apply_updates(d_params, updates)
    return d_params, d_opt_state, loss, d_accuracy(real_logits, fake_logits)


def g_step(g_params, g_opt_state, d_params):
    z = sample_latent(BATCH)
    loss, grads = jax.value_and_grad(g_loss)(g_params, d_params, z)
    updates, g_opt_state = g_optimizer.update(grads, g_opt_state, g_params)
    g_params = optax.apply_updates(g_params, updates)
    return g_params, g_opt_state, loss


# The expert's version: the numpy noise and the metric on the host, the generator's
# forward and each loss + gradient + update in jit.
_generate = jax.jit(generator.apply)
_expert_d_update = _common.jit_update(d_loss, d_optimizer, has_aux=True)
_expert_g_update = _common.jit_update(g_loss, g_optimizer)


def expert_d_step(d_params, d_opt_state, g_params, real, instance_noise):
    z = sample_latent(real.shape[0])
    real = real + instance_noise * noise_rng.normal(size=real.shape).astype(np.float32)
    d_params, d_opt_state, (loss, (real_logits, fake_logits)) = _expert_d_update(
        d_params, d_opt_state, real, _generate(g_params, z))
    return d_params, d_opt_state, loss, d_accuracy(real_logits, fake_logits)


def expert_g_step(g_params, g_opt_state, d_params):
    return _expert_g_update(g_params, g_opt_state, d_params, sample_latent(BATCH))


EXPERT_STEPS = {"d_step": expert_d_step, "g_step": expert_g_step}


def init_params(seed=0):
    kg, kd = jax.random.split(jax.random.PRNGKey(seed))
    g_params = generator.init(kg, jnp.zeros((1, LATENT), jnp.float32))
    d_params = discriminator.init(kd, jnp.zeros((1, IMAGE, IMAGE, 1), jnp.float32))
    return g_params, d_params


def run(wrap, steps, log=print, seed=0, timings=None):
    """The training loop; returns the final {'g': ..., 'd': ...} parameters."""
    global noise_rng
    noise_rng = np.random.RandomState(seed)
    data = make_dataset(seed)
    g_params, d_params = init_params(seed)
    g_opt_state = g_optimizer.init(g_params)
    d_opt_state = d_optimizer.init(d_params)
    d_step_fn = wrap(d_step)
    g_step_fn = wrap(g_step)

    g_loss_val = 1.0
    d_updates = g_updates = g_skipped = 0
    for it in range(1, steps + 1):
        start = time.perf_counter()
        real = data[(it - 1) % len(data)]
        instance_noise = 0.2 * 0.9 ** it
        n_d = 2 if g_loss_val < G_STRONG else 1
        accs = []
        for _ in range(n_d):
            d_params, d_opt_state, d_loss, acc = d_step_fn(
                d_params, d_opt_state, g_params, real, instance_noise)
            accs.append(acc)
        d_updates += n_d
        d_loss_val = float(d_loss)
        if d_loss_val > D_CONFUSED:
            g_skipped += 1
        else:
            g_params, g_opt_state, g_loss = g_step_fn(g_params, g_opt_state, d_params)
            g_loss_val = float(g_loss)
            g_updates += 1
        if it % LOG_EVERY == 0:
            log(f"iter {it} d_loss {d_loss_val:.4f} g_loss {g_loss_val:.4f} "
                f"d_acc {np.mean(accs):.3f} d_updates {d_updates} g_updates {g_updates} "
                f"g_skipped {g_skipped}")
        if timings is not None:
            timings.append(time.perf_counter() - start)
    return {"g": g_params, "d": d_params}


def main(argv=None):
    return _common.cli(run, __doc__, argv, experts=EXPERT_STEPS)


if __name__ == "__main__":
    sys.exit(main())
