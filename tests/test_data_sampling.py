"""Class-aware crop sampling (data.sampling): config checks, the recorded class locations, the draw in the
pipeline (shares, fallback, purity in (seed, element index)), the expected sampled frequencies, the class weights
from them (loss.class_weights_from), and exact resume of a sampled run.
"""

import json
import math
import signal

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from segtrain.class_weights import class_stats_dict
from segtrain.config import DataConfig, MaskConfig, config_from_dict
from segtrain.data.masks import MaskMapping
from segtrain.data.pipeline import DataSpec, SamplingTable, sampled_centre, training_dataset
from segtrain.data.sampling import ClassLocations, resize_nearest
from segtrain.data.scan import scan_training_set
from segtrain.errors import ConfigError
from segtrain.labels import IGNORE_INDEX
from tests.helpers import Interruption, history, invoke, weights_of, write_config, write_pair

SIZE, CROP, N_TRAIN = 48, 16, 8
HOLDERS = (0, 1, 2, 3, 4, 5)  # the images holding the rare class; images 6 and 7 hold none


def make_spots_dataset(root, n_train=N_TRAIN, n_val=2, size=SIZE, seed=0):
    """A 3x3 bright spot (mask 255) on dark noise in the images of HOLDERS, none in the others; channel 2 of
    image i is the constant 10 + 20 i, so a crop tells which image it came from."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", n_train), ("val", n_val)):
        for i in range(count):
            mask = np.zeros((size, size), np.uint8)
            if split == "val" or i in HOLDERS:
                y, x = rng.integers(0, size - 3, 2)
                mask[y : y + 3, x : x + 3] = 255
            image = rng.integers(0, 60, (size, size, 3)).astype(np.uint8)
            image[mask > 0, :2] = 230
            image[..., 2] = 10 + 20 * i
            write_pair(root, split, f"img{i:02d}", image, mask)
    return root


@pytest.fixture(scope="module")
def spots(tmp_path_factory):
    return make_spots_dataset(tmp_path_factory.mktemp("spots") / "data")


def data_config(root, sampling, **kwargs):
    values = dict(crop=CROP, batch_size=1, cache="memory")
    values.update(kwargs)
    return DataConfig(root=str(root), classes=["bg", "spot"], mask=MaskConfig(threshold=127), sampling=sampling,
                      **values)


def pipeline(root, sampling, seed=3, start_element=0, cache_dir=None, **kwargs):
    """The training pipeline of `root` as fit builds it (statistics pass first), and its training pairs."""
    data = data_config(root, sampling, **kwargs)
    train = scan_training_set(data)
    spec = DataSpec(data, MaskMapping(data.mask, data.classes), train.channels, 8, seed, train.counter.locations)
    return training_dataset(train.pairs, spec, cache_dir, start_element=start_element), train


def crops(ds, n):
    """The first n (image, mask) crops of a pipeline, unbatched, as NumPy."""
    images, masks = [], []
    for image, mask in ds.unbatch().take(n):
        images.append(image.numpy())
        masks.append(mask.numpy())
    return np.stack(images), np.stack(masks)


def image_ids(images):
    return np.rint((images[:, 0, 0, 2] - 10) / 20).astype(int)


# ---------------------------------------------------------------------------- config


BASE = {"data": {"root": "x", "classes": ["background", "crack"], "crop": 32}, "model": {"depth": 2}}


def config_with(data=None, loss=None):
    raw = json.loads(json.dumps(BASE))
    raw["data"].update(data or {})
    if loss is not None:
        raw["loss"] = loss
    return config_from_dict(raw)


@pytest.mark.parametrize("data, message", [
    ({"sampling": {"crak": 0.5}}, "data.sampling.crak: unknown class 'crak'; valid classes: background, crack."),
    ({"sampling": {"crack": 1.5}}, "data.sampling.crack: a share of the training crops must be in [0, 1], got 1.5"),
    ({"sampling": {"crack": -0.1}}, "data.sampling.crack: a share of the training crops must be in [0, 1]"),
    ({"sampling": {"crack": 0.7, "background": 0.6}}, "data.sampling: the shares sum to 1.3 > 1"),
    ({"sampling": {"crack": 0.5}, "crop": None}, "data.sampling: class-aware sampling centres training crops on "
                                                 "class pixels and needs data.crop"),
    ({"sampling": {"crack": "half"}}, "data.sampling.crack: expected a number, got 'half'."),
    ({"sampling": [0.5]}, "data.sampling: expected a mapping"),
])
def test_sampling_config_errors_name_the_key(data, message):
    with pytest.raises(ConfigError) as err:
        config_with(data)
    assert message in str(err.value)


def test_sampling_and_class_weights_from_defaults_and_values():
    config = config_with()
    assert config.data.sampling == {} and config.loss.class_weights_from == "sampled"
    config = config_with({"sampling": {"crack": 1.0}}, {"name": "jaccard", "class_weights_from": "data"})
    assert config.data.sampling == {"crack": 1.0} and config.loss.class_weights_from == "data"
    with pytest.raises(ConfigError, match=r"loss.class_weights_from: 'sampeld' is not one of data, sampled. "
                                          r"Did you mean 'sampled'\?"):
        config_with(loss={"class_weights_from": "sampeld"})


# ---------------------------------------------------------------------------- recorded locations


def test_recorded_coordinates_are_pixels_of_their_class_and_bounded():
    rng = np.random.default_rng(1)
    many = np.zeros((40, 50), np.int32)
    many[rng.random((40, 50)) < 0.2] = 1  # about 400 pixels of class 1
    many[0, :3] = IGNORE_INDEX
    few = np.zeros((40, 50), np.int32)
    few[[3, 7, 30], [4, 49, 0]] = 1
    none = np.zeros((30, 20), np.int32)
    locations = ClassLocations(2, {1: 0.5}, crop=16)
    for mask in (many, few, none):
        locations.update(mask)
    points, counts = locations.points, locations.counts
    assert points.dtype == np.int32 and points.shape == (3, 1, 32, 2)
    assert counts.tolist() == [[32], [3], [0]]
    rows, cols = points[0, 0, :, 0], points[0, 0, :, 1]
    assert (many[rows, cols] == 1).all() and len(set(zip(rows, cols))) == 32  # distinct pixels of class 1
    assert sorted(map(tuple, points[1, 0, :3])) == [(3, 4), (7, 49), (30, 0)]
    again = ClassLocations(2, {1: 0.5}, crop=16)
    again.update(many)
    np.testing.assert_array_equal(again.points[0], points[0])  # seeded by (seed, image index)


def _window_histogram(mask, top, left, crop, k):
    window = mask[top : top + crop, left : left + crop]  # a smaller image is padded with ignored pixels
    hist = np.bincount(window[window != IGNORE_INDEX].ravel(), minlength=k).astype(float)
    return hist, np.where(hist > 0, hist.sum(), 0.0)


def test_window_histograms_match_a_brute_force_count():
    """Summed-area sums against slicing every window: uniform positions, centred windows clipped to the image,
    images smaller than the crop (padding counts nowhere) and ignored pixels."""
    rng = np.random.default_rng(3)
    crop, k = 8, 3
    masks = [rng.integers(0, 3, shape).astype(np.int32) for shape in ((20, 13), (8, 30), (5, 6), (9, 9))]
    masks[0][rng.random(masks[0].shape) < 0.2] = IGNORE_INDEX
    masks[2][masks[2] == 2] = 0  # an image without class 2: its centred histogram falls back to uniform
    locations = ClassLocations(k, {1: 0.25, 2: 0.5}, crop=crop, max_points=4)
    uniform, centred = np.zeros((2, k)), np.zeros((2, 2, k))
    for i, mask in enumerate(masks):
        locations.update(mask)
        h, w = mask.shape
        windows = [_window_histogram(mask, t, l, crop, k) for t in range(max(h - crop, 0) + 1)
                   for l in range(max(w - crop, 0) + 1)]
        u = np.mean(windows, axis=0)
        uniform += u
        for j in range(2):
            n = locations.counts[i, j]
            if n == 0:
                centred[:, j] += u
                continue
            at = [_window_histogram(mask, min(max(y - crop // 2, 0), max(h - crop, 0)),
                                    min(max(x - crop // 2, 0), max(w - crop, 0)), crop, k)
                  for y, x in locations.points[i, j, :n]]
            centred[:, j] += np.mean(at, axis=0)
    assert locations.counts[2, 1] == 0 and (locations.counts[[0, 1, 3]] == 4).all()
    np.testing.assert_allclose(locations.uniform, uniform[0])
    np.testing.assert_allclose(locations.uniform_holding, uniform[1])
    np.testing.assert_allclose(locations.centred, centred[0])
    np.testing.assert_allclose(locations.centred_holding, centred[1])
    counts, holding = locations.expected_counts()
    np.testing.assert_allclose(counts, (0.25 * centred[0, 0] + 0.5 * centred[0, 1] + 0.25 * uniform[0]) / 4)
    np.testing.assert_allclose(holding, (0.25 * centred[1, 0] + 0.5 * centred[1, 1] + 0.25 * uniform[1]) / 4)


def test_locations_round_trip_through_the_run_file(tmp_path):
    locations = ClassLocations(3, {1: 0.25, 2: 0.5}, crop=8, resize=[10, 12])
    for seed in range(3):
        locations.update(np.random.default_rng(seed).integers(0, 3, (16, 16)).astype(np.int32))
    locations.save(tmp_path / "class_locations.npz")
    loaded = ClassLocations.load(tmp_path / "class_locations.npz")
    for name in ("points", "counts", "uniform", "centred", "uniform_holding", "centred_holding"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(locations, name), err_msg=name)
    assert loaded.matches({1: 0.25, 2: 0.5}, 8, [10, 12])
    assert not loaded.matches({1: 0.25, 2: 0.4}, 8, [10, 12]) and not loaded.matches({1: 0.25, 2: 0.5}, 16, [10, 12])


@pytest.mark.parametrize("shape, size", [((48, 48), (20, 30)), ((37, 53), (64, 16)), ((10, 7), (10, 7))])
def test_resize_nearest_matches_tensorflow(shape, size):
    mask = np.random.default_rng(0).integers(0, 5, shape).astype(np.int32)
    expected = tf.image.resize(mask[..., None], size, method="nearest")[..., 0].numpy()
    np.testing.assert_array_equal(resize_nearest(mask, size), expected)


def test_scan_records_locations_in_the_resized_frame(spots):
    data = data_config(spots, {"spot": 0.5}, resize=[24, 40])
    train = scan_training_set(data)
    locations = train.counter.locations
    assert locations.num_images == N_TRAIN
    mapping = MaskMapping(data.mask, data.classes)
    for i, pair in enumerate(train.pairs):
        raw = (np.asarray(Image.open(pair.mask)) > 127).astype(np.int32)
        resized = tf.image.resize(raw[..., None], [24, 40], method="nearest")[..., 0].numpy()
        n = locations.counts[i, 0]
        assert n == min(32, int((resized == 1).sum()))
        pts = locations.points[i, 0, :n]
        assert (resized[pts[:, 0], pts[:, 1]] == 1).all()
    assert set(np.flatnonzero(locations.counts[:, 0] == 0)) <= {6, 7}
    assert mapping.describe()


def test_no_sampling_records_nothing(spots):
    assert scan_training_set(data_config(spots, {})).counter.locations is None


# ---------------------------------------------------------------------------- the draw


def test_share_one_centres_every_crop_on_the_class_and_falls_back_to_uniform(spots):
    n = 4 * N_TRAIN  # four epochs, flips and turns on
    sampled_images, sampled_masks = crops(pipeline(spots, {"spot": 1.0})[0], n)
    uniform_images, uniform_masks = crops(pipeline(spots, {})[0], n)
    ids = image_ids(sampled_images)
    np.testing.assert_array_equal(ids, image_ids(uniform_images))  # the same images in the same order
    holders = np.isin(ids, HOLDERS)
    assert holders.sum() == 4 * len(HOLDERS)
    for i in np.flatnonzero(holders):
        assert (sampled_masks[i] == 1).sum() > 0, f"crop {i} of image {ids[i]} misses the spot"
    # without sampling, some crops of the same images miss it: the check above can fail
    assert min((uniform_masks[i] == 1).sum() for i in np.flatnonzero(holders)) == 0
    # an image without the class gets today's uniform crop, bit for bit
    for i in np.flatnonzero(~holders):
        np.testing.assert_array_equal(sampled_images[i], uniform_images[i])
        np.testing.assert_array_equal(sampled_masks[i], uniform_masks[i])


@pytest.mark.parametrize("cache", ["none", "disk"])
def test_sampling_with_streaming_and_disk_cache(spots, tmp_path, cache):
    images, masks = crops(pipeline(spots, {"spot": 1.0}, cache=cache, cache_dir=tmp_path / "cache")[0], 2 * N_TRAIN)
    ids = image_ids(images)
    assert sorted(ids) == sorted(list(range(N_TRAIN)) * 2)
    for i in np.flatnonzero(np.isin(ids, HOLDERS)):
        assert (masks[i] == 1).sum() > 0


def _slot_table():
    """Three classes: class 1 lies in rows 0-3, class 2 in rows 28-31 of every image."""
    locations = ClassLocations(3, {1: 0.3, 2: 0.2}, crop=8)
    for _ in range(5):
        mask = np.zeros((32, 32), np.int32)
        mask[:4] = 1
        mask[28:] = 2
        locations.update(mask)
    return SamplingTable(locations)


def _draws(table, n, seed):
    base = tf.constant([seed, 0], tf.int64)

    def draw(i):
        element_seed = base + tf.stack([tf.constant(0, tf.int64), i])
        centred, row, col = sampled_centre(element_seed, tf.cast(i % 5, tf.int32), table)
        return centred, row, col

    out = list(tf.data.Dataset.range(n).map(draw).batch(n))[0]
    return [t.numpy() for t in out]


def test_empirical_shares_match_the_configured_shares():
    n = 20000
    centred, rows, _ = _draws(_slot_table(), n, seed=7)
    measured = {"spot1": np.mean(centred & (rows < 4)), "spot2": np.mean(centred & (rows >= 28)),
                "uniform": np.mean(~centred)}
    assert np.all((rows[centred] < 4) | (rows[centred] >= 28))  # a centred draw sits on a recorded point
    for name, share in (("spot1", 0.3), ("spot2", 0.2), ("uniform", 0.5)):
        # each element picks a slot independently: the count is Binomial(n, share); 5 standard deviations
        tolerance = 5 * math.sqrt(share * (1 - share) / n)
        print(f"{name}: configured {share}, measured {measured[name]:.4f} (tolerance {tolerance:.4f})")
        assert abs(measured[name] - share) < tolerance


def test_the_draw_is_a_pure_function_of_seed_and_element_index(spots):
    table = _slot_table()
    first, second, other = _draws(table, 64, 7), _draws(table, 64, 7), _draws(table, 64, 8)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(first, other))
    # through the pipeline: the same seed gives the same crops, a resumed pipeline the same tail, another seed others
    n = 3 * N_TRAIN
    images, masks = crops(pipeline(spots, {"spot": 0.5})[0], n)
    again_images, again_masks = crops(pipeline(spots, {"spot": 0.5})[0], n)
    tail_images, tail_masks = crops(pipeline(spots, {"spot": 0.5}, start_element=10)[0], n - 10)
    other_images, _ = crops(pipeline(spots, {"spot": 0.5}, seed=4)[0], n)
    np.testing.assert_array_equal(images, again_images)
    np.testing.assert_array_equal(masks, again_masks)
    np.testing.assert_array_equal(images[10:], tail_images)
    np.testing.assert_array_equal(masks[10:], tail_masks)
    assert not np.array_equal(images, other_images)


# ---------------------------------------------------------------------------- expected frequencies and weights


def test_expected_sampled_frequencies_match_an_empirical_count(spots):
    ds, train = pipeline(spots, {"spot": 0.5}, batch_size=32)
    stats = class_stats_dict(train.counter, ["bg", "spot"], "balanced")
    expected = stats["sampled_frequencies"][1]
    n = 250 * N_TRAIN  # 250 epochs of crops
    _, masks = crops(ds, n)
    assert (masks != IGNORE_INDEX).all()  # no padding: every crop has CROP**2 valid pixels
    per_crop = (masks == 1).mean(axis=(1, 2))
    measured = per_crop.mean()
    # the pooled frequency is the mean of the per-crop fractions; its standard error from their spread
    tolerance = 5 * per_crop.std(ddof=1) / math.sqrt(n)
    print(f"spot: data frequency {stats['frequencies'][1]:.5f}, expected sampled {expected:.5f}, "
          f"measured {measured:.5f} (tolerance {tolerance:.5f})")
    assert abs(measured - expected) < tolerance
    assert expected - stats["frequencies"][1] > 3 * tolerance  # sampling really changes what the model sees


def test_class_weights_from_sampled_or_data_frequencies(spots):
    counter = scan_training_set(data_config(spots, {"spot": 0.5})).counter
    sampled = class_stats_dict(counter, ["bg", "spot"], "balanced", None, "sampled")
    data = class_stats_dict(counter, ["bg", "spot"], "balanced", None, "data")
    # balanced, scaled so that sum_c p_c w_c = 1: w_c = 1 / (K p_c) under the frequencies it was computed from
    np.testing.assert_allclose(sampled["class_weights"], 1 / (2 * np.asarray(sampled["sampled_frequencies"])))
    np.testing.assert_allclose(data["class_weights"], 1 / (2 * np.asarray(data["frequencies"])))
    assert sampled["class_weights"][1] < data["class_weights"][1] / 2
    assert sampled["sampling"] == {"spot": 0.5} and sampled["class_weights_from"] == "sampled"
    # median_frequency too: sampled uses the crop analogue of image_pixels
    assert sampled["weights"]["median_frequency"] != data["weights"]["median_frequency"]
    # without sampling, sampled is data, bit for bit
    plain = scan_training_set(data_config(spots, {})).counter
    for strategy in ("balanced", "median_frequency"):
        a = class_stats_dict(plain, ["bg", "spot"], strategy, None, "sampled")
        b = class_stats_dict(plain, ["bg", "spot"], strategy, None, "data")
        assert a["class_weights"] == b["class_weights"] and a["sampled_frequencies"] == a["frequencies"]
        assert "sampling" not in a


SAMPLING_TINY = {
    "model": {"depth": 2, "base_filters": 4},
    "data": {"classes": ["background", "spot"], "mask": {"threshold": 127}, "crop": 16, "batch_size": 4,
             "sampling": {"spot": 0.5}},
    "loss": {"terms": [{"name": "cross_entropy"}], "class_weights": "balanced"},
    "train": {"epochs": 2, "steps_per_epoch": 2, "learning_rate": 0.01, "seed": 1},
}


def test_stats_prints_the_sampled_frequencies(spots, tmp_path):
    config = write_config(tmp_path / "c.yaml", spots, base=SAMPLING_TINY)
    result = invoke("stats", config)
    assert result.exit_code == 0, result.output
    assert "sampled" in result.output.splitlines()[1]  # the table's header has the sampled column
    assert "under data.sampling (spot 0.5)" in result.output
    stats = json.loads(invoke("stats", config, "--json").output)
    assert stats["sampled_frequencies"][1] > stats["frequencies"][1]


# ---------------------------------------------------------------------------- end to end: fit and exact resume


@pytest.mark.slow
def test_fit_with_sampling_and_sigterm_resume_ends_with_the_same_weights(tmp_path):
    root = make_spots_dataset(tmp_path / "data")
    config = write_config(
        tmp_path / "sampling.yaml", root, base=SAMPLING_TINY, model={"depth": 2, "base_filters": 4, "dropout": 0.3},
        train={"epochs": 3, "steps_per_epoch": 4, "checkpoint_every_steps": 3, "learning_rate": 0.01, "seed": 1,
               "deterministic": True},
    )
    stopped = Interruption(config, tmp_path / "stopped", signal.SIGTERM)
    result = invoke("fit", config, "--out", tmp_path / "full")
    assert result.exit_code == 0, result.output
    full = tmp_path / "full"
    stats = json.loads((full / "class_stats.json").read_text())
    assert stats["sampling"] == {"spot": 0.5} and stats["class_weights_from"] == "sampled"
    assert ClassLocations.load(full / "class_locations.npz").counts.shape == (N_TRAIN, 1)

    stopped.finish()
    run = stopped.run
    assert stopped.proc.returncode == 130, stopped.output[-3000:]
    assert not (run / "metrics.json").exists()
    result = invoke("fit", run / "config.yaml", "--out", run, "--resume")
    assert result.exit_code == 0, result.output
    assert "Resuming" in result.output
    for name in ("last.keras", "best.keras"):
        for a, b in zip(weights_of(run / name), weights_of(full / name)):
            np.testing.assert_array_equal(a, b, err_msg=name)
    assert history(run) == history(full)
    assert json.loads((run / "class_stats.json").read_text()) == stats

    # resuming with other sampling settings is refused, naming the key
    # the resume reads the locations back from the run folder, and refuses ones recorded for other settings
    from segtrain.config import load_config
    from segtrain.errors import CheckpointError
    from segtrain.train import prepare_data

    prepared = prepare_data(load_config(run / "config.yaml"), stats, run / "class_locations.npz")
    np.testing.assert_array_equal(prepared.locations.points, ClassLocations.load(full / "class_locations.npz").points)
    assert prepared.class_stats == stats
    other = load_config(run / "config.yaml", ["data.sampling.spot=0.25"])
    with pytest.raises(CheckpointError, match=r"data.sampling: .* other sampling settings"):
        prepare_data(other, stats, run / "class_locations.npz")
    with pytest.raises(CheckpointError, match=r"data.sampling: the run has no class_locations.npz"):
        prepare_data(load_config(run / "config.yaml"), stats, run / "missing.npz")
