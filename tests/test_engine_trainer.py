"""segtrain/engine/trainer.py: the compiled steps (gradient clipping, the XLA-compiled steps) and the
validation labeler."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.helpers import history, invoke, make_stripes_dataset, write_config


# ---------------------------------------------------------------------------- gradient clipping


def _one_sgd_step(clip, loss_scale=False):
    from segtrain.engine.trainer import Trainer
    from segtrain.config import loss_config
    from segtrain.losses import build_loss
    from segtrain.model import build_unet

    keras.utils.set_random_seed(0)
    strategy = tf.distribute.get_strategy()
    model = build_unet(3, 1, depth=1, base_filters=2, batch_norm=False)
    loss = build_loss(loss_config({"terms": [{"name": "cross_entropy"}]}, ["a", "b"]), ["a", "b"])
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



# ---------------------------------------------------------------------------- validation


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



# ---------------------------------------------------------------------------- XLA


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
