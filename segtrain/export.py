"""`segtrain export`: a trained run as a self-contained model for TF Serving, ONNX Runtime or TFLite.

The exported model takes raw images (uint8, or uint16 when the run was trained on 9- to 16-bit
images, e.g. 12-bit microscopy, each scaled by its own range; any height and width, a batch of one size) and
does inside what `segtrain predict` does around the `.keras` file: resize as in training
(`data.resize`), pad to a multiple of 2**depth by the rule prediction uses (`segtrain.policy.padding`, any size
down to 1 px) and crop back, flip test-time augmentation of the logits when the policy has it, then the run's
decision policy (`segtrain.policy.policy.DecisionPolicy.tf_scores_and_labels`, resolved from policy.json and
config.yaml exactly as eval and predict resolve it): temperature(s), prior correction, rule. Out come `labels`
(int32, B x H x W, class indices) and `probabilities` (float32, B x H x W x K: q, what the rule reads). Beside it,
`metadata.json` says how to read them: class names, how a label maps back to a mask value or colour, the policy,
input channels, the hash of the run's config.yaml and segtrain's version.

Not inside: the per-class post-processing (connected components have no TensorFlow op; metadata.json describes
the settings for the consumer to apply) and tiling. `predict` cuts images larger than `predict.tile_size` into overlapping
tiles; the export runs the whole image at once, so on large images its borders can differ
slightly from `predict` (the same network, more context).
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from segtrain.atomic import write_json
from segtrain.config import Config
from segtrain.data.masks import MaskMapping
from segtrain.errors import CheckpointError, SegtrainError

FORMATS = ("saved_model", "onnx", "tflite")
MODEL_FILES = {"saved_model": "saved_model", "onnx": "model.onnx", "tflite": "model.tflite"}
"""The model's name inside the export folder, per format."""


class ExportError(SegtrainError):
    """A format's converter is missing or failed; the message says how to get it or what broke."""


def input_spec(sample_type: str) -> tuple[str, int]:
    """(exported input dtype, the largest sample value) for a run's training sample type: uint8 as it is; b-bit
    unsigned samples (9 <= b <= 16, e.g. 12-bit microscopy) as uint16 holding values up to 2**b - 1, brought to the
    8-bit scale the model reads by 255 / (2**b - 1), as files are read (`segtrain.data.images.read_image`)."""
    if sample_type == "uint8":
        return "uint8", 255
    if sample_type.startswith("uint") and sample_type[4:].isdigit() and 8 < int(sample_type[4:]) <= 16:
        return "uint16", 2 ** int(sample_type[4:]) - 1
    raise ValueError(sample_type)


def serving_module(model, config: Config, policy, input_type: str = "uint8"):
    """A tf.Module whose `serve(images)` maps raw images (B, H, W, C) to labels and q, under `policy` (a
    `segtrain.policy.policy.DecisionPolicy`; its post-processing is not in the graph)."""
    import tensorflow as tf

    from segtrain.policy.padding import pad_to_multiple_tf

    divisor = config.model.divisor
    channels = int(model.input_shape[-1])
    dtype, top = input_spec(input_type)

    def logits_of(x):
        z = tf.cast(model(x, training=False), tf.float32)
        if not policy.tta:
            return z
        flips = tf.reverse(tf.cast(model(tf.reverse(x, [2]), training=False), tf.float32), [2])
        flops = tf.reverse(tf.cast(model(tf.reverse(x, [1]), training=False), tf.float32), [1])
        return (z + flips + flops) / 3.0

    class Serving(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, None, None, channels], dtype, name="images")])
        def serve(self, images):
            x = tf.cast(images, tf.float32)
            if top != 255:
                x = x * (255.0 / top)
            height, width = tf.shape(x)[1], tf.shape(x)[2]
            if config.data.resize is not None:
                x = tf.image.resize(x, config.data.resize, method="bilinear")
            padded = pad_to_multiple_tf(x, divisor)
            z = logits_of(padded)[:, : tf.shape(x)[1], : tf.shape(x)[2], :]
            if config.data.resize is not None:
                z = tf.image.resize(z, tf.stack([height, width]), method="bilinear")
            scores, labels = policy.tf_scores_and_labels(z)
            return {"labels": tf.cast(labels, tf.int32), "probabilities": tf.cast(scores, tf.float32)}

    module = Serving()
    module.model = model  # tracked, so its variables are saved with the module
    return module


def export_metadata(config: Config, config_text: str, channels: int, policy, input_type: str = "uint8",
                    resolved=None) -> dict:
    """What a consumer of the exported model needs besides the model itself."""
    mapping = MaskMapping(config.data.mask, config.data.classes)
    encoded = mapping.encode(np.arange(len(config.data.classes)))
    decision = policy.to_dict()
    decision["applied"] = ("inside the model: logits / temperature, softmax (sigmoid for one channel), "
                           "q = p w**-tau exp(bias) normalised, then the rule on q")
    if resolved is not None:
        decision["sources"] = list(resolved.sources)
        decision["tuned"] = None if resolved.tuned is None else {
            k: resolved.tuned.get(k) for k in ("split", "objective", "images", "pixels")}
    postprocess = decision.pop("postprocess")
    return {
        "classes": list(config.data.classes),
        "labels_to_mask": {"kind": "palette" if mapping.rgb else "values", "values": encoded.tolist()},
        "decision": decision,
        "postprocess": {"settings": {name: {"min_size": n, "max_hole": m} for name, (n, m) in postprocess.items()},
                        "applied": "NOT inside the model: remove connected components (8-connected) of a class "
                                   "smaller than min_size pixels (they take the next most probable class by "
                                   "`probabilities`) and fill its holes (4-connected, not touching the border) "
                                   "smaller than max_hole pixels, class by class in index order, as "
                                   "segtrain.policy.postprocess does; segtrain.load(export folder) applies it"
                                   if postprocess else None},
        "input": {"channels": channels, "dtype": input_spec(input_type)[0], "max_value": input_spec(input_type)[1],
                  "sample_type": input_type, "layout": "B x H x W x C, raw pixel values",
                  "resize": config.data.resize, "pad_to_multiple_of": config.model.divisor},
        "outputs": {"labels": "int32 B x H x W class indices (before post-processing)",
                    "probabilities": "float32 B x H x W x K, q: the probabilities the rule reads (calibrated and "
                                     "prior-corrected), classes in the order of `classes`"},
        "test_time_augmentation": bool(policy.tta),
        "config_sha256": hashlib.sha256(config_text.encode()).hexdigest(),
        "segtrain_version": metadata.version("segtrain"),
    }


def export_run(run_dir: Path, fmt: str, out_dir: Optional[Path], log=print, overwrite: bool = False,
               overrides: Sequence[str] = ()) -> Path:
    """Export a run folder (or a .keras file with config.yaml beside it) in `fmt`; returns the export folder.

    The export is written into a temporary sibling of `out_dir` and renamed into place once complete; an existing
    non-empty `out_dir` is refused, or with `overwrite` replaced only then (a failed export keeps the old one).
    `overrides`: predict.* KEY=VALUE settings applied to the run's config in memory (`segtrain.runs.run_config`)."""
    from segtrain.runs import resolve_checkpoint, run_config, staged_folder

    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt}: unknown; use one of {', '.join(FORMATS)}.")
    model_path, run_folder = resolve_checkpoint(run_dir)
    config = run_config(run_folder, overrides)
    out_dir = Path(out_dir) if out_dir else run_folder / "export" / fmt
    check_export_folder(out_dir, overwrite)
    from segtrain.policy.predictor import Predictor

    predictor = Predictor.load(model_path, config, log=log)
    model, policy = predictor.model, predictor.policy
    if policy.postprocess:
        log("note: the run's post-processing (" + ", ".join(f"{config.data.classes[c]} min_size {n} max_hole {m}"
            for c, (n, m) in sorted(policy.postprocess.items())) + ") is not inside the exported model; "
            "metadata.json describes it, and segtrain.load(export folder) applies it.")
    input_type = _input_type(run_folder)
    module = serving_module(model, config, policy, input_type)
    with staged_folder(out_dir, overwrite) as staging:
        saved = staging / MODEL_FILES["saved_model"]
        _save_saved_model(module, saved)
        if fmt == "onnx":
            _saved_model_to_onnx(saved, staging / MODEL_FILES["onnx"])
        elif fmt == "tflite":
            _saved_model_to_tflite(saved, staging / MODEL_FILES["tflite"])
        info = export_metadata(config, (run_folder / "config.yaml").read_text(), int(model.input_shape[-1]), policy,
                               input_type, predictor.resolved)
        info.update({"format": fmt, "model": MODEL_FILES[fmt], "source": str(model_path)})
        write_json(info, staging / "metadata.json")
    log(f"Exported {model_path} as {fmt} -> {out_dir / MODEL_FILES[fmt]} (+ metadata.json)")
    return out_dir


def check_export_folder(out_dir: Path, overwrite: bool = False) -> None:
    """An export goes into a new (or empty) folder; with `overwrite` an existing export folder is replaced."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise CheckpointError(f"{out_dir}: exists and is not a folder; pass another --out.")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise CheckpointError(f"{out_dir}: the export folder exists and is not empty; pass another --out, or "
                              "--overwrite to replace it (the old folder is kept until the new export is complete).")


def _input_type(run_folder: Path) -> str:
    """The sample type the run was trained on (run.json; runs written before it was recorded: uint8)."""
    import json

    from segtrain.runs import RUN_INFO

    info_path = run_folder / RUN_INFO
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    input_type = info.get("input_sample_type", "uint8")
    try:
        input_spec(input_type)
    except ValueError:
        raise ExportError(f"{info_path}: the run was trained on {input_type} images; the export takes unsigned "
                          "integer images of 8 to 16 bits only.") from None
    return input_type


def _save_saved_model(module, path: Path) -> None:
    import tensorflow as tf

    tf.saved_model.save(module, str(path), signatures={"serving_default": module.serve})


def _saved_model_to_onnx(saved: Path, target: Path) -> None:
    """ONNX through tf2onnx from the SavedModel (its Keras 3 path is broken: onnx/tensorflow-onnx#2329, #2348)."""
    try:
        import tf2onnx  # noqa: F401
    except ImportError:
        raise ExportError("--format onnx needs tf2onnx: pip install 'segtrain[export]'.") from None
    command = [sys.executable, "-m", "tf2onnx.convert", "--saved-model", str(saved), "--output", str(target),
               "--opset", "17", "--signature_def", "serving_default"]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0 or not target.is_file():
        last = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        raise ExportError(f"tf2onnx could not convert {saved}: {last[0][:300]}")


def _saved_model_to_tflite(saved: Path, target: Path) -> None:
    """TFLite from the SavedModel's signature with its variables frozen into constants.

    Converted as they are, the variables stay resource variables that the TFLite runtime never
    initialises (the outputs came out NaN here), so the signature is frozen first and wrapped
    again under its own output names.
    """
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    loaded = tf.saved_model.load(str(saved))  # kept alive: the signature reads its variables
    signature = loaded.signatures["serving_default"]
    frozen = convert_variables_to_constants_v2(signature)
    names = sorted(signature.structured_outputs)  # the order tf.nest flattens the outputs dict in
    spec = signature.structured_input_signature[1]["images"]

    @tf.function(input_signature=[tf.TensorSpec(spec.shape, spec.dtype, name="images")])
    def serve(images):
        return dict(zip(names, frozen(images=images)))

    holder = tf.Module()
    holder.serve, holder.loaded = serve, loaded
    converter = tf.lite.TFLiteConverter.from_concrete_functions([serve.get_concrete_function()], holder)
    try:
        flatbuffer = converter.convert()
    except Exception as exc:  # the converter raises several unrelated types
        raise ExportError(f"TFLite could not convert {saved}: {str(exc).splitlines()[0][:300]}") from None
    target.write_bytes(flatbuffer)
