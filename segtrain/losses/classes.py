"""Keras `Loss` classes: thin wrappers that store a loss function's settings and reduce its values.

As Keras's `LossFunctionWrapper`: `SegmentationLoss(term, **settings)` calls
`functional.TERMS[term]` with the settings it stores (and returns from `get_config`); the named
classes (`CrossEntropy`, `TverskyLoss`, ...) only fix `term`. `build_loss` makes the loss of a
config's `loss` section.

Reduction (Keras's default `sum_over_batch_size`), always over the *global* batch:
- per-pixel losses (a function returning (B, H, W): cross-entropy, cost-sensitive, focal) give
  `sum over valid pixels of loss / number of valid pixels` (0 when no pixel is valid);
- overlap losses (a function returning () or (B,)) give the pooled ratio of the batch's soft
  counts, or with `per_image` the mean of the images' losses.
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
from keras.src.backend.common.masking import set_keras_mask  # keeps a tensor's mask (eager too); no public name

from segtrain.errors import ConfigError
from segtrain.labels import IGNORE_INDEX
from segtrain.losses import functional as F



def _floats(values):
    return None if values is None else [float(v) for v in np.asarray(values).ravel()]


def _plain(value):
    """A setting as plain Python, for get_config: arrays, tuples and lists become lists of floats."""
    if isinstance(value, (list, tuple, np.ndarray)):
        return np.asarray(value, float).tolist()
    return value.item() if isinstance(value, np.generic) else value


@keras.saving.register_keras_serializable(package="segtrain")
class SegmentationLoss(keras.losses.Loss):
    """A loss function of `functional.TERMS` as a Keras loss, reduced over the global batch.

    Args:
        term: the function's name in `functional.TERMS` (fixed by the named subclasses).
        class_weights: None or K non-negative weights (K = 2 for one output channel).
        ignore_false_negatives: class indices whose misses are free (see `functional`).
        from_logits: y_pred holds logits (default) or probabilities.
        ignore_index: label value of ignored pixels. Defaults to `IGNORE_INDEX` (-1).
        **settings: the function's own keyword arguments (e.g. `alpha` of tversky), stored as
            attributes; those not given take the function's defaults.

    Example:
    >>> loss = SegmentationLoss("tversky", alpha=0.7, beta=0.3)
    >>> loss.alpha, loss.name
    (0.7, 'tversky')
    """

    term = None

    def __init__(
        self,
        term=None,
        class_weights=None,
        ignore_false_negatives=None,
        from_logits=True,
        ignore_index=IGNORE_INDEX,
        name=None,
        reduction="sum_over_batch_size",
        dtype=None,
        **settings,
    ):
        self.term = term or self.term
        if self.term not in F.TERMS:
            raise ValueError(f"unknown loss term {self.term!r}; choose from {', '.join(F.TERMS)}.")
        super().__init__(name=name or self.term, reduction=reduction, dtype=dtype)
        defaults = {p.name: p.default for p in F.term_settings(F.TERMS[self.term])}
        unknown = sorted(set(settings) - set(defaults))
        if unknown:
            raise TypeError(f"{type(self).__name__}: unknown setting(s) {', '.join(unknown)}; "
                            f"{self.term} takes {', '.join(defaults) or 'none'}.")
        self.settings = {key: _plain(settings.get(key, default)) for key, default in defaults.items()}
        for key, value in self.settings.items():
            setattr(self, key, value)
        self.class_weights = _floats(class_weights)
        self.ignore_false_negatives = [int(c) for c in (ignore_false_negatives or [])]
        self.from_logits = bool(from_logits)
        self.ignore_index = int(ignore_index)

    def get_config(self):
        config = {
            **super().get_config(),
            "class_weights": self.class_weights,
            "ignore_false_negatives": self.ignore_false_negatives,
            "from_logits": self.from_logits,
            "ignore_index": self.ignore_index,
            **self.settings,
        }
        if type(self).term is None:
            config["term"] = self.term
        return config

    def values(self, y_true, y_pred):
        """The function's unreduced losses: (B, H, W) per pixel, or per image (B,), the pooled () repeated."""
        values = F.TERMS[self.term](
            y_true, y_pred, **self.settings, class_weights=self.class_weights,
            ignore_false_negatives=self.ignore_false_negatives, from_logits=self.from_logits,
            ignore_index=self.ignore_index,
        )
        if values.shape.rank == 0:  # pooled over the batch: one value per image, so a reduction sees a batch
            values = tf.fill(tf.shape(y_pred)[:1], values)
        return values

    def call(self, y_true, y_pred):
        values = self.values(y_true, y_pred)
        if values.shape.rank > 1:
            set_keras_mask(values, F.valid_labels(y_true, y_pred, self.ignore_index)[1])
        return values

    def __call__(self, y_true, y_pred, sample_weight=None):
        if self.reduction != "sum_over_batch_size":
            return super().__call__(y_true, y_pred, sample_weight)
        with tf.name_scope(self.name):
            y_pred = tf.cast(tf.convert_to_tensor(y_pred), tf.float32)
            if sample_weight is not None:
                sample_weight = tf.cast(tf.convert_to_tensor(sample_weight), tf.float32)
            return self.replica_share(y_true, y_pred, sample_weight)

    def replica_share(self, y_true, y_pred, sample_weight):
        """This replica's share of the global-batch loss (module docstring): the sum of its (weighted)
        values / the valid pixels (per-pixel losses) or the images (overlap losses) of the global batch.

        Pooled, every image carries the global-batch value (its counts are summed over the
        replicas), so the shares add up to it.
        """
        values = _weighted(self.values(y_true, y_pred), sample_weight)
        if values.shape.rank > 1:
            count = tf.reduce_sum(tf.cast(F.valid_labels(y_true, y_pred, self.ignore_index)[1], tf.float32))
        else:
            count = tf.cast(tf.shape(y_pred)[0], tf.float32)
        return tf.math.divide_no_nan(tf.reduce_sum(values), tf.stop_gradient(F.replica_sum(count)))


def _weighted(values, sample_weight):
    """values * sample_weight, the weight given trailing axes of size 1 to match the values' rank."""
    if sample_weight is None:
        return values
    while sample_weight.shape.rank < values.shape.rank:
        sample_weight = sample_weight[..., None]
    return values * sample_weight


@keras.saving.register_keras_serializable(package="segtrain")
class CrossEntropy(SegmentationLoss):
    """Class-weighted cross-entropy (BCE for one channel), mean over valid pixels (`functional.cross_entropy`).

    Formula:
    ```
    loss = sum_{valid pixels} w[y] * ce / number of valid pixels
    ```
    (divided by the pixel count, not by the sum of weights: scale weights over the data set
    with `segtrain.class_weights` so the loss keeps its unweighted scale).

    Example:
    >>> loss = CrossEntropy(class_weights=[1.0, 4.0])
    >>> float(loss(np.array([[[1]]]), np.zeros((1, 1, 1, 1))))  # 4 * ln 2
    2.772588...
    """

    term = "cross_entropy"


@keras.saving.register_keras_serializable(package="segtrain")
class CostSensitiveCrossEntropy(SegmentationLoss):
    """Cost-sensitive cross-entropy, mean over valid pixels (`functional.cost_sensitive_cross_entropy`).

    Formula:
    ```
    loss = sum_{valid pixels} w[y] * sum_j C[y][j] * -log(1 - p_j) / number of valid pixels
    ```
    `cost_matrix` defaults to the fp_cost / fn_cost shorthand, and without costs to `1 - I`
    (for two classes exactly binary cross-entropy).
    """

    term = "cost_sensitive"


@keras.saving.register_keras_serializable(package="segtrain")
class FocalLoss(SegmentationLoss):
    """Focal loss, mean over valid pixels (`functional.focal`); class weights are the per-class alpha.

    Formula:
    ```
    loss = sum_{valid pixels} w[y] * (1 - p_y)**gamma * -log p_y / number of valid pixels
    ```
    """

    term = "focal"


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

    term = "tversky"


@keras.saving.register_keras_serializable(package="segtrain")
class DiceLoss(SegmentationLoss):
    """Soft Dice loss: `TverskyLoss` with alpha = beta = 0.5 (`functional.dice`).

    Formula:
    ```
    loss = 1 - (2 TP + 2 smooth) / (2 TP + FP + FN + 2 smooth)      per class
    ```
    """

    term = "dice"


@keras.saving.register_keras_serializable(package="segtrain")
class JaccardLoss(SegmentationLoss):
    """Soft Jaccard (IoU) loss: `TverskyLoss` with alpha = beta = 1 (`functional.jaccard`).

    Formula:
    ```
    loss = 1 - (TP + smooth) / (TP + FP + FN + smooth)      per class
    ```
    """

    term = "jaccard"


NAMED = {cls.term: cls for cls in (CrossEntropy, CostSensitiveCrossEntropy, FocalLoss, TverskyLoss, DiceLoss,
                                    JaccardLoss)}
"""The named class of a term; a term without one is a plain `SegmentationLoss(term)`."""


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


def build_loss(loss, class_names, class_weights=None):
    """The Keras loss of a config's `loss` section.

    Args:
        loss: a `segtrain.config.LossConfig` (a raw YAML section: validate it with `segtrain.config.loss_config`).
        class_names: the K class names.
        class_weights: resolved K weights (see `segtrain.class_weights`) or None; given to
            every term with `use_class_weights: true`.

    Returns:
        The term's loss when there is one term of weight 1, else a `CombinedLoss`.
    """
    class_names = list(class_names)
    if class_weights is not None:
        class_weights = np.asarray(class_weights, float).ravel()
        if class_weights.shape != (len(class_names),):
            raise ConfigError(f"loss.class_weights: expected {len(class_names)} weights ({', '.join(class_names)}), "
                              f"got {class_weights.size}.")
    terms = []
    for term in loss.terms:
        make = NAMED.get(term.name, SegmentationLoss)
        terms.append((term.weight, make(
            term.name, class_weights=class_weights if term.use_class_weights else None,
            ignore_false_negatives=loss.free_misses(term, class_names), **term.settings(),
        )))
    if len(terms) == 1 and terms[0][0] == 1.0:
        return terms[0][1]
    return CombinedLoss(terms)
