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
from PIL import Image

from tests.helpers import REPO, TINY, history, make_stripes_dataset, stopped_at_step, write_config

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
    # 5 val images in batches of 4: the last batch of 1 leaves the second replica none (validation must still equal
    # one device's)
    root = make_stripes_dataset(tmp_path / "data", n_train=8, n_val=5)
    # Ignored pixels (raw value 100) in a band of every other image, so replicas hold different numbers of
    # valid pixels: the loss must still be the global batch's.
    for mask_path in sorted((root / "train" / "masks").glob("*.png"))[::2] + [root / "val" / "masks" / "img00.png"]:
        mask = np.array(Image.open(mask_path))
        mask[:, : mask.shape[1] // 2] = 100
        Image.fromarray(mask).save(mask_path)
    # Synchronised BatchNorm (set by fit when replicas > 1), gradient clipping on the all-reduced gradient, and
    # losses whose valid-pixel and overlap counts are summed over the replicas keep the global-batch semantics
    # for cross-entropy + Jaccard. Dropout would draw different masks per replica, so it is off here.
    # Deterministic ops make each run repeatable, so the comparison below cannot pass or fail at random.
    config = write_config(tmp_path / "mirror.yaml", root,
                          data={**TINY["data"], "mask": {"threshold": 127, "ignore": [100]}},
                          loss={"terms": [{"name": "cross_entropy"}, {"name": "jaccard", "weight": 0.5}],
                                "class_weights": "balanced"},
                          train={"epochs": 2, "steps_per_epoch": 3, "learning_rate": 0.01, "seed": 1,
                                 "grad_clip_norm": 0.05, "deterministic": True})
    script = tmp_path / "mirror.py"
    script.write_text(MIRRORED_SCRIPT)
    env = dict(os.environ, SEGTRAIN_CPU_DEVICES="2", TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run([sys.executable, str(script), str(config), str(tmp_path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=400, check=False)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    report = json.loads(proc.stdout.split("REPORT", 1)[1])
    assert "1 replica(s)" in report["none"]["output"] and "2 replica(s)" in report["mirrored"]["output"]

    single, mirrored = history(tmp_path / "none"), history(tmp_path / "mirrored")
    # Both runs do the same float32 arithmetic in another grouping (halves summed across replicas, synchronised
    # BatchNorm's E[x^2] - E[x]^2), ~1e-6 relative per step. Adam divides each gradient entry by its own running
    # RMS, which amplifies that noise in entries whose gradient is near zero, so the runs drift apart as they
    # train: 2e-5 relative after 3 steps and 2e-4 after 6 (observed; deterministic ops make both runs repeatable,
    # so this cannot vary between test runs). rtol 1e-3 keeps a 5x margin and still fails a per-replica Jaccard
    # ratio, which is off by 6e-3 (0.658 vs 0.662 for one step).
    for column in ("loss", "val_loss", "lr"):
        np.testing.assert_allclose([float(r[column]) for r in mirrored], [float(r[column]) for r in single],
                                   rtol=1e-3, err_msg=column)
    # The mean IoU counts pixels: that drift can flip a pixel whose logit is within it of the decision boundary.
    # One flip moves this mean IoU by at most (1/800 + 1/3700) / 2 = 7.6e-4 (of the 4608 valid val pixels, the
    # stripes hold about 850, so each class's union is at least that); 3e-3 allows 3 flips (observed: none after
    # 3 steps, 1 after 6).
    np.testing.assert_allclose([float(r["val_mean_iou"]) for r in mirrored],
                               [float(r["val_mean_iou"]) for r in single], atol=3e-3, rtol=0, err_msg="val_mean_iou")
    # Weights after 6 Adam steps: Adam divides each gradient entry by its own running RMS, so an entry whose
    # gradient is at the float32 noise level can step by up to one learning rate either way in either run: the
    # bound arithmetic gives is 2 x steps x lr = 0.12 for a single weight (observed up to 3e-3; the exactness of
    # the loss and its gradients is checked tightly by the test below).
    a = np.concatenate([np.ravel(w) for w in report["mirrored"]["weights"]])
    b = np.concatenate([np.ravel(w) for w in report["none"]["weights"]])
    assert np.abs(a - b).max() <= 2 * 6 * 0.01

    # a global batch smaller than the number of replicas is refused before any run folder is written
    bad = report["bad"]
    assert bad["exit_code"] == 2 and "data.batch_size" in bad["output"] and "2 replicas" in bad["output"]
    assert "Traceback" not in bad["output"] and not (tmp_path / "bad").exists()
    # auto counts GPUs only: two logical CPU devices still train on one
    assert report["cpus"] == 2 and report["auto_replicas"] == 1


EXACT_LOSS_SCRIPT = textwrap.dedent("""
    import json
    import numpy as np, tensorflow as tf
    from segtrain.engine.devices import configure_cpu_devices
    configure_cpu_devices()
    from segtrain.labels import IGNORE_INDEX
    from segtrain.losses import CombinedLoss, CrossEntropy, JaccardLoss, TverskyLoss

    rng = np.random.default_rng(3)
    batch, size = 4, 16
    y = rng.integers(0, 3, (batch, size, size)).astype(np.int32)
    y[:2, : size // 2] = IGNORE_INDEX  # replica 0 holds images 0-1: far fewer valid pixels than replica 1
    y[3] = np.where(y[3] == 2, 1, y[3])  # class 2 absent from the last image
    x = rng.normal(size=(batch, size, size, 3)).astype(np.float32) * 2
    losses = {
        "cross_entropy": CrossEntropy(class_weights=[0.5, 1.0, 3.0]),
        "jaccard": JaccardLoss(),
        "jaccard_with_background": JaccardLoss(include_background=True),
        "tversky_per_image": TverskyLoss(alpha=0.7, beta=0.3, per_image=True),
        "ce_plus_jaccard": CombinedLoss([(1.0, CrossEntropy()), (0.5, JaccardLoss())]),
    }
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])

    def replica_step(loss, y_part, x_part):
        x_var = tf.convert_to_tensor(x_part)
        with tf.GradientTape() as tape:
            tape.watch(x_var)
            value = loss(y_part, x_var)
        return value, tape.gradient(value, x_var)

    def split(a):
        return strategy.experimental_distribute_values_from_function(
            lambda ctx: tf.constant(a[ctx.replica_id_in_sync_group * 2 : ctx.replica_id_in_sync_group * 2 + 2]))

    report = {}
    for name, loss in losses.items():
        one_value, one_grad = replica_step(loss, tf.constant(y), tf.constant(x))
        run = tf.function(lambda yp, xp: strategy.run(replica_step, args=(loss, yp, xp)))
        values, grads = run(split(y), split(x))
        two_value = strategy.reduce("SUM", values, axis=None)
        two_grad = np.concatenate([g.numpy() for g in strategy.experimental_local_results(grads)])
        mean_of_ratios = np.mean([float(loss(y[i:i + 2], x[i:i + 2])) for i in (0, 2)])
        report[name] = {"one": float(one_value), "two": float(two_value), "mean_of_halves": float(mean_of_ratios),
                        "grad_one": one_grad.numpy().ravel().tolist(), "grad_two": two_grad.ravel().tolist()}
    print("REPORT" + json.dumps(report))
""")


def test_losses_and_gradients_on_two_replicas_equal_the_global_batch_on_one_device(tmp_path):
    """Overlap counts and valid-pixel counts are summed over replicas before dividing: exact global-batch loss.

    Tolerance: both sides compute the same float32 sums in another grouping (two halves added last). For
    pairwise summation of n = 1024 terms the relative error is below log2(n) * eps32 = 10 * 1.2e-7 ~ 1.2e-6 of
    the sum of magnitudes, so rtol 1e-5 (values) and atol 1e-5 x max|gradient| hold with margin. The bug this
    guards against (a mean of the replicas' own ratios) is off by 6e-4 or more here (checked below).
    """
    script = tmp_path / "exact.py"
    script.write_text(EXACT_LOSS_SCRIPT)
    env = dict(os.environ, SEGTRAIN_CPU_DEVICES="2", TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run([sys.executable, str(script)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    report = json.loads(proc.stdout.split("REPORT", 1)[1])
    for name, r in report.items():
        np.testing.assert_allclose(r["two"], r["one"], rtol=1e-5, err_msg=name)
        one, two = np.array(r["grad_one"]), np.array(r["grad_two"])
        np.testing.assert_allclose(two, one, rtol=0, atol=1e-5 * np.abs(one).max(), err_msg=name)
        if name != "tversky_per_image":  # a per-image loss is a mean over images: halves average exactly
            # the replicas' own ratios differ from the global one by 10x the tolerance or more: the old
            # behaviour (a mean of per-replica losses) fails the first assertion
            assert abs(r["mean_of_halves"] - r["one"]) > 10 * 1e-5 * abs(r["one"]), name


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
    # 5 val images in batches of 4: the last batch of 1 leaves the second replica none (validation must still equal
    # one device's)
    root = make_stripes_dataset(tmp_path / "data", n_train=8, n_val=5)
    config = write_config(tmp_path / "mw.yaml", root,
                          train={"epochs": 3, "steps_per_epoch": 3, "learning_rate": 0.01, "seed": 1,
                                 "checkpoint_every_steps": 1})
    run, scratch = tmp_path / "run", tmp_path / "scratch"
    scratch.mkdir()

    # SIGINT (Ctrl-C) to the non-chief worker only, once the chief has written a checkpoint: both workers agree
    # to stop at the same step, take part in one last checkpoint and exit 130 (SIGTERM: see test_engine_resume.py)
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
