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
    assert result.expert_failure == "no EXPERT_STEPS" and result.terra_vs_expert is None
    table = bench.format_table([result])
    assert path.stem in table and "terra correct on 1/1" in table
    assert "expert version of" not in table


EXPERTS = {
    "right": ("jax.jit(train_step)", True),
    "wrong": ("jax.jit(lambda w, x: train_step(w, 2.0 * x))", False),   # not eager's program
}


@pytest.mark.parametrize("expert", list(EXPERTS))
def test_bench_checks_and_times_the_expert_version(tmp_path, expert):
    version, correct = EXPERTS[expert]
    path = tmp_path / f"prog_expert_{expert}.py"
    path.write_text(PROGRAM.format(feature="pass")
                    + f"\nEXPERT_STEPS = {{'train_step': {version}}}\n")
    result = bench.bench_program(path.stem, path, steps=6, rounds=1, progress=lambda *a: None)
    assert result.expert_correct is correct, result.expert_failure
    assert result.terra_correct and result.jit_correct
    table = bench.format_table([result])
    assert "vs expert" in table and "vs jit" in table
    if correct:
        assert result.expert_ms > 0 and result.terra_vs_expert > 0
        assert result.terra_vs_jit > 0
    else:
        assert result.expert_ms is None and result.terra_vs_expert is None
        assert result.expert_failure == "printed output differs from eager"
        assert f"expert version of {path.stem}: printed output differs" in table


def test_logs_match_tolerates_only_float_noise():
    assert bench.logs_match(["step 1 loss 0.12345"], ["step 1 loss 0.12346"])
    assert not bench.logs_match(["step 1 loss 0.12345"], ["step 2 loss 0.12345"])
    assert not bench.logs_match(["step 1 loss 0.123"], ["step 1 loss 0.125"])
    assert not bench.logs_match(["a"], ["a", "b"])
