"""`model.encoder_weights`: ImageNet weights through Keras's own download cache, or a local file, copied into the
encoder layer by layer; for other than 3 image channels the first convolution's RGB kernels are adapted."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from segtrain.encoders.catalog import backbone
from segtrain.errors import ConfigError


def keras_cache_dir() -> Path:
    """Where `keras.utils.get_file` keeps downloads: $KERAS_HOME, else ~/.keras; when that is not a writable
    folder, a .keras folder in /tmp (Keras's own rule)."""
    base = Path(os.path.expanduser(os.environ.get("KERAS_HOME") or os.path.join("~", ".keras")))
    if not os.access(base, os.W_OK):
        base = Path("/tmp" if os.path.isdir("/tmp") else tempfile.gettempdir()) / ".keras"
    return base


def imagenet_cached(name: str) -> bool:
    """Whether the backbone's ImageNet weights are already in Keras's cache (no download needed; for `segtrain
    plan`, which must not reach the network)."""
    return (keras_cache_dir() / "models" / backbone(name).imagenet_file).is_file()


def imagenet_weights_file(name: str) -> Path:
    """The backbone's ImageNet weights (no classifier) from Keras's cache, downloaded into it if missing.

    Raises ConfigError (exit 2) naming the file and the folder to place it in when it cannot be downloaded.
    """
    import keras

    entry = backbone(name)
    folder = keras_cache_dir() / "models"
    try:
        return Path(keras.utils.get_file(entry.imagenet_file, entry.imagenet_url, cache_subdir="models",
                                         cache_dir=str(keras_cache_dir())))
    except Exception as exc:  # get_file raises a bare Exception for network failures
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise ConfigError(
            f"model.encoder_weights: imagenet: could not download the {name} weights ({reason}). On a machine "
            f"without internet access, download {entry.imagenet_url} elsewhere and place it as "
            f"{folder / entry.imagenet_file} (Keras's cache: $KERAS_HOME/models, default ~/.keras/models), or set "
            "model.encoder_weights to a local weights file or none."
        ) from None


def adapt_kernel(kernel: np.ndarray, channels: int) -> np.ndarray:
    """A first convolution's kernel (kh, kw, 3, F) for `channels` input bands: 1 band, the sum over the RGB
    kernels (a gray image x gives what the RGB image (x, x, x) gave); C bands, the RGB kernels tiled (band i takes
    kernel i mod 3) and scaled by 3 / C (C bands of one value x give what (x, x, x) gave for C a multiple of 3)."""
    if kernel.shape[2] == channels:
        return kernel
    if channels == 1:
        return kernel.sum(axis=2, keepdims=True)
    tiled = kernel[:, :, [i % kernel.shape[2] for i in range(channels)], :]
    return tiled * (kernel.shape[2] / channels)


def copy_weights(source, encoder, source_name: str) -> None:
    """Every layer of `encoder` holding weights takes those of the same-named layer of `source` (a backbone or an
    encoder); kernels over 3 input channels are adapted to the encoder's channels (`adapt_kernel`)."""
    channels = int(encoder.input_shape[-1])
    for layer in encoder.layers:
        if not layer.weights:
            continue
        try:
            origin = source.get_layer(layer.name)
        except ValueError:
            raise ConfigError(f"model.encoder_weights: {source_name} has no layer {layer.name!r}: it holds weights "
                              f"of another backbone than the configured model.encoder.") from None
        values = []
        for ours, theirs in zip(layer.get_weights(), origin.get_weights()):
            if ours.shape != theirs.shape and theirs.ndim == 4 and theirs.shape[2] == 3 \
                    and ours.shape[:2] + ours.shape[3:] == theirs.shape[:2] + theirs.shape[3:]:
                theirs = adapt_kernel(theirs, channels)
            if ours.shape != theirs.shape:
                raise ConfigError(f"model.encoder_weights: {source_name}: layer {layer.name!r} has weights of shape "
                                  f"{theirs.shape}, the encoder {ours.shape} (another backbone or input channels?).")
            values.append(theirs)
        if len(values) != len(layer.weights):
            raise ConfigError(f"model.encoder_weights: {source_name}: layer {layer.name!r} holds "
                              f"{len(origin.weights)} weights, the encoder {len(layer.weights)}.")
        layer.set_weights(values)


def _weights_file_source(path: Path, name: str, channels: int):
    """A backbone holding the weights of a file written by Keras (`save_weights` of the keras.applications
    backbone without its top, or Keras's own ImageNet .h5 files): for 3 bands, else the image's."""
    from segtrain.encoders.backbones import build_backbone

    import warnings

    errors = []
    for bands in dict.fromkeys((3, channels)):
        twin = build_backbone(name, bands)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                twin.load_weights(str(path))
            skipped = [str(w.message) for w in caught if "retain" in str(w.message) or "Skipping" in str(w.message)]
            if skipped:  # Keras loads what matches and warns about the rest: a partial load is no load
                raise ValueError(skipped[0])
            return twin
        except Exception as exc:  # Keras raises ValueError, KeyError or OSError by format
            errors.append(str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__)
    raise ConfigError(f"model.encoder_weights: {path}: not weights of a keras.applications "
                      f"{backbone(name).constructor} without its top ({errors[-1]}). Use a file written by its "
                      "save_weights, a .keras model (or run folder) of an earlier segtrain run with this encoder, "
                      "imagenet or none.")


def _model_file_source(path: Path):
    """The encoder of a segtrain run's .keras file (or a saved backbone model itself)."""
    import keras

    from segtrain.encoders.backbones import encoder_of

    try:
        model = keras.saving.load_model(str(path), compile=False)
    except Exception as exc:
        raise ConfigError(f"model.encoder_weights: {path}: cannot be loaded as a Keras model "
                          f"({str(exc).splitlines()[0][:200]}).") from None
    return encoder_of(model) or model


def resolve_weights_path(value: str) -> Path:
    """A local `model.encoder_weights` path: a file, or a run folder (its best.keras, else last.keras)."""
    path = Path(value).expanduser()
    if path.is_dir():
        for model_file in ("best.keras", "last.keras"):
            if (path / model_file).is_file():
                return path / model_file
        raise ConfigError(f"model.encoder_weights: {path} is a folder without best.keras or last.keras; name a "
                          "weights file, a .keras file or a segtrain run folder.")
    if not path.is_file():
        raise ConfigError(f"model.encoder_weights: {path}: no such file; use imagenet, none, or the path of a "
                          "weights file (Keras save_weights) or of an earlier segtrain run's .keras.")
    return path


def load_encoder_weights(encoder, name: str, weights: str) -> None:
    """Set the encoder's weights from `model.encoder_weights`: none (keep the random ones), imagenet, or a PATH."""
    if weights in (None, "none"):
        return
    channels = int(encoder.input_shape[-1])
    if weights == "imagenet":
        path = imagenet_weights_file(name)
        copy_weights(_weights_file_source(path, name, channels), encoder, str(path))
        return
    path = resolve_weights_path(weights)
    source = _model_file_source(path) if path.suffix == ".keras" else _weights_file_source(path, name, channels)
    copy_weights(source, encoder, str(path))
