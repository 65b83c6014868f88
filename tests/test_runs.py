"""segtrain/runs.py: saving models atomically and loading them in Keras safe mode."""

import keras
import pytest


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


def test_models_load_in_keras_safe_mode(tmp_path):
    from segtrain.errors import CheckpointError
    from segtrain.runs import load_model

    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Lambda(lambda x: x * 2)(inputs))  # arbitrary Python code
    model.save(tmp_path / "lambda.keras")
    with pytest.raises(CheckpointError, match="cannot load the model"):
        load_model(tmp_path / "lambda.keras")
