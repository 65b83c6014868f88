"""A plain Keras segmentation script of the kind users write: the quality benchmark's baseline.

Loads the training images into memory, takes random crops with random flips, trains a
simple U-Net (the same size as segtrain's: conv-BN-ReLU twice per level, max-pool down,
transposed convolution up, BatchNorm momentum 0.9 as in segtrain so its moving statistics
keep up in a short run) with plain binary cross-entropy, Adam at Keras's default
learning rate, `model.fit`, for a wall-clock budget; then predicts the whole validation
images, thresholds the sigmoid at 0.5, and scores them with segtrain's metrics
(`confusion_matrix_np` + `metrics_from_confusion`, one confusion matrix over the split).

    python benchmarks/plain_keras_baseline.py ../shared/datasets/crackforest --foreground 255 \
        --crop 160 --batch 4 --minutes 3 --json /tmp/base.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from keras import layers  # noqa: E402
from PIL import Image  # noqa: E402


def load_split(root: Path, split: str, foreground: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Images (H, W, C float32 0..255) and binary masks (H, W uint8) paired by file stem."""
    images, masks = [], []
    mask_files = {p.stem: p for p in (root / split / "masks").iterdir()}
    for path in sorted((root / split / "images").iterdir()):
        image = Image.open(path)
        array = np.asarray(image.convert("L" if image.mode in ("L", "1", "I;16") else "RGB"), np.float32)
        images.append(array[..., None] if array.ndim == 2 else array)
        raw = np.asarray(Image.open(mask_files[path.stem]).convert("L"))
        masks.append((raw > 127) if foreground == "above127" else (raw == int(foreground)))
    return images, [m.astype(np.uint8) for m in masks]


def unet(channels: int, depth: int = 4, filters: int = 16) -> keras.Model:
    def block(x, f):
        for _ in range(2):
            x = layers.Conv2D(f, 3, padding="same", use_bias=False)(x)
            # momentum 0.9, as segtrain's U-Net: with Keras's 0.99 the moving statistics lag the weights for
            # the first few hundred steps and the validation output is wrong for reasons that are not the loss
            x = layers.BatchNormalization(momentum=0.9)(x)
            x = layers.Activation("relu")(x)
        return x

    inputs = keras.Input((None, None, channels))
    x = layers.Rescaling(1 / 127.5, offset=-1)(inputs)
    skips = []
    for level in range(depth):
        x = block(x, filters * 2**level)
        skips.append(x)
        x = layers.MaxPooling2D()(x)
    x = block(x, filters * 2**depth)
    for level in reversed(range(depth)):
        x = layers.Conv2DTranspose(filters * 2**level, 2, strides=2, padding="same")(x)
        x = block(layers.Concatenate()([x, skips[level]]), filters * 2**level)
    return keras.Model(inputs, layers.Conv2D(1, 1)(x))


def crops(images, masks, crop: int, batch: int, seed: int) -> tf.data.Dataset:
    """Endless random crops with random flips, from images held in memory."""
    def gen():
        rng = np.random.default_rng(seed)
        while True:
            i = rng.integers(len(images))
            h, w = masks[i].shape
            y, x = rng.integers(0, h - crop + 1), rng.integers(0, w - crop + 1)
            image, mask = images[i][y:y + crop, x:x + crop], masks[i][y:y + crop, x:x + crop, None]
            if rng.random() < 0.5:
                image, mask = image[:, ::-1], mask[:, ::-1]
            if rng.random() < 0.5:
                image, mask = image[::-1], mask[::-1]
            yield image, mask.astype(np.float32)

    channels = images[0].shape[-1]
    spec = (tf.TensorSpec((crop, crop, channels), tf.float32), tf.TensorSpec((crop, crop, 1), tf.float32))
    return tf.data.Dataset.from_generator(gen, output_signature=spec).batch(batch).prefetch(tf.data.AUTOTUNE)


class TimeLimit(keras.callbacks.Callback):
    """Stop training once `seconds` of wall-clock have passed (checked after every batch)."""

    def __init__(self, seconds: float):
        super().__init__()
        self.seconds, self.start, self.steps = seconds, None, 0

    def on_train_begin(self, logs=None):
        self.start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.steps += 1
        if time.perf_counter() - self.start >= self.seconds:
            self.model.stop_training = True


def predict_whole(model, image: np.ndarray, divisor: int) -> np.ndarray:
    h, w = image.shape[:2]
    ph, pw = math.ceil(h / divisor) * divisor, math.ceil(w / divisor) * divisor
    padded = np.pad(image, ((0, ph - h), (0, pw - w), (0, 0)), mode="reflect")
    logits = model.predict(padded[None], verbose=0)[0, :h, :w, 0]
    return (1 / (1 + np.exp(-logits)) >= 0.5).astype(np.int64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path, help="data set folder with train/ and val/")
    parser.add_argument("--foreground", default="above127",
                        help="'above127' (mask value > 127 is foreground) or the raw value of the foreground, e.g. 0")
    parser.add_argument("--crop", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--filters", type=int, default=16)
    parser.add_argument("--minutes", type=float, default=3.0, help="wall-clock training budget")
    parser.add_argument("--max-steps", type=int, default=None, help="also stop after this many steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the metrics here")
    args = parser.parse_args()

    keras.utils.set_random_seed(args.seed)
    train_images, train_masks = load_split(args.root, "train", args.foreground)
    val_images, val_masks = load_split(args.root, "val", args.foreground)
    model = unet(train_images[0].shape[-1], args.depth, args.filters)
    model.compile(optimizer="adam", loss=keras.losses.BinaryCrossentropy(from_logits=True))
    steps_per_epoch = max(1, math.ceil(len(train_images) / args.batch))
    epochs = 10_000 if args.max_steps is None else max(1, math.ceil(args.max_steps / steps_per_epoch))
    limit = TimeLimit(args.minutes * 60)
    start = time.perf_counter()
    model.fit(crops(train_images, train_masks, args.crop, args.batch, args.seed), epochs=epochs,
              steps_per_epoch=steps_per_epoch, callbacks=[limit], verbose=0)
    train_seconds = time.perf_counter() - start

    from segtrain.metrics import confusion_matrix_np, metrics_from_confusion

    cm = np.zeros((2, 2), np.int64)
    for image, mask in zip(val_images, val_masks):
        cm += confusion_matrix_np(mask, predict_whole(model, image, 2**args.depth), 2)
    metrics = metrics_from_confusion(cm, ["background", "foreground"])
    metrics.update(train_seconds=train_seconds, steps=limit.steps, images_seen=limit.steps * args.batch)
    fg = metrics["per_class"]["foreground"]
    print(f"plain Keras: {limit.steps} steps in {train_seconds / 60:.2f} min; val foreground IoU {fg['iou']}, "
          f"F1 {fg['dice']}, precision {fg['precision']}, recall {fg['recall']}")
    if args.json:
        args.json.write_text(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    main()
