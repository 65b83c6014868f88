"""Overhead of tiled prediction over the bare model forward pass on the same tiles.

Times `segtrain.policy.inference.predict_probabilities` on one size x size image against the model
alone run on the same tiles (pre-extracted, same batches, same padded last batch, outputs
fetched to NumPy), medians over repeats. The last line is `ratio: X`, X = tiled / bare
(target: X <= 1.15).

    python benchmarks/predict_throughput.py --size 1500 --tile 256 --depth 4 --repeats 5
    python benchmarks/predict_throughput.py --tiny   # seconds-long smoke run
"""

from __future__ import annotations

import argparse
import inspect
import math
import os
import platform
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from segtrain.policy.inference import predict_probabilities, tile_positions  # noqa: E402


def _local_unet(in_channels: int, out_channels: int, depth: int, base_filters: int) -> keras.Model:
    """Fallback U-Net (conv-conv per level, max-pool down, upsample + concat up), logits out."""
    from keras import layers

    inp = keras.Input((None, None, in_channels))
    x, skips = inp, []
    for level in range(depth):
        for _ in range(2):
            x = layers.Conv2D(base_filters * 2**level, 3, padding="same", activation="relu")(x)
        skips.append(x)
        x = layers.MaxPooling2D()(x)
    for _ in range(2):
        x = layers.Conv2D(base_filters * 2**depth, 3, padding="same", activation="relu")(x)
    for level in reversed(range(depth)):
        x = layers.Concatenate()([layers.UpSampling2D()(x), skips[level]])
        for _ in range(2):
            x = layers.Conv2D(base_filters * 2**level, 3, padding="same", activation="relu")(x)
    return keras.Model(inp, layers.Conv2D(out_channels, 1)(x))


def build_model(in_channels: int, out_channels: int, depth: int, base_filters: int):
    """segtrain.model.build_unet when it exists, else the local builder. Returns (model, source)."""
    try:
        from segtrain.model import build_unet
    except ImportError:
        return _local_unet(in_channels, out_channels, depth, base_filters), "local fallback U-Net"
    params = inspect.signature(build_unet).parameters
    out_key = "out_channels" if "out_channels" in params else "num_classes"
    model = build_unet(in_channels=in_channels, depth=depth, base_filters=base_filters, **{out_key: out_channels})
    return model, "segtrain.model.build_unet"


def extract_batches(image: np.ndarray, tile: int, overlap: float, batch_size: int, divisor: int):
    """The batches predict_probabilities feeds the model: same tiles, same order, last batch padded."""
    h, w = image.shape[:2]
    ph = h if h > tile else math.ceil(h / divisor) * divisor
    pw = w if w > tile else math.ceil(w / divisor) * divisor
    image = np.pad(image, ((0, ph - h), (0, pw - w), (0, 0)), mode="reflect")
    th, tw = min(tile, ph), min(tile, pw)
    stride = max(1, int(round(tile * (1 - overlap))))
    coords = [(y, x) for y in tile_positions(ph, th, min(stride, th)) for x in tile_positions(pw, tw, min(stride, tw))]
    if len(coords) == 1:
        return [image[None]], 1
    batches = []
    for start in range(0, len(coords), batch_size):
        batch = np.zeros((batch_size, th, tw, image.shape[2]), np.float32)
        for i, (y, x) in enumerate(coords[start : start + batch_size]):
            batch[i] = image[y : y + th, x : x + tw]
        batches.append(batch)
    return batches, len(coords)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=1500, help="image side in pixels")
    parser.add_argument("--tile", type=int, default=256, help="tile side in pixels")
    parser.add_argument("--depth", type=int, default=4, help="U-Net depth (divisor 2**depth)")
    parser.add_argument("--base-filters", type=int, default=16)
    parser.add_argument("--classes", type=int, default=3, help="number of classes K (2 -> one sigmoid channel)")
    parser.add_argument("--in-channels", type=int, default=3)
    parser.add_argument("--overlap", type=float, default=0.25)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--window", default="cosine", choices=["cosine", "gaussian"])
    parser.add_argument("--tta", action="store_true", help="flip TTA (the bare pass is then run 3 times too)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tiny", action="store_true", help="smoke run: 200 px, tile 64, depth 2, 8 filters, 2 repeats")
    args = parser.parse_args()
    if args.tiny:
        args.size, args.tile, args.depth, args.base_filters, args.repeats = 200, 64, 2, 8, 2

    keras.utils.set_random_seed(0)
    out_channels = 1 if args.classes == 2 else args.classes
    model, source = build_model(args.in_channels, out_channels, args.depth, args.base_filters)
    divisor = 2**args.depth
    image = np.random.default_rng(0).uniform(0, 255, (args.size, args.size, args.in_channels)).astype(np.float32)
    batches, n_tiles = extract_batches(image, args.tile, args.overlap, args.batch_size, divisor)
    passes = 3 if args.tta else 1

    gpus = tf.config.list_physical_devices("GPU")
    print(f"machine: {platform.platform()}, python {platform.python_version()}, {os.cpu_count()} CPUs, "
          f"GPUs: {', '.join(g.name for g in gpus) or 'none'}, TF {tf.__version__}, Keras {keras.__version__}")
    print(f"model: {source}, depth {args.depth}, base filters {args.base_filters}, "
          f"{model.count_params():,} parameters, {out_channels} output channel(s)")
    print(f"image {args.size}x{args.size}x{args.in_channels}, tile {args.tile}, overlap {args.overlap}, "
          f"{n_tiles} tiles in {len(batches)} batches of {args.batch_size}, window {args.window}, "
          f"TTA {'on' if args.tta else 'off'}, {args.repeats} repeats")

    forward = tf.function(lambda x: model(x, training=False))

    def bare():
        for _ in range(passes):
            for batch in batches:
                forward(batch).numpy()

    def tiled():
        predict_probabilities(model, image, args.tile, overlap=args.overlap, batch_size=args.batch_size,
                              window=args.window, tta=args.tta, divisor=divisor)

    bare(), tiled()  # warm-up: trace both compiled calls once
    times = {"bare": [], "tiled": []}
    for _ in range(args.repeats):  # interleaved, so load changes on a shared machine hit both alike
        for name, fn in (("bare", bare), ("tiled", tiled)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    bare_t, tiled_t = statistics.median(times["bare"]), statistics.median(times["tiled"])
    mpix = args.size**2 / 1e6
    print(f"bare forward pass: median {bare_t:.3f} s  (runs: {', '.join(f'{t:.3f}' for t in times['bare'])})")
    print(f"tiled prediction:  median {tiled_t:.3f} s  (runs: {', '.join(f'{t:.3f}' for t in times['tiled'])}), "
          f"{mpix / tiled_t:.2f} Mpx/s, {n_tiles * passes / tiled_t:.1f} tiles/s")
    print(f"ratio of the fastest runs (less sensitive to other load): {min(times['tiled']) / min(times['bare']):.3f}")
    print(f"ratio: {tiled_t / bare_t:.3f}")


if __name__ == "__main__":
    main()
