"""Fine-tuning an encoder U-Net: the encoder frozen (weights and BatchNorm statistics untouched) for
train.freeze_encoder_*, then trained at the learning rate x train.encoder_lr_scale; compiled calls end at the
switch; a run resumed in either phase ends as an uninterrupted one; mixed precision."""

import json
import shutil

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.helpers import history, invoke, make_stripes_dataset, tiny_mobilenet, weights_of, write_config

SMALL = "mobilenetv3small"
NARROW = [8, 8, 8, 8, 8]
@pytest.fixture
def tiny_backbone(monkeypatch):
    monkeypatch.setattr(keras.applications, "MobileNetV3Small", tiny_mobilenet)


# ---------------------------------------------------------------------------- the encoder's learning rate


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_the_encoder_variables_move_by_the_scale_times_the_plain_update(weight_decay):
    """Adam (AdamW) with one layer's variables scaled by 0.1 against plain Adam from the same weights on the same
    gradients: the scaled layer's change is 0.1 x the plain one's (Adam's update and AdamW's decay are linear in
    the rate, its moments do not depend on it), the other layer's is the plain one's."""
    from segtrain.config import TrainConfig
    from segtrain.engine.schedules import make_optimizer

    train = TrainConfig(learning_rate=0.01, weight_decay=weight_decay, encoder_lr_scale=0.1)
    results = []
    for encoder_scaled in (True, False):
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, name="enc"), keras.layers.Dense(2)])
        encoder_vars = model.get_layer("enc").trainable_variables
        optimizer = make_optimizer(train, 0.01, "float32", encoder_vars if encoder_scaled else None)
        optimizer.build(model.trainable_variables)
        before = [v.numpy().copy() for v in model.trainable_variables]
        grads = [tf.fill(v.shape, 0.3) for v in model.trainable_variables]
        optimizer.apply_gradients(zip(grads, model.trainable_variables))  # one step: the decay reads v0 in both
        results.append([v.numpy() - b for v, b in zip(model.trainable_variables, before)])
    scaled, plain = results
    # a change read as new - old in float32 is off by up to eps x |weight| (each rounded to half that)
    atol = 2 * np.finfo(np.float32).eps * max(np.abs(b).max() for b in before)
    for i in range(2):  # the encoder layer's kernel and bias
        assert np.abs(plain[i]).min() > 100 * atol
        np.testing.assert_allclose(scaled[i], 0.1 * plain[i], rtol=1e-6, atol=atol)
    for i in range(2, 4):
        np.testing.assert_allclose(scaled[i], plain[i], rtol=1e-6, atol=atol)


def test_calls_end_where_the_encoder_unfreezes():
    from segtrain.engine.loop import steps_in_next_call
    from segtrain.engine.state import LoopState

    loop, calls = LoopState("loss", steps_per_epoch=5), []
    while loop.global_step < 10:
        count = steps_in_next_call(loop, None, 4, freeze_until=3)
        calls.append(count)
        loop.add_step_losses([0.0] * count)
        if loop.steps_left_in_epoch == 0:
            loop.finish_epoch({"epoch": loop.epoch + 1, "loss": 0.0})
    assert calls == [3, 2, 4, 1]


def test_freeze_steps_counts_epochs_of_the_schedule_or_takes_the_steps():
    from segtrain.config import TrainConfig
    from segtrain.engine.setup import freeze_steps

    assert freeze_steps(TrainConfig(freeze_encoder_epochs=1.5), 10) == 15
    assert freeze_steps(TrainConfig(freeze_encoder_steps=7), 10) == 7
    assert freeze_steps(TrainConfig(), 10) == 0


# ---------------------------------------------------------------------------- the frozen and unfrozen phases


def _bce(masks, logits):
    labels = tf.cast(masks[..., None], tf.float32)
    return tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels=labels, logits=logits))


def _values(variables):
    return [np.array(v.numpy()) for v in variables]


def test_the_frozen_phase_changes_no_encoder_weight_nor_statistic_and_the_unfrozen_phase_does(tiny_backbone):
    from segtrain.config import TrainConfig
    from segtrain.encoders.backbones import encoder_of
    from segtrain.encoders.build import build_encoder_unet
    from segtrain.engine.schedules import make_optimizer
    from segtrain.engine.trainer import Trainer

    keras.utils.set_random_seed(0)
    model = build_encoder_unet(SMALL, 3, 1, NARROW)
    encoder = encoder_of(model)
    optimizer = make_optimizer(TrainConfig(learning_rate=0.01), 0.01, "float32", encoder.trainable_variables)
    optimizer.build(model.trainable_variables)
    trainer = Trainer(tf.distribute.get_strategy(), model, _bce, optimizer, 2, encoder=encoder)
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    masks = (images[..., 0] > 128).astype("int32")
    batches = iter(tf.data.Dataset.from_tensors((images, masks)).repeat())
    statistics = [v for v in encoder.non_trainable_variables if "moving" in v.path]
    decoder = model.get_layer("decoder4_conv1").kernel
    assert len(statistics) == 10 and len(encoder.trainable_variables) == 15

    start = _values(model.variables) + _values(optimizer.variables)
    trainer.set_encoder_frozen(True)
    assert model.get_layer("encoder").trainable is False and not any(
        v in encoder.trainable_variables for v in model.trainable_variables)
    trainer.train_steps(batches, 1)
    frozen = _values(model.variables)
    # the same step at an unfrozen step's cost (a budgeted run measures so): the same update
    for variable, value in zip(list(model.variables) + list(optimizer.variables), start):
        variable.assign(value)
    assert trainer.set_encoder_frozen(True, full_cost=True)
    trainer.train_steps(batches, 1)
    for a, b in zip(_values(model.variables), frozen):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)

    trainer.set_encoder_frozen(True)
    encoder_before, stats_before = _values(trainer.encoder_variables), _values(statistics)
    decoder_before = decoder.numpy().copy()
    trainer.train_steps(batches, 2)
    assert all(np.array_equal(a, b) for a, b in zip(_values(trainer.encoder_variables), encoder_before))
    assert all(np.array_equal(a, b) for a, b in zip(_values(statistics), stats_before))
    assert not np.array_equal(decoder.numpy(), decoder_before)

    assert trainer.set_encoder_frozen(False)
    trainer.train_steps(batches, 1)
    assert len(encoder.trainable_variables) == len(encoder_before)
    moved = [not np.array_equal(a, b) for a, b in zip(_values(encoder.trainable_variables), encoder_before)]
    assert all(moved)
    assert all(not np.array_equal(a, b) for a, b in zip(_values(statistics), stats_before))


# ---------------------------------------------------------------------------- whole runs


def _rewind(run, step, tmp_path, name):
    """A copy of the finished run as if it had been killed at `step`: its checkpoint state points there."""
    copy = tmp_path / name
    shutil.copytree(run, copy)
    (copy / "checkpoints" / "checkpoint").write_text(f'model_checkpoint_path: "ckpt-{step}"\n')
    for stale in ("metrics.json",):
        (copy / stale).unlink()
    return copy


@pytest.mark.slow
def test_a_run_resumed_in_either_phase_ends_as_the_uninterrupted_one(tmp_path, tiny_backbone):
    """3 epochs of 2 steps, the encoder frozen for 3 steps (1.5 epochs), a checkpoint at every step: resumed from
    step 1 (frozen) and step 4 (unfrozen), the runs end with the uninterrupted run's weights and history."""
    root = make_stripes_dataset(tmp_path / "data", n_train=4, n_val=1)
    config = write_config(
        tmp_path / "c.yaml", root, model={"encoder": SMALL, "encoder_weights": "none", "decoder_filters": NARROW},
        data={"crop": 32, "batch_size": 2},
        train={"epochs": 3, "steps_per_epoch": 2, "freeze_encoder_epochs": 1.5, "checkpoint_every_steps": 1,
               "keep_checkpoints": 10, "deterministic": True, "learning_rate": 0.01, "seed": 1},
        predict={"calibrate": False})
    result = invoke("fit", config, "--out", tmp_path / "full")
    assert result.exit_code == 0, result.output
    assert "Encoder unfrozen at step 3" in result.output
    full = tmp_path / "full"
    for step in (1, 4):
        run = _rewind(full, step, tmp_path, f"from{step}")
        resumed = invoke("fit", run / "config.yaml", "--out", run, "--resume")
        assert resumed.exit_code == 0, resumed.output
        assert f"ckpt-{step})" in resumed.output
        assert ("Encoder unfrozen at step 3" in resumed.output) is (step < 3)
        for a, b in zip(weights_of(run / "last.keras"), weights_of(full / "last.keras")):
            np.testing.assert_array_equal(a, b)
        assert history(run) == history(full)
        assert json.loads((run / "metrics.json").read_text())["confusion_matrix"] == \
            json.loads((full / "metrics.json").read_text())["confusion_matrix"]


@pytest.mark.slow
def test_mixed_precision_trains_an_encoder_with_a_frozen_phase(tmp_path, float32_policy, tiny_backbone):
    """mixed_float16 on the CPU: float32 logits, finite losses, the frozen step leaves the encoder as it was."""
    root = make_stripes_dataset(tmp_path / "data", n_train=2, n_val=1)
    config = write_config(
        tmp_path / "c.yaml", root, model={"encoder": SMALL, "encoder_weights": "none", "decoder_filters": NARROW},
        data={"crop": 32, "batch_size": 2},
        train={"epochs": 2, "steps_per_epoch": 1, "freeze_encoder_epochs": 1, "precision": "mixed_float16",
               "seed": 1}, predict={"calibrate": False})
    result = invoke("fit", config, "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    assert "mixed_float16" in result.output and "Encoder unfrozen at step 1" in result.output
    model = keras.models.load_model(tmp_path / "run" / "last.keras", compile=False)
    assert model.get_layer("logits").compute_dtype == "float32"
    assert model.get_layer("encoder").get_layer("conv").compute_dtype == "float16"
    rows = history(tmp_path / "run")
    assert len(rows) == 2 and all(np.isfinite(float(r["loss"])) for r in rows)


MIRRORED_SCRIPT = '''
import json, sys
import keras, numpy as np
from click.testing import CliRunner
from segtrain.cli import cli

sys.path.insert(0, sys.argv[3])
from tests.helpers import tiny_mobilenet

keras.applications.MobileNetV3Small = tiny_mobilenet  # the stand-in of tests/helpers.py
report = {}
for mode in ("none", "mirrored"):
    result = CliRunner().invoke(cli, ["fit", sys.argv[1], "--out", f"{sys.argv[2]}/{mode}", "--set",
                                      f"train.distribute={mode}"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    model = keras.models.load_model(f"{sys.argv[2]}/{mode}/last.keras", compile=False)
    encoder = model.get_layer("encoder")
    report[mode] = {"output": result.output, "weights": [w.tolist() for w in model.get_weights()],
                    "synchronized": [l.synchronized for l in encoder.layers
                                     if isinstance(l, keras.layers.BatchNormalization)]}
print("REPORT" + json.dumps(report))
'''


@pytest.mark.slow
def test_mirrored_on_two_cpu_devices_freezes_and_trains_as_one_device(tmp_path):
    """Two replicas (synchronised BatchNorm, the encoder's too) against one device on the same global batch, with
    a frozen first epoch: the same losses (rtol 1e-3, as tests/test_engine_distribute.py argues for the plain
    U-Net) and the encoder unfrozen at the same step."""
    import os
    import subprocess
    import sys

    from tests.helpers import REPO

    root = make_stripes_dataset(tmp_path / "data", n_train=4, n_val=2)
    config = write_config(
        tmp_path / "c.yaml", root, model={"encoder": SMALL, "encoder_weights": "none", "decoder_filters": NARROW},
        data={"crop": 32, "batch_size": 2},
        train={"epochs": 2, "steps_per_epoch": 2, "freeze_encoder_epochs": 1, "deterministic": True,
               "learning_rate": 0.01, "seed": 1}, predict={"calibrate": False})
    script = tmp_path / "mirror.py"
    script.write_text(MIRRORED_SCRIPT)
    env = dict(os.environ, SEGTRAIN_CPU_DEVICES="2", TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run([sys.executable, str(script), str(config), str(tmp_path), str(REPO)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=400, check=False)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    report = json.loads(proc.stdout.split("REPORT", 1)[1])
    assert "2 replica(s)" in report["mirrored"]["output"] and "1 replica(s)" in report["none"]["output"]
    for mode in ("none", "mirrored"):
        assert "Encoder unfrozen at step 2" in report[mode]["output"]
    assert report["mirrored"]["synchronized"] == [True] * 5 and report["none"]["synchronized"] == [False] * 5
    single, mirrored = history(tmp_path / "none"), history(tmp_path / "mirrored")
    for column in ("loss", "val_loss"):
        np.testing.assert_allclose([float(r[column]) for r in mirrored], [float(r[column]) for r in single],
                                   rtol=1e-3, err_msg=column)
    a = np.concatenate([np.ravel(w) for w in report["mirrored"]["weights"]])
    b = np.concatenate([np.ravel(w) for w in report["none"]["weights"]])
    assert np.abs(a - b).max() <= 2 * 4 * 0.01  # 4 Adam steps of at most one learning rate each, either way


@pytest.mark.slow
def test_under_a_budget_the_frozen_phase_counts_epochs_of_the_plan(tmp_path, monkeypatch, tiny_backbone):
    """A budget measured on a fake clock (every read one second later; tests/test_engine_budget.py works the plan
    out: 116 steps in epochs of 29): freeze_encoder_epochs 1.5 unfreezes at step round(1.5 x 29) = 44, not at a
    step of train.steps_per_epoch or of the measuring."""
    import itertools

    from segtrain.engine import budget

    counter = itertools.count()
    monkeypatch.setattr(budget, "clock", lambda: float(next(counter)))
    monkeypatch.setattr(budget, "REPLAN_SHARE", float("inf"))  # the fake clock prices each epoch at a second
    root = make_stripes_dataset(tmp_path / "data", n_train=8, n_val=3)
    config = write_config(
        tmp_path / "c.yaml", root, model={"encoder": SMALL, "encoder_weights": "none", "decoder_filters": NARROW},
        data={"crop": 32, "batch_size": 4},
        train={"budget": "80s", "steps_per_epoch": None, "steps_per_execution": 2, "freeze_encoder_epochs": 1.5,
               "learning_rate": 0.01, "seed": 1}, predict={"calibrate": False})
    result = invoke("fit", config, "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    plan = json.loads((tmp_path / "run" / "budget.json").read_text())
    assert (plan["measured_steps"], plan["steps_per_epoch"], plan["total_steps"]) == (7, 29, 116)
    assert "Encoder unfrozen at step 44:" in result.output and result.output.count("Encoder unfrozen") == 1
