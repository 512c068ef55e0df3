"""Train a small Music Transformer (relative attention) on synthetic MIDI events.

A plain JAX program (eager `jax.numpy`, a parameter dict, `jax.value_and_grad`,
optax Adam with warmup) of a decoder-only transformer with *relative position
self-attention* (Huang et al., 2018): each layer learns one embedding per head
and relative distance, and the relative logits Q·Erᵀ are aligned with the
"skewing" trick (pad a column, reshape, drop a row) instead of building the
L x L x d tensor of relative embeddings. Data are performance-event sequences
(NOTE_ON / NOTE_OFF / TIME_SHIFT / SET_VELOCITY, the Music Transformer event
vocabulary) generated from seeded random melodies. Nothing in it knows about
Terra.

Pieces have different lengths. The data loader draws, in Python, a length bucket
for each batch (16, 32 or 48 events) and the pieces' lengths within it; batches
are stored padded to the longest bucket. Like any dynamic-padding training
script, the step trims the batch to the smallest bucket that holds its longest
piece: `int(jnp.max(lengths))` decides the shapes of everything after it, so
shapes change between steps among three variants, and `jax.jit(train_step)`
cannot stage the step (ConcretizationTypeError on the `int`).

    python examples/music_transformer.py --steps 20                # eager JAX
    python examples/music_transformer.py --steps 20 --mode jit     # jax.jit: raises
    python examples/music_transformer.py --steps 20 --mode terra   # terra.function
    python examples/music_transformer.py --steps 20 --mode expert  # the hand partial-jit version
"""

import math
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

# the Music Transformer performance-event vocabulary, plus PAD and BOS
NOTE_ON, NOTE_OFF, TIME_SHIFT, VELOCITY = 0, 128, 256, 356
PAD, BOS = 388, 389
VOCAB = 390
BUCKETS = (16, 32, 48)
MAX_LEN = BUCKETS[-1]
BATCH = 8
D_MODEL = 64
HEADS = 4
LAYERS = 2
LEARNING_RATE = 1e-3

STEP_FUNCTIONS = ("train_step",)


# ----------------------------------------------------------------------- data


def melody_events(rng, n_events):
    """Events of a random melody in a random major key: SET_VELOCITY, NOTE_ON,
    TIME_SHIFT (duration), NOTE_OFF, sometimes a rest."""
    scale = np.array([0, 2, 4, 5, 7, 9, 11])
    root = int(rng.integers(48, 61))
    degree = int(rng.integers(0, 7))
    velocity = int(rng.integers(12, 28))
    events = [BOS]
    while len(events) < n_events:
        degree = int(np.clip(degree + rng.choice([-2, -1, -1, 0, 1, 1, 2]), 0, 13))
        pitch = root + 12 * (degree // 7) + int(scale[degree % 7])
        duration = int(rng.choice([10, 20, 20, 40, 80]))      # in 10 ms steps
        if rng.random() < 0.3:
            velocity = int(np.clip(velocity + rng.integers(-3, 4), 0, 31))
            events.append(VELOCITY + velocity)
        events += [NOTE_ON + pitch, TIME_SHIFT + duration - 1, NOTE_OFF + pitch]
        if rng.random() < 0.2:
            events.append(TIME_SHIFT + int(rng.choice([10, 20])) - 1)
    return events[:n_events]


def batches(seed=0):
    """Endless batches: a length bucket drawn in Python, pieces of lengths inside
    it (the longest in the bucket), stored padded to MAX_LEN."""
    py_rng = random.Random(seed)
    rng = np.random.default_rng(seed)
    while True:
        b = py_rng.choices(range(len(BUCKETS)), weights=(3, 4, 2))[0]
        low = BUCKETS[b - 1] + 1 if b > 0 else 8
        lengths = rng.integers(max(8, BUCKETS[b] // 2), BUCKETS[b] + 1, size=BATCH)
        lengths[py_rng.randrange(BATCH)] = py_rng.randint(low, BUCKETS[b])
        tokens = np.full((BATCH, MAX_LEN), PAD, np.int32)
        for i, n in enumerate(lengths):
            tokens[i, :n] = melody_events(rng, int(n))
        yield tokens, lengths.astype(np.int32)


# ---------------------------------------------------------------------- model


def init_params(seed=0):
    rng = np.random.default_rng(seed)
    hd = D_MODEL // HEADS

    def dense(n_in, n_out, bias=True):
        w = rng.normal(0.0, 1.0 / math.sqrt(n_in), size=(n_in, n_out))
        p = {"w": jnp.asarray(w, jnp.float32)}
        if bias:
            p["b"] = jnp.zeros((n_out,), jnp.float32)
        return p

    def norm():
        return {"scale": jnp.ones((D_MODEL,), jnp.float32),
                "bias": jnp.zeros((D_MODEL,), jnp.float32)}

    layers = []
    for _ in range(LAYERS):
        layers.append({
            "ln_attn": norm(),
            # no bias: a key bias shifts each softmax row by a constant (zero grad)
            "qkv": dense(D_MODEL, 3 * D_MODEL, bias=False),
            "rel": jnp.asarray(rng.normal(0.0, 0.1, size=(HEADS, MAX_LEN, hd)),
                               jnp.float32),       # distances -(MAX_LEN-1) .. 0
            "out": dense(D_MODEL, D_MODEL),
            "ln_ff": norm(),
            "ff1": dense(D_MODEL, 4 * D_MODEL),
            "ff2": dense(4 * D_MODEL, D_MODEL),
        })
    return {
        "embed": jnp.asarray(rng.normal(0.0, 0.1, size=(VOCAB, D_MODEL)), jnp.float32),
        "layers": layers,
        "ln_out": norm(),
        "head": dense(D_MODEL, VOCAB),
    }


def layer_norm(p, x, eps=1e-6):
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps) * p["scale"] + p["bias"]


def skew(rel_logits):
    """[b, h, L, L] logits against relative distances -(L-1)..0 (column m is
    distance m-(L-1)) -> [b, h, L, L] with entry (i, j) for distance j-i, j <= i."""
    b, h, length, _ = rel_logits.shape
    padded = jnp.pad(rel_logits, ((0, 0), (0, 0), (0, 0), (1, 0)))
    padded = padded.reshape(b, h, length + 1, length)
    return padded[:, :, 1:, :]


def relative_attention(p, x):
    b, length, d = x.shape
    hd = d // HEADS
    qkv = (x @ p["qkv"]["w"]).reshape(b, length, 3, HEADS, hd)
    q, k, v = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))   # [b, h, L, hd]
    rel = p["rel"][:, MAX_LEN - length:, :]                             # [h, L, hd]
    logits = q @ k.transpose(0, 1, 3, 2) + skew(jnp.einsum("bhld,hmd->bhlm", q, rel))
    logits = logits / math.sqrt(hd)
    causal = jnp.tril(jnp.ones((length, length), bool))
    logits = jnp.where(causal, logits, -1e9)
    out = jax.nn.softmax(logits, axis=-1) @ v
    out = out.transpose(0, 2, 1, 3).reshape(b, length, d)
    return out @ p["out"]["w"] + p["out"]["b"]


def forward(params, tokens):
    x = params["embed"][tokens] * math.sqrt(D_MODEL)
    for p in params["layers"]:
        x = x + relative_attention(p, layer_norm(p["ln_attn"], x))
        h = layer_norm(p["ln_ff"], x)
        h = jax.nn.relu(h @ p["ff1"]["w"] + p["ff1"]["b"])
        x = x + h @ p["ff2"]["w"] + p["ff2"]["b"]
    x = layer_norm(params["ln_out"], x)
    return x @ params["head"]["w"] + params["head"]["b"]


def loss_fn(params, tokens, lengths):
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    logits = forward(params, inputs)
    positions = jnp.arange(targets.shape[1])[None, :]
    weights = (positions < (lengths[:, None] - 1)).astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return jnp.sum(ce * weights) / jnp.sum(weights)


schedule = optax.linear_schedule(0.0, LEARNING_RATE, transition_steps=8)
optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))


def train_step(params, opt_state, tokens, lengths):
    tokens = jnp.asarray(tokens)
    lengths = jnp.asarray(lengths)
    # dynamic padding: trim to the smallest bucket that holds the longest piece
    longest = int(jnp.max(lengths))
    bucket = next(b for b in BUCKETS if b >= longest)
    tokens = tokens[:, :bucket]
    loss, grads = jax.value_and_grad(loss_fn)(params, tokens, lengths)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, opt_state, loss, bucket


# The expert's version: the bucket chosen in numpy, loss + gradient + update in one
# jit (compiled once per bucket).
_expert_update = _common.jit_update(loss_fn, optimizer)


def expert_train_step(params, opt_state, tokens, lengths):
    bucket = next(b for b in BUCKETS if b >= int(np.max(lengths)))
    params, opt_state, loss = _expert_update(params, opt_state, tokens[:, :bucket], lengths)
    return params, opt_state, loss, bucket


EXPERT_STEPS = {"train_step": expert_train_step}


# ----------------------------------------------------------------------- loop


def run(wrap, steps, log=print, seed=0, timings=None):
    """Train for `steps` steps with `train_step` wrapped by `wrap`; return params."""
    data = batches(seed)
    params = init_params(seed)
    opt_state = optimizer.init(params)
    step_fn = wrap(train_step)
    seen = {}
    for step in range(1, steps + 1):
        start = time.perf_counter()
        tokens, lengths = next(data)
        params, opt_state, loss, bucket = step_fn(params, opt_state, tokens, lengths)
        seen[bucket] = seen.get(bucket, 0) + 1
        log(f"step {step} bucket {bucket} loss {float(loss):.4f}")
        if timings is not None:
            timings.append(time.perf_counter() - start)
    log("batches per bucket: " + ", ".join(f"{b}: {n}" for b, n in sorted(seen.items())))
    return params


def main(argv=None):
    return _common.cli(run, __doc__, argv, experts=EXPERT_STEPS)


if __name__ == "__main__":
    sys.exit(main())
