"""segtrain/engine/devices.py: the mixed-precision policy (a run trained, saved and
reloaded under each). tf.distribute strategies run end to end in test_engine_distribute.py."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.helpers import history, invoke, make_stripes_dataset, write_config


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
