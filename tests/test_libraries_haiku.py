"""Haiku under Terra: hk.transform_with_state (BatchNorm state, dropout) and
hk.PRNGSequence, equal to eager and co-executed (tests/library_programs.py)."""
import os

os.environ["TERRA_STRICT"] = "1"
os.environ.setdefault("TERRA_SYNC_COMPILE", "1")

import pytest  # noqa: E402

pytest.importorskip("haiku")

from library_programs import check  # noqa: E402


def test_haiku_transform_with_state_prng_sequence():
    res = check("haiku_train")
    assert res.stats.fallbacks == 0, res.describe()
