"""Fine-tune a small BERT encoder for sequence classification, the ordinary way.

A plain JAX/flax program: a post-LN BERT encoder (token + position + segment
embeddings, padding-masked bidirectional self-attention, GELU feed-forward), a
[CLS] pooler (dense + tanh) and a classification head, trained with eager
`jax.value_and_grad` and optax AdamW (warmup + linear decay, weight decay off
LayerNorm/bias) on synthetic "sentiment" sentences of varying length, padded to
a fixed length with an attention mask. Nothing in it knows about Terra.

The step is pure array code, so `jax.jit(train_step)` stages it whole: this is a
stageable baseline.

    python examples/bert_cls.py --steps 20                 # eager JAX
    python examples/bert_cls.py --steps 20 --mode jit      # jax.jit(train_step)
    python examples/bert_cls.py --steps 20 --mode terra    # terra.function(train_step)
    python examples/bert_cls.py --steps 20 --mode expert   # the hand partial-jit version
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

VOCAB = 600
SEQ = 48
BATCH = 16
D_MODEL = 64
HEADS = 4
LAYERS = 2
NUM_CLASSES = 3
PAD, CLS, SEP = 0, 1, 2
FIRST_WORD = 10
LEARNING_RATE = 5e-4

STEP_FUNCTIONS = ("train_step",)


# ----------------------------------------------------------------------- data


def make_dataset(seed=0, n_batches=24):
    """Synthetic 3-way sentiment: a sentence is mostly neutral words plus a few
    sentiment words; its label is which sentiment vocabulary dominates."""
    rng = np.random.default_rng(seed)
    words = np.arange(FIRST_WORD, VOCAB)
    rng.shuffle(words)
    polar = [words[:40], words[40:80], words[80:120]]      # class-specific words
    neutral = words[120:]
    out = []
    for _ in range(n_batches):
        tokens = np.full((BATCH, SEQ), PAD, np.int32)
        segments = np.zeros((BATCH, SEQ), np.int32)
        labels = rng.integers(0, NUM_CLASSES, size=BATCH).astype(np.int32)
        for i in range(BATCH):
            n = int(rng.integers(SEQ // 3, SEQ - 2))
            sentence = rng.choice(neutral, size=n)
            k = int(rng.integers(2, 6))
            where = rng.choice(n, size=k, replace=False)
            sentence[where[: k - 1]] = rng.choice(polar[labels[i]], size=k - 1)
            sentence[where[k - 1]] = rng.choice(polar[(labels[i] + 1) % NUM_CLASSES])
            split = n // 2                                   # "sentence pair"
            tokens[i, 0] = CLS
            tokens[i, 1:n + 1] = sentence
            tokens[i, n + 1] = SEP
            segments[i, split + 1:n + 2] = 1
        mask = (tokens != PAD).astype(np.int32)
        out.append((tokens, segments, mask, labels))
    return out


# ---------------------------------------------------------------------- model


class SelfAttention(nn.Module):
    d_model: int
    heads: int

    @nn.compact
    def __call__(self, x, mask):
        b, t, d = x.shape
        hd = d // self.heads
        q = nn.Dense(d, name="query")(x).reshape(b, t, self.heads, hd)
        # no key bias: it shifts each softmax row by a constant (zero gradient)
        k = nn.Dense(d, use_bias=False, name="key")(x).reshape(b, t, self.heads, hd)
        v = nn.Dense(d, name="value")(x).reshape(b, t, self.heads, hd)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
        scores = jnp.where(mask[:, None, None, :] > 0, scores, -1e9)
        probs = jax.nn.softmax(scores, axis=-1)
        ctx = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, d)
        return nn.Dense(d, name="output")(ctx)


class EncoderLayer(nn.Module):
    d_model: int
    heads: int

    @nn.compact
    def __call__(self, x, mask):
        x = nn.LayerNorm(epsilon=1e-12, name="attention_ln")(
            x + SelfAttention(self.d_model, self.heads, name="attention")(x, mask))
        h = nn.gelu(nn.Dense(4 * self.d_model, name="intermediate")(x))
        h = nn.Dense(self.d_model, name="output")(h)
        return nn.LayerNorm(epsilon=1e-12, name="output_ln")(x + h)


class BertClassifier(nn.Module):
    vocab: int = VOCAB
    max_len: int = SEQ
    d_model: int = D_MODEL
    heads: int = HEADS
    layers: int = LAYERS
    num_classes: int = NUM_CLASSES

    @nn.compact
    def __call__(self, tokens, segments, mask):
        init = nn.initializers.normal(0.02)
        x = (nn.Embed(self.vocab, self.d_model, embedding_init=init, name="word")(tokens)
             + nn.Embed(self.max_len, self.d_model, embedding_init=init,
                        name="position")(jnp.arange(tokens.shape[1]))[None]
             + nn.Embed(2, self.d_model, embedding_init=init, name="segment")(segments))
        x = nn.LayerNorm(epsilon=1e-12, name="embeddings_ln")(x)
        for i in range(self.layers):
            x = EncoderLayer(self.d_model, self.heads, name=f"layer_{i}")(x, mask)
        pooled = jnp.tanh(nn.Dense(self.d_model, name="pooler")(x[:, 0]))   # [CLS]
        return nn.Dense(self.num_classes, name="classifier")(pooled)


model = BertClassifier()


def decay_mask(params):
    """AdamW weight decay on kernels and embeddings, not on biases/LayerNorm."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: path[-1].key in ("kernel", "embedding"), params)


schedule = optax.warmup_cosine_decay_schedule(
    init_value=0.0, peak_value=LEARNING_RATE, warmup_steps=5, decay_steps=200)
optimizer = optax.adamw(schedule, weight_decay=0.01, mask=decay_mask)


def loss_fn(params, tokens, segments, mask, labels):
    logits = model.apply({"params": params}, tokens, segments, mask)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, logits


def train_step(params, opt_state, tokens, segments, mask, labels):
    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, tokens, segments, mask, labels)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    accuracy = jnp.mean(jnp.argmax(logits, axis=-1) == labels)
    return params, opt_state, loss, accuracy


# The whole step is pure, so an expert jits all of it.
EXPERT_STEPS = {"train_step": jax.jit(train_step)}


# ----------------------------------------------------------------------- loop


def run(wrap, steps, log=print, seed=0, timings=None):
    """Train for `steps` steps with `train_step` wrapped by `wrap`; return params."""
    data = make_dataset(seed)
    tokens, segments, mask, _ = data[0]
    params = model.init(jax.random.PRNGKey(seed), tokens, segments, mask)["params"]
    opt_state = optimizer.init(params)
    step_fn = wrap(train_step)
    for step in range(1, steps + 1):
        start = time.perf_counter()
        tokens, segments, mask, labels = data[(step - 1) % len(data)]
        params, opt_state, loss, accuracy = step_fn(
            params, opt_state, tokens, segments, mask, labels)
        if step % 5 == 0 or step == 1:
            log(f"step {step} loss {float(loss):.4f} acc {float(accuracy):.3f}")
        if timings is not None:
            timings.append(time.perf_counter() - start)
    return params


def main(argv=None):
    return _common.cli(run, __doc__, argv, experts=EXPERT_STEPS)


if __name__ == "__main__":
    sys.exit(main())
