"""Equinox training programs under Terra (tests/library_programs.py): equal to
eager (prints, returned values, model/state/optimizer leaves) and co-executed."""
import os

os.environ["TERRA_STRICT"] = "1"
os.environ.setdefault("TERRA_SYNC_COMPILE", "1")

import pytest  # noqa: E402

pytest.importorskip("equinox")

from library_programs import check  # noqa: E402


def test_eqx_filter_transforms_batchnorm_state_filter_jit():
    res = check("eqx_train")
    assert res.stats.fallbacks == 0, res.describe()


def test_eqx_tree_at_in_branch_on_fetched_loss():
    res = check("eqx_branch_on_loss")
    assert "dropout off" in res.eager.stdout
    assert res.stats.paths >= 2, res.describe()
