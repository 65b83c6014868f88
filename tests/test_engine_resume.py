"""Exact resume: a real `segtrain fit` process killed (SIGKILL) or stopped (SIGTERM) mid-run, resumed with
--resume, ends with the same weights, history and metrics as an uninterrupted run with the same seed."""

import json
import re
import signal

import numpy as np
import pytest
import tensorflow as tf

from tests.helpers import Interruption, history, invoke, make_stripes_dataset, stopped_at_step, weights_of, write_config

pytestmark = pytest.mark.slow

STEPS = 4  # per epoch; checkpoints every 3 steps and at each epoch end: 3, 4, 6, 8, 9, 12


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A run killed with SIGKILL, one stopped with SIGTERM, and the uninterrupted reference run in-process,
    all three at once (dropout, warm-up + cosine, deterministic ops)."""
    base = tmp_path_factory.mktemp("resume")
    root = make_stripes_dataset(base / "data", n_train=8, n_val=3)
    config = write_config(
        base / "resume.yaml", root, model={"depth": 2, "base_filters": 4, "dropout": 0.3},
        loss={"terms": [{"name": "cross_entropy"}, {"name": "jaccard", "weight": 0.5}], "class_weights": "balanced"},
        train={"epochs": 3, "steps_per_epoch": STEPS, "checkpoint_every_steps": 3, "learning_rate": 0.01, "seed": 1,
               "warmup_epochs": 1, "deterministic": True},
    )
    killed = Interruption(config, base / "killed", signal.SIGKILL)
    stopped = Interruption(config, base / "stopped", signal.SIGTERM)
    result = invoke("fit", config, "--out", base / "full")
    assert result.exit_code == 0, result.output
    return base, config, killed.finish(), stopped.finish()


def assert_same_run(run, reference):
    for name in ("last.keras", "best.keras"):
        for a, b in zip(weights_of(run / name), weights_of(reference / name)):
            np.testing.assert_array_equal(a, b, err_msg=name)
    assert history(run) == history(reference)  # every column but the wall-clock ones
    ours, theirs = (json.loads((r / "metrics.json").read_text()) for r in (run, reference))
    assert ours["confusion_matrix"] == theirs["confusion_matrix"]
    assert ours["per_class"] == theirs["per_class"] and ours["best_epoch"] == theirs["best_epoch"]


def test_sigkill_then_resume_ends_with_the_same_weights_and_metrics(runs):
    base, config, killed, _ = runs
    run = killed.run
    assert killed.proc.returncode == -signal.SIGKILL  # no handler, no cleanup: as a crash or an OOM kill
    assert not (run / "metrics.json").exists()  # it really stopped before the end
    killed_at = tf.train.latest_checkpoint(str(run / "checkpoints"))

    result = invoke("fit", config, "--out", run, "--resume")
    assert result.exit_code == 0, result.output
    assert f"(from {killed_at})" in result.output
    assert_same_run(run, base / "full")


def test_sigterm_saves_a_checkpoint_exits_130_and_resumes_exactly(runs):
    base, config, _, stopped = runs
    run, output = stopped.run, stopped.output
    assert stopped.proc.returncode == 130, output[-3000:]
    assert "Traceback" not in output
    match = re.search(r"Error: SIGTERM: stopped (.*?); checkpoint saved\. "
                      r"Resume with: segtrain fit (\S+) --resume --out (\S+)", output)
    assert match, output[-3000:]
    assert match.group(2) == str(run / "config.yaml") and match.group(3) == str(run)
    # the checkpoint was written at the step the message names
    latest = tf.train.latest_checkpoint(str(run / "checkpoints"))
    assert latest.endswith(f"ckpt-{stopped_at_step(match.group(1), STEPS)}")

    result = invoke("fit", match.group(2), "--out", match.group(3), "--resume")  # the command it printed
    assert result.exit_code == 0, result.output
    assert_same_run(run, base / "full")
