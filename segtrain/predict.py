"""`segtrain predict`: find the images, load the run, predict each, write the masks.

The model and its decision policy are a `segtrain.policy.predictor.Predictor`, shared with eval, tune and the
Python API, so the masks predict writes are exactly the ones eval scores.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import click
import numpy as np

from segtrain.data.discovery import IMAGE_SUFFIXES
from segtrain.data.images import read_image, write_png_atomic
from segtrain.data.masks import MaskMapping
from segtrain.errors import DataError
from segtrain.policy.predictor import Predictor
from segtrain.policy.store import Overrides
from segtrain.reports import overlay as overlay_image
from segtrain.runs import resolve_checkpoint, run_config


PROBABILITY_FORMATS = ("png", "npy")


def collect_images(inputs: list[str]) -> list[Path]:
    """Image files from the arguments (files or folders, folders not recursed), sorted, no duplicates."""
    from segtrain.data.discovery import empty_folder_message, suffix_list

    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found += sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
        elif path.is_file():
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                raise DataError(f"{path}: not a supported image ({suffix_list(IMAGE_SUFFIXES)}).")
            found.append(path)
        else:
            raise DataError(f"{path}: no such file or folder.")
    unique = list(dict.fromkeys(p.resolve() for p in found))
    if not unique:
        folders = [Path(item) for item in inputs if Path(item).is_dir()]
        if len(folders) == 1:
            raise DataError(empty_folder_message(folders[0]) + " Pass the image files or the folder holding them.")
        raise DataError(f"no images found in {', '.join(inputs)}: looked for {suffix_list(IMAGE_SUFFIXES)} files "
                        "(any case) directly in each folder; subfolders are not searched. Pass the image files or the "
                        "folders holding them.")
    return unique


def predict_images(images: list[Path], checkpoint: Optional[str], out_dir: Optional[Path],
                   decision: Optional[str], threshold: Optional[float], tta: Optional[bool],
                   probabilities: bool, overlay: bool, log=click.echo, probabilities_format: str = "png",
                   overrides: Sequence[str] = ()) -> Path:
    """Write one mask per image (same stem, same size, training encoding) into out_dir (default: RUN/predictions).

    With `probabilities` also the probabilities the decision rule reads (q: calibrated and, with prior correction,
    corrected; `segtrain.policy.policy`), as `probabilities_format` says: "png" (default):
    `<stem>_prob_<class>.png`, 8-bit (round(255 q); the foreground only for two classes), so one grey level is
    1/255 ~ 0.004 of probability; "npy": `<stem>.npy`, the float32 array H x W x K (every class, two for two
    classes) at the input's size, so thresholding it reproduces the masks. With `overlay` also
    `<stem>_overlay.png`. `overrides`: `predict.*` KEY=VALUE settings applied to the run's config in memory.
    """
    if probabilities_format not in PROBABILITY_FORMATS:
        raise ValueError(f"probabilities_format must be one of {PROBABILITY_FORMATS}, not {probabilities_format!r}")
    from tqdm import tqdm

    model_path, run_dir = resolve_checkpoint(checkpoint)
    config = run_config(run_dir, overrides)
    predictor = Predictor.load(model_path, config, Overrides(decision, threshold, tta), log)
    mapping = MaskMapping(config.data.mask, config.data.classes)
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "predictions"
    _check_outputs(images, out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for path in tqdm(images, desc="predicting", unit="image", disable=None):
        _predict_one(predictor, mapping, path, out_dir, probabilities_format if probabilities else None, overlay)
    log(f"Wrote {len(images)} mask(s) to {out_dir} (model {model_path}, decision {predictor.policy.describe()}).")
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
    _, probs, labels = predictor.predict(image)
    write_png_atomic(mapping.encode(labels), out_dir / f"{path.stem}.png")
    if probabilities == "npy":
        write_npy_atomic(np.asarray(probs, dtype=np.float32), out_dir / f"{path.stem}.npy")
    elif probabilities:
        for cls, name in enumerate(classes):
            if len(classes) == 2 and cls == 0:
                continue
            write_png_atomic(np.round(probs[..., cls] * 255).astype(np.uint8), out_dir / f"{path.stem}_prob_{name}.png")
    if overlay:
        write_png_atomic(overlay_image(image, labels, len(classes)), out_dir / f"{path.stem}_overlay.png")
