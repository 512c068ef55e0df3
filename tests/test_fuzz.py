"""The fast profile of the differential fuzzer (tests/fuzz.py): eager == terra on
a fixed (derandomized) set of generated imperative programs.

`make fuzz` runs the long, random profile and prints its figures.
"""
import os

from hypothesis import HealthCheck, given, settings

import fuzz

FAST_PROGRAMS = int(os.environ.get("TERRA_FUZZ_PROGRAMS", "200"))


@settings(max_examples=FAST_PROGRAMS, derandomize=True, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
@given(fuzz.programs())
def test_generated_programs_match_eager(prog):
    fuzz.check(prog)


def test_the_fuzzer_exercised_co_execution():
    """Runs after the fuzz test: most programs must really have co-executed."""
    t = fuzz.TALLY
    if t.programs == 0:
        import pytest
        pytest.skip("run together with test_generated_programs_match_eager")
    assert t.programs_coexecuted >= 0.6 * t.programs, t
    assert t.steps_coexecuted >= 0.3 * t.steps, t
