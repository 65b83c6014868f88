"""Helpers shared by the benchmark scripts: the machine line, synthetic data sets, configs, timing.

Not a benchmark itself (the leading underscore keeps it out of the benchmark list).
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED_DATASETS = REPO.parent / "shared" / "datasets"


@contextlib.contextmanager
def output_folder(out: Optional[Path], prefix: str) -> Iterator[Path]:
    """`--out` (created; kept), or a temporary folder named `prefix...`, removed afterwards."""
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        yield out
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        yield Path(tmp)


def cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def load_average() -> str:
    try:
        return "load average " + " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:  # pragma: no cover
        return "load average unknown"


def machine_line() -> str:
    """One line naming the machine, for every benchmark's output (absolute times need it)."""
    import keras
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    return (f"machine: {platform.platform()}, {cpu_model()}, {cores()} cores usable "
            f"({os.cpu_count()} online), GPUs: {', '.join(g.name for g in gpus) or 'none'}, "
            f"python {platform.python_version()}, TF {tf.__version__}, Keras {keras.__version__}, "
            f"{load_average()} at start")


def median_line(name: str, values: list[float], unit: str, fmt: str = ".2f") -> str:
    runs = ", ".join(format(v, fmt) for v in values)
    return f"{name}: median {format(statistics.median(values), fmt)} {unit}  (runs: {runs})"


# ---------------------------------------------------------------------------- synthetic data


def synthetic_pair(rng: np.random.Generator, height: int, width: int, channels: int = 3,
                   lines: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """A textured image with a few bright thick lines (mask 255) on darker ground (mask 0).

    Roughly 10-20% foreground; smooth enough that PNG files stay small and decode at a realistic speed.
    """
    mask = np.zeros((height, width), np.uint8)
    yy, xx = np.mgrid[0:height, 0:width]
    for _ in range(lines):
        angle = rng.uniform(0, np.pi)
        offset = rng.uniform(-0.4, 0.4) * min(height, width)
        thickness = rng.uniform(3, 9)
        distance = np.abs((xx - width / 2) * np.sin(angle) - (yy - height / 2) * np.cos(angle) - offset)
        mask[distance < thickness] = 255
    ground = rng.normal(70, 20, (height // 8 + 1, width // 8 + 1, channels))
    ground = np.kron(ground, np.ones((8, 8, 1)))[:height, :width]
    image = ground + rng.normal(0, 12, (height, width, channels))
    image[mask > 0] += 90
    image = np.clip(image, 0, 255).astype(np.uint8)
    return (image[..., 0] if channels == 1 else image), mask


def write_dataset(root: Path, n_train: int, n_val: int, size: int, channels: int = 3, image_ext: str = ".png",
                  seed: int = 0, n_distinct: Optional[int] = None) -> Path:
    """A data set ROOT/{train,val}/{images,masks}/ of synthetic pairs; masks are 0/255 PNGs.

    n_distinct: generate this many distinct pairs and copy the files for the rest (fast for large sets;
    every file is still read and decoded on its own).
    """
    import shutil

    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, count in (("train", n_train), ("val", n_val)):
        (root / split / "images").mkdir(parents=True, exist_ok=True)
        (root / split / "masks").mkdir(parents=True, exist_ok=True)
        for i in range(count):
            image_path = root / split / "images" / f"{i:05d}{image_ext}"
            mask_path = root / split / "masks" / f"{i:05d}.png"
            if n_distinct is not None and i >= n_distinct:
                source = i % n_distinct
                shutil.copyfile(root / split / "images" / f"{source:05d}{image_ext}", image_path)
                shutil.copyfile(root / split / "masks" / f"{source:05d}.png", mask_path)
                continue
            image, mask = synthetic_pair(rng, size, size, channels)
            Image.fromarray(image).save(image_path, **({"quality": 90} if image_ext == ".jpg" else {}))
            Image.fromarray(mask).save(mask_path)
    return root


def write_tiny_config(out: Path, foreground: str = "line", extra: str = "") -> Path:
    """out/tiny.yaml on a synthetic set in out/tiny_data (6 train, 2 val images of 64 px; the `--tiny` runs): crop
    32, batch 2, a depth-2 U-Net of 4 filters; `extra`, YAML lines of other sections, appended."""
    root = write_dataset(out / "tiny_data", 6, 2, 64)
    config_path = out / "tiny.yaml"
    config_path.write_text(
        f"data: {{root: {root}, classes: [background, {foreground}], mask: {{threshold: 127}}, crop: 32, "
        "batch_size: 2}\nmodel: {depth: 2, base_filters: 4}\n" + extra)
    return config_path


def split_halves(source: Path, target: Path, split: str = "val") -> Path:
    """TARGET: a data set folder whose train split and `split` link to SOURCE's, plus `<split>_a` (the first half of
    `split`'s pairs in file order) and `<split>_b` (the rest), file by file: two fixed, disjoint labelled halves."""
    source, target = Path(source).resolve(), Path(target)
    target.mkdir(parents=True, exist_ok=True)
    for name in ("train", split):
        if not (target / name).exists():
            (target / name).symlink_to(source / name)
    images = sorted((source / split / "images").iterdir())
    masks = {p.stem: p for p in (source / split / "masks").iterdir()}
    half = (len(images) + 1) // 2
    for suffix, part in (("a", images[:half]), ("b", images[half:])):
        for kind in ("images", "masks"):
            (target / f"{split}_{suffix}" / kind).mkdir(parents=True, exist_ok=True)
        for image in part:
            for kind, path in (("images", image), ("masks", masks[image.stem])):
                link = target / f"{split}_{suffix}" / kind / path.name
                if not link.exists():
                    link.symlink_to(path)
    return target


def fmt(value, digits: int = 3) -> str:
    """A number for a Markdown table; '-' for None or NaN."""
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    return f"{value:.{digits}f}"


def synthetic_config(root: Path, crop: Optional[int], batch_size: int, depth: int, base_filters: int,
                     cache: str = "memory", extra: Optional[dict] = None):
    """A segtrain Config for a synthetic set: two classes by threshold, CE + Jaccard with balanced weights."""
    from segtrain.config import config_from_dict

    raw = {
        "data": {"root": str(root), "classes": ["background", "line"], "mask": {"threshold": 127},
                 "crop": crop, "batch_size": batch_size, "cache": cache},
        "model": {"depth": depth, "base_filters": base_filters},
        "loss": {"terms": [{"name": "cross_entropy", "weight": 1.0}, {"name": "jaccard", "weight": 0.5}],
                 "class_weights": "balanced", "max_weight": 10},
        "train": {"learning_rate": 1e-3, "seed": 0},
    }
    for dotted, value in (extra or {}).items():
        node = raw
        *parents, last = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return config_from_dict(raw)


# ---------------------------------------------------------------------------- timing


def alternate(variants: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """Call each variant once per round, in turn, `repeats` rounds; each call returns its own figure.

    Interleaving means a burst of load from other users hits every variant alike.
    """
    results: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            results[name].append(fn())
    return results


def timed(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# ---------------------------------------------------------------------------- segtrain's own training path


class SegtrainSetup:
    """segtrain's training objects built by the functions `segtrain.train.run_fit` calls, and its loop.

    prepare_data (file checks and the class-statistics pass), the strategy, the precision policy,
    `segtrain.engine.setup.build_engine` (U-Net, loss with the data set's class weights, optimizer and
    schedule, Trainer with the config's steps per call and XLA setting) and `RunData` (training_dataset
    over the files on disk, distributed by the strategy). `run_steps` runs the loop's own
    `train_epoch`: compiled calls, losses read once per call, tqdm bar, NaN and signal checks.
    """

    def __init__(self, config, work_dir: Path, total_steps: int = 1000):
        import dataclasses

        from segtrain.engine.devices import make_strategy, training_process_settings
        from segtrain.engine.setup import RunData, build_engine
        from segtrain.train import prepare_data

        # many epochs: the cosine schedule decays over far more steps than a benchmark runs
        config = dataclasses.replace(config, train=dataclasses.replace(config.train, epochs=total_steps))
        self.config = config
        self.work_dir = Path(work_dir)
        self.prepared = prepare_data(config)
        self.strategy = make_strategy(config.train.distribute)
        self._settings = training_process_settings(config.train)
        self.policy = self._settings.__enter__()  # process-wide for the benchmark's lifetime, as in a fit
        self.engine = build_engine(config, self.prepared, self.strategy, self.policy, self.work_dir, True, False)
        self.data = RunData(config, self.prepared, self.engine, self.work_dir)
        self.model, self.trainer, self.iterator = self.engine.model, self.engine.trainer, self.data.train_iterator
        self.loss_fn = self.trainer.loss_fn
        self.steps_per_execution, self.jit_compile = self.engine.steps_per_execution, self.engine.jit_compile
        self.spec = self.data.spec

    def run_steps(self, n: int) -> None:
        """n optimizer steps through the loop fit runs (`segtrain.engine.loop.train_epoch`)."""
        from segtrain.engine.loop import StopFlag, train_epoch
        from segtrain.engine.state import LoopState

        loop = LoopState(self.config.train.monitor, n)
        with StopFlag() as stop:
            train_epoch(self.engine, self.data, loop, stop, self.work_dir)


def keras_unet(setup: SegtrainSetup, steps_per_execution: int = 1, jit_compile="auto", batches: int = 8):
    """Plain Keras on the same U-Net: compiled with Adam and BinaryCrossentropy (its best settings given here),
    fed `batches` of segtrain's own crops as in-memory tensors. Returns (model, repeating dataset)."""
    import keras
    import tensorflow as tf

    from segtrain.model import build_unet, output_channels

    config = setup.config
    keras.utils.set_random_seed(1)
    model = build_unet(setup.prepared.channels, output_channels(len(config.data.classes)), config.model.depth,
                       config.model.base_filters, config.model.batch_norm, config.model.dropout)
    model.compile(optimizer=keras.optimizers.Adam(config.train.learning_rate),
                  loss=keras.losses.BinaryCrossentropy(from_logits=True),
                  steps_per_execution=steps_per_execution, jit_compile=jit_compile)
    images, masks = in_memory_batches(setup.prepared.train_pairs, setup.spec, batches)
    targets = np.clip(masks, 0, 1).astype(np.float32)[..., None]
    ds = tf.data.Dataset.from_tensor_slices((images, targets)).batch(config.data.batch_size, drop_remainder=True)
    return model, ds.cache().repeat().prefetch(tf.data.AUTOTUNE)


def in_memory_batches(pairs, spec, count: int) -> tuple[np.ndarray, np.ndarray]:
    """`count` augmented training batches from segtrain's pipeline, as NumPy arrays (images, int32 masks)."""
    import dataclasses

    from segtrain.data.pipeline import training_dataset

    memory_spec = dataclasses.replace(spec, data=dataclasses.replace(spec.data, cache="memory"))
    batches = [(i.numpy(), m.numpy()) for i, m in training_dataset(pairs, memory_spec, None).take(count)]
    return np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])


# ---------------------------------------------------------------------------- budgeted training runs


def measure_step_seconds(config, work_dir: Path, steps: int = 6) -> float:
    """Seconds per training step of a config on this machine now (after tracing and a warm-up)."""
    setup = SegtrainSetup(config, work_dir, total_steps=1000)
    setup.run_steps(3)
    start = time.perf_counter()
    setup.run_steps(steps)
    return (time.perf_counter() - start) / steps


def set_budget(config, total_steps: int, epochs: int = 10, validations: int = 5) -> None:
    """Spread total_steps over `epochs` epochs (fewer per-epoch saves than one pass per epoch), validating
    `validations` times; the cosine schedule then decays over exactly the budgeted steps."""
    epochs = max(1, min(epochs, total_steps))
    config.train.epochs = epochs
    config.train.steps_per_epoch = max(1, -(-total_steps // epochs))
    config.train.validate_every = max(1, epochs // max(1, validations))


def timed_run_fit(config, run_dir: Path) -> dict:
    """segtrain.train.run_fit; returns its final metrics (best.keras on val, as `segtrain eval`) plus
    `train_seconds` (the fit without its post-training calibration and evaluation) and `eval_seconds` (those, as
    fit itself times them: metrics.json `post_training_seconds`)."""
    from segtrain.train import run_fit

    start = time.perf_counter()
    metrics = run_fit(config, run_dir, overwrite=True, log=lambda *a, **k: None)
    total = time.perf_counter() - start
    metrics["eval_seconds"] = metrics.get("post_training_seconds", 0.0)
    metrics["train_seconds"] = total - metrics["eval_seconds"]
    return metrics


def budgeted_fit(config_path: Path, budget: str, run_dir: Path, overrides=()) -> dict:
    """`segtrain fit CONFIG --budget BUDGET --set ...` in process; its final metrics (best.keras on val) plus
    `wall_minutes`, `train_minutes` (without fit's calibration and evaluation) and `planned_steps` (the last
    re-plan's step count)."""
    import json

    from segtrain.api import fit

    start = time.perf_counter()
    result = fit(config_path, [f"train.budget={budget}", *overrides], out=run_dir, overwrite=True,
                 log=lambda *a, **k: None)
    metrics = dict(result.metrics)
    plan = json.loads((run_dir / "budget.json").read_text())
    metrics["wall_minutes"] = (time.perf_counter() - start) / 60
    metrics["train_minutes"] = metrics["wall_minutes"] - metrics.get("post_training_seconds", 0.0) / 60
    metrics["planned_steps"] = plan["replans"][-1]["total_steps"] if plan.get("replans") else plan["total_steps"]
    return metrics


# ---------------------------------------------------------------------------- side by side, a core each
# A script that trains two runs at once calls `add_pinned_arguments(parser)`, then `run_pinned_child(args)` first
# thing (it returns True in the child, which has done its work), and starts each run with `start_pinned`.


def add_pinned_arguments(parser) -> None:
    """The hidden arguments of the child process `start_pinned` starts."""
    import argparse

    parser.add_argument("--one", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--core", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--extra", action="append", default=[], help=argparse.SUPPRESS)


def start_pinned(script: str, config_path: Path, budget: str, run_dir: Path, overrides, core: int):
    """`budgeted_fit` in a child process of `script` pinned to `core` (os.sched_setaffinity: TensorFlow then sizes
    its thread pools to the one core); its metrics arrive as JSON in run_dir.parent/<name>.json (`pinned_metrics`),
    its stderr in <name>.log. Returns the subprocess.Popen."""
    import subprocess
    import sys

    command = [sys.executable, script, "--one", str(config_path), "--budget", budget, "--run-dir", str(run_dir),
               "--core", str(core), *[f"--extra={item}" for item in overrides]]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=open(run_dir.parent / f"{run_dir.name}.log", "w"))


def run_pinned_child(args) -> bool:
    """In the child `start_pinned` started: pin, fit, write the metrics, return True. Elsewhere: False."""
    import json

    if args.one is None:
        return False
    os.sched_setaffinity(0, {args.core})
    metrics = budgeted_fit(args.one, args.budget, args.run_dir, args.extra)
    metrics["core"] = args.core
    (args.run_dir.parent / f"{args.run_dir.name}.json").write_text(json.dumps(metrics))
    return True


def pinned_metrics(child, run_dir: Path, what: str) -> dict:
    """Wait for a `start_pinned` child; its metrics, or SystemExit naming `what` and its log."""
    import json

    if child.wait() != 0:
        raise SystemExit(f"{what} failed: see {run_dir.parent / f'{run_dir.name}.log'}")
    return json.loads((run_dir.parent / f"{run_dir.name}.json").read_text())


def fit_side_by_side(script: str, runs, budget: str) -> list[dict]:
    """Budgeted fits of `runs`, (what, config_path, run_dir, overrides) each, all at once, the i-th pinned to core i
    (children of `script`); their metrics, in order."""
    children = [start_pinned(script, config_path, budget, run_dir, overrides, core)
                for core, (_, config_path, run_dir, overrides) in enumerate(runs)]
    return [pinned_metrics(child, run_dir, what) for (what, _, run_dir, _), child in zip(runs, children)]


def evaluate_model_file(model_path: Path, split: str = "val") -> dict:
    """`segtrain eval MODEL.keras --split val`, in process."""
    from segtrain.evaluation import evaluate_checkpoint

    return evaluate_checkpoint(str(model_path), None, split, Path(model_path).parent / f"eval_{Path(model_path).stem}",
                               None, None, log=lambda *a, **k: None)


def class_rows(metrics: dict) -> list[tuple[str, float, float, float, float]]:
    """(class, IoU, F1, precision, recall) per class; None shown as nan."""
    def f(v):
        return float("nan") if v is None else float(v)

    return [(name, f(v["iou"]), f(v["dice"]), f(v["precision"]), f(v["recall"]))
            for name, v in metrics["per_class"].items()]
