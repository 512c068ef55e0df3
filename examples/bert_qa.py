"""Fine-tune a small BERT encoder for extractive QA (span prediction), the usual way.

A plain JAX/flax program in the style of SQuAD fine-tuning: a post-LN BERT
encoder reads "[CLS] question [SEP] context [SEP]", a span head predicts start
and end logits over the context, and the loss is the cross entropy of the gold
start and end positions (eager `jax.value_and_grad`, optax AdamW). Data are
synthetic: the question names the two context words right before the answer and
the answer's length, so the span is recoverable from the text.

Right after the update the step does what QA training scripts do to report
progress: it fetches the start/end logits to the host (`np.asarray`), searches
the best valid span per example in Python (top-k start x top-k end candidates,
end >= start, inside the context, bounded length) and scores the predicted
answer tokens against the gold answer with SQuAD's exact match and token F1.
This host work on tensor values inside the step is what `jax.jit(train_step)`
cannot stage (it raises TracerArrayConversionError).

    python examples/bert_qa.py --steps 20                 # eager JAX
    python examples/bert_qa.py --steps 20 --mode jit      # jax.jit(train_step): raises
    python examples/bert_qa.py --steps 20 --mode terra    # terra.function(train_step)
    python examples/bert_qa.py --steps 20 --mode expert   # the hand partial-jit version
"""

import collections
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
SEQ = 48
BATCH = 16
D_MODEL = 64
HEADS = 4
LAYERS = 2
PAD, CLS, SEP = 0, 1, 2
LEN_TOKEN = 3            # tokens 4..(3 + MAX_GOLD) say "the answer has k tokens"
MAX_GOLD = 4
FIRST_WORD = 16
TOP_K = 5
MAX_ANSWER = 8
LEARNING_RATE = 3e-4

STEP_FUNCTIONS = ("train_step",)


# ----------------------------------------------------------------------- data


def make_dataset(seed=0, n_batches=24):
    """Synthetic SQuAD-like examples.

    context: random words; answer: a span of 1..MAX_GOLD context words; question:
    the two words right before the answer plus a token giving the answer length.
    """
    rng = np.random.default_rng(seed)
    q_len = 3
    out = []
    for _ in range(n_batches):
        tokens = np.full((BATCH, SEQ), PAD, np.int32)
        segments = np.zeros((BATCH, SEQ), np.int32)
        context_mask = np.zeros((BATCH, SEQ), np.int32)
        starts = np.zeros(BATCH, np.int32)
        ends = np.zeros(BATCH, np.int32)
        for i in range(BATCH):
            c_len = int(rng.integers(20, SEQ - q_len - 3))
            context = rng.integers(FIRST_WORD, VOCAB, size=c_len)
            k = int(rng.integers(1, MAX_GOLD + 1))
            a = int(rng.integers(2, c_len - k + 1))
            question = [context[a - 2], context[a - 1], LEN_TOKEN + k]
            c0 = q_len + 2                                  # first context position
            seq = [CLS, *question, SEP, *context, SEP]
            tokens[i, :len(seq)] = seq
            segments[i, c0:len(seq)] = 1
            context_mask[i, c0:c0 + c_len] = 1
            starts[i], ends[i] = c0 + a, c0 + a + k - 1
        mask = (tokens != PAD).astype(np.int32)
        out.append((tokens, segments, mask, context_mask, starts, ends))
    return out


# ---------------------------------------------------------------------- model


class SelfAttention(nn.Module):
    d_model: int
    heads: int

    @nn.compact
    def __call__(self, x, mask):
        b, t, d = x.shape
        hd = d // self.heads
        # no bias: a key bias shifts each softmax row by a constant (zero gradient)
        qkv = nn.Dense(3 * d, use_bias=False, name="qkv")(x)
        qkv = qkv.reshape(b, t, 3, self.heads, hd)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
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


class BertForQA(nn.Module):
    vocab: int = VOCAB
    max_len: int = SEQ
    d_model: int = D_MODEL
    heads: int = HEADS
    layers: int = LAYERS

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
        # span head: a hidden layer, then start/end logits. The projection has no
        # bias, and the hidden layer keeps the encoder's last LayerNorm bias from
        # feeding the logits linearly: either would shift every position's logit
        # by the same amount, which the softmax over positions ignores (zero
        # gradient)
        h = nn.gelu(nn.Dense(self.d_model, name="qa_hidden")(x))
        logits = nn.Dense(2, use_bias=False, name="qa_outputs")(h)
        return logits[..., 0], logits[..., 1]


model = BertForQA()
optimizer = optax.adamw(LEARNING_RATE, weight_decay=0.01)


def loss_fn(params, tokens, segments, mask, context_mask, starts, ends):
    start_logits, end_logits = model.apply({"params": params}, tokens, segments, mask)
    # answers lie in the context: other positions cannot be predicted
    start_logits = jnp.where(context_mask > 0, start_logits, -1e4)
    end_logits = jnp.where(context_mask > 0, end_logits, -1e4)
    loss = (optax.softmax_cross_entropy_with_integer_labels(start_logits, starts).mean()
            + optax.softmax_cross_entropy_with_integer_labels(end_logits, ends).mean()) / 2
    return loss, (start_logits, end_logits)


# ------------------------------------------------------- host post-processing


def best_span(start_scores, end_scores, context):
    """SQuAD-style decoding: best start+end score over top-k candidates that form
    a valid answer (inside the context, end >= start, bounded length)."""
    top_starts = np.argsort(start_scores)[::-1][:TOP_K]
    top_ends = np.argsort(end_scores)[::-1][:TOP_K]
    best, best_score = (0, 0), -math.inf
    for s in top_starts:
        for e in top_ends:
            if not (context[s] and context[e]):
                continue
            if e < s or e - s + 1 > MAX_ANSWER:
                continue
            score = float(start_scores[s]) + float(end_scores[e])
            if score > best_score:
                best, best_score = (int(s), int(e)), score
    return best


def f1_score(prediction, gold):
    common = collections.Counter(prediction) & collections.Counter(gold)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(prediction)
    recall = overlap / len(gold)
    return 2 * precision * recall / (precision + recall)


def train_step(params, opt_state, tokens, segments, mask, context_mask, starts, ends):
    (loss, (start_logits, end_logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, tokens, segments, mask, context_mask, starts, ends)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    metrics = span_metrics(start_logits, end_logits, tokens, context_mask, starts, ends)
    return params, opt_state, loss, metrics


def span_metrics(start_logits, end_logits, tokens, context_mask, starts, ends):
    """Evaluate this batch's predictions on the host, as QA scripts do."""
    start_np = np.asarray(start_logits)
    end_np = np.asarray(end_logits)
    context_np = np.asarray(context_mask)
    exact, f1 = [], []
    for i in range(start_np.shape[0]):
        s, e = best_span(start_np[i], end_np[i], context_np[i])
        prediction = [int(t) for t in tokens[i, s:e + 1]]
        gold = [int(t) for t in tokens[i, starts[i]:ends[i] + 1]]
        exact.append(float(prediction == gold))
        f1.append(f1_score(prediction, gold) if prediction else 0.0)
    return {"exact_match": 100.0 * sum(exact) / len(exact),
            "f1": 100.0 * sum(f1) / len(f1)}


# The expert's version: loss + gradient + update in one jit, the metrics on the host.
_expert_update = _common.jit_update(loss_fn, optimizer, has_aux=True)


def expert_train_step(params, opt_state, tokens, segments, mask, context_mask, starts, ends):
    params, opt_state, (loss, (start_logits, end_logits)) = _expert_update(
        params, opt_state, tokens, segments, mask, context_mask, starts, ends)
    metrics = span_metrics(start_logits, end_logits, tokens, context_mask, starts, ends)
    return params, opt_state, loss, metrics


EXPERT_STEPS = {"train_step": expert_train_step}


# ----------------------------------------------------------------------- loop


def run(wrap, steps, log=print, seed=0, timings=None):
    """Train for `steps` steps with `train_step` wrapped by `wrap`; return params."""
    data = make_dataset(seed)
    tokens, segments, mask = data[0][:3]
    params = model.init(jax.random.PRNGKey(seed), tokens, segments, mask)["params"]
    opt_state = optimizer.init(params)
    step_fn = wrap(train_step)
    for step in range(1, steps + 1):
        start = time.perf_counter()
        batch = data[(step - 1) % len(data)]
        params, opt_state, loss, metrics = step_fn(params, opt_state, *batch)
        if step % 2 == 0 or step == 1:
            log(f"step {step} loss {float(loss):.4f} "
                f"EM {metrics['exact_match']:.2f} F1 {metrics['f1']:.2f}")
        if timings is not None:
            timings.append(time.perf_counter() - start)
    return params


def main(argv=None):
    return _common.cli(run, __doc__, argv, experts=EXPERT_STEPS)


if __name__ == "__main__":
    sys.exit(main())
