"""The persistent cache (TERRA_CACHE_DIR): a restarted job co-executes from its first step.

Each "run" is a fresh process (`cache_program.py`): the same training job,
eagerly for reference, then under Terra with a cache directory — the first run
records, compiles and saves; a restart loads the TraceGraph and the compiled
executables and co-executes every step, with eager's results and prints. A
stale graph (the job's shapes changed), an unreadable file and a graph that
cannot be saved all leave results unchanged.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from terra.bench import logs_match

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROGRAM = os.path.join(ROOT, "tests", "cache_program.py")
RTOL, ATOL = 1e-4, 1e-5


def run(mode: str, cache_dir: Path | None, *flags: str,
        env_changes: dict | None = None) -> tuple[dict, list[str], str]:
    """(report, printed lines, stderr) of one run of the job in a new process.

    `cache_dir` None: the cache is off (TERRA_CACHE=0); `env_changes` overrides the
    environment (a value None unsets it).
    """
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", TERRA_SYNC_COMPILE="1",
               TERRA_CACHE="0" if cache_dir is None else "1")
    env.pop("TERRA_CACHE_DIR", None)
    if cache_dir is not None:
        env["TERRA_CACHE_DIR"] = str(cache_dir)
    for name, value in (env_changes or {}).items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    proc = subprocess.run([sys.executable, "-W", "always", PROGRAM, mode, *flags], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    *printed, last = proc.stdout.strip().splitlines()
    return json.loads(last), printed, proc.stderr


def assert_same_as_eager(got: tuple, eager: tuple) -> None:
    (report, printed, _), (expected, eager_printed, _) = got, eager
    np.testing.assert_allclose(report["losses"], expected["losses"], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(report["params"], expected["params"], rtol=RTOL, atol=ATOL)
    assert logs_match(printed, eager_printed), (printed, eager_printed)


@pytest.fixture(scope="module")
def eager() -> tuple:
    return run("eager", None)


def test_restarted_job_coexecutes_from_its_first_step(tmp_path, eager):
    cold = run("terra", tmp_path)
    assert_same_as_eager(cold, eager)
    stats, store = cold[0]["stats"], cold[0]["store"]
    assert not stats["resumed"] and stats["traced"] >= 1 and stats["coexecuted"] >= 1
    assert store["compiled"] >= 1 and store["loaded"] == 0
    assert list((tmp_path / "graphs").glob("*.graph"))

    warm = run("terra", tmp_path)
    assert_same_as_eager(warm, eager)
    stats, store = warm[0]["stats"], warm[0]["store"]
    steps = len(eager[0]["losses"])
    assert stats["resumed"]
    assert stats["traced"] == 0 and stats["coexecuted"] == steps and stats["fallbacks"] == 0
    assert stats["segments_dispatched"] >= steps  # the graph, not eager, computed every step
    # Every executable came from the directory: nothing was compiled again.
    assert store == {"loaded": cold[0]["store"]["compiled"], "compiled": 0}


def test_stale_graph_diverges_and_learns_the_new_path(tmp_path):
    run("terra", tmp_path, "--hidden", "32")
    eager16 = run("eager", None, "--hidden", "16")
    changed = run("terra", tmp_path, "--hidden", "16")  # same code, other shapes
    assert_same_as_eager(changed, eager16)
    stats = changed[0]["stats"]
    assert stats["resumed"] and stats["divergences"] >= 1 and stats["fallbacks"] >= 1
    assert stats["paths"] == 2 and stats["compiles"] >= 2
    # The new path co-executes once learned, and is saved for the next restart.
    last = run("terra", tmp_path, "--hidden", "16")[0]["stats"]
    assert last["resumed"] and last["traced"] == 0 and last["divergences"] == 0


def test_unreadable_graph_file_is_recorded_again(tmp_path, eager):
    run("terra", tmp_path)
    (saved,) = (tmp_path / "graphs").glob("*.graph")
    saved.write_bytes(b"not a pickle")
    report, printed, stderr = got = run("terra", tmp_path)
    assert_same_as_eager(got, eager)
    assert "ignoring the saved graph of 'train_step'" in stderr and "recorded again" in stderr
    assert not report["stats"]["resumed"] and report["stats"]["coexecuted"] >= 1
    assert run("terra", tmp_path)[0]["stats"]["resumed"]  # saved again, loadable


def test_graph_that_cannot_be_saved_warns_once_and_runs(tmp_path):
    eager_vjp = run("eager", None, "--custom-vjp")
    got = run("terra", tmp_path, "--custom-vjp")  # its custom_vjp rule is a Python function
    assert_same_as_eager(got, eager_vjp)
    stderr = got[2]
    assert stderr.count("an op holds a Python function (_clip_bwd)") == 1, stderr
    assert got[0]["stats"]["coexecuted"] >= 1
    assert not list((tmp_path / "graphs").glob("*.graph"))  # a restart records it again


def test_cache_off_writes_nothing(tmp_path, eager, monkeypatch):
    monkeypatch.chdir(tmp_path)
    report = run("terra", None, env_changes={"XDG_CACHE_HOME": str(tmp_path / "xdg"),
                                             "HOME": str(tmp_path)})[0]
    assert report["store"] is None and not report["stats"]["resumed"]
    assert not any(tmp_path.iterdir())


def test_cache_is_on_by_default_in_the_users_cache_folder(tmp_path, eager):
    """No setting: the cache lives in $XDG_CACHE_HOME/terra (here a temporary folder),
    with JAX's compilation cache beside it, and a second run resumes."""
    default = {"TERRA_CACHE": None, "TERRA_CACHE_DIR": None, "XDG_CACHE_HOME": str(tmp_path)}
    first = run("terra", None, env_changes=default)
    assert_same_as_eager(first, eager)
    assert list((tmp_path / "terra" / "graphs").glob("*.graph"))
    assert any((tmp_path / "terra" / "jax").iterdir())   # JAX's own compiles, kept
    second = run("terra", None, env_changes=default)
    assert_same_as_eager(second, eager)
    assert second[0]["stats"]["resumed"] and second[0]["stats"]["traced"] == 0
