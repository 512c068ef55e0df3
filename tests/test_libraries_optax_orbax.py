"""Optax optimizers and Orbax checkpointing under Terra (tests/library_programs.py):
equal to eager and co-executed."""
import os

os.environ["TERRA_STRICT"] = "1"
os.environ.setdefault("TERRA_SYNC_COMPILE", "1")

import pytest  # noqa: E402

from library_programs import check  # noqa: E402


def test_optax_chain_schedule_multi_transform_multisteps_inject_hyperparams():
    res = check("optax_train")
    # The first graph is built from one step: a Python number seen once is predicted
    # (most are constants), so one that changes every step costs the step that saw
    # it change; from then on it is fed live.
    assert res.stats.fallbacks <= 1, res.describe()   # then the changing lr is a live feed
    assert "mini-step 1" in res.eager.stdout and "mini-step 0" in res.eager.stdout


def test_orbax_checkpoint_restore_continue():
    pytest.importorskip("orbax.checkpoint")
    res = check("orbax_checkpoint")
    assert res.eager.stdout.count("restored from") == 2
