"""Train a small Flax NNX classifier the way Flax's documentation does.

`nnx.Module` with BatchNorm and Dropout, `nnx.Optimizer`, `nnx.MultiMetric`,
all mutated inside `train_step` by `nnx.value_and_grad` and `optimizer.update`;
a numpy data loader. Nothing in it knows about Terra.

    python examples/nnx_mlp.py --steps 20                  # eager
    python examples/nnx_mlp.py --steps 20 --mode jit       # nnx.jit(train_step)
    python -m terra run --step train_step examples/nnx_mlp.py --steps 20
"""

import argparse

import numpy as np
import optax
from flax import nnx

FEATURES, CLASSES, BATCH = 8, 4, 16


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, width: int = 32):
        self.hidden = nnx.Linear(FEATURES, width, use_bias=False, rngs=rngs)
        self.bn = nnx.BatchNorm(width, rngs=rngs)
        self.dropout = nnx.Dropout(0.1, rngs=rngs)
        self.head = nnx.Linear(width, CLASSES, rngs=rngs)

    def __call__(self, x):
        return self.head(self.dropout(nnx.relu(self.bn(self.hidden(x)))))


def batches(steps, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(256, FEATURES)).astype(np.float32)
    y = np.argmax(x @ rng.normal(size=(FEATURES, CLASSES)), axis=1).astype(np.int32)
    for _ in range(steps):
        idx = rng.choice(len(x), BATCH, replace=False)
        yield x[idx], y[idx]


def train_step(model, optimizer, metrics, x, y):
    def loss_fn(model):
        logits = model(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), logits

    (loss, logits), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads)
    metrics.update(loss=loss, logits=logits, labels=y)
    return loss


def main(steps, mode="eager"):
    step = nnx.jit(train_step) if mode == "jit" else train_step
    model = MLP(nnx.Rngs(params=0, dropout=1))
    optimizer = nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.Param)
    metrics = nnx.MultiMetric(loss=nnx.metrics.Average("loss"), accuracy=nnx.metrics.Accuracy())
    for i, (x, y) in enumerate(batches(steps)):
        step(model, optimizer, metrics, x, y)
        if i % 5 == 4:
            done = metrics.compute()
            print(f"step {i + 1} loss {float(done['loss']):.5f} "
                  f"accuracy {float(done['accuracy']):.4f}")
            metrics.reset()
    print("bn mean", np.round(np.asarray(model.bn.mean[...])[:4], 5))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--mode", choices=["eager", "jit"], default="eager")
    args = parser.parse_args()
    main(args.steps, args.mode)
