"""Train a small GPT-2 language model on synthetic token data, the ordinary way.

A plain JAX/flax program: a pre-LN decoder-only transformer (causal
self-attention, GELU MLP, tied input/output embeddings) written with
`flax.linen`, trained with eager `jax.value_and_grad` and optax AdamW on token
sequences drawn from a seeded random Markov chain (shaped like a tokenized text
corpus). Nothing in it knows about Terra.

The step is pure array code, so `jax.jit(train_step)` stages it whole: this is a
stageable baseline.

    python examples/gpt2.py --steps 20                 # eager JAX
    python examples/gpt2.py --steps 20 --mode jit      # jax.jit(train_step)
    python examples/gpt2.py --steps 20 --mode terra    # terra.function(train_step)
    python examples/gpt2.py --steps 20 --mode expert   # the hand partial-jit version
"""

import math
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

VOCAB = 512
SEQ = 64
BATCH = 8
D_MODEL = 128
HEADS = 4
LAYERS = 2
LEARNING_RATE = 3e-4
WEIGHT_DECAY = 0.01

STEP_FUNCTIONS = ("train_step",)


# ----------------------------------------------------------------------- data


def make_corpus(seed=0, n_tokens=BATCH * (SEQ + 1) * 64):
    """A token stream from a sparse random Markov chain (each token has a few
    likely successors), so a language model has something to learn."""
    rng = np.random.default_rng(seed)
    successors = rng.integers(0, VOCAB, size=(VOCAB, 4))
    probs = rng.dirichlet(np.ones(4) * 0.5, size=VOCAB)
    tokens = np.empty(n_tokens, np.int32)
    tokens[0] = rng.integers(0, VOCAB)
    choices = rng.random(n_tokens)
    jumps = rng.random(n_tokens) < 0.05          # occasional random token
    random_tokens = rng.integers(0, VOCAB, size=n_tokens)
    for i in range(1, n_tokens):
        prev = tokens[i - 1]
        if jumps[i]:
            tokens[i] = random_tokens[i]
        else:
            k = np.searchsorted(np.cumsum(probs[prev]), choices[i])
            tokens[i] = successors[prev, min(k, 3)]
    return tokens


def batches(tokens, seed=0):
    """Endless random windows of SEQ+1 tokens: inputs and next-token targets."""
    rng = np.random.default_rng(seed + 1)
    while True:
        starts = rng.integers(0, len(tokens) - SEQ - 1, size=BATCH)
        window = np.stack([tokens[s:s + SEQ + 1] for s in starts])
        yield window[:, :-1], window[:, 1:]


# ---------------------------------------------------------------------- model


class CausalSelfAttention(nn.Module):
    d_model: int
    heads: int

    @nn.compact
    def __call__(self, x):
        b, t, d = x.shape
        hd = d // self.heads
        # no bias (nanoGPT's bias=False): a key bias only shifts each softmax row
        # by a constant, so its true gradient is zero
        qkv = nn.Dense(3 * d, use_bias=False, name="c_attn")(x)
        q, k, v = jnp.split(qkv, 3, axis=-1)
        q = q.reshape(b, t, self.heads, hd).transpose(0, 2, 1, 3)
        k = k.reshape(b, t, self.heads, hd).transpose(0, 2, 1, 3)
        v = v.reshape(b, t, self.heads, hd).transpose(0, 2, 1, 3)
        att = (q @ k.transpose(0, 1, 3, 2)) / math.sqrt(hd)
        causal = jnp.tril(jnp.ones((t, t), dtype=bool))
        att = jnp.where(causal[None, None], att, jnp.finfo(att.dtype).min)
        att = jax.nn.softmax(att, axis=-1)
        y = (att @ v).transpose(0, 2, 1, 3).reshape(b, t, d)
        return nn.Dense(d, name="c_proj")(y)


class Block(nn.Module):
    d_model: int
    heads: int

    @nn.compact
    def __call__(self, x):
        x = x + CausalSelfAttention(self.d_model, self.heads, name="attn")(
            nn.LayerNorm(name="ln_1")(x))
        h = nn.LayerNorm(name="ln_2")(x)
        h = nn.Dense(4 * self.d_model, name="c_fc")(h)
        h = nn.gelu(h)
        h = nn.Dense(self.d_model, name="c_proj")(h)
        return x + h


class GPT2(nn.Module):
    vocab: int = VOCAB
    max_len: int = SEQ
    d_model: int = D_MODEL
    heads: int = HEADS
    layers: int = LAYERS

    @nn.compact
    def __call__(self, tokens):
        wte = nn.Embed(self.vocab, self.d_model, name="wte",
                       embedding_init=nn.initializers.normal(0.02))
        wpe = nn.Embed(self.max_len, self.d_model, name="wpe",
                       embedding_init=nn.initializers.normal(0.01))
        t = tokens.shape[1]
        x = wte(tokens) + wpe(jnp.arange(t))[None]
        for i in range(self.layers):
            x = Block(self.d_model, self.heads, name=f"h_{i}")(x)
        x = nn.LayerNorm(name="ln_f")(x)
        return wte.attend(x)                      # tied output embedding


model = GPT2()
optimizer = optax.adamw(LEARNING_RATE, weight_decay=WEIGHT_DECAY)


def loss_fn(params, x, y):
    logits = model.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def train_step(params, opt_state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, opt_state, loss


# The whole step is pure, so an expert jits all of it.
EXPERT_STEPS = {"train_step": jax.jit(train_step)}


# ----------------------------------------------------------------------- loop


def run(wrap, steps, log=print, seed=0, timings=None):
    """Train for `steps` steps with `train_step` wrapped by `wrap`; return params."""
    tokens = make_corpus(seed)
    data = batches(tokens, seed)
    x0, _ = next(data)
    params = model.init(jax.random.PRNGKey(seed), x0)["params"]
    opt_state = optimizer.init(params)
    step_fn = wrap(train_step)
    for step in range(1, steps + 1):
        start = time.perf_counter()
        x, y = next(data)
        params, opt_state, loss = step_fn(params, opt_state, x, y)
        if step % 5 == 0 or step == 1:
            loss_value = float(loss)
            log(f"step {step} loss {loss_value:.4f} ppl {math.exp(loss_value):.2f}")
        if timings is not None:
            timings.append(time.perf_counter() - start)
    return params


def main(argv=None):
    return _common.cli(run, __doc__, argv, experts=EXPERT_STEPS)


if __name__ == "__main__":
    sys.exit(main())
