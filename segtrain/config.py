"""The typed, validated configuration: every default lives here, in one place.

A config is a YAML file with four sections (`data`, `model`, `loss`, `train`) and an
optional `predict` section. It is read with `yaml.safe_load`, overridden by
`--set dotted.key=value` pairs, then checked against the dataclasses below: unknown
keys are rejected with their dotted path and the closest valid name, wrong types are
rejected with the expected type.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from segtrain.errors import ConfigError


@dataclass
class MaskConfig:
    """How raw mask pixel values become class indices (choose one of values/threshold/palette)."""

    values: Optional[dict[int, int]] = None
    """Raw value -> class index, e.g. {0: 1, 255: 0}. Default (all three unset): value v is class v."""
    threshold: Optional[float] = None
    """Binary masks: raw value > threshold is class 1, the rest class 0 (soft masks)."""
    palette: Optional[dict[str, list[int]]] = None
    """RGB masks: class name -> [r, g, b]."""
    ignore: list[Any] = field(default_factory=list)
    """Raw values (or [r, g, b] colours) that count in no loss and no metric, e.g. [255]."""


@dataclass
class AugmentConfig:
    """Random augmentations applied to image and mask by the same call (training only)."""

    flip: bool = True
    """Random horizontal and vertical flips."""
    rotate90: bool = True
    """Random rotations by multiples of 90 degrees (square crops only)."""


@dataclass
class DataConfig:
    """Where the data set is and how it is read."""

    root: str = ""
    """Data set folder holding {train,val[,test]}/{images,masks}/; a relative path is taken from the config
    file's folder if it exists there, else from the working directory."""
    classes: list[str] = field(default_factory=lambda: ["background", "foreground"])
    """Class names, in class-index order. Two classes train one sigmoid channel."""
    mask: MaskConfig = field(default_factory=MaskConfig)
    train_split: str = "train"
    val_split: str = "val"
    crop: Optional[int] = 128
    """Side of the square random training crop (a multiple of 2**model.depth); null trains on whole images."""
    resize: Optional[list[int]] = None
    """[height, width] every image (and mask, by nearest neighbour) is resized to before cropping."""
    batch_size: int = 8
    """Global batch size (split across replicas)."""
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    cache: Literal["memory", "disk", "none"] = "memory"
    """Keep decoded images in memory, in a cache file in the run folder, or re-read every epoch (streams)."""
    shuffle_buffer: int = 16
    """Shuffle buffer of decoded images when cache is disk (the cache file itself is in a seeded random order;
    memory and none shuffle the whole set). Its size bounds the memory of a streaming run."""
    max_image_pixels: int = 100_000_000
    """Images with more pixels than this are refused (decompression-bomb guard)."""


@dataclass
class ModelConfig:
    """The U-Net."""

    depth: int = 4
    """Number of down-sampling steps; crops must be multiples of 2**depth."""
    base_filters: int = 16
    """Filters of the first level; doubled at each level down."""
    batch_norm: bool = True
    dropout: float = 0.0
    """Dropout rate at the bottleneck."""


@dataclass
class TrainConfig:
    """The training loop."""

    epochs: int = 20
    steps_per_epoch: Optional[int] = None
    """Optimizer steps per epoch; null = ceil(training images / batch_size)."""
    seed: int = 0
    learning_rate: float = 1e-3
    schedule: Literal["cosine", "constant", "plateau"] = "cosine"
    """Learning-rate schedule after warm-up; plateau: constant, lowered when `monitor` stalls."""
    warmup_epochs: float = 0.0
    plateau_factor: float = 0.5
    """schedule plateau: multiply the learning rate by this (0 < factor < 1) when `monitor` stalls."""
    plateau_patience: int = 2
    """schedule plateau: validated epochs without improvement of `monitor` before the rate is lowered."""
    plateau_min_learning_rate: float = 1e-6
    """schedule plateau: the rate is never lowered below this."""
    weight_decay: float = 0.0
    """Decoupled weight decay (AdamW) when > 0."""
    grad_clip_norm: Optional[float] = None
    precision: Literal["auto", "float32", "mixed_float16", "mixed_bfloat16"] = "auto"
    """auto: mixed_float16 on a CUDA GPU, float32 on the CPU."""
    distribute: Literal["auto", "none", "mirrored", "multi_worker"] = "auto"
    monitor: str = "val_mean_iou"
    """History column that picks best.keras (higher is better for IoU/dice/accuracy, lower for losses)."""
    early_stopping_patience: Optional[int] = None
    """Stop after this many epochs without improvement of `monitor`."""
    validate_every: int = 1
    deterministic: bool = False
    """Use deterministic TF ops (slower; makes runs bit-reproducible on the CPU)."""
    keep_checkpoints: int = 3
    checkpoint_every_steps: Optional[int] = None
    """Also checkpoint every this many optimizer steps inside an epoch (a kill then loses little); null: epoch ends only."""


@dataclass
class PredictConfig:
    """How eval and predict turn probabilities into masks."""

    decision: Literal["argmax", "cost", "threshold"] = "argmax"
    """argmax; cost: least expected cost under the loss's cost matrix; threshold: binary only."""
    threshold: Optional[float] = None
    """Foreground probability threshold for decision=threshold."""
    tile_size: Optional[int] = None
    """Tile side for large images; null: 2 x data.crop (or 512)."""
    overlap: float = 0.25
    tta: bool = False
    """Average over flips at test time."""
    batch_size: int = 4
    """Tiles per forward pass."""
    fp_cost: Any = None
    """Costs for decision=cost, per class (list or {class: cost}); see the `cost_sensitive` loss term."""
    fn_cost: Any = None
    cost_matrix: Any = None
    """Full K x K decision cost matrix C[true][pred]; overrides fp_cost/fn_cost. Without any of the three,
    decision=cost uses the cost_sensitive loss term's matrix."""


@dataclass
class Config:
    """A whole segtrain config."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: Any = None
    """The loss section; validated and normalised by segtrain.losses.normalize_loss_config."""
    train: TrainConfig = field(default_factory=TrainConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)

    @property
    def num_classes(self) -> int:
        return len(self.data.classes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------- loading


def load_config(path: str | Path, overrides: list[str] = ()) -> Config:
    """Read a YAML config, apply `KEY=VALUE` overrides and return the validated Config."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found. Pass the path of a YAML file, e.g. configs/roads.yaml.")
    try:
        raw = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        where = ""
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: YAML syntax error{where}: {problem}. Fix the YAML and run again.") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping with sections data, model, loss, train.")
    for item in overrides:
        apply_override(raw, item)
    config = config_from_dict(raw)
    config.data.root = resolve_data_root(config.data.root, path)
    return config


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (YAML would keep the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping; keep one", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def resolve_data_root(root: str, config_path: Path) -> str:
    """A relative data root is taken from the config's folder, else from the working directory; made absolute."""
    if not root:
        raise ConfigError("data.root: missing. Set it to the data set folder, e.g. `data: {root: data_samples/roads}`.")
    candidate = Path(root)
    if not candidate.is_absolute() and (config_path.parent / candidate).exists():
        candidate = config_path.parent / candidate
    return str(candidate.resolve())  # absolute, so the saved config works from any folder


def apply_override(raw: dict, item: str) -> None:
    """Apply one `dotted.key=value` to the raw dict; the value is parsed as YAML (typed by the schema later).

    Keys may index lists: `--set loss.terms[1].weight=0.2`.
    """
    if "=" not in item:
        raise ConfigError(f"--set {item}: expected KEY=VALUE, e.g. --set train.epochs=2.")
    key, _, text = item.partition("=")
    steps = _override_steps(key.strip(), item)
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    node = raw
    for n, step in enumerate(steps[:-1]):
        where = _steps_text(steps[: n + 1])
        following = steps[n + 1]
        if isinstance(step, int):
            if not isinstance(node, list) or step >= len(node):
                raise ConfigError(f"--set {item}: {where} does not exist; the list has {len(node)} item(s).")
            child = node[step]
            if isinstance(child, str) and isinstance(following, str):  # a bare term name: `- jaccard`
                child = node[step] = {"name": child}
        else:
            child = node.get(step)
            if child is None:
                child = node[step] = [] if isinstance(following, int) else {}
            elif isinstance(child, str) and node is raw and step == "loss":
                child = node[step] = {"terms": [{"name": child}]}  # short form `loss: jaccard`
        if isinstance(following, int) != isinstance(child, list) or not isinstance(child, (list, dict)):
            kind = "a list" if isinstance(child, list) else "a section" if isinstance(child, dict) else "a value"
            raise ConfigError(f"--set {item}: {where} is {kind}; check the key.")
        node = child
    last = steps[-1]
    if isinstance(last, int):
        if last >= len(node):
            raise ConfigError(f"--set {item}: {_steps_text(steps)} does not exist; the list has {len(node)} item(s).")
    node[last] = value


def _override_steps(key: str, item: str) -> list:
    """`loss.terms[1].weight` -> ["loss", "terms", 1, "weight"]."""
    steps: list = []
    for part in key.split("."):
        match = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_-]*)((?:\[\d+\])*)", part)
        if not match:
            raise ConfigError(f"--set {item}: bad key {key!r}; use a dotted path such as train.epochs "
                              "or loss.terms[0].weight.")
        steps.append(match.group(1))
        steps += [int(i) for i in re.findall(r"\[(\d+)\]", match.group(2))]
    return steps


def _steps_text(steps: list) -> str:
    text = ""
    for step in steps:
        text += f"[{step}]" if isinstance(step, int) else (f".{step}" if text else step)
    return text


def config_from_dict(raw: dict) -> Config:
    """Validate a raw mapping against the schema; raise ConfigError naming the dotted key."""
    config = _build_dataclass(Config, raw, "")
    _check_semantics(config)
    from segtrain.losses import normalize_loss_config

    config.loss = normalize_loss_config(config.loss, config.data.classes)
    _check_predict(config)
    return config


def decision_cost_matrix(config: Config):
    """The K x K matrix for decision=cost: predict's own costs, else the cost_sensitive loss term's, else None."""
    import numpy as np

    from segtrain.losses.config import _cost_matrix, _per_class, cost_matrix_from_config, shorthand_cost_matrix

    predict, classes = config.predict, config.data.classes
    if predict.cost_matrix is not None:
        return np.asarray(_cost_matrix(predict.cost_matrix, "predict.cost_matrix", classes), float)
    if predict.fp_cost is not None or predict.fn_cost is not None:
        fp = None if predict.fp_cost is None else _per_class(predict.fp_cost, "predict.fp_cost", classes)
        fn = None if predict.fn_cost is None else _per_class(predict.fn_cost, "predict.fn_cost", classes)
        return shorthand_cost_matrix(fp, fn, len(classes))
    return cost_matrix_from_config(config.loss, classes)


def _check_predict(config: Config) -> None:
    """Decision settings are checked now, not after training."""
    predict = config.predict
    matrix = decision_cost_matrix(config)
    if predict.decision == "cost" and matrix is None:
        raise ConfigError(
            "predict.decision: 'cost' needs costs: set predict.fp_cost / predict.fn_cost (or predict.cost_matrix) "
            "in the config (for eval and predict: in the run's config.yaml), or add a cost_sensitive loss term."
        )
    if predict.decision == "threshold":
        if len(config.data.classes) != 2:
            raise ConfigError("predict.decision: 'threshold' is for two classes only; use argmax or cost.")
        if predict.threshold is None:
            raise ConfigError("predict.threshold: set it (e.g. 0.5) when predict.decision is 'threshold'.")


def save_config(config: Config, path: Path) -> None:
    """Write the resolved config as YAML."""
    from segtrain.atomic import write_text_atomic

    write_text_atomic(yaml.safe_dump(config.to_dict(), sort_keys=False), path)


# ---------------------------------------------------------------------------- type checking


def _build_dataclass(cls, raw: Any, path: str):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping of keys, got {raw!r}.")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        dotted = f"{path}.{key}" if path else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else f" Valid keys: {', '.join(names)}."
            raise ConfigError(f"{dotted}: unknown key.{hint}")
        kwargs[key] = _coerce(value, hints[key], dotted)
    return cls(**kwargs)


_EXPONENT_FORM = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def parse_number(value: Any) -> Optional[float]:
    """A config number as float, or None when `value` is not one.

    The one rule for every section: ints and floats (not booleans), and strings in exponent
    form such as `1e-5` or `1E3`, which PyYAML (YAML 1.1) reads as strings because they lack a
    dot. Other strings, quoted numbers included, are not numbers.
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str) and _EXPONENT_FORM.fullmatch(value.strip()):
        return float(value)
    return None


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if tp is Any:
        return "any value"
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        k, v = typing.get_args(tp)
        return f"a mapping {_type_name(k)} -> {_type_name(v)}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp, path: str):
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return _build_dataclass(tp, value, path)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        members = [a for a in args if a is not type(None)]
        if len(members) == 1:  # Optional[X]: let X's own message (with the inner key) through
            return _coerce(value, members[0], path)
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path)
            except ConfigError:
                continue
        raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}.")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value in allowed:
            return value
        close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"{path}: {value!r} is not one of {', '.join(map(str, allowed))}.{hint}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}.")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}.")
        key_tp, val_tp = typing.get_args(tp)
        return {_coerce(k, key_tp, f"{path}.{k}"): _coerce(v, val_tp, f"{path}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        number = parse_number(value)
        if number is not None:
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}.")


# ---------------------------------------------------------------------------- semantic checks


def _check_semantics(config: Config) -> None:
    data, model, train = config.data, config.model, config.train
    if len(data.classes) < 2:
        raise ConfigError("data.classes: name at least two classes, e.g. [background, road].")
    if len(set(data.classes)) != len(data.classes):
        raise ConfigError("data.classes: class names must be unique.")
    for i, name in enumerate(data.classes):
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise ConfigError(
                f"data.classes[{i}]: {name!r} is not a valid class name; use letters, digits, '_', '.' or '-' "
                "(names appear in file names and CSV columns)."
            )
    mask = data.mask
    chosen = [name for name in ("values", "threshold", "palette") if getattr(mask, name) is not None]
    if len(chosen) > 1:
        raise ConfigError(f"data.mask: set only one of values, threshold, palette (got {', '.join(chosen)}).")
    if mask.threshold is not None:
        if len(data.classes) != 2:
            raise ConfigError("data.mask.threshold: a threshold makes two classes; data.classes must name exactly two.")
        if not 0 <= mask.threshold < 255:
            raise ConfigError(f"data.mask.threshold: {mask.threshold} is outside 0..254; masks hold values 0..255.")
    if mask.values is not None:
        for raw_value, cls in mask.values.items():
            if not 0 <= raw_value <= 255:
                raise ConfigError(f"data.mask.values.{raw_value}: raw mask values are 0..255 in 8-bit masks.")
            if not 0 <= cls < len(data.classes):
                raise ConfigError(
                    f"data.mask.values.{raw_value}: class index {cls} is out of range; "
                    f"use 0..{len(data.classes) - 1} (data.classes has {len(data.classes)} names)."
                )
            if raw_value in mask.ignore:
                raise ConfigError(f"data.mask.values.{raw_value}: this value is also in data.mask.ignore; keep one.")
        unreachable = [name for i, name in enumerate(data.classes) if i not in mask.values.values()]
        if unreachable:
            raise ConfigError(
                f"data.mask.values: no raw value maps to class(es) {', '.join(unreachable)}; "
                "map a value to each class in data.classes."
            )
    if mask.palette is not None:
        for name, colour in mask.palette.items():
            if name not in data.classes:
                raise ConfigError(f"data.mask.palette.{name}: not a class name; use one of {', '.join(data.classes)}.")
            if len(colour) != 3 or not all(0 <= c <= 255 for c in colour):
                raise ConfigError(f"data.mask.palette.{name}: expected [r, g, b] with values 0..255, got {colour}.")
        missing = [c for c in data.classes if c not in mask.palette]
        if missing:
            raise ConfigError(f"data.mask.palette: no colour for class(es) {', '.join(missing)}.")
        colours = [tuple(c) for c in mask.palette.values()]
        for name, colour in mask.palette.items():
            if colours.count(tuple(colour)) > 1:
                raise ConfigError(f"data.mask.palette.{name}: colour {colour} is used by another class too.")
            if list(colour) in mask.ignore:
                raise ConfigError(f"data.mask.palette.{name}: colour {colour} is also in data.mask.ignore.")
    for i, value in enumerate(mask.ignore):
        ok = isinstance(value, int) and not isinstance(value, bool) or (
            isinstance(value, list) and len(value) == 3 and all(isinstance(c, int) for c in value)
        )
        if ok:
            channels = value if isinstance(value, list) else [value]
            ok = all(0 <= c <= 255 for c in channels)
        if not ok:
            raise ConfigError(
                f"data.mask.ignore[{i}]: expected a raw mask value 0..255 or an [r, g, b] colour, got {value!r}."
            )
    divisor = 2**model.depth
    if model.depth < 1 or model.depth > 7:
        raise ConfigError(f"model.depth: {model.depth} is out of range; use 1..7 (4 is usual).")
    if model.base_filters < 1:
        raise ConfigError("model.base_filters: must be a positive integer, e.g. 16.")
    if not 0.0 <= model.dropout < 1.0:
        raise ConfigError("model.dropout: must be in [0, 1).")
    if data.crop is not None and (data.crop <= 0 or data.crop % divisor):
        raise ConfigError(
            f"data.crop: {data.crop} is not a positive multiple of 2**model.depth = {divisor}; "
            f"use e.g. {max(divisor, round((data.crop or divisor) / divisor) * divisor)}."
        )
    if data.resize is not None and (len(data.resize) != 2 or min(data.resize) <= 0):
        raise ConfigError("data.resize: expected [height, width] with positive values.")
    if data.batch_size < 1:
        raise ConfigError("data.batch_size: must be at least 1.")
    if data.shuffle_buffer < 1:
        raise ConfigError("data.shuffle_buffer: must be at least 1.")
    if data.max_image_pixels < 1:
        raise ConfigError("data.max_image_pixels: must be positive, e.g. 100000000.")
    if train.epochs < 1:
        raise ConfigError("train.epochs: must be at least 1.")
    if train.steps_per_epoch is not None and train.steps_per_epoch < 1:
        raise ConfigError("train.steps_per_epoch: must be at least 1 (or null for one pass over the data).")
    if not math.isfinite(train.learning_rate) or train.learning_rate <= 0:
        raise ConfigError("train.learning_rate: must be positive, e.g. 0.001.")
    if train.grad_clip_norm is not None and train.grad_clip_norm <= 0:
        raise ConfigError("train.grad_clip_norm: must be positive (or null for no clipping).")
    if not 0 <= train.seed < 2**31:
        raise ConfigError(f"train.seed: {train.seed} is out of range; use 0 .. 2**31 - 1.")
    if train.validate_every < 1:
        raise ConfigError("train.validate_every: must be at least 1.")
    predict = config.predict
    if predict.threshold is not None and not 0.0 < predict.threshold < 1.0:
        raise ConfigError("predict.threshold: must be between 0 and 1.")
    if not 0.0 <= predict.overlap < 1.0:
        raise ConfigError("predict.overlap: must be in [0, 1).")
    if predict.batch_size < 1:
        raise ConfigError("predict.batch_size: must be at least 1.")
    if predict.tile_size is not None and (predict.tile_size <= 0 or predict.tile_size % divisor):
        raise ConfigError(f"predict.tile_size: must be a positive multiple of 2**model.depth = {divisor}.")
    _check_train(config)


def _check_train(config: Config) -> None:
    """Checks of the train section (ConfigError naming the key)."""
    train = config.train
    if train.schedule == "plateau":
        if not 0.0 < train.plateau_factor < 1.0:
            raise ConfigError(f"train.plateau_factor: must be between 0 and 1 (e.g. 0.5), got {train.plateau_factor}.")
        if train.plateau_patience < 1:
            raise ConfigError(f"train.plateau_patience: must be at least 1, got {train.plateau_patience}.")
        if not 0.0 <= train.plateau_min_learning_rate <= train.learning_rate:
            raise ConfigError(
                f"train.plateau_min_learning_rate: must be between 0 and train.learning_rate "
                f"({train.learning_rate}), got {train.plateau_min_learning_rate}."
            )
    if train.warmup_epochs < 0 or not math.isfinite(train.warmup_epochs):
        raise ConfigError(f"train.warmup_epochs: must be 0 or more, got {train.warmup_epochs}.")
    if train.weight_decay < 0:
        raise ConfigError(f"train.weight_decay: must be 0 or more, got {train.weight_decay}.")
    if train.early_stopping_patience is not None and train.early_stopping_patience < 1:
        raise ConfigError("train.early_stopping_patience: must be at least 1 (or null for no early stopping).")
    if train.keep_checkpoints < 1:
        raise ConfigError("train.keep_checkpoints: must be at least 1.")
    if train.checkpoint_every_steps is not None and train.checkpoint_every_steps < 1:
        raise ConfigError("train.checkpoint_every_steps: must be at least 1 (or null for epoch ends only).")
    columns = monitor_columns(config.data.classes)
    if train.monitor not in columns:
        close = difflib.get_close_matches(train.monitor, columns, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(
            f"train.monitor: {train.monitor!r} is not a history column.{hint} "
            f"Use one of {', '.join(columns)}."
        )


def monitor_columns(classes: list[str]) -> list[str]:
    """Columns of history.csv that train.monitor can name."""
    columns = ["loss", "val_loss", "val_mean_iou", "val_pixel_accuracy"]
    for name in classes:
        columns += [f"val_iou_{name}", f"val_dice_{name}"]
    return columns
