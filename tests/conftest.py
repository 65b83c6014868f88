"""Fixtures only; the helpers they use (and that tests import) live in tests/helpers.py."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from tests.helpers import make_stripes_dataset  # noqa: E402


@pytest.fixture
def stripes(tmp_path) -> Path:
    return make_stripes_dataset(tmp_path / "stripes")


@pytest.fixture
def float32_policy():
    """run_fit sets Keras's global dtype policy; make sure every test leaves it at float32."""
    yield
    import keras

    keras.mixed_precision.set_global_policy("float32")
