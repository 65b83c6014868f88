"""Shared test helpers, the one module tests import from (test modules never import each other, and conftest.py
holds only fixtures): paths, tiny synthetic data sets, a tiny config and an in-process CLI, and readers of a
run folder."""

import csv
import hashlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import yaml
from click.testing import CliRunner
from PIL import Image

from segtrain.cli import cli

REPO = Path(__file__).resolve().parents[1]
SHARED_DATASETS = REPO.parent / "shared" / "datasets"


# ---------------------------------------------------------------------------- synthetic data sets


def write_pair(root: Path, split: str, stem: str, image: np.ndarray, mask: np.ndarray, image_ext: str = ".png"):
    (root / split / "images").mkdir(parents=True, exist_ok=True)
    (root / split / "masks").mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(root / split / "images" / f"{stem}{image_ext}")
    Image.fromarray(mask).save(root / split / "masks" / f"{stem}.png")


def make_stripes_dataset(root: Path, n_train: int = 6, n_val: int = 2, size: int = 32, seed: int = 0) -> Path:
    """Bright vertical stripes (mask 255) on dark noise: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", n_train), ("val", n_val)):
        for i in range(count):
            mask = np.zeros((size, size), np.uint8)
            for x in rng.choice(size - 4, size=2, replace=False):
                mask[:, x : x + 3] = 255
            image = rng.integers(0, 60, (size, size, 3)).astype(np.uint8)
            image[mask > 0] = rng.integers(180, 255, (int((mask > 0).sum()), 3)).astype(np.uint8)
            write_pair(root, split, f"img{i:02d}", image, mask)
    return root


def make_three_class_dataset(root: Path, n_train: int = 6, n_val: int = 2, size: int = 32, seed: int = 0) -> Path:
    """Class 1: bright red vertical stripes (a fifth of the pixels), class 2: small green squares (rare), class 0:
    dark noise; masks hold the class index (0, 1, 2)."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", n_train), ("val", n_val)):
        for i in range(count):
            mask = np.zeros((size, size), np.uint8)
            for x in rng.choice(size - 4, size=2, replace=False):
                mask[:, x : x + 3] = 1
            for _ in range(2):
                y, x = rng.integers(0, size - 3, 2)
                mask[y : y + 3, x : x + 3] = 2
            image = rng.integers(0, 60, (size, size, 3)).astype(np.uint8)
            image[mask == 1, 0] = rng.integers(180, 255, int((mask == 1).sum()))
            image[mask == 2, 1] = rng.integers(180, 255, int((mask == 2).sum()))
            write_pair(root, split, f"img{i:02d}", image, mask)
    return root


THREE_CLASSES = {"classes": ["background", "stripe", "square"], "mask": {"values": {0: 0, 1: 1, 2: 2}}}
"""The data section's classes and mask of make_three_class_dataset (update TINY's data section with it)."""


# ---------------------------------------------------------------------------- the CLI


TINY = {
    "model": {"depth": 2, "base_filters": 4},
    "data": {"classes": ["background", "stripe"], "mask": {"threshold": 127}, "crop": 16, "batch_size": 4},
    "loss": {"terms": [{"name": "cross_entropy"}], "class_weights": "balanced"},
    "train": {"epochs": 2, "steps_per_epoch": 2, "learning_rate": 0.01, "seed": 1},
}
"""A config that trains in seconds on the stripes data set of make_stripes_dataset."""


def write_config(path, root, base=TINY, **sections):
    """`base` with data.root set and some sections updated, written as YAML to `path`."""
    config = json.loads(json.dumps(base))
    config["data"]["root"] = str(root)
    for name, values in sections.items():
        config.setdefault(name, {}).update(values)
    path.write_text(yaml.safe_dump(config))
    return path


def invoke(*args):
    """Run `segtrain ARGS...` in this process; exceptions other than Click's propagate."""
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def folder_digest(folder):
    """One hash of every file's relative path and bytes: equal digests mean an untouched folder."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


# ---------------------------------------------------------------------------- run folders


TIMING_COLUMNS = ("seconds", "images_per_second")


def weights_of(path):
    """The weights of a saved .keras model."""
    import keras  # here, so that importing the helpers does not start TensorFlow

    return keras.models.load_model(path, compile=False).get_weights()


def history(run, drop=TIMING_COLUMNS):
    """history.csv of a run folder as a list of rows, without the columns that vary between runs (timings)."""
    with (run / "history.csv").open() as handle:
        return [{k: v for k, v in row.items() if k not in drop} for row in csv.DictReader(handle)]


def stopped_at_step(where, steps_per_epoch):
    """The global step of 'at epoch E, step S' (inside an epoch) or 'after epoch N' (during its validation)."""
    inside = re.fullmatch(r"at epoch (\d+), step (\d+)", where)
    if inside:
        return (int(inside.group(1)) - 1) * steps_per_epoch + int(inside.group(2))
    return int(re.fullmatch(r"after epoch (\d+)", where).group(1)) * steps_per_epoch


# ---------------------------------------------------------------------------- interrupted runs


class Interruption:
    """A `segtrain fit` subprocess that receives `sig` once `due(run)` holds (by default: its first checkpoint
    exists), watched by a thread. `launch` replaces `-m segtrain` (e.g. `-c CODE` that patches fit first)."""

    def __init__(self, config, run, sig, timeout=240, launch=("-m", "segtrain"), due=None):
        self.run, self.sig, self.timeout = run, sig, timeout
        self.due = due or has_a_checkpoint
        self.proc = subprocess.Popen(
            [sys.executable, *launch, "fit", str(config), "--out", str(run)],
            cwd=REPO, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        self.signalled = False
        self.output = ""
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _watch(self):
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            if self.due(self.run):
                self.proc.send_signal(self.sig)
                self.signalled = True
                break
            time.sleep(0.02)
        else:
            self.proc.kill()
        self.output = self.proc.communicate(timeout=self.timeout)[0]

    def finish(self):
        self.thread.join(self.timeout)
        assert self.signalled, f"fit ended before the signal was due:\n{self.output[-3000:]}"
        return self


def has_a_checkpoint(run) -> bool:
    """The run has written its first checkpoint (TF writes the `checkpoint` state file last, atomically)."""
    state = run / "checkpoints" / "checkpoint"
    return state.is_file() and "ckpt-" in state.read_text()


# ---------------------------------------------------------------------------- encoders


MOBILENET_SKIPS = (
    "conv_bn", "expanded_conv_project_bn", "expanded_conv_2_add", "expanded_conv_7_add", "expanded_conv_10_add")
"""MobileNetV3Small's skip layers (segtrain/encoders/catalog.py), which the stand-in below names its own."""


def tiny_mobilenet(include_top=False, weights=None, input_shape=None, include_preprocessing=True, name="tiny"):
    """A stand-in for keras.applications.MobileNetV3Small with its skip layers' names (so the catalogue's entry
    applies): five stride-2 convolutions, each with BatchNorm. What these tests check is the engine's, not the
    backbone's; a real backbone's step takes seconds to trace (tests/test_encoders*.py build the real ones)."""
    import keras

    assert not include_top and weights is None
    x = inputs = keras.Input(input_shape)
    for level, skip in enumerate(MOBILENET_SKIPS):
        x = keras.layers.Conv2D(4 * (level + 1), 3, strides=2, padding="same", use_bias=False,
                                name="conv" if level == 0 else f"tiny_conv{level}")(x)
        x = keras.layers.BatchNormalization(name=skip)(x)
        if level < len(MOBILENET_SKIPS) - 1:
            x = keras.layers.Activation("relu", name=f"tiny_relu{level}")(x)
    return keras.Model(inputs, x, name=name)


# ---------------------------------------------------------------------------- benchmark scripts


def run_benchmark_in_process(name: str, *args: str, monkeypatch, capsys) -> list[str]:
    """benchmarks/NAME's main() with ARGS in this process (TensorFlow is loaded already: each script's own start
    saves seconds); its non-blank stdout lines, the first naming the machine. For scripts that change no
    process-wide setting (a dtype policy, devices): those run through `run_benchmark_script`."""
    import importlib.util

    import keras

    monkeypatch.setattr(sys, "argv", [name, *args])
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    spec = importlib.util.spec_from_file_location(f"benchmark_{Path(name).stem}", REPO / "benchmarks" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    capsys.readouterr()
    module.main()
    assert keras.mixed_precision.global_policy().name == "float32", f"{name} left a dtype policy behind"
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert lines, "no output"
    assert lines[0].startswith("machine: "), lines[0]  # absolute figures always name the machine
    return lines


def run_benchmark_script(name: str, *args: str, timeout: int = 300) -> list[str]:
    """Run benchmarks/NAME with ARGS on the CPU; its non-blank stdout lines, the first naming the machine."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "")}
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / name), *args], capture_output=True, text=True,
                            cwd=REPO, env=env, timeout=timeout)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert lines, "no output"
    assert lines[0].startswith("machine: "), lines[0]  # absolute figures always name the machine
    return lines
