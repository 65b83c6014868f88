"""Choosing the tf.distribute strategy and the mixed-precision policy from the config.

`SEGTRAIN_CPU_DEVICES=N` (environment) splits the CPU into N logical devices before
TensorFlow initialises, so `train.distribute: mirrored` runs N replicas on a machine
without GPUs (tests, debugging a multi-GPU config on a laptop). It must be set before
the process starts; segtrain applies it at the start of `fit`.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import keras
import tensorflow as tf

from segtrain.cluster import is_chief_task, tf_config
from segtrain.errors import ConfigError

CPU_DEVICES_ENV = "SEGTRAIN_CPU_DEVICES"


def configure_cpu_devices() -> int:
    """Apply SEGTRAIN_CPU_DEVICES (if set) and return the number of logical CPU devices asked for (1 if unset)."""
    text = os.environ.get(CPU_DEVICES_ENV, "").strip()
    if not text:
        return 1
    try:
        count = int(text)
    except ValueError:
        count = 0
    if count < 1:
        raise ConfigError(f"{CPU_DEVICES_ENV}={text!r}: expected a positive integer (the number of logical CPU devices).")
    cpu = tf.config.list_physical_devices("CPU")[0]
    wanted = [tf.config.LogicalDeviceConfiguration() for _ in range(count)]
    current = tf.config.get_logical_device_configuration(cpu)
    if len(current or [None]) == count:
        return count
    try:
        tf.config.set_logical_device_configuration(cpu, wanted)
    except RuntimeError:
        raise ConfigError(
            f"{CPU_DEVICES_ENV}={count}: TensorFlow was already initialised in this process, so the CPU can no "
            "longer be split; set the variable before starting segtrain."
        ) from None
    return count


def make_strategy(distribute: str) -> tf.distribute.Strategy:
    """The tf.distribute strategy for `train.distribute`; create it before any other TensorFlow work.

    auto: MirroredStrategy when more than one GPU is visible, else one device. none: one
    device. mirrored: MirroredStrategy over every GPU (or every logical CPU device when there
    is no GPU). multi_worker: MultiWorkerMirroredStrategy over the cluster in TF_CONFIG.
    One device is OneDeviceStrategy on the first GPU, whose distributed datasets prefetch the
    next batches onto the GPU ahead of the step (as MirroredStrategy does on each of its
    devices), or TensorFlow's default strategy on the CPU.
    """
    if distribute == "multi_worker":
        if tf_config() is None:
            raise ConfigError(
                "train.distribute: multi_worker needs the cluster in the TF_CONFIG environment variable "
                '(e.g. {"cluster": {"worker": ["host1:12345", "host2:12345"]}, "task": {"type": "worker", "index": 0}}).'
            )
        return tf.distribute.MultiWorkerMirroredStrategy()
    gpus = tf.config.list_logical_devices("GPU")
    if distribute == "mirrored" or (distribute == "auto" and len(gpus) > 1):
        devices = [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices=devices)
    if gpus:
        return tf.distribute.OneDeviceStrategy(gpus[0].name)
    return tf.distribute.get_strategy()


def resolve_precision(precision: str) -> str:
    """The Keras dtype policy name: `auto` is mixed_float16 on a CUDA GPU and float32 elsewhere."""
    if precision == "auto":
        return "mixed_float16" if tf.config.list_physical_devices("GPU") else "float32"
    return precision


def set_precision(precision: str) -> str:
    """Set Keras's global dtype policy and return its name (process-global: callers restore it when done)."""
    policy = resolve_precision(precision)
    keras.mixed_precision.set_global_policy(policy)
    return policy


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """True on the worker that writes the run folder (always true off multi-worker).

    With a `chief` task in the cluster, only the chief; otherwise worker 0 (TF's convention).
    """
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return True
    resolver = strategy.cluster_resolver
    return is_chief_task(resolver.cluster_spec().as_dict(), resolver.task_type, resolver.task_id)


@contextmanager
def training_process_settings(train):
    """Seed, op determinism and the precision policy of a run; yields the policy name, restores both after.

    `train` is the config's TrainConfig.
    """
    from tensorflow.python.framework import config as tf_config  # is/disable_op_determinism are not public

    policy_before = keras.mixed_precision.global_policy().name
    determinism_before = tf_config.is_op_determinism_enabled()
    try:
        if train.deterministic:
            tf.config.experimental.enable_op_determinism()
        keras.utils.set_random_seed(train.seed)
        yield set_precision(train.precision)
    finally:
        keras.mixed_precision.set_global_policy(policy_before)
        if train.deterministic and not determinism_before:
            tf_config.disable_op_determinism()


AUTO_STEPS_PER_EXECUTION = {"GPU": 32, "CPU": 8}
"""train.steps_per_execution: auto. On a GPU a U-Net step takes milliseconds, so 32 steps per call (Keras's own
advice for small steps) keep the host round trip off the device's path. On the CPU a real U-Net step takes a second
or more: 8 steps per call keep the progress bar and Ctrl-C responsive; benchmarks/step_overhead.py measured the
loop's cost per step there on par with Keras's fit at 32 steps per call (docs/BENCHMARKS.md)."""


def resolve_steps_per_execution(train) -> int:
    """train.steps_per_execution as a number (auto: AUTO_STEPS_PER_EXECUTION for the device)."""
    if train.steps_per_execution != "auto":
        return int(train.steps_per_execution)
    return AUTO_STEPS_PER_EXECUTION["GPU" if tf.config.list_physical_devices("GPU") else "CPU"]


def resolve_jit_compile(train, replicas: int) -> bool:
    """train.jit_compile as a bool. auto: XLA on a CUDA GPU with one replica and train.deterministic off.

    XLA failed here with several replicas (it cannot reach a variable on another device) and has no deterministic
    MaxPool gradient, so auto leaves it off there, and `true` is refused there. On the CPU it measured no faster on
    a real U-Net and adds a compile per run, so auto leaves it off.
    """
    if train.jit_compile == "auto":
        return bool(tf.config.list_physical_devices("GPU")) and replicas == 1 and not train.deterministic
    if train.jit_compile and replicas > 1:
        raise ConfigError(f"train.jit_compile: XLA steps under {replicas} replicas are not supported; "
                          "use jit_compile: false (or auto).")
    return bool(train.jit_compile)
