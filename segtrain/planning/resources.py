"""The device, memory and time model the plan's rules size the model and the schedule by.

- **Device** (`device`, `memory_target`): cpu or gpu, and the memory training may use on it.
- **Memory** (`activation_values`, `training_bytes`): what one training step of segtrain's U-Net
  (`segtrain.model.build_unet`) holds, per image, for a crop, depth, base filters, channels and classes.
- **Time** (`forward_flops`, `images_per_second`): the U-Net's multiply-adds per image, and an assumed effective
  rate per device, to turn a time budget into epochs.

Both models are documented where they are defined; `benchmarks/plan_memory.py` checks them against a measured
training step.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Optional

from segtrain.planning.encoding import Decision

GB = 1024**3
MB = 1024**2

DEFAULT_GPU_MEMORY = 8 * GB
"""GPU memory assumed when nvidia-smi cannot tell (use --memory)."""
CPU_MEMORY_SHARE = 0.25
CPU_MEMORY_CAP = 8 * GB


def _gpu_visible() -> bool:
    """An NVIDIA GPU the driver lists, unless CUDA_VISIBLE_DEVICES hides every one (no TensorFlow import)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    gpus = Path("/proc/driver/nvidia/gpus")
    return gpus.is_dir() and any(gpus.iterdir())


def device(requested: Optional[str] = None) -> Decision:
    """cpu or gpu: as given (--device), else gpu when the NVIDIA driver lists one."""
    if requested:
        return Decision(requested, f"--device {requested}")
    if _gpu_visible():
        return Decision("gpu", "an NVIDIA GPU is visible (/proc/driver/nvidia)")
    return Decision("cpu", "no GPU visible")


def total_ram() -> int:
    """Physical memory in bytes, or the cgroup's limit when that is lower (containers)."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and 0 < int(text) < total:
            total = int(text)
    return total


def _gpu_memory() -> Optional[int]:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout
        return int(out.split()[0]) * MB
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return None


def memory_target(device_name: str, requested: Optional[int] = None) -> Decision:
    """The memory training may use: --memory; else on the CPU 25% of the RAM, at most 8 GB (the machine keeps
    running other work); on a GPU its memory (nvidia-smi), else 8 GB assumed."""
    if requested:
        return Decision(int(requested), f"--memory {format_bytes(requested)}")
    if device_name == "gpu":
        found = _gpu_memory()
        if found:
            return Decision(found, f"GPU memory {format_bytes(found)} (nvidia-smi)")
        return Decision(DEFAULT_GPU_MEMORY, f"GPU memory unknown, {format_bytes(DEFAULT_GPU_MEMORY)} assumed "
                                            "(pass --memory)")
    ram = total_ram()
    target = int(min(CPU_MEMORY_SHARE * ram, CPU_MEMORY_CAP))
    return Decision(target, f"CPU: 25% of {format_bytes(ram)} RAM, at most {format_bytes(CPU_MEMORY_CAP)}")


def format_bytes(n: float) -> str:
    return f"{n / GB:.1f} GB" if n >= GB else f"{n / MB:.0f} MB"


# ---------------------------------------------------------------------------- the memory model

BYTES_PER_VALUE = {"cpu": 4, "gpu": 2}
"""float32 on the CPU; mixed_float16 activations on a GPU (segtrain's `precision: auto`)."""
TRAINING_FACTOR = {"cpu": 1.25, "gpu": 2.0}
"""Bytes a training step holds per byte of kept activations (`activation_values`). The forward pass keeps every
layer's output for the backward pass; the backward pass adds gradients the size of the activations it is working
through (freeing them as it goes), and TensorFlow's kernels their temporaries (convolution workspaces, the loss's
per-pixel tensors). Measured on the CPU (benchmarks/plan_memory.py, depth 4, 8-32 filters, crops 128-256, batches
2-8): the first step's peak RSS growth was 0.65-1.0 x the kept activations plus about 80 MB, not the 3 x of the usual
rule of thumb: TensorFlow frees each activation once its gradient is computed. 1.25 keeps headroom for segtrain's
real step (two loss terms, class weights, several steps per call, the input pipeline's buffers); the estimate was
0.98-1.31 x the measured growth. GPU: 2, assumed (the BFC allocator rounds and fragments; cuDNN picks workspaces by
the memory it finds), not measured: no GPU here."""
RUNTIME_BYTES = {"cpu": 800 * MB, "gpu": 600 * MB}
"""Memory taken before any step. CPU: a process that imported TensorFlow, built the model and Adam had an RSS of
610-700 MB (benchmarks/plan_memory.py), and the first step's graph optimisation adds about 80 MB. GPU: the CUDA
context and cuDNN/cuBLAS handles (assumed)."""


def output_channels(num_classes: int) -> int:
    """segtrain.model.output_channels: one sigmoid channel for two classes, one per class otherwise."""
    return 1 if num_classes == 2 else num_classes


def activation_values(crop: int, depth: int, base_filters: int, channels: int, classes: int) -> float:
    """Values of the layer outputs one image leaves for the backward pass of `build_unet` (batch_norm on).

    With A_l = (crop / 2**l)**2 the pixels and f_l = base_filters * 2**l the filters at level l, counting every
    layer's output (Keras keeps what the gradients need; BatchNorm and ReLU need their inputs and outputs):
    ```
    encoder level l   conv, BN, ReLU twice           6 f_l A_l   + max-pool  f_l A_l / 4
    bottleneck        conv, BN, ReLU twice           6 f_D A_D
    decoder level l   transpose conv f_l, concat 2 f_l, conv, BN, ReLU twice    9 f_l A_l
    input and output  image + scaled image, logits and ~4 loss tensors          (2 C + 5 K') A_0
    ```
    Since f_l A_l = base_filters crop**2 / 2**l, the sum is about 30.5 base_filters crop**2 values: doubling the crop
    quadruples it, doubling the filters doubles it, the depth barely matters.
    """
    out = output_channels(classes)
    area = float(crop) * crop
    total = (2 * channels + 5 * out) * area
    for level in range(depth):
        total += 15.25 * base_filters * 2**level * area / 4**level
    total += 6 * base_filters * 2**depth * area / 4**depth
    return total


def parameter_count(depth: int, base_filters: int, channels: int, classes: int) -> int:
    """Trainable and BatchNorm parameters of `build_unet` (batch_norm on; convolutions without bias before BN)."""
    out = output_channels(classes)
    f = [base_filters * 2**level for level in range(depth + 1)]
    count, previous = 0, channels
    for level in range(depth + 1):  # encoder levels and the bottleneck
        count += 9 * previous * f[level] + 9 * f[level] * f[level] + 8 * f[level]
        previous = f[level]
    for level in reversed(range(depth)):
        count += 4 * f[level + 1] * f[level] + f[level]  # transpose conv (with bias)
        count += 9 * 2 * f[level] * f[level] + 9 * f[level] * f[level] + 8 * f[level]
    return count + f[0] * out + out


def training_bytes(crop: int, depth: int, base_filters: int, channels: int, classes: int, batch: int,
                   device_name: str = "cpu") -> float:
    """Estimated memory of one training step on top of the runtime (`RUNTIME_BYTES`): the batch's activations
    (`activation_values` x bytes per value x `TRAINING_FACTOR`) plus the float32 weights, gradients and Adam's two
    slots (4 x 4 bytes per parameter)."""
    per_image = activation_values(crop, depth, base_filters, channels, classes) * BYTES_PER_VALUE[device_name]
    weights = 16 * parameter_count(depth, base_filters, channels, classes)
    return batch * per_image * TRAINING_FACTOR[device_name] + weights


# ---------------------------------------------------------------------------- the time model

CPU_FLOPS_PER_CORE = 20e9
"""Effective FLOP/s of one CPU core in a training step (TensorFlow's oneDNN kernels, float32), scaled by the cores of
the planning machine (at most 16). Measured on a shared 2-core AMD EPYC (benchmarks/plan_memory.py, depth 4, crop
128-256, batch 4-8): 39-107 GFLOP/s for the step on a quiet machine (lowest with 8 or 32 base filters and batch
8), 27-59 with other jobs running; segtrain's real path adds the data pipeline, two loss terms and validation (fit_throughput.py: 20.9 crops/s
at crop 128, about 90 GFLOP/s). 20 per core is the low end: a plan should fit its budget."""
GPU_FLOPS = 8e12
"""Assumed effective FLOP/s of one GPU under mixed precision (a mid-range card at ~25% of its tensor-core peak);
not measured here: no GPU was available."""
TILE_OVERHEAD = 1.8
"""Validation predicts whole images by overlapping tiles (overlap 0.25): about 1.8 x the image's pixels."""


def forward_flops(crop: int, depth: int, base_filters: int, channels: int, classes: int) -> float:
    """Floating-point operations (2 per multiply-add) of one forward pass over a crop x crop image:
    3x3 convolutions 18 C_in C_out A, 2x2 stride-2 transposed convolutions 2 C_in C_out A_out, the 1x1 logits."""
    out = output_channels(classes)
    f = [base_filters * 2**level for level in range(depth + 1)]
    area = [float(crop) * crop / 4**level for level in range(depth + 1)]
    flops, previous = 0.0, channels
    for level in range(depth + 1):
        flops += 18 * (previous * f[level] + f[level] * f[level]) * area[level]
        previous = f[level]
    for level in reversed(range(depth)):
        flops += 2 * f[level + 1] * f[level] * area[level]
        flops += 18 * (2 * f[level] * f[level] + f[level] * f[level]) * area[level]
    return flops + 2 * f[0] * out * area[0]


def device_flops(device_name: str) -> float:
    if device_name == "gpu":
        return GPU_FLOPS
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return CPU_FLOPS_PER_CORE * min(cores, 16)


def images_per_second(crop: int, depth: int, base_filters: int, channels: int, classes: int,
                      device_name: str) -> float:
    """Training crops per second: the device's rate over 3 forward passes per crop (forward + backward)."""
    return device_flops(device_name) / (3 * forward_flops(crop, depth, base_filters, channels, classes))


def receptive_field(depth: int) -> int:
    """Side of the input window one bottleneck pixel sees: 1 + the 3x3 convolutions' and 2x2 pools' reach,
    9 * 2**depth - 4 (68 px at depth 3, 140 at 4, 284 at 5)."""
    return 9 * 2**depth - 4
