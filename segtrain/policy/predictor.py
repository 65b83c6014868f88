"""`Predictor`: a loaded model, its decision policy and how an image goes through it.

One object built from a run (nnU-Net's `nnUNetPredictor` is the model): `logits(image)` runs the forward
pass (resize as in training, whole image or tiles, flips: `segtrain.policy.inference`), `policy.apply(logits)`
turns them into (q, labels). eval, predict, calibrate, tune, export and the Python API all go through it, so
what one command scores is what another writes.

`SplitLogits` is one labelled split's logits, computed once and kept in memory up to `CACHE_BYTES` (beyond
that, recomputed on each further pass): after fit, calibration and evaluation share one forward pass; tune
reads the split several times at the cost of one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Optional

import click
import numpy as np

from segtrain.errors import CheckpointError
from segtrain.policy.policy import DecisionPolicy
from segtrain.policy.store import Overrides, ResolvedPolicy, resolve_policy

CACHE_BYTES = 1536 * 2**20
"""Logits kept in memory across passes over a split, at most (1.5 GiB: CamVid's val logits are 0.77 GiB)."""


class Predictor:
    """A model, the config it was trained with, and its resolved decision policy."""

    def __init__(self, model, config, policy: DecisionPolicy, resolved: Optional[ResolvedPolicy] = None):
        self.model = model
        self.config = config
        self.policy = policy
        self.resolved = resolved
        self.channels = int(model.input_shape[-1])

    @classmethod
    def load(cls, model_path: Path, config, overrides: Optional[Overrides] = None, log=click.echo,
             use_calibration: bool = True, use_tuned: bool = True) -> "Predictor":
        """Load a saved model, check its outputs against the config's classes, resolve its policy
        (`segtrain.policy.store.resolve_policy`)."""
        from segtrain.model import output_channels
        from segtrain.runs import load_model

        model = load_model(model_path)
        expected, actual = output_channels(len(config.data.classes)), int(model.output_shape[-1])
        if actual != expected:
            raise CheckpointError(
                f"{model_path}: the model has {actual} output channel(s) but the config names "
                f"{len(config.data.classes)} classes (needs {expected}). Use the run's own config.")
        resolved = resolve_policy(Path(model_path), config, overrides, log, use_calibration, use_tuned)
        return cls(model, config, resolved.policy, resolved)

    def logits(self, image: np.ndarray) -> np.ndarray:
        """Logits H x W x C at the image's own size (resized like training when data.resize is set)."""
        import tensorflow as tf

        from segtrain.policy.inference import predict_logits

        resize = self.config.data.resize
        height, width = image.shape[:2]
        if resize is not None:
            image = tf.image.resize(image, resize, method="bilinear").numpy()
        predict = self.config.predict
        out = predict_logits(self.model, image, predict.tile_size, overlap=predict.overlap,
                             batch_size=predict.batch_size, tta=self.policy.tta, divisor=self.config.model.divisor)
        if resize is not None:
            out = tf.image.resize(out, (height, width), method="bilinear").numpy()
        return out

    def predict(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(logits, q, labels) of one image: the forward pass, then the whole policy."""
        logits = self.logits(image)
        scores, labels = self.policy.apply(logits)
        return logits, scores, labels


class SplitLogits:
    """(pair, image, truth, logits) of every image of a labelled split; the logits of the first pass are kept for
    the next ones while they fit in `cache_bytes`."""

    def __init__(self, predictor: Predictor, pairs, mapping, desc: str = "predicting", cache_bytes: int = CACHE_BYTES):
        self.predictor, self.pairs, self.mapping, self.desc = predictor, list(pairs), mapping, desc
        self.cache_bytes = int(cache_bytes)
        self._cache: Optional[list] = None
        self.forward_passes = 0

    def __iter__(self) -> Iterator[tuple]:
        from segtrain.data.scan import labelled_images

        predictor = self.predictor
        max_pixels = predictor.config.data.max_image_pixels
        cached, fresh, kept = self._cache, [], 0
        for i, (pair, image, truth) in enumerate(labelled_images(self.pairs, self.mapping, predictor.channels,
                                                                 max_pixels, self.desc)):
            if cached is not None:
                logits = cached[i]
            else:
                logits = predictor.logits(image)
                kept += logits.nbytes
                if fresh is not None and kept <= self.cache_bytes:
                    fresh.append(logits)
                else:
                    fresh = None
            yield pair, image, truth, logits
        if cached is None:
            self.forward_passes += 1
            if fresh is not None and len(fresh) == len(self.pairs):
                self._cache = fresh
