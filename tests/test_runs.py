"""segtrain/runs.py: saving models atomically, loading them in Keras safe mode, and finding a run (its model file,
its config with predict.* overrides) without TensorFlow."""

import os
import subprocess
import sys

import keras
import pytest

from tests.helpers import REPO


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


# ---------------------------------------------------------------------------- finding a run, its config, --set


def _fake_run(folder, model=True, config=True):
    """A run folder's shape without training: config.yaml (the tiny config) and a best.keras never loaded."""
    from tests.helpers import make_stripes_dataset, write_config

    folder.mkdir(parents=True)
    if config:
        write_config(folder / "config.yaml", make_stripes_dataset(folder.parent / "data", n_train=1, n_val=1))
    if model:
        (folder / "best.keras").write_bytes(b"x")
    return folder


def test_resolve_checkpoint_says_what_was_looked_for_and_where(tmp_path, monkeypatch):
    from segtrain.errors import CheckpointError
    from segtrain.runs import resolve_checkpoint

    monkeypatch.chdir(tmp_path)
    run = _fake_run(tmp_path / "runs" / "roads")
    assert resolve_checkpoint("runs/roads") == (run.relative_to(tmp_path) / "best.keras", run.relative_to(tmp_path))
    (run / "last.keras").write_bytes(b"y")
    assert resolve_checkpoint(run / "last.keras") == (run / "last.keras", run)
    with pytest.raises(CheckpointError) as missing:
        resolve_checkpoint("runs/road")
    message = str(missing.value.message)
    assert message.startswith(f"runs/road: no such folder (looked in {tmp_path}). Did you mean runs/roads? Pass a "
                              "run folder written by `segtrain fit` (it holds best.keras and config.yaml)")
    assert "the newest run under runs/ is runs/roads" in message
    with pytest.raises(CheckpointError, match=r"^/nowhere/run: no such folder\. Pass"):  # absolute: no cwd
        resolve_checkpoint("/nowhere/run")
    with pytest.raises(CheckpointError, match="no best.keras or last.keras in this folder"):
        resolve_checkpoint(tmp_path / "runs" / "data")  # the data set _fake_run wrote
    with pytest.raises(CheckpointError, match="not a .keras model"):
        resolve_checkpoint(run / "config.yaml")


def test_newest_run_is_a_suggestion_for_the_command_line(tmp_path, monkeypatch):
    from segtrain.runs import is_run_path, newest_run_hint

    monkeypatch.chdir(tmp_path)
    assert "there is no trained run under" in newest_run_hint() and str(tmp_path) in newest_run_hint()
    old, new = _fake_run(tmp_path / "runs" / "old"), tmp_path / "runs" / "new"
    new.mkdir()
    (new / "last.keras").write_bytes(b"x")
    os.utime(old / "best.keras", (1e9, 1e9))
    assert newest_run_hint() == "the newest run under runs/ is runs/new"
    assert is_run_path(old) and is_run_path(new) and is_run_path("missing.keras")
    assert not is_run_path(tmp_path / "runs" / "data") and not is_run_path(old / "config.yaml")


def test_no_run_is_never_guessed(tmp_path, monkeypatch):
    import segtrain
    from segtrain.errors import CheckpointError
    from segtrain.runs import resolve_checkpoint

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "only").mkdir(parents=True)
    (tmp_path / "runs" / "only" / "best.keras").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="no run named: .*the newest run under runs/ is runs/only"):
        resolve_checkpoint(None)
    with pytest.raises(TypeError):
        segtrain.evaluate()  # the API names its run too


def test_run_config_takes_predict_overrides_in_memory_only(tmp_path):
    from segtrain.errors import CheckpointError, ConfigError
    from segtrain.runs import describe_overrides, run_config

    run = _fake_run(tmp_path / "run")
    saved = (run / "config.yaml").read_bytes()
    config = run_config(run, ["predict.tta=true", "predict.tile_size=16"])
    assert config.predict.tta is True and config.predict.tile_size == 16
    assert run_config(run).predict.tta is False and (run / "config.yaml").read_bytes() == saved
    assert describe_overrides(run, ["predict.tta=true", "predict.decision=threshold", "predict.tile_size=16"]) == [
        "--set predict.tta=true (the run's: false)", "--set predict.decision=threshold (the run's: argmax)",
        "--set predict.tile_size=16 (the run's: null)"]
    for key in ("data.crop=8", "train.epochs=3", "predict=x", "model.depth=1"):
        with pytest.raises(ConfigError, match="is fixed by training.*only predict.\\* keys"):
            run_config(run, [key])
    with pytest.raises(ConfigError, match="pass --data DIR"):
        run_config(run, ["data.root=/elsewhere"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        run_config(run, ["predict.tta"])
    with pytest.raises(ConfigError, match="predict.tta: expected true or false"):
        run_config(run, ["predict.tta=maybe"])
    with pytest.raises(CheckpointError, match="no config.yaml beside the model.*Pass a run folder written by"):
        run_config(_fake_run(tmp_path / "bare", config=False))


def test_staged_folder_replaces_only_a_complete_folder(tmp_path):
    from segtrain.runs import staged_folder

    out = tmp_path / "export"
    with staged_folder(out) as staging:
        assert staging.parent == tmp_path and not out.exists()
        (staging / "model").write_text("first")
    assert (out / "model").read_text() == "first"

    with pytest.raises(RuntimeError):
        with staged_folder(out, overwrite=True) as staging:
            (staging / "model").write_text("half")
            raise RuntimeError("killed halfway")
    assert (out / "model").read_text() == "first" and sorted(p.name for p in tmp_path.iterdir()) == ["export"]

    with staged_folder(out, overwrite=True) as staging:
        (staging / "other").write_text("second")
    assert sorted(p.name for p in out.iterdir()) == ["other"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]

    (tmp_path / "empty").mkdir()
    with staged_folder(tmp_path / "empty") as staging:  # an empty folder is as good as none
        (staging / "model").write_text("x")
    assert (tmp_path / "empty" / "model").is_file()


def test_finding_a_run_does_not_import_tensorflow():
    """The command line resolves runs, configs and data folders before TensorFlow loads (6-8 s)."""
    code = ("import sys; import segtrain.runs, segtrain.config, segtrain.data.discovery, segtrain.export, "
            "segtrain.predict, segtrain.cli; print('tensorflow' in sys.modules, 'keras' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["False", "False"]
