"""segtrain/engine/loop.py (with state.py): plateau, early stopping and its resume, divergence, and several
steps per compiled call."""

import json
import re

import numpy as np
import pytest
import tensorflow as tf

from tests.helpers import history, invoke, make_stripes_dataset, weights_of, write_config


# ---------------------------------------------------------------------------- plateau, early stopping, resume


@pytest.fixture(scope="module")
def stalled(tmp_path_factory):
    """A run whose monitored metric cannot improve (learning rate 1e-9, no BatchNorm)."""
    base = tmp_path_factory.mktemp("stalled")
    root = make_stripes_dataset(base / "data", n_train=4, n_val=2)
    config = write_config(
        base / "stall.yaml", root, model={"depth": 2, "base_filters": 4, "batch_norm": False},
        train={"epochs": 10, "steps_per_epoch": 1, "learning_rate": 1e-9, "seed": 3, "schedule": "plateau",
               "plateau_factor": 0.5, "plateau_patience": 2, "plateau_min_learning_rate": 1e-12,
               "monitor": "val_pixel_accuracy", "early_stopping_patience": 4, "deterministic": True},
    )
    result = invoke("fit", config, "--out", base / "full")
    assert result.exit_code == 0, result.output
    return base, config, result.output


@pytest.mark.slow
def test_plateau_lowers_the_rate_and_early_stopping_ends_the_run(stalled, float32_policy):
    base, _, output = stalled
    rows = history(base / "full")
    # epoch 1 sets the best; 2 to 5 stall. Plateau (patience 2) halves the rate after epochs 3 and 5
    # (the lr column is the rate during the epoch); early stopping (patience 4) stops after epoch 5.
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4, 5]
    np.testing.assert_allclose([float(r["lr"]) for r in rows], [1e-9, 1e-9, 1e-9, 5e-10, 5e-10], rtol=1e-5)
    assert "Early stopping: val_pixel_accuracy has not improved for 4 epochs" in output
    assert "learning rate lowered to 5e-10" in output
    assert json.loads((base / "full" / "metrics.json").read_text())["best_epoch"] == 1


@pytest.mark.slow
def test_resume_restores_plateau_and_best_so_far(stalled, float32_policy):
    base, config, _ = stalled
    part = base / "part"
    first = invoke("fit", config, "--out", part, "--set", "train.epochs=2")  # stops with 1 stalled epoch counted
    assert first.exit_code == 0, first.output
    resumed = invoke("fit", config, "--out", part, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert "Resuming" in resumed.output and "Early stopping" in resumed.output
    # the wait counter (1), the best value and epoch came back from the checkpoint: the rate is lowered
    # after epoch 3 and the run stops after epoch 5, as without the interruption
    assert history(part) == history(base / "full")
    for a, b in zip(weights_of(part / "last.keras"), weights_of(base / "full" / "last.keras")):
        np.testing.assert_array_equal(a, b)



@pytest.mark.slow
def test_early_stopping_counts_only_validated_epochs(stalled, float32_policy):
    """With validate_every 2, patience 2 means two validated epochs without improvement (epochs 4 and 6)."""
    base, config, _ = stalled
    result = invoke("fit", config, "--out", base / "every2", "--set", "train.validate_every=2",
                    "--set", "train.early_stopping_patience=2", "--set", "train.schedule=constant")
    assert result.exit_code == 0, result.output
    rows = history(base / "every2")
    # epoch 2 is the first validated epoch and sets the best; 4 and 6 stall; unvalidated 3 and 5 do not count
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [bool(r["val_pixel_accuracy"]) for r in rows] == [False, True, False, True, False, True]



# ---------------------------------------------------------------------------- divergence


@pytest.mark.slow
def test_nan_loss_stops_naming_epoch_and_step_and_keeps_the_last_good_checkpoint(tmp_path, float32_policy):
    root = make_stripes_dataset(tmp_path / "data", n_train=4, n_val=2)
    config = write_config(
        tmp_path / "nan.yaml", root, model={"depth": 2, "base_filters": 4, "batch_norm": False},
        # Adam moves every weight by ~1e6 per step: without BatchNorm the activations overflow float32
        train={"epochs": 2, "steps_per_epoch": 3, "learning_rate": 1e6, "schedule": "constant",
               "checkpoint_every_steps": 1},
    )
    run = tmp_path / "run"
    result = invoke("fit", config, "--out", run)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and result.output.count("Error:") == 1
    match = re.search(r"(loss became (nan|inf|-inf)|weights became NaN or Inf) at epoch \d+, step \d+ "
                      r"\(global step (\d+)\)", result.output)
    assert match, result.output
    assert "last good checkpoint is kept" in result.output
    assert not (run / "last.keras").exists()
    latest = tf.train.latest_checkpoint(str(run / "checkpoints"))
    assert latest is not None
    # the kept checkpoint is from before the failing step, and its weights are finite
    assert int(latest.rsplit("-", 1)[1]) < int(match.group(3))
    from segtrain.model import build_unet

    model = build_unet(3, 1, 2, 4, batch_norm=False)
    tf.train.Checkpoint(model=model).restore(latest).expect_partial()
    assert all(np.isfinite(w).all() for w in model.get_weights())



# ---------------------------------------------------------------------------- several steps per call


@pytest.mark.parametrize("per_call, every, expected", [
    (8, None, [5, 5, 5]),        # never past an epoch end
    (3, None, [3, 2, 3, 2, 3, 2]),
    (8, 2, [2, 2, 1, 1, 2, 2, 2, 2, 1]),  # nor past a checkpoint step (global steps 2, 4, 6, ...)
    (1, 4, [1] * 15),
])
def test_calls_end_on_epoch_ends_and_checkpoint_steps(per_call, every, expected):
    from segtrain.engine.loop import steps_in_next_call
    from segtrain.engine.state import LoopState

    loop, calls = LoopState("loss", steps_per_epoch=5), []
    while loop.global_step < 15:
        count = steps_in_next_call(loop, every, per_call)
        calls.append(count)
        loop.add_step_losses([0.0] * count)
        if loop.steps_left_in_epoch == 0:
            loop.finish_epoch({"epoch": loop.epoch + 1, "loss": 0.0})
    assert calls == expected



@pytest.mark.slow
def test_steps_per_execution_trains_exactly_as_one_step_per_call(tmp_path, float32_policy):
    """Several steps in one compiled call change when the host looks, not what is computed: same losses, same
    weights, bit for bit with deterministic ops; mid-epoch checkpoints still land on their steps."""
    root = make_stripes_dataset(tmp_path / "data", n_train=8, n_val=2)
    config = write_config(tmp_path / "c.yaml", root,
                          train={"epochs": 2, "steps_per_epoch": 5, "learning_rate": 0.01, "seed": 4,
                                 "deterministic": True, "checkpoint_every_steps": 3, "keep_checkpoints": 10})
    runs = {}
    for per_call in (1, 4):
        run = tmp_path / f"spe{per_call}"
        result = invoke("fit", config, "--out", run, "--set", f"train.steps_per_execution={per_call}")
        assert result.exit_code == 0, result.output
        runs[per_call] = run
    assert history(runs[4]) == history(runs[1])
    for a, b in zip(weights_of(runs[4] / "last.keras"), weights_of(runs[1] / "last.keras")):
        np.testing.assert_array_equal(a, b)
    # checkpoints at global steps 3, 6, 9 (mid-epoch) and 5, 10 (epoch ends), whatever the call size
    for run in runs.values():
        steps = sorted(int(p.name.split("-")[1].split(".")[0]) for p in (run / "checkpoints").glob("ckpt-*.index"))
        assert steps == [3, 5, 6, 9, 10]
