"""tf.distribute: MirroredStrategy over two logical CPU devices (SEGTRAIN_CPU_DEVICES=2, set before TensorFlow
starts, hence a subprocess) and MultiWorkerMirroredStrategy with two worker processes on 127.0.0.1."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from tests.conftest import REPO, make_stripes_dataset
from tests.cli_helpers import write_config
from tests.test_engine import history, stopped_at_step

pytestmark = pytest.mark.slow

MIRRORED_SCRIPT = textwrap.dedent("""
    import json, sys
    import keras, numpy as np
    from click.testing import CliRunner
    from segtrain.cli import cli

    config, base = sys.argv[1], sys.argv[2]
    report = {}
    for mode in ("none", "mirrored"):
        result = CliRunner().invoke(cli, ["fit", config, "--out", f"{base}/{mode}", "--set",
                                          f"train.distribute={mode}"], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        report[mode] = {"output": result.output,
                        "weights": [w.tolist() for w in keras.models.load_model(f"{base}/{mode}/last.keras",
                                                                               compile=False).get_weights()]}
    bad = CliRunner().invoke(cli, ["fit", config, "--out", f"{base}/bad", "--set", "train.distribute=mirrored",
                                   "--set", "data.batch_size=1"], catch_exceptions=False)
    report["bad"] = {"exit_code": bad.exit_code, "output": bad.output}
    from segtrain.engine.devices import make_strategy
    import tensorflow as tf
    report["cpus"] = len(tf.config.list_logical_devices("CPU"))
    report["auto_replicas"] = make_strategy("auto").num_replicas_in_sync
    print("REPORT" + json.dumps(report))
""")


def test_mirrored_on_two_cpu_devices_matches_one_device_for_the_same_global_batch(tmp_path):
    root = make_stripes_dataset(tmp_path / "data", n_train=8, n_val=3)
    # Synchronised BatchNorm (set by fit when replicas > 1) and gradient clipping on the all-reduced
    # gradient keep the global-batch semantics. A loss that is a mean over pixels (cross-entropy) splits
    # exactly; dropout would draw different masks per replica, so it is off here.
    config = write_config(tmp_path / "mirror.yaml", root,
                          train={"epochs": 2, "steps_per_epoch": 3, "learning_rate": 0.01, "seed": 1,
                                 "grad_clip_norm": 0.05})
    script = tmp_path / "mirror.py"
    script.write_text(MIRRORED_SCRIPT)
    env = dict(os.environ, SEGTRAIN_CPU_DEVICES="2", TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run([sys.executable, str(script), str(config), str(tmp_path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=400, check=False)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    report = json.loads(proc.stdout.split("REPORT", 1)[1])
    assert "1 replica(s)" in report["none"]["output"] and "2 replica(s)" in report["mirrored"]["output"]

    single, mirrored = history(tmp_path / "none"), history(tmp_path / "mirrored")
    for column in ("loss", "val_loss", "val_mean_iou", "lr"):
        np.testing.assert_allclose([float(r[column]) for r in mirrored], [float(r[column]) for r in single],
                                   rtol=1e-4, err_msg=column)
    # float32 sums in another order (and synchronised BatchNorm's E[x^2] - E[x]^2): observed 1.4e-6
    for a, b in zip(report["mirrored"]["weights"], report["none"]["weights"]):
        np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-4)

    # a global batch smaller than the number of replicas is refused before any run folder is written
    bad = report["bad"]
    assert bad["exit_code"] == 2 and "data.batch_size" in bad["output"] and "2 replicas" in bad["output"]
    assert "Traceback" not in bad["output"] and not (tmp_path / "bad").exists()
    # auto counts GPUs only: two logical CPU devices still train on one
    assert report["cpus"] == 2 and report["auto_replicas"] == 1


def free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def start_workers(config, run, scratch, *overrides):
    """Two workers of one cluster on loopback, each `python -m segtrain fit ... multi_worker`."""
    cluster = {"worker": [f"127.0.0.1:{port}" for port in free_ports(2)]}
    procs = []
    for index in range(2):
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", TMPDIR=str(scratch),
                   TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}))
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "segtrain", "fit", str(config), "--out", str(run),
             "--set", "train.distribute=multi_worker", *overrides],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


def finish(procs, timeout=300):
    try:
        return [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def test_multi_worker_trains_through_the_cli_stops_together_resumes_and_only_the_chief_writes(tmp_path):
    root = make_stripes_dataset(tmp_path / "data", n_train=8, n_val=3)
    config = write_config(tmp_path / "mw.yaml", root,
                          train={"epochs": 3, "steps_per_epoch": 3, "learning_rate": 0.01, "seed": 1,
                                 "checkpoint_every_steps": 1})
    run, scratch = tmp_path / "run", tmp_path / "scratch"
    scratch.mkdir()

    # SIGINT (Ctrl-C) to the non-chief worker only, once the chief has written a checkpoint: both workers agree
    # to stop at the same step, take part in one last checkpoint and exit 130 (SIGTERM: see test_resume.py)
    procs = start_workers(config, run, scratch)
    state = run / "checkpoints" / "checkpoint"
    deadline = time.monotonic() + 300
    while not (state.is_file() and "ckpt-" in state.read_text()):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), finish(procs)
        time.sleep(0.02)
    procs[1].send_signal(signal.SIGINT)
    outputs = finish(procs)
    assert [p.returncode for p in procs] == [130, 130], outputs
    assert "Error: a signal on another worker: stopped" in outputs[0] and "Error: SIGINT: stopped" in outputs[1]
    stopped = [re.search(r"stopped (.*?); checkpoint saved", out).group(1) for out in outputs]
    assert stopped[0] == stopped[1]  # the same step on both workers
    step = stopped_at_step(stopped[0], 3)
    assert tf_latest(run).endswith(f"ckpt-{step}")
    assert not (run / "metrics.json").exists()

    # every worker resumes from the chief's checkpoint and the run completes
    procs = start_workers(config, run, scratch, "--resume")
    outputs = finish(procs)
    assert [p.returncode for p in procs] == [0, 0], outputs
    for out in outputs:
        assert re.search(rf"Resuming {re.escape(str(run))} at epoch \d+, step {step} ", out) and "2 replica(s)" in out
    # both workers took part in the same steps: the same epoch losses
    losses = [re.findall(r"epoch \d+: loss [0-9.]+", out) for out in outputs]
    assert losses[0] and losses[0] == losses[1]

    # one complete run folder, written by the chief only; no stray temporary files anywhere
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "mw.yaml", "run", "scratch"]
    for name in ("config.yaml", "class_stats.json", "run.json", "best.keras", "last.keras", "history.csv",
                 "metrics.json", "history.png", "per_class.csv", "confusion_matrix.png"):
        assert (run / name).is_file(), name
    assert json.loads((run / "run.json").read_text())["replicas"] == 2
    assert [int(r["epoch"]) for r in history(run)] == [1, 2, 3]
    assert tf_latest(run).endswith("ckpt-9")
    assert not any(run.glob(".*")) and list(scratch.iterdir()) == []


def tf_latest(run):
    text = (run / "checkpoints" / "checkpoint").read_text()
    return re.search(r'^model_checkpoint_path: "(.*)"', text, re.MULTILINE).group(1)
