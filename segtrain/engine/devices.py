"""Choosing the tf.distribute strategy and the mixed-precision policy from the config."""

from __future__ import annotations

import json
import os

import keras
import tensorflow as tf

from segtrain.errors import ConfigError


def make_strategy(distribute: str) -> tf.distribute.Strategy:
    """auto: MirroredStrategy with several GPUs, else the default strategy; multi_worker reads TF_CONFIG."""
    gpus = tf.config.list_logical_devices("GPU")
    if distribute == "multi_worker":
        if not os.environ.get("TF_CONFIG"):
            raise ConfigError(
                "train.distribute: multi_worker needs the cluster in the TF_CONFIG environment variable "
                '(e.g. {"cluster": {"worker": ["host1:12345", "host2:12345"]}, "task": {"type": "worker", "index": 0}}).'
            )
        try:
            json.loads(os.environ["TF_CONFIG"])
        except ValueError:
            raise ConfigError("TF_CONFIG: not valid JSON; see the README's multi-machine section.") from None
        return tf.distribute.MultiWorkerMirroredStrategy()
    if distribute == "mirrored" or (distribute == "auto" and len(gpus) > 1):
        devices = [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices=devices)
    return tf.distribute.get_strategy()


def resolve_precision(precision: str) -> str:
    """The Keras dtype policy name: `auto` is mixed_float16 on a CUDA GPU and float32 elsewhere."""
    if precision == "auto":
        return "mixed_float16" if tf.config.list_physical_devices("GPU") else "float32"
    return precision


def set_precision(precision: str) -> str:
    """Set Keras's global dtype policy and return its name."""
    policy = resolve_precision(precision)
    keras.mixed_precision.set_global_policy(policy)
    return policy


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """True on the worker that writes the run folder (always true off multi-worker)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    return task_type is None or task_type == "chief" or (task_type == "worker" and task_id == 0)
