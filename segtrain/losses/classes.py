"""Keras `Loss` classes: thin wrappers that store settings and call `functional`.

Reduction (Keras's default `sum_over_batch_size`), always over the *global* batch:
- per-pixel losses (`CrossEntropy`, `CostSensitiveCrossEntropy`, `FocalLoss`) give
  `sum over valid pixels of loss / number of valid pixels` (0 when no pixel is valid);
- overlap losses give the pooled ratio of the batch's soft counts, or with `per_image`
  the mean of the images' losses.
Inside a tf.distribute step each replica returns its *share* of that global value (Keras's
convention: the shares sum to it, and so do their gradients): the valid-pixel count,
the image count and the pooled overlap counts are summed over the replicas first, so
two replicas give exactly what one device gives for the same global batch, however the
ignored pixels fall. Outside a distributed step the share is the whole value.

`reduction="sum"` and `reduction=None` follow Keras on the per-pixel map (the values carry
a Keras mask of the valid pixels; None returns (B, H, W) with zeros at ignored pixels) or
on the per-image values (B,). `sample_weight` follows Keras: it broadcasts to those shapes,
e.g. (B, H, W) or (B, 1, 1) for per-pixel losses, (B,) for overlap losses, and the default
reduction still divides by the number of valid pixels (or images), not by the weights.
"""

import keras
import numpy as np
import tensorflow as tf

from segtrain.labels import IGNORE_INDEX
from segtrain.losses import functional as F

try:  # Keras >= 3.5 keeps tensor masks through this helper (works on eager tensors too).
    from keras.src.backend.common.masking import set_keras_mask as _set_mask
except ImportError:  # pragma: no cover - older Keras 3

    def _set_mask(x, mask):
        x._keras_mask = mask


def _floats(values):
    return None if values is None else [float(v) for v in np.asarray(values).ravel()]


class SegmentationLoss(keras.losses.Loss):
    """Base class: settings common to all segtrain losses.

    Args:
        class_weights: None or K non-negative weights (K = 2 for one output channel).
        ignore_false_negatives: class indices whose misses are free (see `functional`).
        from_logits: y_pred holds logits (default) or probabilities.
        ignore_index: label value of ignored pixels. Defaults to `IGNORE_INDEX` (-1).
    """

    def __init__(
        self,
        class_weights=None,
        ignore_false_negatives=None,
        from_logits=True,
        ignore_index=IGNORE_INDEX,
        name=None,
        reduction="sum_over_batch_size",
        dtype=None,
    ):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.class_weights = _floats(class_weights)
        self.ignore_false_negatives = [int(c) for c in (ignore_false_negatives or [])]
        self.from_logits = bool(from_logits)
        self.ignore_index = int(ignore_index)

    def _common(self):
        return {
            "class_weights": self.class_weights,
            "ignore_false_negatives": self.ignore_false_negatives,
            "from_logits": self.from_logits,
            "ignore_index": self.ignore_index,
        }

    def _settings(self):
        return {}

    def get_config(self):
        return {**super().get_config(), **self._common(), **self._settings()}

    def __call__(self, y_true, y_pred, sample_weight=None):
        if self.reduction != "sum_over_batch_size":
            return super().__call__(y_true, y_pred, sample_weight)
        with tf.name_scope(self.name):
            y_pred = tf.cast(tf.convert_to_tensor(y_pred), tf.float32)
            return self.replica_share(y_true, y_pred, _broadcast_weight(sample_weight))

    def replica_share(self, y_true, y_pred, sample_weight):
        """This replica's share of the global-batch loss (see the module docstring)."""
        raise NotImplementedError


def _broadcast_weight(sample_weight):
    return None if sample_weight is None else tf.cast(tf.convert_to_tensor(sample_weight), tf.float32)


def _weighted(values, sample_weight):
    """values * sample_weight, the weight given trailing axes of size 1 to match the values' rank."""
    if sample_weight is None:
        return values
    while sample_weight.shape.rank < values.shape.rank:
        sample_weight = sample_weight[..., None]
    return values * sample_weight


class PixelLoss(SegmentationLoss):
    """A loss defined per pixel: `call` returns (B, H, W), masked to the valid pixels."""

    def pixel_losses(self, y_true, y_pred):
        raise NotImplementedError

    def call(self, y_true, y_pred):
        losses = self.pixel_losses(y_true, y_pred)
        _, valid = F.valid_labels(y_true, y_pred, self.ignore_index)
        _set_mask(losses, valid)
        return losses

    def replica_share(self, y_true, y_pred, sample_weight):
        """sum of this replica's valid pixel losses / valid pixels of the global batch."""
        losses = _weighted(self.pixel_losses(y_true, y_pred), sample_weight)
        _, valid = F.valid_labels(y_true, y_pred, self.ignore_index)
        count = F.replica_sum(tf.reduce_sum(tf.cast(valid, tf.float32)))
        return tf.math.divide_no_nan(tf.reduce_sum(losses), tf.stop_gradient(count))


@keras.saving.register_keras_serializable(package="segtrain")
class CrossEntropy(PixelLoss):
    """Class-weighted cross-entropy (BCE for one channel), mean over valid pixels.

    Formula:
    ```
    loss = sum_{valid pixels} w[y] * ce / number of valid pixels
    ```
    (divided by the pixel count, not by the sum of weights: scale weights over the data set
    with `segtrain.class_weights` so the loss keeps its unweighted scale).

    Args:
        label_smoothing: float in [0, 1). Defaults to 0.
        Other args: see `SegmentationLoss`.

    Example:
    >>> loss = CrossEntropy(class_weights=[1.0, 4.0])
    >>> float(loss(np.array([[[1]]]), np.zeros((1, 1, 1, 1))))  # 4 * ln 2
    2.772588...
    """

    def __init__(self, label_smoothing=0.0, name="cross_entropy", **kwargs):
        super().__init__(name=name, **kwargs)
        self.label_smoothing = float(label_smoothing)

    def _settings(self):
        return {"label_smoothing": self.label_smoothing}

    def pixel_losses(self, y_true, y_pred):
        return F.cross_entropy(
            y_true, y_pred, self.class_weights, self.label_smoothing,
            self.ignore_false_negatives, self.from_logits, self.ignore_index,
        )


@keras.saving.register_keras_serializable(package="segtrain")
class CostSensitiveCrossEntropy(PixelLoss):
    """Cost-sensitive cross-entropy, mean over valid pixels.

    Formula:
    ```
    loss = sum_{valid pixels} w[y] * sum_j C[y][j] * -log(1 - p_j) / number of valid pixels
    ```

    Args:
        cost_matrix: K x K costs `C[true][pred]`, zero diagonal. Defaults to `1 - I`, which
            for two classes is exactly binary cross-entropy.
        ignore_false_negatives: classes whose rows of C are zeroed.
        Other args: see `SegmentationLoss`.
    """

    def __init__(self, cost_matrix=None, name="cost_sensitive", **kwargs):
        super().__init__(name=name, **kwargs)
        self.cost_matrix = None if cost_matrix is None else np.asarray(cost_matrix, float).tolist()

    def _settings(self):
        return {"cost_matrix": self.cost_matrix}

    def pixel_losses(self, y_true, y_pred):
        costs = self.cost_matrix
        if costs is None:
            k = F.num_classes(y_pred)
            costs = 1.0 - np.eye(k)
        return F.cost_sensitive_cross_entropy(
            y_true, y_pred, costs, self.class_weights,
            self.ignore_false_negatives, self.from_logits, self.ignore_index,
        )


@keras.saving.register_keras_serializable(package="segtrain")
class FocalLoss(PixelLoss):
    """Focal loss `w[y] * (1 - p_y)**gamma * -log p_y`, mean over valid pixels.

    Args:
        gamma: focusing exponent >= 0. Defaults to 2. Class weights are the per-class alpha.
        Other args: see `SegmentationLoss`.
    """

    def __init__(self, gamma=2.0, name="focal", **kwargs):
        super().__init__(name=name, **kwargs)
        self.gamma = float(gamma)

    def _settings(self):
        return {"gamma": self.gamma}

    def pixel_losses(self, y_true, y_pred):
        return F.focal(
            y_true, y_pred, self.gamma, self.class_weights,
            self.ignore_false_negatives, self.from_logits, self.ignore_index,
        )


@keras.saving.register_keras_serializable(package="segtrain")
class TverskyLoss(SegmentationLoss):
    """Tversky loss: alpha weighs false positives, beta false negatives; gamma makes it focal.

    Formula:
    ```
    TI_c = (TP_c + smooth) / (TP_c + alpha FP_c + beta FN_c + smooth)
    loss = sum_c w_c (1 - TI_c)**gamma / sum_c w_c      over classes present in the batch
    ```
    See `functional.tversky` for absent classes, smoothing, `per_image` and
    `include_background`.
    """

    def __init__(
        self,
        alpha=0.5,
        beta=0.5,
        gamma=1.0,
        smooth=1.0,
        per_image=False,
        include_background=False,
        name="tversky",
        **kwargs,
    ):
        super().__init__(name=name, **kwargs)
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.gamma = float(gamma)
        self.smooth = float(smooth)
        self.per_image = bool(per_image)
        self.include_background = bool(include_background)

    def _settings(self):
        return {
            "alpha": self.alpha,
            "beta": self.beta,
            "gamma": self.gamma,
            "smooth": self.smooth,
            "per_image": self.per_image,
            "include_background": self.include_background,
        }

    def call(self, y_true, y_pred):
        loss = F.tversky(
            y_true, y_pred, self.alpha, self.beta, self.gamma, self.smooth,
            self.class_weights, self.per_image, self.include_background,
            self.ignore_false_negatives, self.from_logits, self.ignore_index,
        )
        if not self.per_image:  # one value per image (the pooled one) so a reduction sees a batch
            loss = tf.fill(tf.shape(y_pred)[:1], loss)
        return loss

    def replica_share(self, y_true, y_pred, sample_weight):
        """sum of this replica's (weighted) per-image values / images of the global batch.

        Pooled, every image carries the global-batch value (its counts are summed over the
        replicas), so the shares add up to it.
        """
        losses = _weighted(self.call(y_true, y_pred), sample_weight)
        images = F.replica_sum(tf.cast(tf.shape(y_pred)[0], tf.float32))
        return tf.math.divide_no_nan(tf.reduce_sum(losses), images)


@keras.saving.register_keras_serializable(package="segtrain")
class DiceLoss(TverskyLoss):
    """Soft Dice loss: `TverskyLoss` with alpha = beta = 0.5."""

    def __init__(self, name="dice", **kwargs):
        super().__init__(alpha=0.5, beta=0.5, name=name, **kwargs)

    def _settings(self):
        settings = super()._settings()
        del settings["alpha"], settings["beta"]
        return settings


@keras.saving.register_keras_serializable(package="segtrain")
class JaccardLoss(TverskyLoss):
    """Soft Jaccard (IoU) loss: `TverskyLoss` with alpha = beta = 1."""

    def __init__(self, name="jaccard", **kwargs):
        super().__init__(alpha=1.0, beta=1.0, name=name, **kwargs)

    def _settings(self):
        settings = super()._settings()
        del settings["alpha"], settings["beta"]
        return settings


@keras.saving.register_keras_serializable(package="segtrain")
class CombinedLoss(keras.losses.Loss):
    """Weighted sum of losses, each reduced by its own reduction.

    Formula:
    ```
    loss = sum_i weight_i * term_i(y_true, y_pred, sample_weight)
    ```

    Args:
        terms: list of `(weight, loss)` pairs.
    """

    def __init__(self, terms, name="loss", reduction="sum_over_batch_size", dtype=None):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.terms = [(float(w), loss) for w, loss in terms]

    def term_values(self, y_true, y_pred, sample_weight=None):
        """{term name: unweighted reduced value}, e.g. for logging each term."""
        return {loss.name: loss(y_true, y_pred, sample_weight) for _, loss in self.terms}

    def __call__(self, y_true, y_pred, sample_weight=None):
        total = 0.0
        for weight, loss in self.terms:
            total = total + weight * loss(y_true, y_pred, sample_weight)
        return tf.convert_to_tensor(total, tf.float32)

    def call(self, y_true, y_pred):
        return self(y_true, y_pred)

    def get_config(self):
        return {
            **super().get_config(),
            "terms": [[w, keras.saving.serialize_keras_object(l)] for w, l in self.terms],
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["terms"] = [
            (w, keras.saving.deserialize_keras_object(l)) for w, l in config["terms"]
        ]
        return cls(**config)
