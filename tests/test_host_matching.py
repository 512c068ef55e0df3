"""A DETR-style step: a host matching (scipy's Hungarian algorithm) on a fetched cost
matrix picks which predictions and targets the differentiated loss indexes.

The matched index arrays are numpy values Python computes in every step. In the first
steps (the same batch, a learning-rate warmup: each of those steps is recorded) they
are the same, so Terra predicts them and runs ahead with them, the gradient op too;
then the batches vary (1 to 3 targets): Terra must see each change and feed the new
value, where the loss indexes with it and where its gradient does.
The step is compared with eager's from eager's state (the numerics contract is per
step, docs/numerics.md); the matches, integers, must be eager's exactly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy.optimize import linear_sum_assignment

import terra
from harness import assert_same_tree

STEPS = 24
WARMUP = 3
QUERIES, DIM, BOX = 5, 8, 4
OPT = optax.sgd(1.0)


def batches(steps: int, seed: int) -> list:
    """(x, targets, learning rate) per step: WARMUP steps on one batch with one target,
    then a new random batch per step with 1 to 3 targets (three paths)."""
    rng = np.random.RandomState(seed)

    def batch(targets: int) -> tuple:
        return (rng.normal(size=(QUERIES, DIM)).astype(np.float32),
                rng.uniform(size=(targets, BOX)).astype(np.float32))

    first = batch(1)
    data = [first] * WARMUP + [batch(rng.randint(1, 4)) for _ in range(steps - WARMUP)]
    return [(x, t, 0.1 * min(1.0, (i + 1) / WARMUP)) for i, (x, t) in enumerate(data)]


def loss_fn(params, x, targets, rows, cols):
    boxes = jax.nn.sigmoid(x @ params["w"])
    return jnp.mean(jnp.abs(boxes[rows] - targets[cols]))


def detr_step(params, opt_state, x, targets, lr):
    x, targets = jnp.asarray(x), jnp.asarray(targets)
    logits = np.asarray(x @ params["w"])                      # fetched
    boxes = 1.0 / (1.0 + np.exp(-logits))
    cost = np.abs(boxes[:, None, :] - np.asarray(targets)[None]).sum(-1)
    rows, cols = linear_sum_assignment(cost)                  # numpy int arrays
    loss, grads = jax.value_and_grad(loss_fn)(params, x, targets, rows, cols)
    updates, opt_state = OPT.update(grads, opt_state, params)
    updates = jax.tree.map(lambda u: lr * u, updates)
    return optax.apply_updates(params, updates), opt_state, loss, rows, cols


def run_from_eagers_state(step, data: list) -> list:
    """Each step's outputs, every step starting from eager's state."""
    params = {"w": jnp.asarray(np.random.RandomState(1).normal(size=(DIM, BOX))
                               .astype(np.float32) * 0.5)}
    state, outs = (params, OPT.init(params)), []
    for batch in data:
        outs.append(step(*state, *batch))
        state = detr_step(*state, *batch)[:2]
    return outs


@pytest.mark.parametrize("seed", [0, 1])
def test_matched_indices_fed_to_the_gradient_are_eagers(seed):
    data = batches(STEPS, seed)
    eager = run_from_eagers_state(detr_step, data)
    step = terra.function(detr_step)
    coexec = run_from_eagers_state(step, data)
    for i, (e, t) in enumerate(zip(eager, coexec)):
        e_params, e_state, e_loss, e_rows, e_cols = e
        t_params, t_state, t_loss, t_rows, t_cols = t
        np.testing.assert_array_equal(t_rows, e_rows, err_msg=f"rows of step {i}")
        np.testing.assert_array_equal(t_cols, e_cols, err_msg=f"cols of step {i}")
        assert_same_tree((e_params, e_state, e_loss), (t_params, t_state, t_loss),
                         f"step {i}")
    stats = step.stats()
    assert stats.coexecuted >= STEPS // 2, stats
    assert stats.feeds > 0, stats
