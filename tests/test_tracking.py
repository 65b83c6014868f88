"""`tracking: mlflow`: a fit logs the config, the per-epoch history, the final metrics and the run folder to MLflow
(read back with MlflowClient from a folder store and a sqlite store); a resumed fit appends to the same MLflow
run; without MLflow installed, one clear message before the run folder is written."""

import csv
import importlib.util
import json
import os
import sys

import pytest
import yaml

from tests.helpers import invoke, make_stripes_dataset, write_config

needs_mlflow = pytest.mark.skipif(importlib.util.find_spec("mlflow") is None and not os.environ.get("CI"),
                                  reason="MLflow is not installed (the mlflow extra: pip install -e '.[mlflow]'); "
                                         "under CI these tests run, and fail without it")


def client_for(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def csv_columns(run):
    """history.csv as {column: {epoch: value}} of its numeric cells."""
    with (run / "history.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    columns = {}
    for row in rows:
        for key, value in row.items():
            if key != "epoch" and value != "":
                columns.setdefault(key, {})[int(row["epoch"])] = float(value)
    return columns


def assert_run_logged(client, run_dir, epochs):
    """The MLflow run of tracking.json holds the config, every history column, the final metrics and the files."""
    recorded = json.loads((run_dir / "tracking.json").read_text())
    run = client.get_run(recorded["run_id"])
    assert run.info.status == "FINISHED"
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    params = run.data.params
    assert params["train.learning_rate"] == str(config["train"]["learning_rate"]) == "0.01"
    assert params["data.root"] == config["data"]["root"] and params["model.depth"] == "2"
    assert json.loads(params["data.classes"]) == ["background", "stripe"]
    assert params["loss.terms.0.name"] == "cross_entropy" and params["tracking.backend"] == "mlflow"

    history = csv_columns(run_dir)
    assert {"loss", "lr", "val_mean_iou", "val_iou_stripe", "val_dice_background"} <= set(history)
    for column, values in history.items():  # each column, epoch by epoch, as history.csv holds it
        logged = {m.step: m.value for m in client.get_metric_history(run.info.run_id, column)}
        assert logged == values, column
    assert sorted(history["loss"]) == list(range(1, epochs + 1))

    metrics = json.loads((run_dir / "metrics.json").read_text())
    final = run.data.metrics
    assert final["mean_iou"] == pytest.approx(metrics["mean_iou"], rel=1e-12)
    for name, values in metrics["per_class"].items():
        assert final[f"iou_{name}"] == pytest.approx(values["iou"], rel=1e-12)
        assert final[f"f1_{name}"] == pytest.approx(values["dice"], rel=1e-12)

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    on_disk = {p.name for p in run_dir.iterdir()}
    assert artifacts == on_disk - {"checkpoints"}  # everything but the checkpoints (for --resume only)
    assert {"metrics.json", "best.keras", "config.yaml", "history.csv", "logs"} <= artifacts
    copy = client.download_artifacts(run.info.run_id, "metrics.json", str(run_dir.parent))
    assert open(copy, "rb").read() == (run_dir / "metrics.json").read_bytes()
    return run


@pytest.fixture(scope="module")
def stripes_root(tmp_path_factory):
    return make_stripes_dataset(tmp_path_factory.mktemp("tracking") / "stripes", n_train=4, n_val=2)


@needs_mlflow
@pytest.mark.slow
def test_fit_logs_to_a_folder_store_and_resume_appends_to_the_same_run(stripes_root, tmp_path):
    store = tmp_path / "store"
    config = write_config(tmp_path / "tracked.yaml", stripes_root, train={"epochs": 2},
                          tracking={"backend": "mlflow", "uri": str(store)})
    run_dir = tmp_path / "run"
    result = invoke("fit", config, "--out", run_dir)
    assert result.exit_code == 0, result.output
    client = client_for(store.as_uri())
    first = assert_run_logged(client, run_dir, epochs=2)
    assert f"MLflow: run {first.info.run_id}" in result.output

    result = invoke("fit", config, "--out", run_dir, "--resume", "--set", "train.epochs=3")
    assert result.exit_code == 0, result.output
    again = assert_run_logged(client, run_dir, epochs=3)  # the loss history now has steps 1, 2, 3
    assert again.info.run_id == first.info.run_id
    assert again.data.params["train.epochs"] == "2"  # params keep the values the run started with
    experiment = client.get_experiment_by_name("segtrain")
    assert len(client.search_runs([experiment.experiment_id])) == 1


@needs_mlflow
@pytest.mark.slow
def test_fit_logs_to_a_sqlite_store(stripes_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # MLflow puts a sqlite store's artifacts in ./mlruns
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = write_config(tmp_path / "tracked.yaml", stripes_root, train={"epochs": 1},
                          tracking={"backend": "mlflow", "uri": uri, "experiment": "roads"})
    result = invoke("fit", config, "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    client = client_for(uri)
    run = assert_run_logged(client, tmp_path / "run", epochs=1)
    assert run.info.experiment_id == client.get_experiment_by_name("roads").experiment_id


@needs_mlflow
def test_long_values_and_class_names_mlflow_refuses_are_made_loggable(tmp_path):
    """A config value longer than MLflow's limit is cut (the whole config is the config.yaml artifact); characters
    MLflow refuses in names (a class `car(s)`) become `_`, in params and in metrics."""
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    from segtrain.config import Config, TrackingConfig
    from segtrain.tracking import MlflowTracker

    config = Config(tracking=TrackingConfig(backend="mlflow", uri=str(tmp_path / "store")))
    config.data.classes = ["background", "car(s)"]
    config.data.sampling = {"car(s)": 0.5}
    config.data.root = "d" * (MAX_PARAM_VAL_LENGTH + 50)
    (tmp_path / "run").mkdir()
    tracker = MlflowTracker.open(tmp_path / "run", config)
    tracker.log_epochs([{"epoch": 1, "loss": 0.25, "val_iou_car(s)": 0.5}, {"epoch": 2, "loss": "0.125"}])

    client = client_for((tmp_path / "store").as_uri())
    params = client.get_run(tracker.run_id).data.params
    assert len(params["data.root"]) == MAX_PARAM_VAL_LENGTH and params["data.root"].endswith(" ...")
    assert params["data.sampling.car_s_"] == "0.5"
    assert [(m.step, m.value) for m in client.get_metric_history(tracker.run_id, "val_iou_car_s_")] == [(1, 0.5)]
    assert [(m.step, m.value) for m in client.get_metric_history(tracker.run_id, "loss")] == [(1, 0.25), (2, 0.125)]


def test_without_mlflow_installed_fit_stops_before_writing_the_run_folder(stripes_root, tmp_path, monkeypatch):
    for name in [name for name in sys.modules if name == "mlflow" or name.startswith("mlflow.")] + ["mlflow"]:
        monkeypatch.setitem(sys.modules, name, None)  # `import mlflow...` now raises ImportError
    config = write_config(tmp_path / "tracked.yaml", stripes_root, tracking={"backend": "mlflow",
                                                                              "uri": str(tmp_path / "store")})
    result = invoke("fit", config, "--out", tmp_path / "run")
    assert result.exit_code == 2, result.output
    assert "tracking: mlflow needs MLflow" in result.output and "pip install 'segtrain[mlflow]'" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "run").exists() and not (tmp_path / "store").exists()
