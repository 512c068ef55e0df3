"""Sharded steps and multi-process runs co-execute on JAX's own sharding.

* Several CPU devices (`--xla_force_host_platform_device_count=8`, fixed when
  JAX initializes, hence a subprocess: `sharded_cases.py`): data- and
  model-parallel training steps, a sharding constraint and a `device_put` inside
  the step, a batch whose sharding changes. Each runs eagerly and under Terra
  through the differential harness (same printed losses, same results), then
  the returned arrays' shardings are compared with eager's.
* Two processes joined by `jax.distributed` (loopback coordinator) run the
  data-parallel example eagerly and under Terra (`examples/sharded_mlp.py
  --processes 2`), each on its own shard of the global batch.
"""
import json
import os
import subprocess
import sys

import pytest

import harness

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.dirname(os.path.abspath(__file__))
TIMEOUT_S = 300


def _env(**extra) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", TERRA_STRICT="1",
               TERRA_SYNC_COMPILE="1")
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def cases() -> dict:
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "sharded_cases.py")], cwd=ROOT, capture_output=True,
        text=True, timeout=TIMEOUT_S,
        env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=8"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["devices"] == 8
    return report


def _assert_like_eager(case: dict, fallbacks: int = 0) -> None:
    """Terra gave eager's results and shardings, and really co-executed."""
    assert case["error"] is None, case["error"]
    stats = case["stats"]
    assert stats["coexecuted"] >= 3 and stats["segments_dispatched"] >= 3, stats
    assert stats["fallbacks"] == fallbacks and stats["internal_errors"] == 0, stats
    for leaf in case["shardings"]:
        assert leaf["equal"], leaf
        assert leaf["terra_devices"] == leaf["eager_devices"], leaf  # nothing gathered


def test_data_parallel_step_matches_eager_with_its_shardings(cases):
    case = cases["data_parallel"]
    _assert_like_eager(case)
    # parameters and loss stay replicated over all 8 devices, as in eager
    assert [leaf["terra_devices"] for leaf in case["shardings"]].count(8) >= 4
    assert "step 5 loss" in case["stdout"]


def _second_path_learned(case: dict) -> int:
    """The first graph is built from step 1, whose inputs are placed otherwise than
    the later steps' (step 1's outputs): steps 2-3 take a second path and fall back
    while it is learned. Returns those fallbacks."""
    stats = case["stats"]
    assert stats["paths"] == 2 and stats["fallbacks"] <= 2, stats
    return stats["fallbacks"]


def test_model_parallel_weights_stay_sharded(cases):
    case = cases["model_parallel"]
    _assert_like_eager(case, fallbacks=_second_path_learned(case))
    sharded = [leaf for leaf in case["shardings"] if leaf["terra_sharded"]]
    assert any("'model'" in leaf["terra"] for leaf in sharded), case["shardings"]
    assert len(sharded) >= 3  # w1, b1, w2 (and their adam moments)


def test_sharding_constraint_inside_step(cases):
    case = cases["sharding_constraint"]
    _assert_like_eager(case, fallbacks=_second_path_learned(case))


def test_device_put_with_sharding_inside_step(cases):
    case = cases["device_put_in_step"]
    _assert_like_eager(case)
    assert case["shardings"][0]["terra_sharded"]


def test_sharding_change_between_steps_is_a_new_path_not_an_error(cases):
    case = cases["sharding_changes"]
    assert case["error"] is None, case["error"]
    stats = case["stats"]
    assert stats["divergences"] >= 1 and stats["paths"] == 2, stats
    # step 0 traces, 1-4 co-execute, 5-6 fall back while the new path is
    # learned, 7-8 co-execute again
    _assert_like_eager(case, fallbacks=stats["fallbacks"])
    assert stats["fallbacks"] <= 2 and stats["coexecuted"] + stats["fallbacks"] == 8, stats


def test_coexecuted_sharded_steps_make_no_host_transfers(cases):
    facts = cases["host_transfers"]
    assert facts["eager_error"] and "Disallowed" in facts["eager_error"]  # the guard is on
    assert facts["terra_error"] is None, facts["terra_error"]
    assert facts["terra_guarded_steps"] == 3
    stats = facts["stats"]
    assert stats["coexecuted"] == 5 and stats["fallbacks"] == 0, stats


def test_two_processes_data_parallel_match_eager(tmp_path):
    out = tmp_path / "result.json"
    cmd = [sys.executable, "examples/sharded_mlp.py", "--processes", "2", "--steps", "10",
           "--json", str(out), "--timeout", "150"]
    # Graphs compile in the background by default; with several processes Terra
    # switches to each new graph at the same step everywhere (compiles in line).
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S,
                          env=_env(TERRA_SYNC_COMPILE="0"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert [r["process"] for r in results] == [0, 1]
    for r in results:
        assert r["process_count"] == 2 and r["global_devices"] == 2
        assert r["losses_match"] and r["params_match"] and r["shardings_match"], r
        assert len(r["terra_log"]) == 1 and r["terra_log"][0].startswith("step 10 loss"), r
        assert r["terra_stats"]["coexecuted"] >= 4 and r["terra_stats"]["fallbacks"] == 0, r
        assert r["terra_stats"]["segments_dispatched"] >= 4, r
    # both processes printed the same global loss
    assert results[0]["terra_log"] == results[1]["terra_log"]


def test_sharded_example_on_one_device_matches_eager():
    """The example's loop in this process (one CPU device: a one-device mesh)."""
    example = harness.load_program("sharded_mlp")

    def program(wrap, steps):
        return example.run(wrap, steps), None

    res = harness.differential(program, steps=12, min_coexecuted=8)
    assert "step 10 loss" in res.eager.stdout
    harness.assert_expert_matches_eager(example, res.eager.stdout, res.eager.results,
                                        lambda wrap, n, log: example.run(wrap, n, log=log), 12)
    assert res.stats.fallbacks == 0 and res.stats.segments_dispatched >= 8, res.describe()
