"""The example training programs give eager's output under Terra.

* in process: each example's own training loop (`train`) with its unmodified
  `train_step`, run eagerly and wrapped by `terra.function`, through the
  differential harness (same printed losses, same final parameters, Terra really
  co-executed);
* the CLI: `python -m terra run --step train_step examples/mlp.py` prints what
  `python examples/mlp.py --mode eager` prints;
* the expert version (`EXPERT_STEPS`, the hand partial jit `terra bench` times
  Terra against) prints what eager prints and ends with eager's parameters; the
  other examples' tests (tests/test_programs_*.py, test_sharding.py) check theirs.
"""

import json
import os
import subprocess
import sys

import pytest

import harness
from harness import load_program

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 12
@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_example_terra_matches_eager(name):
    example = load_program(name)

    def program(wrap, steps):
        # The example's own loop; it prints "step N loss X" every 10 steps.
        params = example.train(wrap(example.train_step), steps)
        return params, None

    res = harness.differential(program, steps=STEPS, min_coexecuted=1)
    assert "step 10 loss" in res.eager.stdout
    assert res.stats.coexecuted > 0, res.describe()
    harness.assert_expert_matches_eager(
        example, res.eager.stdout, res.eager.results,
        lambda wrap, steps, log: example.train(wrap(example.train_step), steps, log=log), STEPS)


# Reports the CLI-wrapped step's stats on stderr at exit, so the test can check
# that the unmodified script really co-executed (loaded via PYTHONPATH; the
# command line itself stays exactly what a user types).
_REPORT_STATS = """
import atexit, json, sys

def _terra_report_stats():
    fn = getattr(sys.modules.get("__main__"), "train_step", None)
    if fn is not None and hasattr(fn, "stats"):
        stats = dict(fn.stats().as_dict())
        sys.stderr.write("TERRA_STATS " + json.dumps(stats, default=str) + "\\n")

atexit.register(_terra_report_stats)
"""


def _run(args, env_extra):
    env = dict(os.environ)
    env.setdefault("JAX_PLATFORMS", "cpu")
    env.update(env_extra)
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (
        f"{' '.join(args)} exited {proc.returncode}\n"
        f"stdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-4000:]}")
    return proc


def test_cli_runs_unmodified_example_like_eager(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(_REPORT_STATS)
    env = {"TERRA_STRICT": "1", "TERRA_SYNC_COMPILE": "1"}
    script = os.path.join("examples", "mlp.py")
    eager = _run([script, "--steps", str(STEPS), "--mode", "eager"], env)
    under_terra = _run(["-m", "terra", "run", "--step", "train_step", script,
                        "--steps", str(STEPS)],
                       {**env, "PYTHONPATH": os.pathsep.join(
                           p for p in (str(tmp_path), os.environ.get("PYTHONPATH")) if p)})
    assert "step 10 loss" in eager.stdout
    harness.assert_same_text(eager.stdout, under_terra.stdout, "stdout of the CLI run")

    reports = [line for line in under_terra.stderr.splitlines()
               if line.startswith("TERRA_STATS ")]
    assert reports, "the CLI did not wrap train_step with terra.function\n" + \
        under_terra.stderr[-2000:]
    stats = json.loads(reports[-1].split(" ", 1)[1])
    assert stats["steps"] == STEPS, stats
    assert stats["coexecuted"] > 0, stats
