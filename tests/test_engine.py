"""The training engine in-process: schedules, clipping, plateau, early stopping, divergence, mixed precision,
safe saves and chief selection. Helpers here are shared by test_resume / test_distribute / test_bad_input."""

import csv
import json
import os
import re

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import pytest
import tensorflow as tf

from segtrain.config import TrainConfig
from tests.cli_helpers import invoke, write_config
from tests.conftest import make_stripes_dataset

TIMING_COLUMNS = ("seconds", "images_per_second")


def weights_of(path):
    return keras.models.load_model(path, compile=False).get_weights()


def history(run, drop=TIMING_COLUMNS):
    with (run / "history.csv").open() as handle:
        return [{k: v for k, v in row.items() if k not in drop} for row in csv.DictReader(handle)]


def stopped_at_step(where, steps_per_epoch):
    """The global step of 'at epoch E, step S' (inside an epoch) or 'after epoch N' (during its validation)."""
    inside = re.fullmatch(r"at epoch (\d+), step (\d+)", where)
    if inside:
        return (int(inside.group(1)) - 1) * steps_per_epoch + int(inside.group(2))
    return int(re.fullmatch(r"after epoch (\d+)", where).group(1)) * steps_per_epoch


@pytest.fixture
def float32_policy():
    """run_fit sets Keras's global dtype policy; make sure every test leaves it at float32."""
    yield
    keras.mixed_precision.set_global_policy("float32")


# ---------------------------------------------------------------------------- schedules


def test_cosine_warmup_rises_linearly_then_decays_to_alpha():
    from segtrain.engine.schedules import make_schedule

    train = TrainConfig(learning_rate=0.1, schedule="cosine", warmup_epochs=2)
    schedule = make_schedule(train, total_steps=40, steps_per_epoch=5)  # warm-up: 2 epochs x 5 = 10 steps
    lr = np.array([float(schedule(step)) for step in range(41)])
    # warm-up from 1% (0.001) to 0.1 in 10 equal steps of 0.0099
    np.testing.assert_allclose(lr[:11], 0.001 + 0.0099 * np.arange(11), rtol=1e-5)
    assert np.all(np.diff(lr[10:]) < 0)  # then strictly decreasing
    # cosine over the 30 remaining steps: half way, (1 + cos(pi/2)) / 2 = 0.5 of the way from 0.1 to alpha*0.1
    assert lr[25] == pytest.approx(0.001 + (0.1 - 0.001) * 0.5, rel=1e-4)
    assert lr[40] == pytest.approx(0.001, rel=1e-4)  # alpha = 0.01


def test_constant_and_plateau_schedules_share_the_warmup_and_plateau_follows_its_scale():
    from segtrain.engine.schedules import make_schedule

    scale = tf.Variable(1.0)
    constant = make_schedule(TrainConfig(learning_rate=0.2, schedule="constant", warmup_epochs=1), 100, 4, scale)
    plateau = make_schedule(TrainConfig(learning_rate=0.2, schedule="plateau", warmup_epochs=1), 100, 4, scale)
    # 4 warm-up steps: 0.002, 0.0515, 0.101, 0.1505, then 0.2
    expected = [0.002, 0.0515, 0.101, 0.1505, 0.2, 0.2]
    np.testing.assert_allclose([float(constant(s)) for s in range(6)], expected, rtol=1e-5)
    np.testing.assert_allclose([float(plateau(s)) for s in range(6)], expected, rtol=1e-5)
    scale.assign(0.25)
    assert float(plateau(50)) == pytest.approx(0.05)
    assert float(constant(50)) == pytest.approx(0.2)  # constant ignores the plateau scale


def test_plateau_state_lowers_after_patience_and_stops_at_the_minimum():
    from segtrain.engine.schedules import PlateauState

    scale, wait = tf.Variable(1.0), tf.Variable(0, dtype=tf.int64)
    train = TrainConfig(learning_rate=0.1, schedule="plateau", plateau_factor=0.5, plateau_patience=2,
                        plateau_min_learning_rate=0.02)
    plateau = PlateauState(train, scale, wait)
    # improved, stalled, stalled (-> 0.5), stalled, improved (wait reset), stalled, stalled (-> 0.25),
    # stalled, stalled (-> 0.2 = min 0.02 / 0.1), stalled, stalled (already at the minimum)
    events = [True, False, False, False, True, False, False, False, False, False, False]
    lowered = [plateau.update(e) for e in events]
    assert lowered == [None, None, 0.5, None, None, None, 0.25, None, pytest.approx(0.2), None, None]
    assert float(scale.numpy()) == pytest.approx(0.2)


# ---------------------------------------------------------------------------- gradient clipping


def _one_sgd_step(clip, loss_scale=False):
    from segtrain.engine.trainer import Trainer
    from segtrain.losses import build_loss
    from segtrain.model import build_unet

    keras.utils.set_random_seed(0)
    strategy = tf.distribute.get_strategy()
    model = build_unet(3, 1, depth=1, base_filters=2, batch_norm=False)
    loss = build_loss({"terms": [{"name": "cross_entropy"}]}, ["a", "b"])
    optimizer = keras.optimizers.SGD(learning_rate=1.0)
    if loss_scale:  # as under mixed_float16: gradients arrive multiplied by the dynamic scale (2**15)
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    trainer = Trainer(strategy, model, loss, optimizer, 2, grad_clip_norm=clip)
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (2, 8, 8, 3)).astype("float32")
    masks = (rng.uniform(size=(2, 8, 8)) > 0.5).astype("int32")
    before = [w.copy() for w in model.get_weights()]
    trainer.train_steps(iter(tf.data.Dataset.from_tensors((images, masks))), 1)
    # SGD with lr 1: the update is exactly minus the (clipped) gradient
    return float(np.sqrt(sum(np.sum((a - b) ** 2) for a, b in zip(model.get_weights(), before))))


@pytest.mark.parametrize("loss_scale", [False, True])
def test_grad_clip_norm_limits_the_global_gradient_norm(loss_scale):
    unclipped = _one_sgd_step(None, loss_scale)
    assert unclipped > 0.05  # so that clipping at 0.05 must act
    assert _one_sgd_step(0.05, loss_scale) == pytest.approx(0.05, rel=1e-4)
    assert _one_sgd_step(10 * unclipped, loss_scale) == pytest.approx(unclipped, rel=1e-5)  # a loose bound: no change


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


# ---------------------------------------------------------------------------- mixed precision


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_trains_saves_and_reloads(tmp_path, precision, float32_policy):
    root = make_stripes_dataset(tmp_path / "data", n_train=4, n_val=2)
    config = write_config(tmp_path / "mp.yaml", root,
                          train={"epochs": 1, "steps_per_epoch": 2, "precision": precision})
    run = tmp_path / "run"
    result = invoke("fit", config, "--out", run)
    assert result.exit_code == 0, result.output
    assert keras.mixed_precision.global_policy().name == "float32"  # run_fit restored the global policy
    assert json.loads((run / "run.json").read_text())["precision"] == precision
    assert np.isfinite(float(history(run)[0]["loss"]))
    model = keras.models.load_model(run / "last.keras", compile=False)
    compute = {layer.dtype_policy.compute_dtype for layer in model.layers if layer.name.endswith("conv1")}
    assert compute == {precision.split("_")[1]}  # the convolutions compute in half precision
    assert model.get_layer("logits").dtype_policy.name == "float32"
    logits = model(np.zeros((1, 16, 16, 3), "float32"))
    assert logits.dtype == "float32"
    # the checkpoint reloads into a fresh model and optimizer built the same way (with dynamic loss scaling
    # under float16: the LossScaleOptimizer's scale is part of it)
    from segtrain.config import TrainConfig as Train
    from segtrain.engine.checkpoints import TrainingState
    from segtrain.engine.schedules import make_optimizer, make_schedule
    from segtrain.model import build_unet

    keras.mixed_precision.set_global_policy(precision)
    fresh = build_unet(3, 1, 2, 4)
    optimizer = make_optimizer(Train(), make_schedule(Train(), 2, 2), precision)
    optimizer.build(fresh.trainable_variables)
    state = TrainingState(fresh, optimizer, run / "checkpoints")
    assert state.restore_latest().endswith("ckpt-2") and int(state.step.numpy()) == 2
    assert int(optimizer.iterations.numpy()) == 2
    saved = [name for name, _ in tf.train.list_variables(state.latest())]
    has_scale = any("dynamic_scale" in name for name in saved)
    assert has_scale is (precision == "mixed_float16")  # dynamic loss scaling for float16 only
    assert isinstance(optimizer, keras.optimizers.LossScaleOptimizer) is has_scale
    for a, b in zip(fresh.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------- safe saves


def test_failed_model_save_keeps_the_previous_file_loadable(tmp_path, monkeypatch):
    from segtrain.model import build_unet
    from segtrain.runs import load_model, save_model_atomic

    model = build_unet(3, 1, depth=1, base_filters=2)
    save_model_atomic(model, tmp_path / "best.keras")
    before = (tmp_path / "best.keras").read_bytes()

    def crash(path, *args, **kwargs):  # a kill mid-write: half a file, then the process is gone
        with open(path, "wb") as handle:
            handle.write(before[: len(before) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(model, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_model_atomic(model, tmp_path / "best.keras")
    assert (tmp_path / "best.keras").read_bytes() == before
    assert load_model(tmp_path / "best.keras").count_params() == model.count_params()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.keras"]  # no temporary file left


def test_half_written_checkpoint_is_ignored(tmp_path):
    from segtrain.engine.checkpoints import TrainingState
    from segtrain.model import build_unet

    model = build_unet(3, 1, depth=1, base_filters=2)
    optimizer = keras.optimizers.Adam()
    optimizer.build(model.trainable_variables)  # as run_fit does before training
    state = TrainingState(model, optimizer, tmp_path / "checkpoints")
    state.best.assign(0.75)
    state.save(epoch=1, step=5)
    saved = [w.copy() for w in model.get_weights()]
    # a save of step 9 killed after its data and index files, before the state file was updated
    (tmp_path / "checkpoints" / "ckpt-9.data-00000-of-00001").write_bytes(b"\x00" * 100)
    (tmp_path / "checkpoints" / "ckpt-9.index").write_bytes(b"garbage")

    fresh = build_unet(3, 1, depth=1, base_filters=2)
    restored = TrainingState(fresh, keras.optimizers.Adam(), tmp_path / "checkpoints")
    assert restored.restore_latest().endswith("ckpt-5")
    assert int(restored.step.numpy()) == 5 and int(restored.epoch.numpy()) == 1 and restored.best_value == 0.75
    for a, b in zip(fresh.get_weights(), saved):
        np.testing.assert_array_equal(a, b)


def test_models_load_in_keras_safe_mode(tmp_path):
    from segtrain.errors import CheckpointError
    from segtrain.runs import load_model

    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Lambda(lambda x: x * 2)(inputs))  # arbitrary Python code
    model.save(tmp_path / "lambda.keras")
    with pytest.raises(CheckpointError, match="cannot load the model"):
        load_model(tmp_path / "lambda.keras")


# ---------------------------------------------------------------------------- chief selection


@pytest.mark.parametrize(
    "cluster, task, chief",
    [
        ({"worker": ["a:1", "b:1"]}, {"type": "worker", "index": 0}, True),
        ({"worker": ["a:1", "b:1"]}, {"type": "worker", "index": 1}, False),
        ({"chief": ["c:1"], "worker": ["a:1"]}, {"type": "chief", "index": 0}, True),
        ({"chief": ["c:1"], "worker": ["a:1"]}, {"type": "worker", "index": 0}, False),  # the chief task writes
    ],
)
def test_only_the_chief_writes(monkeypatch, cluster, task, chief):
    from segtrain.engine.devices import _is_chief_task, is_non_chief_process

    assert _is_chief_task(cluster, task["type"], task["index"]) is chief
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": cluster, "task": task}))
    assert is_non_chief_process() is (not chief)


def test_validation_labeler_follows_the_decision_rule():
    """Validation in fit decides like eval: a threshold or cost rule, not always argmax."""
    import tensorflow as tf

    from segtrain.engine.trainer import logits_labeler

    logits = tf.constant([[[[-2.0], [-0.5], [0.5]]]])  # p_fg = 0.12, 0.38, 0.62
    assert logits_labeler("argmax")(logits).numpy().ravel().tolist() == [0, 0, 1]
    assert logits_labeler("threshold", 0.3)(logits).numpy().ravel().tolist() == [0, 1, 1]
    # fp = 1, fn = 4: foreground when p_fg > 1 / (1 + 4) = 0.2
    assert logits_labeler("cost", None, [[0, 1], [4, 0]])(logits).numpy().ravel().tolist() == [0, 1, 1]
    three = tf.constant([[[[0.0, 1.0, 0.9]]]])  # softmax ~ [0.17, 0.42, 0.38]
    cost = [[0, 1, 1], [1, 0, 1], [1, 10, 0]]  # calling class 2 a 1 is expensive
    assert logits_labeler("argmax")(three).numpy().ravel().tolist() == [1]
    assert logits_labeler("cost", None, cost)(three).numpy().ravel().tolist() == [2]


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


@pytest.mark.slow
def test_xla_steps_compute_the_same_first_loss_and_train(tmp_path, float32_policy):
    """jit_compile: true runs the XLA-compiled train and validation steps (auto keeps them off on the CPU)."""
    root = make_stripes_dataset(tmp_path / "data", n_train=4, n_val=2)
    config = write_config(tmp_path / "c.yaml", root, train={"epochs": 2, "steps_per_epoch": 1, "seed": 2})
    rows = {}
    for jit in ("false", "true"):
        result = invoke("fit", config, "--out", tmp_path / jit, "--set", f"train.jit_compile={jit}")
        assert result.exit_code == 0, result.output
        rows[jit] = history(tmp_path / jit)
    # epoch 1 is one step whose loss is computed before any update: the same math, summed in another order
    # by XLA's fused kernels (float32, ~1e-6 relative on a sum of 2 x 4 x 16 x 16 pixel losses)
    assert float(rows["true"][0]["loss"]) == pytest.approx(float(rows["false"][0]["loss"]), rel=1e-5)
    assert float(rows["true"][1]["val_loss"]) == pytest.approx(float(rows["false"][1]["val_loss"]), rel=1e-3)
