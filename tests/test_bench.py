"""The benchmark harness: correctness verdicts and failure categories on real programs."""
from __future__ import annotations

import textwrap

import pytest

from terra import bench

PROGRAM = '''
import jax, jax.numpy as jnp, numpy as np
import time

STEP_FUNCTIONS = ("train_step",)

def train_step(w, x):
    loss, g = jax.value_and_grad(lambda w: jnp.mean((x @ w - 1.0) ** 2))(w)
    {feature}
    return w - 0.1 * g, loss

def run(wrap, steps, log=print, seed=0, timings=None):
    rng = np.random.RandomState(seed)
    w = jnp.zeros(4)
    step = wrap(train_step)
    for i in range(steps):
        start = time.perf_counter()
        w, loss = step(w, jnp.asarray(rng.normal(size=(8, 4)).astype(np.float32)))
        log(f"step {{i}} loss {{float(loss):.5f}}")
        if timings is not None:
            timings.append(time.perf_counter() - start)
    return w
'''

FEATURES = {
    "stageable": ("pass", True, ""),
    "control_flow": ("if loss > 0.5:\n        g = g * 0.5", False, "data-dependent control flow"),
    "numpy_on_value": ("g = g * float(np.tanh(np.asarray(loss)))", False, "third-party call"),
    "print_in_step": ("print('loss', loss)", False, "side effect lost or repeated"),
}


@pytest.mark.parametrize("feature", list(FEATURES))
def test_bench_program_verdicts(tmp_path, feature, capsys):
    body, jit_ok, category = FEATURES[feature]
    path = tmp_path / f"prog_{feature}.py"
    path.write_text(PROGRAM.format(feature=textwrap.indent(body, "    ").lstrip()))
    result = bench.bench_program(path.stem, path, steps=6, rounds=1, progress=lambda *a: None)
    assert result.terra_correct, result.terra_failure
    assert result.coexecuted_steps > 0            # terra's timings are co-executed steps
    assert result.jit_correct is jit_ok, result.jit_failure
    assert result.jit_category == category
    assert result.eager_ms > 0 and result.terra_ms > 0 and result.speedup > 0
    table = bench.format_table([result])
    assert path.stem in table and "terra correct on 1/1" in table


def test_logs_match_tolerates_only_float_noise():
    assert bench.logs_match(["step 1 loss 0.12345"], ["step 1 loss 0.12346"])
    assert not bench.logs_match(["step 1 loss 0.12345"], ["step 2 loss 0.12345"])
    assert not bench.logs_match(["step 1 loss 0.123"], ["step 1 loss 0.125"])
    assert not bench.logs_match(["a"], ["a", "b"])
