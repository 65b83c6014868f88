"""data.normalize: dataset: robust per-channel statistics of the training pixels, built into the model."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from segtrain.config import DataConfig, MaskConfig
from tests.helpers import invoke, make_stripes_dataset, write_config, write_pair


def _numpy_statistics(values):
    """The statistics by hand: percentiles 0.5 / 99.5 per channel, then mean and std of the clipped values."""
    low = np.percentile(values, 0.5, axis=0)
    high = np.percentile(values, 99.5, axis=0)
    clipped = np.minimum(np.maximum(values, low), high)
    return low, high, clipped.mean(axis=0), clipped.std(axis=0)


def _skewed_dataset(root, n=3, size=16):
    """RGB images whose channels differ in range, with a few bright outliers the percentiles should clip."""
    rng = np.random.default_rng(3)
    for i in range(n):
        image = np.stack([rng.integers(0, 40, (size, size)), rng.integers(100, 200, (size, size)),
                          np.full((size, size), 70)], axis=-1).astype(np.uint8)
        image[rng.integers(0, size), rng.integers(0, size)] = 255  # outliers
        mask = (rng.random((size, size)) > 0.7).astype(np.uint8) * 255
        write_pair(root, "train", f"s{i}", image, mask)
        write_pair(root, "val", f"v{i}", image, mask)
    return root


def test_statistics_match_numpy_and_stats_prints_them(tmp_path):
    from segtrain.class_weights import class_stats_dict
    from segtrain.data.scan import scan_training_set

    root = _skewed_dataset(tmp_path / "data")
    data = DataConfig(root=str(root), classes=["bg", "fg"], mask=MaskConfig(threshold=127), normalize="dataset")
    counter = scan_training_set(data).counter
    stats = class_stats_dict(counter, data.classes)["normalization"]
    # every pixel is sampled (16 x 16 < 20000 per image): the sample is the training set's pixels
    pixels = np.concatenate([np.asarray(Image.open(p)).reshape(-1, 3)
                             for p in sorted((root / "train" / "images").glob("*.png"))]).astype(np.float64)
    low, high, mean, std = _numpy_statistics(pixels)
    assert stats["method"] == "dataset" and stats["pixels_sampled"] == 3 * 16 * 16
    np.testing.assert_allclose(stats["low"], low)
    np.testing.assert_allclose(stats["high"], high)
    np.testing.assert_allclose(stats["mean"], mean)
    np.testing.assert_allclose(stats["std"], std)
    assert stats["high"][0] < 255 and stats["std"][2] == 0  # outliers clipped; a constant channel has std 0
    # without data.normalize: dataset nothing is sampled
    plain = DataConfig(root=str(root), classes=["bg", "fg"], mask=MaskConfig(threshold=127))
    assert "normalization" not in class_stats_dict(scan_training_set(plain).counter, plain.classes)

    config = write_config(tmp_path / "c.yaml", root, data={"classes": ["bg", "fg"], "mask": {"threshold": 127},
                                                          "normalize": "dataset"})
    result = invoke("stats", config)
    assert result.exit_code == 0 and "normalization (data.normalize: dataset, 768 pixels sampled)" in result.output
    assert f"{stats['high'][1]:9.3f}" in result.output
    as_json = json.loads(invoke("stats", config, "--json").output)
    assert as_json["normalization"] == json.loads(json.dumps(stats))


def test_the_sample_is_bounded_and_seeded():
    from segtrain.data.normalization import PixelSampler, pixels_per_image, sample_pixels

    assert pixels_per_image(10) == 20_000 and pixels_per_image(1000) == 2_000 and pixels_per_image(10**8) == 1
    image = np.random.default_rng(0).random((300, 200, 4)).astype(np.float32)
    a, b = sample_pixels(image, 7, 500), sample_pixels(image, 7, 500)
    assert a.shape == (500, 4) and np.array_equal(a, b)  # the same image index: the same pixels
    assert not np.array_equal(a, sample_pixels(image, 8, 500))
    assert np.isin(a[:, 0], image[..., 0]).all()  # real pixels, channels kept together
    sampler = PixelSampler(num_images=5, per_image=300, max_pixels=1000)
    for i in range(5):
        sampler.add(sampler.sample(image, i))
    assert sampler.per_image == 200 and sampler.pixels == 1000  # 5 images within the 1000-pixel budget


def _first_layers(model):
    import keras

    return keras.Model(model.input, model.get_layer("normalize").output)


def test_model_first_layers_map_raw_pixels_like_numpy():
    from segtrain.model import build_unet

    stats = {"method": "dataset", "low": [10.0, 0.0, 70.0, 5.0], "high": [40.0, 1000.0, 70.0, 9.0],
             "mean": [25.0, 300.0, 70.0, 5.0], "std": [6.0, 250.0, 0.0, 0.0]}
    model = build_unet(4, 1, depth=1, base_filters=2, normalization=stats)
    x = np.random.default_rng(1).uniform(-50, 1200, (2, 4, 6, 4)).astype(np.float32)
    got = _first_layers(model).predict(x, verbose=0)
    low, high, mean, std = (np.array(stats[k]) for k in ("low", "high", "mean", "std"))
    for c in (0, 1):  # ((clip(x, lo, hi) - lo) / (hi - lo) - m) / s, with m and s on that [0, 1] scale
        span = high[c] - low[c]
        expected = ((np.clip(x[..., c], low[c], high[c]) - low[c]) / span - (mean[c] - low[c]) / span) / (std[c] / span)
        np.testing.assert_allclose(got[..., c], expected, rtol=1e-5, atol=1e-5)
    assert np.all(got[..., 2] == 0)  # high == low: every value is the channel's one value
    assert np.all(np.isfinite(got[..., 3]))  # std 0 guarded: no division by zero
    np.testing.assert_allclose(got[..., 3], (np.clip(x[..., 3], 5, 9) - 5) / 4, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="for 4 channels, but the model takes 3"):
        build_unet(3, 1, depth=1, base_filters=2, normalization=stats)
    # the fixed rule stays the default
    assert build_unet(4, 1, depth=1, base_filters=2).get_layer("scale") is not None


LOAD_WITHOUT_SEGTRAIN = """
import sys
import numpy as np
import keras
model = keras.models.load_model(sys.argv[1], compile=False)
np.save(sys.argv[3], model.predict(np.load(sys.argv[2]), verbose=0))
assert not any(name.startswith("segtrain") for name in sys.modules), "segtrain was imported"
"""


@pytest.fixture(scope="module")
def dataset_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("normalize")
    root = make_stripes_dataset(base / "data", n_train=4, n_val=1, size=16)
    config = write_config(base / "c.yaml", root, data={"normalize": "dataset", "crop": 16},
                          train={"epochs": 1, "steps_per_epoch": 1})
    run = base / "run"
    result = invoke("fit", config, "--out", run)
    assert result.exit_code == 0, result.output
    return config, run


def test_a_saved_model_takes_raw_pixels_and_loads_without_segtrain(dataset_run, tmp_path, float32_policy):
    from segtrain.runs import load_model

    _, run = dataset_run
    stats = json.loads((run / "class_stats.json").read_text())["normalization"]
    assert stats["method"] == "dataset" and len(stats["low"]) == 3 and stats["pixels_sampled"] == 4 * 16 * 16
    model = load_model(run / "last.keras")
    x = np.random.default_rng(2).uniform(0, 255, (1, 16, 16, 3)).astype(np.float32)
    low, high, mean, std = (np.array(stats[k]) for k in ("low", "high", "mean", "std"))
    span = high - low
    expected = ((np.clip(x, low, high) - low) / span - (mean - low) / span) / (std / span)
    np.testing.assert_allclose(_first_layers(model).predict(x, verbose=0), expected, rtol=1e-4, atol=1e-4)

    np.save(tmp_path / "x.npy", x)
    script = tmp_path / "load.py"
    script.write_text(LOAD_WITHOUT_SEGTRAIN)
    done = subprocess.run([sys.executable, str(script), str(run / "last.keras"), str(tmp_path / "x.npy"),
                           str(tmp_path / "y.npy")], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), model.predict(x, verbose=0), rtol=1e-5, atol=1e-5)


def test_resume_reuses_the_stored_statistics(dataset_run, tmp_path, float32_policy):
    import shutil

    from segtrain.runs import load_model

    config, trained = dataset_run
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    path = run / "class_stats.json"
    stats = json.loads(path.read_text())
    stats["normalization"]["mean"] = [m + 1.0 for m in stats["normalization"]["mean"]]  # recomputing would undo this
    path.write_text(json.dumps(stats))
    result = invoke("fit", config, "--out", run, "--resume", "--set", "train.epochs=2")
    assert result.exit_code == 0, result.output
    assert json.loads(path.read_text())["normalization"] == stats["normalization"]
    layer = load_model(run / "last.keras").get_layer("normalize")
    norm = stats["normalization"]
    span = np.array(norm["high"]) - np.array(norm["low"])
    np.testing.assert_allclose(np.ravel(layer.mean), (np.array(norm["mean"]) - norm["low"]) / span, rtol=1e-6)

    # a resume under the other setting is refused: the model was built with these statistics
    result = invoke("fit", config, "--out", run, "--resume", "--set", "data.normalize=fixed")
    assert result.exit_code == 2 and "data.normalize" in result.output and "Traceback" not in result.output


def test_the_config_refuses_an_unknown_value(tmp_path):
    root = make_stripes_dataset(tmp_path / "data", n_train=1, n_val=1, size=16)
    config = write_config(tmp_path / "c.yaml", root, data={"normalize": "zscore"})
    result = invoke("fit", config, "--out", tmp_path / "run")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "data.normalize: 'zscore' is not one of fixed, dataset" in result.output
    assert not (tmp_path / "run").exists()
