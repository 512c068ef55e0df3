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


def test_cli_runs_unmodified_nnx_script(tmp_path):
    # `python -m terra run --step train_step examples/nnx_mlp.py` prints what the
    # script prints eagerly, and its train_step co-executed.
    import contextlib
    import io
    import json

    import harness
    from test_examples import _REPORT_STATS, _run

    eager = io.StringIO()
    with contextlib.redirect_stdout(eager):
        harness.load_program("nnx_mlp").main(10)
    (tmp_path / "sitecustomize.py").write_text(_REPORT_STATS)
    env = {"TERRA_STRICT": "1", "TERRA_SYNC_COMPILE": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH"))
                                         if p)}
    under_terra = _run(["-m", "terra", "run", "--step", "train_step",
                        os.path.join("examples", "nnx_mlp.py"), "--steps", "10"], env)
    assert "step 10 loss" in eager.getvalue()
    harness.assert_same_text(eager.getvalue(), under_terra.stdout, "stdout of the CLI run")
    stats = json.loads([line for line in under_terra.stderr.splitlines()
                        if line.startswith("TERRA_STATS ")][-1].split(" ", 1)[1])
    assert stats["steps"] == 10 and stats["coexecuted"] > 0, stats


def test_nnx_hijax_variables_run_eagerly_with_one_warning():
    # Terra cannot stage mutable hijax state: every step runs eagerly (equal to
    # eager, no exception eager would not raise) and one TerraWarning names the call.
    res = check("nnx_hijax", min_coexecuted=0)
    warned = [w for w in res.terra.warnings if w.startswith("TerraWarning")]
    assert len(warned) == 1 and "cur_qdd" in warned[0] and "hijax" in warned[0], warned
    assert res.stats.coexecuted == 0 and res.stats.traced == 0, res.describe()
