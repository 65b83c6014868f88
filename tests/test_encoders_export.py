"""An encoder U-Net (MobileNetV3Small, the smallest catalogued backbone) trained by `segtrain fit`: exported as
SavedModel, ONNX and TFLite, each against `segtrain predict`'s probabilities on an odd-sized image, and its
.keras file loaded by Keras in a process that never imports segtrain.

Parity as in tests/test_export.py: the same float32 network on the same reflect-padded pixels, so q may differ
only by the runtimes' float32 summation orders (a few 1e-6); PROB_ATOL = 1e-4 keeps a margin of 10x or more."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tests.helpers import invoke, make_stripes_dataset, write_config

pytestmark = pytest.mark.slow

PROB_ATOL = 1e-4


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tmp_path_factory.mktemp("encoder_export")
    root = make_stripes_dataset(base / "data", n_train=2, n_val=1)
    config = write_config(base / "c.yaml", root,
                          model={"encoder": "mobilenetv3small", "encoder_weights": "none",
                                 "decoder_filters": [16, 8, 8, 8, 8]},
                          data={"crop": 32, "batch_size": 2}, train={"epochs": 1, "steps_per_epoch": 1, "seed": 1})
    result = invoke("fit", config, "--out", base / "run")
    assert result.exit_code == 0, result.output
    return base / "run"


def odd_image():
    return np.random.default_rng(4).integers(0, 256, (45, 67, 3)).astype(np.uint8)


@pytest.mark.parametrize("fmt", ["saved_model", "onnx", "tflite"])
def test_the_exported_encoder_unet_answers_as_predict(run, fmt, tmp_path):
    import segtrain

    image = odd_image()
    q = segtrain.load(run).predict(image).probabilities
    out = tmp_path / fmt
    result = invoke("export", run, "--format", fmt, "--out", out)
    assert result.exit_code == 0, result.output
    if fmt == "saved_model":
        import tensorflow as tf

        served = tf.saved_model.load(str(out / "saved_model")).signatures["serving_default"](
            images=tf.constant(image[None]))
        probabilities = served["probabilities"].numpy()[0]
    elif fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(out / "model.onnx"))
        names = [o.name for o in session.get_outputs()]
        probabilities = dict(zip(names, session.run(None, {"images": image[None]})))["probabilities"][0]
    else:
        from ai_edge_litert.interpreter import Interpreter

        runner = Interpreter(model_path=str(out / "model.tflite")).get_signature_runner("serving_default")
        probabilities = runner(images=image[None])["probabilities"][0]
    assert probabilities.shape == q.shape and q.shape[:2] == (45, 67)
    np.testing.assert_allclose(probabilities, q, atol=PROB_ATOL, rtol=0)


LOAD_WITHOUT_SEGTRAIN = textwrap.dedent("""
    import sys
    import keras, numpy as np
    model = keras.saving.load_model(sys.argv[1], compile=False, safe_mode=True)
    np.save(sys.argv[3], np.asarray(model(np.load(sys.argv[2]))))
    assert not any(name == "segtrain" or name.startswith("segtrain.") for name in sys.modules)
    print("layers", model.get_layer("encoder").name, len(model.get_layer("encoder").layers))
""")


def test_the_keras_file_loads_without_segtrain(run, tmp_path):
    import keras

    images = np.random.default_rng(5).uniform(0, 255, (1, 64, 32, 3)).astype(np.float32)
    np.save(tmp_path / "x.npy", images)
    script = tmp_path / "load.py"
    script.write_text(LOAD_WITHOUT_SEGTRAIN)
    proc = subprocess.run([sys.executable, str(script), str(run / "best.keras"), str(tmp_path / "x.npy"),
                           str(tmp_path / "y.npy")], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          check=False, env={"PATH": "/usr/bin:/bin", "TF_CPP_MIN_LOG_LEVEL": "3",
                                            "HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "layers encoder" in proc.stdout
    expected = keras.models.load_model(run / "best.keras", compile=False)(images)
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), np.asarray(expected), rtol=1e-5, atol=1e-5)
