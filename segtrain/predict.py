"""`segtrain predict`: find the images, load the run, predict each by tiles, decide, write the masks.

`Predictor` (a loaded model plus the decision rule) is shared with `segtrain.evaluation`, so
the masks predict writes are exactly the ones eval scores. The tiled-inference math lives
in `segtrain.inference`, the decision rules in `segtrain.decision`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import click
import numpy as np

from segtrain.config import Config
from segtrain.data.discovery import IMAGE_SUFFIXES
from segtrain.data.images import read_image, write_png_atomic
from segtrain.data.masks import MaskMapping
from segtrain.errors import CheckpointError, DataError
from segtrain.runs import load_model, resolve_checkpoint, run_config


PROBABILITY_FORMATS = ("png", "npy")


def tile_size(config: Config) -> int:
    """predict.tile_size, or twice the training crop, or 512; a multiple of 2**depth."""
    divisor = 2**config.model.depth
    size = config.predict.tile_size or (2 * config.data.crop if config.data.crop else 512)
    return max(divisor, size // divisor * divisor)


class Predictor:
    """A loaded model plus the decision: image array in, class-index mask out.

    `decision`, `threshold` and `tta` override the config's `predict` section (None keeps
    it) and get the config's checks. `temperature` divides the logits before they become
    probabilities (`segtrain.calibration`; `load` reads it from the run's calibration.json unless
    predict.calibrate is false); 1.0 leaves them as they are. `operating_point` (what `segtrain tune`
    chose, `segtrain.operating_point`) and `class_weights` (the run's, for predict.prior_correction) make
    the rest of the decision: prior correction, then the rule (a tuned threshold replaces the config's
    rule unless `decision` or `threshold` is given), then post-processing.
    """

    def __init__(self, model, config: Config, decision: Optional[str] = None, threshold: Optional[float] = None,
                 tta: Optional[bool] = None, log=click.echo, temperature: float = 1.0,
                 operating_point=None, class_weights=None):
        from segtrain.config import check_predict
        from segtrain.decision import decision_cost_matrix

        self.model = model
        self.channels = int(model.input_shape[-1])
        self.operating_point = operating_point
        tuned_threshold = None if operating_point is None else operating_point.threshold
        use_tuned = tuned_threshold is not None and decision is None and threshold is None
        predict = dataclasses.replace(
            config.predict,
            decision="threshold" if use_tuned else (decision or config.predict.decision),
            threshold=tuned_threshold if use_tuned else (threshold if threshold is not None else config.predict.threshold),
            tta=config.predict.tta if tta is None else tta,
        )
        self.config = dataclasses.replace(config, predict=predict)
        check_predict(self.config)  # command-line overrides get the config's checks
        self.decision, self.threshold, self.tta = predict.decision, predict.threshold, predict.tta
        self.cost_matrix = decision_cost_matrix(self.config)
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self.class_weights = class_weights
        self.tau = self._tau(predict.prior_correction, log)
        self.bias = (operating_point.bias if predict.prior_correction == "tuned" and operating_point is not None
                     else None)
        self.postprocess = self._postprocess_settings()
        own_costs = any(v is not None for v in (predict.fp_cost, predict.fn_cost, predict.cost_matrix))
        if self.decision == "cost" and not own_costs:
            log("warning: decision=cost uses the cost_sensitive loss term's costs, which the model has already "
                "learnt, so they count twice; prefer argmax for a cost-trained model, or train with plain "
                "cross-entropy and set predict.fp_cost / predict.fn_cost for the decision.")

    def _tau(self, prior_correction: str, log) -> float:
        if prior_correction == "none":
            return 0.0
        if prior_correction == "weights":
            return 1.0
        if self.operating_point is None or self.operating_point.tau is None:
            log("warning: predict.prior_correction is 'tuned' but the run has no tuned tau (operating_point.json); "
                "no correction is applied. Run `segtrain tune RUN --split SPLIT` on a labelled split first.")
            return 0.0
        return float(self.operating_point.tau)

    def _postprocess_settings(self) -> dict[int, tuple[int, int]]:
        """{class index: (min_size, max_hole)}: the config's, each class replaced by the tuned one."""
        classes = list(self.config.data.classes)
        predict = self.config.predict
        settings = {}
        for name in classes:
            min_size = (predict.min_size or {}).get(name, 0)
            max_hole = (predict.max_hole or {}).get(name, 0)
            if self.operating_point is not None and name in self.operating_point.postprocess:
                min_size, max_hole = self.operating_point.postprocess[name]
            if min_size > 0 or max_hole > 0:
                settings[classes.index(name)] = (int(min_size), int(max_hole))
        return settings

    @classmethod
    def load(cls, model_path: Path, config: Config, decision: Optional[str] = None,
             threshold: Optional[float] = None, tta: Optional[bool] = None, log=click.echo,
             temperature: Optional[float] = None, tuned: bool = True) -> "Predictor":
        """Load a saved model, check its outputs against the config's classes, and wrap it.

        `temperature` None: the run's calibration.json for this model file (`segtrain.calibration.load_temperature`:
        1.0 without one, or with predict.calibrate false). `tuned`: apply the run's operating_point.json
        (`segtrain.operating_point.load_operating_point`); false: the config's decision settings only."""
        from segtrain.calibration import load_temperature
        from segtrain.model import output_channels
        from segtrain.operating_point import load_operating_point, run_class_weights

        model = load_model(model_path)
        expected = output_channels(len(config.data.classes))
        actual = int(model.output_shape[-1])
        if actual != expected:
            raise CheckpointError(
                f"{model_path}: the model has {actual} output channel(s) but the config names "
                f"{len(config.data.classes)} classes (needs {expected}). Use the run's own config."
            )
        if temperature is None:
            temperature = load_temperature(model_path, config, log)
        point = load_operating_point(model_path, config, temperature, log) if tuned else None
        weights = run_class_weights(Path(model_path).parent, len(config.data.classes))
        return cls(model, config, decision, threshold, tta, log, temperature, point, weights)

    def probabilities(self, image: np.ndarray, calibrated: bool = True) -> np.ndarray:
        """Class probabilities H x W x K at the image's own size (resized like training when data.resize is set),
        with the temperature applied (`calibrated=False`: as the model gives them, T = 1)."""
        from segtrain.inference import predict_probabilities

        temperature = self.temperature if calibrated else 1.0
        return self._forward(predict_probabilities, image, temperature=temperature)

    def logits(self, image: np.ndarray) -> np.ndarray:
        """Logits H x W x C (C = the model's output channels, 1 for binary) through the same resize, padding,
        tiles and flips as `probabilities`, blended as logits (`segtrain.inference.predict_logits`)."""
        from segtrain.inference import predict_logits

        return self._forward(predict_logits, image)

    def _forward(self, predict_fn, image: np.ndarray, **kwargs) -> np.ndarray:
        import tensorflow as tf

        resize = self.config.data.resize
        height, width = image.shape[:2]
        if resize is not None:
            image = tf.image.resize(image, resize, method="bilinear").numpy()
        out = predict_fn(
            self.model, image, tile_size(self.config), overlap=self.config.predict.overlap,
            batch_size=self.config.predict.batch_size, tta=self.tta, divisor=2**self.config.model.depth, **kwargs,
        )
        if resize is not None:
            out = tf.image.resize(out, (height, width), method="bilinear").numpy()
        return out

    def adjusted(self, probabilities: np.ndarray) -> np.ndarray:
        """The probabilities the rule reads: prior-corrected by the run's class weights (tau) and tuned biases."""
        from segtrain.operating_point import prior_adjust

        return prior_adjust(probabilities, self.class_weights, self.tau, self.bias)

    def labels(self, probabilities: np.ndarray) -> np.ndarray:
        """Class indices H x W: prior correction, the decision rule, post-processing (class docstring)."""
        from segtrain.decision import decide
        from segtrain.postprocess import postprocess, second_choice

        q = self.adjusted(probabilities)
        labels = decide(q, self.decision, threshold=self.threshold, cost_matrix=self.cost_matrix)
        if self.postprocess:
            labels = postprocess(labels, second_choice(q, labels), self.postprocess)
        return labels

    def describe(self) -> str:
        """The decision in words, for log lines."""
        parts = [self.decision + (f" {self.threshold:.4g}" if self.decision == "threshold" else "")]
        if self.temperature != 1.0:
            parts.append(f"temperature {self.temperature:.4f}")
        if self.tau:
            parts.append(f"prior correction tau {self.tau:.3g}")
        if self.bias is not None and any(self.bias):
            parts.append("class biases " + ", ".join(f"{n} {b:+.2f}" for n, b in zip(self.config.data.classes, self.bias)
                                                      if b))
        if self.postprocess:
            names = self.config.data.classes
            parts.append("post-processing " + ", ".join(f"{names[c]} min_size {n} max_hole {m}"
                                                         for c, (n, m) in self.postprocess.items()))
        if self.operating_point is not None:
            parts.append(f"tuned on {self.operating_point.info.get('split')}")
        return ", ".join(parts)


def collect_images(inputs: list[str]) -> list[Path]:
    """Image files from the arguments (files or folders, folders not recursed), sorted, no duplicates."""
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found += sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
        elif path.is_file():
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                raise DataError(f"{path}: not a supported image ({', '.join(sorted(IMAGE_SUFFIXES))}).")
            found.append(path)
        else:
            raise DataError(f"{path}: no such file or folder.")
    unique = list(dict.fromkeys(p.resolve() for p in found))
    if not unique:
        raise DataError(f"no images found in {', '.join(inputs)}.")
    return unique


def predict_images(images: list[Path], checkpoint: Optional[str], out_dir: Optional[Path],
                   decision: Optional[str], threshold: Optional[float], tta: Optional[bool],
                   probabilities: bool, overlay: bool, log=click.echo, probabilities_format: str = "png") -> Path:
    """Write one mask per image (same stem, same size, training encoding) into out_dir (default: RUN/predictions).

    With `probabilities` also the class probabilities, as `probabilities_format` says:
    "png" (default): `<stem>_prob_<class>.png`, 8-bit (round(255 p); the foreground only for two
    classes), so one grey level is 1/255 ~ 0.004 of probability; "npy": `<stem>.npy`, the exact
    float32 array H x W x K (every class, two for two classes) that `Predictor.probabilities` gives
    and the decision rule reads, at the input's size. With `overlay` also `<stem>_overlay.png`.
    """
    if probabilities_format not in PROBABILITY_FORMATS:
        raise ValueError(f"probabilities_format must be one of {PROBABILITY_FORMATS}, not {probabilities_format!r}")
    from tqdm import tqdm

    model_path, run_dir = resolve_checkpoint(checkpoint)
    config = run_config(run_dir)
    predictor = Predictor.load(model_path, config, decision, threshold, tta, log)
    mapping = MaskMapping(config.data.mask, config.data.classes)
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "predictions"
    _check_outputs(images, out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for path in tqdm(images, desc="predicting", unit="image", disable=None):
        _predict_one(predictor, mapping, path, out_dir, probabilities_format if probabilities else None, overlay)
    log(f"Wrote {len(images)} mask(s) to {out_dir} (model {model_path}, decision {predictor.describe()}).")
    return out_dir


def write_npy_atomic(array: np.ndarray, path: Path) -> None:
    """`np.save` through `segtrain.atomic.atomic_path`: a killed run leaves no half-written array."""
    from segtrain.atomic import atomic_path

    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)


def _check_outputs(images: list[Path], out_dir: Path) -> None:
    """One mask per stem, and never into a folder of input images."""
    stems = [p.stem for p in images]
    duplicated = {s for s in stems if stems.count(s) > 1}
    if duplicated:
        raise DataError(f"several input images share the stem {sorted(duplicated)[0]!r}; their masks would collide.")
    if out_dir.resolve() in {p.resolve().parent for p in images}:
        raise DataError(f"{out_dir}: this folder holds input images; write the masks elsewhere with --out.")


def _predict_one(predictor: Predictor, mapping: MaskMapping, path: Path, out_dir: Path,
                 probabilities: Optional[str], overlay: bool) -> None:
    """The mask of one image (and its probabilities, in the format `probabilities` names, and overlay when
    asked), written atomically."""
    classes = predictor.config.data.classes
    image = read_image(path, predictor.channels, predictor.config.data.max_image_pixels)
    probs = predictor.probabilities(image)
    labels = predictor.labels(probs)
    write_png_atomic(mapping.encode(labels), out_dir / f"{path.stem}.png")
    if probabilities == "npy":
        write_npy_atomic(np.asarray(probs, dtype=np.float32), out_dir / f"{path.stem}.npy")
    elif probabilities:
        for cls, name in enumerate(classes):
            if len(classes) == 2 and cls == 0:
                continue
            write_png_atomic(np.round(probs[..., cls] * 255).astype(np.uint8), out_dir / f"{path.stem}_prob_{name}.png")
    if overlay:
        write_png_atomic(_overlay(image, labels, len(classes)), out_dir / f"{path.stem}_overlay.png")


_COLOURS = np.array([[0, 0, 0], [255, 40, 40], [40, 200, 255], [255, 220, 0], [160, 80, 255],
                     [0, 220, 120], [255, 120, 200], [255, 150, 40]], dtype=np.float32)


def _overlay(image: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """The image (its first three bands, or its first band in gray) with non-background classes tinted in distinct
    colours."""
    rgb = image[..., :3] if image.shape[-1] >= 3 else np.repeat(image[..., :1], 3, axis=-1)  # multispectral: bands 1-3
    colours = _COLOURS[np.arange(num_classes) % len(_COLOURS)]
    tint = colours[labels]
    alpha = np.where(labels[..., None] > 0, 0.5, 0.0)
    return np.clip(rgb * (1 - alpha) + tint * alpha, 0, 255).astype(np.uint8)
