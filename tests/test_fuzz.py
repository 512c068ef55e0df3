"""The fast profile of the differential fuzzer (tests/fuzz.py): eager == terra on
a fixed (derandomized) set of generated imperative programs.

`make fuzz` runs the long, random profile and prints its figures.
"""
import os

from hypothesis import HealthCheck, Phase, given, settings

import fuzz

FAST_PROGRAMS = int(os.environ.get("TERRA_FUZZ_PROGRAMS", "80"))  # ~ the suite's budget


@settings(max_examples=FAST_PROGRAMS, derandomize=True, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
@given(fuzz.programs(fuzz.STATEMENTS))
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


def test_the_fuzzer_finds_and_shrinks_a_planted_bug(monkeypatch):
    """A Terra that ignores a changed Python number must be caught, with a minimal program."""
    import pytest
    from terra import coexec

    monkeypatch.setattr(coexec, "tokens_equal", lambda a, b: True)  # the planted bug

    @settings(max_examples=100, derandomize=True, deadline=None, database=None,
              report_multiple_bugs=False, phases=[Phase.generate, Phase.shrink],
              suppress_health_check=list(HealthCheck))
    @given(fuzz.programs())
    def search(prog):
        fuzz.check(prog)

    with pytest.raises(AssertionError) as caught:
        search()
    program = str(caught.value).split("--- program ---")[-1]
    assert "lr" in program                          # the minimal program uses the feed...
    assert program.count("\n    v") <= 2 + 4        # ...and little else (v0, v1 + <= 4)
