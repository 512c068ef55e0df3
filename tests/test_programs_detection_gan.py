"""The DCGAN, Faster R-CNN and YOLOv3 example programs give eager's results under Terra.

Each program (examples/NAME.py, the program contract: STEP_FUNCTIONS and
``run(wrap, steps, log, seed, timings)``) is run for a few steps eagerly and with
every step function wrapped by ``terra.function`` (TERRA_STRICT=1,
TERRA_SYNC_COMPILE=1). The logged lines must agree (float tolerance of
``harness``), the final parameters too, and Terra must really have co-executed.

What is hard about them for whole-step staging, inside the step functions:

* dcgan: two step functions and two optimizers, numpy ``RandomState`` noise drawn
  in every step, a numpy metric on fetched logits, and a training loop whose
  alternation (2 D updates per iteration, skipped G updates) follows fetched losses;
* faster_rcnn: proposals (top-k + NMS), anchor matching and ROI sampling in numpy
  on fetched RPN outputs, then a bilinear ROI gather and the losses under
  ``jax.value_and_grad``;
* yolov3: a ``jax.vjp`` forward pass whose predictions are fetched for the
  per-box Python target assignment and ignore mask, ``value_and_grad`` of the
  loss with respect to the predictions, and the pullback.
"""


import pytest

from harness import (assert_expert_matches_eager, assert_same_text, assert_same_tree,
                     load_program)





@pytest.fixture
def terra_env(monkeypatch):
    monkeypatch.setenv("TERRA_STRICT", "1")
    monkeypatch.setenv("TERRA_SYNC_COMPILE", "1")
    monkeypatch.delenv("TERRA_DISABLE", raising=False)


def run_both(name, steps):
    """Run the program eagerly, then under Terra; return (eager, terra) logs and the
    StepFunctions the Terra run created."""
    import terra

    program = load_program(name)

    eager_lines = []
    eager_params = program.run(lambda f: f, steps, log=eager_lines.append)

    wrapped = []

    def wrap(fn):
        step = terra.function(fn)
        wrapped.append(step)
        return step

    terra_lines = []
    terra_params = program.run(wrap, steps, log=terra_lines.append)

    assert eager_lines, "the program logged nothing"
    assert_same_text("\n".join(eager_lines), "\n".join(terra_lines), f"{name} log")
    assert_same_tree(eager_params, terra_params, f"{name} params")
    assert sorted(s.__name__ for s in wrapped) == sorted(program.STEP_FUNCTIONS)
    stats = {s.__name__: dict(s.stats().as_dict()) for s in wrapped}
    coexecuted = sum(st["coexecuted"] for st in stats.values())
    assert coexecuted > 0, f"terra never co-executed: {stats}"
    assert_expert_matches_eager(program, "\n".join(eager_lines), eager_params,
                                lambda wrap, n, log: program.run(wrap, n, log=log), steps)
    return eager_lines, stats


def test_dcgan_terra_matches_eager(terra_env):
    # 8 iterations: iterations 1-3 skip the G step (D loss still high), later
    # ones run it; from iteration 6 on the G loss is low enough for two D updates.
    lines, stats = run_both("dcgan", 8)
    assert lines[-1].endswith("d_updates 11 g_updates 5 g_skipped 3"), lines
    assert stats["d_step"]["coexecuted"] > 0 and stats["g_step"]["coexecuted"] > 0, stats


def test_faster_rcnn_terra_matches_eager(terra_env):
    lines, stats = run_both("faster_rcnn", 10)
    assert len(lines) == 2 and "proposals" in lines[0]
    assert stats["train_step"]["coexecuted"] >= 5, stats


def test_yolov3_terra_matches_eager(terra_env):
    lines, stats = run_both("yolov3", 10)
    assert len(lines) == 2 and "mean_iou" in lines[0]
    assert stats["train_step"]["coexecuted"] >= 5, stats
