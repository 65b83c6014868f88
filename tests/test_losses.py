"""Loss values against independent references, and the properties every loss must keep."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from segtrain.labels import IGNORE_INDEX  # noqa: E402
from segtrain.losses import (  # noqa: E402
    CombinedLoss,
    CostSensitiveCrossEntropy,
    CrossEntropy,
    DiceLoss,
    FocalLoss,
    JaccardLoss,
    TverskyLoss,
    functional,
)

LN2 = np.log(2.0)


def logit(p):
    p = np.asarray(p, np.float64)
    return (np.log(p) - np.log1p(-p)).astype(np.float32)


def softmax(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def random_case(k, seed=0, shape=(2, 5, 6), ignore_fraction=0.2, scale=3.0):
    """Labels with every class present plus some ignored pixels, and random logits."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, size=shape)
    y.flat[:k] = np.arange(k)  # every class present
    y[rng.random(shape) < ignore_fraction] = IGNORE_INDEX
    y.flat[0] = 0
    channels = 1 if k == 2 and seed % 2 == 0 else k
    x = (rng.normal(size=shape + (channels,)) * scale).astype(np.float32)
    return y, x


def value(loss, y, x, **kwargs):
    return float(loss(y, x, **kwargs))


# Every loss with a configuration that exercises its options; used by the property tests.
ALL_LOSSES = {
    "cross_entropy": lambda **kw: CrossEntropy(**kw),
    "cross_entropy_smoothed": lambda **kw: CrossEntropy(label_smoothing=0.1, **kw),
    "cost_sensitive": lambda **kw: CostSensitiveCrossEntropy(**kw),
    "focal": lambda **kw: FocalLoss(gamma=2.0, **kw),
    "dice": lambda **kw: DiceLoss(**kw),
    "jaccard": lambda **kw: JaccardLoss(**kw),
    "jaccard_per_image": lambda **kw: JaccardLoss(per_image=True, **kw),
    "tversky": lambda **kw: TverskyLoss(alpha=0.7, beta=0.3, **kw),
    "focal_tversky": lambda **kw: TverskyLoss(alpha=0.3, beta=0.7, gamma=0.75, **kw),
    "focal_tversky_high_gamma": lambda **kw: TverskyLoss(gamma=2.0, smooth=0.0, **kw),
}
OVERLAP = ["dice", "jaccard", "jaccard_per_image", "tversky", "focal_tversky"]


# --- cross-entropy ---------------------------------------------------------------------


@pytest.mark.parametrize("k", [2, 3, 5])
def test_cross_entropy_matches_keras_on_valid_pixels(k):
    y, x = random_case(k, seed=k)
    valid = y != IGNORE_INDEX
    ours = value(CrossEntropy(), y, x)
    if x.shape[-1] == 1:
        ref = keras.losses.BinaryCrossentropy(from_logits=True)(
            y[valid].astype(np.float32)[:, None], x[valid]
        )
    else:
        ref = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(y[valid], x[valid])
    np.testing.assert_allclose(ours, float(ref), rtol=1e-5)


@pytest.mark.parametrize("k", [2, 3])
def test_label_smoothing_matches_keras(k):
    y, x = random_case(k, seed=2 * k, ignore_fraction=0.0)
    if x.shape[-1] == 1:
        ref = keras.losses.BinaryCrossentropy(from_logits=True, label_smoothing=0.2)(
            y[..., None].astype(np.float32), x
        )
    else:
        ref = keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=0.2)(
            np.eye(k)[y], x
        )
    np.testing.assert_allclose(value(CrossEntropy(label_smoothing=0.2), y, x), float(ref), rtol=1e-5)


def test_weighted_cross_entropy_divides_by_valid_pixels_not_by_weights():
    # Binary, logits 0 => p = 0.5, every pixel costs ln 2 before weighting.
    # Pixels: fg (w=3), bg (w=1), ignored. Sum = 3 ln2 + ln2 = 4 ln2; valid pixels = 2.
    # => 2 ln2 (dividing by the weight sum 4 would give ln2).
    y = np.array([[[1, 0, IGNORE_INDEX]]])
    x = np.zeros((1, 1, 3, 1), np.float32)
    np.testing.assert_allclose(value(CrossEntropy(class_weights=[1.0, 3.0]), y, x), 2 * LN2, rtol=1e-6)


def test_cross_entropy_reductions_use_the_valid_mask():
    y, x = random_case(3, seed=5)
    per_pixel = CrossEntropy(reduction=None)(y, x).numpy()
    n_valid = int((y != IGNORE_INDEX).sum())
    assert per_pixel.shape == y.shape
    assert np.all(per_pixel[y == IGNORE_INDEX] == 0)
    np.testing.assert_allclose(value(CrossEntropy(reduction="sum"), y, x), per_pixel.sum(), rtol=1e-5)
    np.testing.assert_allclose(value(CrossEntropy(), y, x), per_pixel.sum() / n_valid, rtol=1e-5)


def test_all_pixels_ignored_gives_zero_not_nan():
    y = np.full((1, 2, 2), IGNORE_INDEX)
    x = np.ones((1, 2, 2, 3), np.float32)
    for make in ALL_LOSSES.values():
        assert value(make(), y, x) == 0.0


def test_sample_weight_follows_keras():
    y, x = random_case(3, seed=7, ignore_fraction=0.0)
    loss = CrossEntropy()
    per_pixel = CrossEntropy(reduction=None)(y, x).numpy()
    sw = np.zeros(y.shape, np.float32)
    sw[0] = 2.0  # weight image 0 twice, drop image 1
    np.testing.assert_allclose(value(loss, y, x, sample_weight=sw), 2 * per_pixel[0].sum() / y.size, rtol=1e-5)
    np.testing.assert_allclose(
        value(loss, y, x, sample_weight=np.array([2.0, 0.0])[:, None, None]),
        2 * per_pixel[0].sum() / y.size,
        rtol=1e-5,
    )


def test_labels_as_float_with_channel_axis_are_accepted():
    y, x = random_case(3, seed=8)
    expected = value(CrossEntropy(), y, x)
    assert value(CrossEntropy(), y[..., None].astype(np.float32), x) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("k", [2, 3])
def test_probabilities_input_equals_logits_input(k):
    y, x = random_case(k, seed=10 + k, scale=1.0)
    probs = 1 / (1 + np.exp(-x)) if x.shape[-1] == 1 else softmax(x)
    for name, make in ALL_LOSSES.items():
        a = value(make(), y, x)
        b = value(make(from_logits=False), y, probs.astype(np.float32))
        assert a == pytest.approx(b, rel=1e-4, abs=1e-6), name


# --- cost-sensitive --------------------------------------------------------------------


def numpy_cost_sensitive(y, x, costs, weights=None):
    """Independent reference: mean over valid pixels of w[y] * sum_j C[y][j] * -log(1 - p_j)."""
    p = softmax(x) if x.shape[-1] > 1 else np.concatenate([1 - 1 / (1 + np.exp(-x)), 1 / (1 + np.exp(-x))], -1)
    costs = np.asarray(costs, np.float64)
    w = np.ones(len(costs)) if weights is None else np.asarray(weights, np.float64)
    valid = y != IGNORE_INDEX
    yv, pv = y[valid], p[valid]
    per_pixel = w[yv] * np.sum(costs[yv] * -np.log(1 - pv), axis=-1)
    return per_pixel.mean()


def test_identity_costs_in_binary_equal_bce():
    y, x = random_case(2, seed=0)
    valid = y != IGNORE_INDEX
    bce = keras.losses.BinaryCrossentropy(from_logits=True)(y[valid].astype(np.float32)[:, None], x[valid])
    ours = value(CostSensitiveCrossEntropy(cost_matrix=[[0, 1], [1, 0]]), y, x)
    np.testing.assert_allclose(ours, float(bce), rtol=1e-5)


@pytest.mark.parametrize("k", [3, 4])
def test_identity_costs_multiclass_match_numpy_formula(k):
    y, x = random_case(k, seed=k)
    ours = value(CostSensitiveCrossEntropy(cost_matrix=1 - np.eye(k)), y, x)
    np.testing.assert_allclose(ours, numpy_cost_sensitive(y, x, 1 - np.eye(k)), rtol=1e-5)


def test_general_costs_and_weights_match_numpy_formula():
    y, x = random_case(3, seed=21)
    costs = [[0, 2, 5], [1, 0, 0.5], [3, 1, 0]]
    weights = [0.5, 1.0, 2.0]
    ours = value(CostSensitiveCrossEntropy(cost_matrix=costs, class_weights=weights), y, x)
    np.testing.assert_allclose(ours, numpy_cost_sensitive(y, x, costs, weights), rtol=1e-5)


def test_binary_costs_are_bce_with_fn_on_positives_and_fp_on_negatives():
    # C = [[0, fp], [fn, 0]], fp = 2, fn = 10, logit 0 on every pixel (p = 0.5):
    # fg pixel: fn * -log(1 - p_bg) = 10 ln2; bg pixel: fp * -log(1 - p_fg) = 2 ln2.
    # Mean over 2 valid pixels: 6 ln2.
    y = np.array([[[1, 0]]])
    x = np.zeros((1, 1, 2, 1), np.float32)
    loss = CostSensitiveCrossEntropy(cost_matrix=[[0, 2], [10, 0]])
    np.testing.assert_allclose(value(loss, y, x), 6 * LN2, rtol=1e-6)


def test_false_positive_costs_more_than_false_negative_when_fp_cost_is_higher():
    loss = CostSensitiveCrossEntropy(cost_matrix=[[0, 5], [1, 0]])  # fp_cost 5 > fn_cost 1
    confident_fp = value(loss, np.array([[[0]]]), np.full((1, 1, 1, 1), 4.0, np.float32))
    confident_fn = value(loss, np.array([[[1]]]), np.full((1, 1, 1, 1), -4.0, np.float32))
    assert confident_fp > confident_fn
    # softplus(4) = 4.01815: the fp costs 5x the fn.
    np.testing.assert_allclose([confident_fp, confident_fn], [5 * 4.0181499, 4.0181499], rtol=1e-5)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize(
    "make",
    [
        lambda ifn: CostSensitiveCrossEntropy(ignore_false_negatives=ifn),
        lambda ifn: CrossEntropy(ignore_false_negatives=ifn),
        lambda ifn: FocalLoss(ignore_false_negatives=ifn),
        lambda ifn: JaccardLoss(ignore_false_negatives=ifn),
        lambda ifn: TverskyLoss(alpha=0.7, beta=0.3, ignore_false_negatives=ifn),
    ],
)
def test_ignore_false_negatives_frees_misses_but_not_false_positives(make, channels):
    loss = make([1])
    miss = np.full((1, 1, 1, channels), -8.0, np.float32)  # confidently class 0
    claim = -miss if channels == 1 else np.full((1, 1, 1, channels), -8.0, np.float32)
    if channels > 1:
        miss[..., 0] = 8.0
        claim[..., 1] = 8.0  # confidently class 1
    assert value(loss, np.array([[[1]]]), miss) == pytest.approx(0.0, abs=1e-6)  # missed 1: free
    # One pixel: CE-like terms cost ~8, overlap terms on the foreground 1 - 1 / (1 + beta) with smooth 1
    # (Jaccard 0.5, Tversky with beta 0.3: 0.23).
    assert value(loss, np.array([[[0]]]), claim) > 0.2  # false positive of class 1: costs
    assert value(make([]), np.array([[[1]]]), miss) > 0.2  # without the option the miss costs


# --- focal -----------------------------------------------------------------------------


def test_focal_worked_example():
    # y = 1, p_fg = 0.9: (1 - 0.9)^2 * -ln 0.9 = 0.01 * 0.1053605 = 0.001053605; weight 2 doubles.
    loss = FocalLoss(gamma=2.0, class_weights=[1.0, 2.0])
    x = np.full((1, 1, 1, 1), logit(0.9), np.float32)
    np.testing.assert_allclose(value(loss, np.array([[[1]]]), x), 2 * 0.001053605, rtol=1e-5)


@pytest.mark.parametrize("k", [2, 3])
def test_focal_with_gamma_zero_is_cross_entropy(k):
    y, x = random_case(k, seed=30 + k)
    w = np.linspace(0.5, 2, k)
    assert value(FocalLoss(gamma=0.0, class_weights=w), y, x) == pytest.approx(
        value(CrossEntropy(class_weights=w), y, x), rel=1e-6
    )


def test_focal_matches_numpy():
    y, x = random_case(3, seed=33)
    p = softmax(x)
    valid = y != IGNORE_INDEX
    pt = p[valid][np.arange(valid.sum()), y[valid]]
    w = np.array([0.25, 1.0, 3.0])
    ref = np.mean(w[y[valid]] * (1 - pt) ** 1.5 * -np.log(pt))
    np.testing.assert_allclose(value(FocalLoss(gamma=1.5, class_weights=w), y, x), ref, rtol=1e-5)


# --- overlap losses --------------------------------------------------------------------

# Binary worked example: y = [1, 0], p_fg = [0.8, 0.4] => p_bg = [0.2, 0.6].
#   fg: TP = 0.8, FP = 0.4, FN = 0.2.   bg: TP = 0.6, FP = 0.2, FN = 0.4.
WORKED_Y = np.array([[[1, 0]]])
WORKED_X = logit([0.8, 0.4]).reshape(1, 1, 2, 1)


@pytest.mark.parametrize(
    "loss, expected",
    [
        # Jaccard with the background: fg 0.8/1.4 = 0.571429, bg 0.6/1.2 = 0.5 => 1 - 0.535714 = 0.464286.
        (JaccardLoss(smooth=0.0, include_background=True), 1 - (0.8 / 1.4 + 0.5) / 2),
        # smooth 1: fg 1.8/2.4 = 0.75, bg 1.6/2.2 = 0.727273 => 1 - 0.738636 = 0.261364.
        (JaccardLoss(include_background=True), 1 - (1.8 / 2.4 + 1.6 / 2.2) / 2),
        # foreground only (the default): 1 - 0.571429 = 0.428571.
        (JaccardLoss(smooth=0.0), 1 - 0.8 / 1.4),
        (JaccardLoss(smooth=0.0, include_background=False), 1 - 0.8 / 1.4),
        # default smooth 1, foreground only: 1 - 1.8/2.4 = 0.25.
        (JaccardLoss(), 1 - 1.8 / 2.4),
        # weights [1, 3] with the background: (1 * 0.5 + 3 * 0.428571) / 4 = 0.446429.
        (JaccardLoss(smooth=0.0, class_weights=[1, 3], include_background=True), (0.5 + 3 * (1 - 0.8 / 1.4)) / 4),
        # Dice with the background: fg 1.6/(1.6+0.4+0.2) = 0.727273, bg 1.2/(1.2+0.2+0.4) = 0.666667.
        (DiceLoss(smooth=0.0, include_background=True), 1 - (1.6 / 2.2 + 1.2 / 1.8) / 2),
        # Dice, foreground only (the default): 1 - 0.727273 = 0.272727.
        (DiceLoss(smooth=0.0), 1 - 1.6 / 2.2),
        # Tversky alpha (FP) = 0.7, beta (FN) = 0.3, fg only: 0.8 / (0.8 + 0.28 + 0.06) = 0.701754.
        (TverskyLoss(alpha=0.7, beta=0.3, smooth=0.0, include_background=False), 1 - 0.8 / 1.14),
        # Focal Tversky gamma 2 on the above: 0.298246^2 = 0.088951.
        (TverskyLoss(alpha=0.7, beta=0.3, gamma=2.0, smooth=0.0, include_background=False), (1 - 0.8 / 1.14) ** 2),
    ],
)
def test_overlap_worked_examples(loss, expected):
    np.testing.assert_allclose(value(loss, WORKED_Y, WORKED_X), expected, rtol=1e-5)


def test_tversky_alpha_weighs_false_positives():
    loss = TverskyLoss(alpha=0.9, beta=0.1, smooth=0.0, include_background=False)
    # Same soft counts mirrored: an extra predicted fg pixel (FP) vs a missed one (FN).
    y_fp, x_fp = np.array([[[1, 0]]]), logit([0.9, 0.9]).reshape(1, 1, 2, 1)  # TP .9, FP .9, FN .1
    y_fn, x_fn = np.array([[[1, 1]]]), logit([0.9, 0.1]).reshape(1, 1, 2, 1)  # TP 1, FP 0, FN 1
    assert value(loss, y_fp, x_fp) > value(loss, y_fn, x_fn)
    swapped = TverskyLoss(alpha=0.1, beta=0.9, smooth=0.0, include_background=False)
    assert value(swapped, y_fp, x_fp) < value(swapped, y_fn, x_fn)


def test_binary_tversky_default_keeps_the_asymmetry_alpha_and_beta_set():
    """4x4 patch, 8 foreground pixels: 4 false positives only vs 4 false negatives only, alpha 0.9, beta 0.1.

    Foreground only (the default): FP-only TI = 8 / (8 + 0.9 * 4) = 0.689655 -> loss 0.310345;
    FN-only TI = 4 / (4 + 0.1 * 4) = 0.909091 -> loss 0.090909. Averaging in the background would make both
    0.1799 (the background's FN is the foreground's FP), cancelling the asymmetry.
    """
    y = np.zeros((1, 4, 4), np.int32)
    y[0, :2] = 1  # 8 foreground pixels
    p_fp = y[..., None].astype(np.float64)
    p_fp[0, 2, :, 0] = 1.0  # + 4 false positives
    p_fn = y[..., None].astype(np.float64)
    p_fn[0, 1, :, 0] = 0.0  # 4 of the 8 missed
    for make in (lambda **kw: TverskyLoss(alpha=0.9, beta=0.1, smooth=0.0, from_logits=False, **kw),
                 lambda **kw: TverskyLoss(alpha=0.9, beta=0.1, smooth=0.0, from_logits=False, class_weights=[1, 1], **kw)):
        fp_only, fn_only = value(make(), y, p_fp.astype(np.float32)), value(make(), y, p_fn.astype(np.float32))
        np.testing.assert_allclose([fp_only, fn_only], [1 - 8 / 11.6, 1 - 4 / 4.4], rtol=1e-5)
        assert fp_only > fn_only
        both = make(include_background=True)
        assert value(both, y, p_fp.astype(np.float32)) == pytest.approx(value(both, y, p_fn.astype(np.float32)), rel=1e-5)
    # the same rule for several classes: class 0 is the background and is left out by default
    y3, x3 = random_case(3, seed=45, ignore_fraction=0.0)
    fg = value(TverskyLoss(alpha=0.9, beta=0.1, class_weights=[0, 1, 1], include_background=True), y3, x3)
    assert value(TverskyLoss(alpha=0.9, beta=0.1), y3, x3) == pytest.approx(fg, rel=1e-6)


@pytest.mark.parametrize("alpha, beta", [(0.7, 0.3), (0.2, 0.8), (0.5, 0.5)])
def test_tversky_matches_keras_with_alpha_and_beta_swapped(alpha, beta):
    # Keras before PR 23333 (3.15.1 is installed here) multiplies `alpha` by sum((1 - p) * t),
    # i.e. the FALSE NEGATIVES. Our alpha weighs FALSE POSITIVES, so our (alpha, beta) equals
    # keras.losses.Tversky(alpha=beta, beta=alpha). Foreground only, no smoothing, pooled.
    y, x = random_case(2, seed=40, ignore_fraction=0.0)
    ours = value(TverskyLoss(alpha=alpha, beta=beta, smooth=0.0, include_background=False), y, x)
    p = 1 / (1 + np.exp(-x.astype(np.float64)))
    ref = keras.losses.Tversky(alpha=beta, beta=alpha)(y[..., None].astype(np.float32), p.astype(np.float32))
    np.testing.assert_allclose(ours, float(ref), rtol=1e-5)


def test_dice_matches_keras_dice_per_class():
    # keras.losses.Dice (1 - 2 sum(t p) / (sum t + sum p)) on each class channel, averaged.
    k = 3
    y, x = random_case(k, seed=41, ignore_fraction=0.0)
    p = softmax(x).astype(np.float32)
    t = np.eye(k, dtype=np.float32)[y]
    ref = np.mean([float(keras.losses.Dice()(t[..., c], p[..., c])) for c in range(k)])
    np.testing.assert_allclose(value(DiceLoss(smooth=0.0, include_background=True), y, x), ref, rtol=1e-5)
    # the default scores the foreground classes 1 .. k-1 only
    ref_fg = np.mean([float(keras.losses.Dice()(t[..., c], p[..., c])) for c in range(1, k)])
    np.testing.assert_allclose(value(DiceLoss(smooth=0.0), y, x), ref_fg, rtol=1e-5)


def test_jaccard_matches_numpy_iou_formula():
    k = 4
    y, x = random_case(k, seed=42)
    p = softmax(x)
    valid = (y != IGNORE_INDEX)[..., None]
    t = np.eye(k)[np.where(y < 0, 0, y)] * valid
    p = p * valid
    tp, fp, fn = (t * p).sum((0, 1, 2)), ((1 - t) * p * valid).sum((0, 1, 2)), (t * (1 - p)).sum((0, 1, 2))
    ref = 1 - (tp + 1) / (tp + fp + fn + 1)
    np.testing.assert_allclose(value(JaccardLoss(include_background=True), y, x), ref.mean(), rtol=1e-5)
    np.testing.assert_allclose(value(JaccardLoss(), y, x), ref[1:].mean(), rtol=1e-5)


def test_dice_and_jaccard_are_tversky_special_cases():
    y, x = random_case(3, seed=43)
    assert value(DiceLoss(), y, x) == pytest.approx(value(TverskyLoss(alpha=0.5, beta=0.5), y, x), rel=1e-7)
    assert value(JaccardLoss(), y, x) == pytest.approx(value(TverskyLoss(alpha=1.0, beta=1.0), y, x), rel=1e-7)


def test_absent_class_is_left_out_of_the_average():
    # Three classes; the batch holds classes 0 and 1 only and nothing is predicted as 2.
    y = np.array([[[0, 1, 1, 0]]])
    x = np.zeros((1, 1, 4, 3), np.float32)
    x[..., 0] = logit([0.7, 0.3, 0.4, 0.6])  # logits chosen so arg-max is 0 or 1, never 2
    x[..., 1] = logit([0.3, 0.7, 0.6, 0.4])
    x[..., 2] = -20.0
    p = softmax(x)[0, 0]
    # Jaccard with smooth 1 per class: (TP + 1) / (sum p + sum t - TP + 1)
    per_class = []
    for c in (0, 1):
        tp = p[y[0, 0] == c, c].sum()
        per_class.append(1 - (tp + 1) / (p[:, c].sum() + (y == c).sum() - tp + 1))
    got = value(JaccardLoss(include_background=True), y, x)
    np.testing.assert_allclose(got, np.mean(per_class), rtol=1e-4)  # mean over 2 classes
    assert abs(got - np.sum(per_class) / 3) > 0.05  # not over 3 with a ~0 term for class 2
    # Predicting class 2 somewhere makes it present: its false positives now count.
    x2 = x.copy()
    x2[0, 0, 0, 2] = 5.0
    assert value(JaccardLoss(include_background=True), y, x2) > got
    # Foreground only (the default): class 1 alone, not averaged with an absent class 2.
    np.testing.assert_allclose(value(JaccardLoss(), y, x), per_class[1], rtol=1e-4)


def test_per_image_is_the_mean_of_single_image_losses():
    y, x = random_case(3, seed=44)
    single = [value(JaccardLoss(), y[i : i + 1], x[i : i + 1]) for i in range(len(y))]
    np.testing.assert_allclose(value(JaccardLoss(per_image=True), y, x), np.mean(single), rtol=1e-5)
    assert value(JaccardLoss(), y, x) != pytest.approx(np.mean(single), rel=1e-3)


# --- properties shared by all losses -----------------------------------------------------


def confident(y, k, margin=30.0):
    """Logits (B, H, W, C) predicting y with logits +-margin (ignored pixels: any class)."""
    y = np.where(y < 0, 0, y)
    if k == 2:
        return np.where(y == 1, margin, -margin)[..., None].astype(np.float32)
    return (np.eye(k)[y] * 2 * margin - margin).astype(np.float32)


@pytest.mark.parametrize("name", OVERLAP + ["focal"])
@pytest.mark.parametrize("k", [2, 3])
def test_perfect_prediction_scores_zero(name, k):
    y, _ = random_case(k, seed=50)
    assert value(ALL_LOSSES[name](), y, confident(y, k)) == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("name", list(ALL_LOSSES))
@pytest.mark.parametrize("k", [2, 3])
def test_ignored_pixels_change_nothing(name, k):
    y, x = random_case(k, seed=k)
    changed = x.copy()
    rng = np.random.default_rng(1)
    changed[y == IGNORE_INDEX] = rng.normal(size=changed[y == IGNORE_INDEX].shape) * 20
    loss = ALL_LOSSES[name]()
    assert value(loss, y, changed) == pytest.approx(value(loss, y, x), rel=1e-6, abs=1e-7)


@pytest.mark.parametrize("name", list(ALL_LOSSES))
def test_unit_weights_equal_unweighted(name):
    y, x = random_case(3, seed=60)
    make = ALL_LOSSES[name]
    assert value(make(class_weights=[1, 1, 1]), y, x) == pytest.approx(value(make(), y, x), rel=1e-6)


@pytest.mark.parametrize("name", list(ALL_LOSSES))
@pytest.mark.parametrize("k", [2, 4])
def test_good_prediction_scores_lower_than_bad(name, k):
    y, _ = random_case(k, seed=61)
    good = confident(y, k, margin=2.0)
    wrong = np.where(y < 0, 0, (np.where(y < 0, 0, y) + 1) % k)
    bad = confident(wrong, k, margin=2.0)
    loss = ALL_LOSSES[name]()
    assert value(loss, y, good) < value(loss, y, bad)


def gradient(loss, y, x, dtype=tf.float32):
    logits = tf.Variable(tf.cast(x, dtype))
    with tf.GradientTape() as tape:
        out = loss(y, logits)
    return out, tape.gradient(out, logits)


@pytest.mark.parametrize("name", list(ALL_LOSSES))
@pytest.mark.parametrize("k", [2, 3])
def test_values_and_gradients_finite_at_extreme_logits(name, k):
    y, _ = random_case(k, seed=70)
    rng = np.random.default_rng(0)
    right = confident(y, k)
    wrong = confident((np.where(y < 0, 0, y) + 1) % k, k)
    mixed = np.where(rng.random(right.shape) < 0.5, right, wrong)
    for x in (right, wrong, mixed):
        out, grad = gradient(ALL_LOSSES[name](), y, x)
        assert np.isfinite(out.numpy()) and np.all(np.isfinite(grad.numpy())), name


@pytest.mark.parametrize("name", list(ALL_LOSSES))
def test_float16_logits_give_float32_loss_and_finite_gradients(name):
    y, _ = random_case(3, seed=71)
    x = confident((np.where(y < 0, 0, y) + 1) % 3, 3)
    out, grad = gradient(ALL_LOSSES[name](), y, x, dtype=tf.float16)
    assert out.dtype == tf.float32 and grad.dtype == tf.float16
    assert np.isfinite(out.numpy()) and np.all(np.isfinite(grad.numpy().astype(np.float32)))


@pytest.fixture
def mixed_precision():
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


def test_losses_under_mixed_precision_policy(mixed_precision):
    y, _ = random_case(2, seed=72)
    x = confident((np.where(y < 0, 0, y) + 1) % 2, 2)
    layer = keras.layers.Dense(1)  # a float16 layer output, as from a mixed-precision model
    for name, make in ALL_LOSSES.items():
        loss = make()
        assert loss.dtype == "float32"
        out, grad = gradient(loss, y, x, dtype=tf.float16)
        assert out.dtype == tf.float32, name
        assert np.isfinite(out.numpy()) and np.all(np.isfinite(grad.numpy().astype(np.float32))), name
    assert layer(np.ones((1, 2), np.float32)).dtype == tf.float16  # the policy was active


def test_softmax_log_one_minus_p_is_accurate():
    x = np.array([[30.0, -30.0, 0.0], [1.0, 2.0, 3.0], [-5.0, 25.0, 24.0], [7.0, 7.0, -30.0]], np.float32)
    log_p, log_1mp = functional.log_probabilities(tf.constant(x))
    p = softmax(x)
    # Reference log(1 - p_j) = log(sum_{j' != j} p_j'), computed in float64 without cancellation.
    ref = np.log(np.stack([np.delete(p, j, axis=1).sum(-1) for j in range(3)], -1))
    np.testing.assert_allclose(log_p.numpy(), np.log(p), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(log_1mp.numpy(), ref, rtol=1e-5, atol=1e-6)
    assert log_1mp.numpy()[0, 0] == pytest.approx(np.log(np.exp(-60) + np.exp(-30)), rel=1e-5)


def test_tf_function_gives_the_eager_value():
    y, x = random_case(3, seed=80)
    for name, make in ALL_LOSSES.items():
        loss = make()
        traced = tf.function(lambda a, b: loss(a, b))
        assert float(traced(tf.constant(y), tf.constant(x))) == pytest.approx(value(loss, y, x), rel=1e-6), name


# --- combination and serialisation -----------------------------------------------------


def test_combined_loss_is_the_weighted_sum_of_terms():
    y, x = random_case(3, seed=90)
    ce, jac = CrossEntropy(class_weights=[1, 2, 3]), JaccardLoss(per_image=True)
    combined = CombinedLoss([(1.0, ce), (0.5, jac)])
    assert value(combined, y, x) == pytest.approx(value(ce, y, x) + 0.5 * value(jac, y, x), rel=1e-6)
    terms = combined.term_values(y, x)
    assert set(terms) == {"cross_entropy", "jaccard"}


@pytest.mark.parametrize("name", list(ALL_LOSSES))
def test_config_round_trip(name):
    y, x = random_case(3, seed=91)
    loss = ALL_LOSSES[name](class_weights=[1, 2, 0.5], ignore_false_negatives=[2])
    clone = keras.losses.deserialize(keras.losses.serialize(loss))
    assert type(clone) is type(loss) and clone.get_config() == loss.get_config()
    assert value(clone, y, x) == pytest.approx(value(loss, y, x), rel=1e-6)


def test_combined_config_round_trip():
    y, x = random_case(3, seed=92)
    loss = CombinedLoss([(1.0, CostSensitiveCrossEntropy(cost_matrix=[[0, 1, 2], [1, 0, 1], [5, 1, 0]])), (0.3, DiceLoss())])
    clone = keras.losses.deserialize(keras.losses.serialize(loss))
    assert value(clone, y, x) == pytest.approx(value(loss, y, x), rel=1e-6)


@pytest.mark.parametrize("name", ["jaccard", "dice", "tversky"])
def test_ignore_false_negatives_still_rewards_hits_in_overlap_losses(name):
    """Misses of an ignored-FN class are free, but its hits still lower an overlap loss."""
    from segtrain.losses import functional as F

    y_true = np.zeros((1, 1, 6), np.int32)
    y_true[..., :3] = 1  # three foreground pixels
    confident = 12.0

    def logits(fg_pixels):  # one sigmoid channel: + at fg_pixels, - elsewhere
        x = np.full((1, 1, 6, 1), -confident, np.float32)
        x[0, 0, list(fg_pixels), 0] = confident
        return x

    loss = getattr(F, name)
    free = dict(ignore_false_negatives=[1], smooth=1.0)
    perfect = float(loss(y_true, logits([0, 1, 2]), **free))
    all_missed = float(loss(y_true, logits([]), **free))
    # without false positives a miss is free: both score (almost) zero
    assert perfect == pytest.approx(0.0, abs=1e-4) and all_missed == pytest.approx(0.0, abs=1e-4)
    # with the same false positive (pixel 5), hitting the three foreground pixels scores lower
    hits_and_fp = float(loss(y_true, logits([0, 1, 2, 5]), **free))
    misses_and_fp = float(loss(y_true, logits([5]), **free))
    assert hits_and_fp < misses_and_fp - 0.05
