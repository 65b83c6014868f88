"""segtrain/engine/checkpoints.py: the training state on disk. Exact resume after a kill runs end to end in
test_engine_resume.py."""

import keras
import numpy as np


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
