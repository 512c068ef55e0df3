"""Flax NNX training programs under Terra (tests/library_programs.py): prints,
returned values and the modules'/optimizer's/metrics' state after the loop equal
eager's, and the steps co-execute."""
import os

os.environ["TERRA_STRICT"] = "1"
os.environ.setdefault("TERRA_SYNC_COMPILE", "1")

import pytest  # noqa: E402

pytest.importorskip("flax.nnx")

from library_programs import check  # noqa: E402


def test_nnx_module_optimizer_metrics_mutated_in_step():
    res = check("nnx_train")
    assert res.stats.fallbacks == 0, res.describe()
    assert "'accuracy'" in res.eager.stdout       # MultiMetric computed between steps


def test_nnx_split_merge_grad_jit_scan_in_step():
    res = check("nnx_functional")
    assert res.stats.fallbacks == 0, res.describe()


def test_nnx_module_mutated_in_branch_on_fetched_loss():
    res = check("nnx_branch_on_loss")
    assert "skipped update" in res.eager.stdout   # both branches were taken
    assert res.stats.paths >= 2, res.describe()


def test_nnx_step_that_changes_layer_shapes():
    res = check("nnx_shape_change", min_coexecuted=2)
    assert "width 12" in res.eager.stdout and "width 8" in res.eager.stdout
    assert res.stats.divergences >= 1, res.describe()
