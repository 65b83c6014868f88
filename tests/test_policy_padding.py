"""segtrain.policy.padding: one padding rule, identical in NumPy, TensorFlow, TFLite (and ONNX)."""

import numpy as np
import pytest

from segtrain.policy.padding import pad_to_multiple_np, pad_to_multiple_tf, padded_size, reflect_steps

SIZES = range(1, 41)


def _image(height: int, width: int, channels: int) -> np.ndarray:
    """Distinct float32 values, so any wrong source pixel shows."""
    return np.arange(height * width * channels, dtype=np.float32).reshape(height, width, channels)


def _traced(divisor: int, channels: int):
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, channels], tf.float32)])
    def pad(x):
        return pad_to_multiple_tf(x, divisor)

    return pad


def test_padded_size_and_steps():
    assert [padded_size(n, 16) for n in (0, 1, 15, 16, 17, 32)] == [0, 16, 16, 16, 32, 32]
    assert [reflect_steps(d) for d in (1, 2, 16, 17, 32)] == [0, 1, 4, 5, 5]
    with pytest.raises(ValueError):
        padded_size(5, 0)


def test_hand_worked_large_pads():
    # [a b c] -> reflect 2 -> [a b c b a] -> reflect 3 -> [a b c b a b c b]
    np.testing.assert_array_equal(pad_to_multiple_np(np.array([1.0, 2, 3]), 8, axes=(0,)), [1, 2, 3, 2, 1, 2, 3, 2])
    # [a b] -> 1, 2, 4, 7 -> 16 alternating; [a] -> repeated
    np.testing.assert_array_equal(pad_to_multiple_np(np.array([1.0, 2]), 16, axes=(0,)), [1, 2] * 8)
    np.testing.assert_array_equal(pad_to_multiple_np(np.array([7.0]), 16, axes=(0,)), [7] * 16)
    np.testing.assert_array_equal(pad_to_multiple_tf(np.array([1.0, 2, 3]), 8, axes=(0,)).numpy(),
                                  [1, 2, 3, 2, 1, 2, 3, 2])


@pytest.mark.parametrize("divisor", [16, 32])
def test_numpy_rule(divisor):
    for height in SIZES:
        for width in SIZES:
            image = _image(height, width, 2)
            out = pad_to_multiple_np(image, divisor)
            ph, pw = padded_size(height, divisor), padded_size(width, divisor)
            assert out.shape == (ph, pw, 2) and out.dtype == np.float32
            np.testing.assert_array_equal(out[:height, :width], image)
            np_reflect = np.pad(image, ((0, ph - height), (0, pw - width), (0, 0)), mode="reflect")
            # np.pad reflects large pads iteratively too (a 1-px side: its edge) and so agrees everywhere
            np.testing.assert_array_equal(out, np_reflect)


@pytest.mark.parametrize("divisor,channels", [(16, 1), (16, 3), (32, 2)])
def test_tf_matches_numpy_for_every_size(divisor, channels):
    pad = _traced(divisor, channels)
    for height in SIZES:
        for width in SIZES:
            image = _image(height, width, channels)
            out = pad(image[None]).numpy()
            np.testing.assert_array_equal(out[0], pad_to_multiple_np(image, divisor), err_msg=f"{height}x{width}")
    assert pad.experimental_get_tracing_count() == 1
    assert pad.get_concrete_function().structured_outputs.shape.as_list() == [None, None, None, channels]


def test_tflite_matches_numpy():
    import tensorflow as tf

    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        Interpreter = tf.lite.Interpreter
    pad = _traced(16, 2)
    converter = tf.lite.TFLiteConverter.from_concrete_functions([pad.get_concrete_function()], pad)
    interpreter = Interpreter(model_content=converter.convert())
    image = _image(5, 3, 2)
    index = interpreter.get_input_details()[0]["index"]
    interpreter.resize_tensor_input(index, [1, 5, 3, 2])
    interpreter.allocate_tensors()
    interpreter.set_tensor(index, image[None])
    interpreter.invoke()
    out = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
    np.testing.assert_array_equal(out[0], pad_to_multiple_np(image, 16))


def test_onnx_matches_numpy():
    tf2onnx = pytest.importorskip("tf2onnx")
    ort = pytest.importorskip("onnxruntime")
    import tensorflow as tf

    pad = _traced(16, 2)
    proto, _ = tf2onnx.convert.from_function(pad, input_signature=[tf.TensorSpec([None, None, None, 2], tf.float32)],
                                             opset=17)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    for height, width in [(1, 1), (1, 17), (5, 3), (2, 40), (16, 16), (33, 9)]:
        image = _image(height, width, 2)
        out = session.run(None, {name: image[None]})[0]
        np.testing.assert_array_equal(out[0], pad_to_multiple_np(image, 16), err_msg=f"{height}x{width}")
