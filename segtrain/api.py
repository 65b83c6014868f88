"""segtrain from Python: `fit`, `load`, `evaluate`, doing exactly what the commands do.

```python
import segtrain

result = segtrain.fit("configs/roads.yaml", overrides=["train.epochs=5"], out="runs/roads5")
model = segtrain.load(result.run_dir)           # a run folder, a .keras file or an export folder
prediction = model.predict("data/val/images/a.tif")  # a file, read as training reads it (16-bit, N-band TIFF)
prediction = model.predict(image)               # or an H x W (x C) array of raw pixels
predictions = model.predict(batch)              # an N x H x W x C array (or a list of files): a list of Predictions
prediction.labels, prediction.probabilities, prediction.mask
metrics = segtrain.evaluate(result.run_dir, split="val")
```
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from segtrain.config import Config, load_config
from segtrain.errors import CheckpointError


@dataclass
class FitResult:
    """What `fit` leaves: the run folder and the final per-class metrics of best.keras on the val split."""

    run_dir: Path
    metrics: dict
    val_split: str


@dataclass
class Prediction:
    """One image's result: class indices (H x W), probabilities (H x W x K float32) and the mask in the training
    encoding (H x W values, or H x W x 3 colours for palette masks)."""

    labels: np.ndarray
    probabilities: np.ndarray
    mask: np.ndarray


def fit(config: Union[str, Path], overrides: Sequence[str] = (), out: Optional[Union[str, Path]] = None,
        resume: bool = False, overwrite: bool = False, log=print) -> FitResult:
    """`segtrain fit CONFIG [--set ...] [--out DIR] [--resume] [--overwrite]`.

    Args:
        config: path of a YAML config.
        overrides: `KEY=VALUE` strings, as `--set` takes them.
        out: run folder (default: runs/<config name>).
    """
    from segtrain.runs import check_resume_config, check_run_dir, default_run_dir
    from segtrain.train import run_fit

    loaded = load_config(config, list(overrides))
    run_dir = Path(out) if out else default_run_dir(config)
    check_run_dir(run_dir, resume, overwrite, multi_worker=loaded.train.distribute == "multi_worker")
    if resume:
        check_resume_config(loaded, run_dir)
    metrics = run_fit(loaded, run_dir, resume=resume, overwrite=overwrite, config_path=Path(config), log=log)
    return FitResult(run_dir, metrics, loaded.data.val_split)


def evaluate(run: Union[str, Path], data: Optional[str] = None, split: Optional[str] = None,
             out: Optional[Union[str, Path]] = None, decision: Optional[str] = None,
             threshold: Optional[float] = None, log=print) -> dict:
    """`segtrain eval RUN [--data DIR] [--split S] [--out DIR]`: the metrics dict, reports written. `run`: a run
    folder or one of its .keras files (required: the API never guesses the newest run)."""
    from segtrain.evaluation import evaluate_checkpoint

    return evaluate_checkpoint(None if run is None else str(run), data, split,
                               Path(out) if out else None, decision, threshold, log=log)


class Segmenter:
    """A run's model with its decision policy, tiling and mask encoding: `predict(image)` as `segtrain predict` does."""

    def __init__(self, predictor, config: Config, sample_type: str = "uint8"):
        from segtrain.data.masks import MaskMapping

        self._predictor = predictor
        self.config = config
        self.classes = list(config.data.classes)
        self.policy = predictor.policy
        self.sample_type = sample_type
        self._mapping = MaskMapping(config.data.mask, config.data.classes)

    def predict(self, image) -> Union[Prediction, list[Prediction]]:
        """Labels, q (the probabilities the rule reads) and mask of `image` (`predict_input` says what it may be):
        a Prediction, or a list of them for a batch (an N x H x W x C array or a list of files).

        A file is read as training reads it (`segtrain.data.images.read_image`: 16-bit, b-bit and N-band TIFFs by
        their declared sample type). An array holds raw pixel values: uint16 arrays of a run trained on b-bit
        samples (e.g. 12-bit) are scaled by 2**b - 1, as its files were."""
        max_pixels = self.config.data.max_image_pixels
        return predict_input(image, self._predict_pixels, self._predictor.channels,
                             self.sample_type, max_pixels)

    def _predict_pixels(self, pixels: np.ndarray) -> Prediction:
        _, probabilities, labels = self._predictor.predict(pixels)
        return Prediction(labels, probabilities.astype(np.float32), self._mapping.encode(labels))


def _is_path(item) -> bool:
    return isinstance(item, (str, os.PathLike))


def predict_input(image, predict_pixels, channels: int, sample_type: str, max_pixels: Optional[int] = None):
    """What `Segmenter.predict` and `ExportedSegmenter.predict` take, as model input (H x W x channels floats on the
    0..255 scale) handed to `predict_pixels`:

    - a path (str or Path) of an image file: read by `read_image`, exactly as training reads it, not scaled again;
    - an H x W or H x W x C array of raw pixel values (`as_model_input`; uint16 of a b-bit run by 2**b - 1);
    - a batch: an N x H x W x C array, or a list or tuple of paths and/or arrays: a list of Predictions in order.
    """
    from segtrain.data.images import DEFAULT_MAX_PIXELS, as_model_input, read_image

    if _is_path(image):
        return predict_pixels(read_image(Path(image), channels, max_pixels or DEFAULT_MAX_PIXELS))
    if isinstance(image, (list, tuple)) and image and all(_is_path(i) or isinstance(i, np.ndarray) for i in image):
        return [predict_input(item, predict_pixels, channels, sample_type, max_pixels) for item in image]
    array = np.asarray(image)
    if array.ndim == 4:
        return [predict_pixels(as_model_input(_scaled_to_run(item, sample_type), channels)) for item in array]
    return predict_pixels(as_model_input(_scaled_to_run(array, sample_type), channels))


def _scaled_to_run(image: np.ndarray, sample_type: str) -> np.ndarray:
    """A uint16 array of a run trained on b-bit samples (9 <= b < 16) as floats in [0, 1] by 2**b - 1; else as given."""
    if image.dtype == np.uint16 and sample_type.startswith("uint") and sample_type[4:].isdigit():
        bits = int(sample_type[4:])
        if 8 < bits < 16:
            return image.astype(np.float64) / (2**bits - 1)
    return image


class ExportedSegmenter:
    """An export folder (`segtrain export`, SavedModel format) behind the same `predict` as `Segmenter`, including
    the post-processing metadata.json describes (it is not inside the exported graph)."""

    def __init__(self, folder: Path):
        import tensorflow as tf

        self.metadata = json.loads((folder / "metadata.json").read_text())
        self.classes = self.metadata["classes"]
        self._serve = tf.saved_model.load(str(folder / "saved_model")).signatures["serving_default"]
        values = np.asarray(self.metadata["labels_to_mask"]["values"])
        self._lut = values.astype(np.uint16 if values.max() > 255 else np.uint8)  # 16-bit masks above 255
        settings = (self.metadata.get("postprocess") or {}).get("settings") or {}
        self._postprocess = {self.classes.index(name): (int(v["min_size"]), int(v["max_hole"]))
                             for name, v in settings.items()}

    def predict(self, image) -> Union[Prediction, list[Prediction]]:
        """As `Segmenter.predict`: a file path, an H x W (x C) array, or a batch (N x H x W x C array, list of files)
        giving a list of Predictions."""
        spec = self.metadata["input"]
        return predict_input(image, self._predict_pixels, spec["channels"], spec.get("sample_type", "uint8"))

    def _predict_pixels(self, pixels: np.ndarray) -> Prediction:
        """One image as model input (H x W x channels, 0..255) through the exported graph."""
        import tensorflow as tf

        from segtrain.policy.postprocess import postprocess, second_choice

        spec = self.metadata["input"]
        top = spec.get("max_value") or np.iinfo(spec["dtype"]).max
        raw = np.clip(np.rint(pixels * (top / 255.0)), 0, top).astype(spec["dtype"])
        out = self._serve(images=tf.constant(raw[None]))
        labels, scores = out["labels"].numpy()[0].astype(np.int64), out["probabilities"].numpy()[0]
        if self._postprocess:
            labels = postprocess(labels, second_choice(scores, labels), self._postprocess)
        return Prediction(labels, scores, self._lut[labels])


def load(path: Union[str, Path], decision: Optional[str] = None, threshold: Optional[float] = None,
         tta: Optional[bool] = None, log=print):
    """A Segmenter from a run folder or .keras file (decision, threshold, tta override the run's policy), or an
    ExportedSegmenter from a `segtrain export --format saved_model` folder."""
    from segtrain.policy.predictor import Predictor
    from segtrain.policy.store import Overrides
    from segtrain.runs import RUN_INFO, resolve_checkpoint, run_config

    path = Path(path)
    if (path / "metadata.json").is_file() and (path / "saved_model").is_dir():
        if decision is not None or threshold is not None or tta is not None:
            raise CheckpointError(f"{path}: an export carries its decision rule; export again to change it.")
        return ExportedSegmenter(path)
    model_path, run_dir = resolve_checkpoint(path)
    config = run_config(run_dir)
    info = json.loads((run_dir / RUN_INFO).read_text()) if (run_dir / RUN_INFO).is_file() else {}
    predictor = Predictor.load(model_path, config, Overrides(decision, threshold, tta), log)
    return Segmenter(predictor, config, info.get("input_sample_type", "uint8"))
