"""The typed, validated configuration: every default lives here, in one place.

A config is a YAML file with four sections (`data`, `model`, `loss`, `train`) and an
optional `predict` section. It is read with `yaml.safe_load`, overridden by
`--set dotted.key=value` pairs, then checked against the dataclasses below: unknown
keys are rejected with their dotted path and the closest valid name, wrong types are
rejected with the expected type.

Numbers may carry bounds (`NonNegative`, `Positive`, `Fraction`, `Bound`), and settings about
classes (`PerClass`, `CostMatrix`, `ClassNames`) are checked against `data.classes`, mappings
by class name becoming lists of K. The `loss` section's terms are the loss functions of
`segtrain.losses.functional.TERMS`: a term's settings are its function's keyword arguments
(`term_class`).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml

from segtrain.class_weights import STRATEGIES
from segtrain.errors import ConfigError
from segtrain.value_types import (Bound, ByClass, ClassNames, ClassSizes, CostMatrix, Fraction,  # noqa: F401
                                  NonNegative, PerClass, Positive, class_index, parse_number)


@dataclass
class MaskConfig:
    """How raw mask pixel values become class indices (choose one of values/threshold/palette)."""

    values: Optional[dict[int, int]] = None
    """Raw value -> class index, e.g. {0: 1, 255: 0}; values 0..65535 (16-bit masks, e.g. {0: 0, 1000: 1}). Default
    (all three unset): value v is class v."""
    threshold: Optional[float] = None
    """Binary masks: raw value > threshold is class 1, the rest class 0 (soft masks; 0..65534)."""
    palette: Optional[dict[str, list[int]]] = None
    """RGB masks: class name -> [r, g, b]."""
    ignore: list[Any] = field(default_factory=list)
    """Raw values 0..65535 (or [r, g, b] colours) that count in no loss and no metric, e.g. [255]."""


@dataclass
class ElasticConfig:
    """Elastic deformation: a smooth random displacement field moving image and mask together."""

    alpha: NonNegative = 2.0
    """Standard deviation of each displacement component, in pixels (how far pixels move)."""
    sigma: Positive = 8.0
    """Smoothness of the field: sigma of the Gaussian that smooths the noise, in pixels (the wobbles' size)."""


@dataclass
class AugmentConfig:
    """Random augmentations applied to image and mask by the same call (training only), keyed by the seed and the
    element index (`segtrain.data.augment`). Everything but the flips and 90-degree turns is off by default."""

    flip: bool = True
    """Random horizontal and vertical flips."""
    rotate90: bool = True
    """Random rotations by multiples of 90 degrees (square crops only)."""
    scale: Optional[list[Positive]] = None
    """[low, high] zoom factor, log-uniform, before the crop (image bilinear, mask nearest), e.g. [0.8, 1.25];
    null: off. Below 1 zooms out; a crop larger than the zoomed image is padded with ignored pixels."""
    rotate: NonNegative = 0.0
    """Rotation by an angle uniform in [-rotate, rotate] degrees (0..180) after the crop; the uncovered corners
    are ignored in the mask. 0: off."""
    elastic: Union[ElasticConfig, bool, None] = None
    """Elastic deformation {alpha, sigma} (true: the defaults); null or false: off."""
    brightness: NonNegative = 0.0
    """Add an offset uniform in +-brightness * 255 (0.1: +-10% of 0..255), image only. 0: off."""
    contrast: Annotated[float, Bound(">=", 0.0), Bound("<", 1.0)] = 0.0
    """Scale each channel's deviation from its mean by a factor uniform in [1 - contrast, 1 + contrast]. 0: off."""
    gamma: NonNegative = 0.0
    """x -> 255 (x / 255)**g, log g uniform in +-log(1 + gamma) (0.2: g in [1/1.2, 1.2]). 0: off."""
    blur: Optional[list[NonNegative]] = None
    """[low, high] sigma in pixels of a Gaussian blur, uniform, e.g. [0, 1]; null: off."""
    noise: NonNegative = 0.0
    """Standard deviation of additive Gaussian noise, in 8-bit units (e.g. 5). 0: off."""


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
    """Side of the square random training crop (a multiple of 2**model.depth, or of 32 with model.encoder); null trains on whole images."""
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
    sampling: dict[str, float] = field(default_factory=dict)
    """Class-aware crops: class name -> share of training crops centred on a random pixel of that class (e.g.
    {crack: 0.5}); shares sum to <= 1, the rest are placed uniformly, and an image without the class gets a uniform
    crop. Needs data.crop. Empty: every crop uniform."""
    val_fraction: Optional[Fraction] = None
    """Hold out this share of the `train_split` images as the validation split (seeded by train.seed, stratified by
    which classes each image holds), for data sets without a `val_split` folder. The held-out file names are
    recorded in the run folder (split.json): eval, calibrate and tune read the same images. null: use val_split."""
    normalize: Literal["fixed", "dataset"] = "fixed"
    """How the model scales the pixels it reads (0..255 by the fixed per-sample-type rule): `fixed` maps 0..255 to
    [-1, 1]; `dataset` clips each channel to its 0.5th..99.5th percentiles over a seeded sample of training pixels
    and standardises it by the clipped values' mean and standard deviation (class_stats.json; built into the
    model as Keras layers, so a saved .keras still takes raw pixels)."""


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
    encoder: str = "none"
    """none: the plain U-Net above; else a `keras.applications` backbone as the U-Net's encoder, one of
    `segtrain.encoders.catalog.ENCODER_NAMES` (skips at strides 2..32; depth and base_filters are then unused)."""
    encoder_weights: str = "imagenet"
    """With an encoder: imagenet (Keras's own download cache), a local weights file (PATH; relative: from the config
    file's folder if it exists there, else the working directory), or none (random)."""
    decoder_filters: Optional[list[int]] = None
    """With an encoder: the decoder's widths from the deepest level up (5 levels); null: [256, 128, 64, 32, 16]."""

    @property
    def divisor(self) -> int:
        """Image sides must be multiples of this: 2**depth, or the encoder's total stride."""
        from segtrain.encoders.catalog import ENCODER_STRIDE

        return 2**self.depth if self.encoder == "none" else ENCODER_STRIDE


@dataclass
class LossTerm:
    """One term of the loss sum. Its own settings are the keyword arguments of its loss function
    (`segtrain.losses.functional.TERMS[name]`), added as fields by `term_class(name)`."""

    name: str
    """A loss in segtrain.losses.functional.TERMS: cross_entropy, cost_sensitive, focal, jaccard, dice, tversky."""
    weight: NonNegative = 1.0
    """Factor of this term in the sum."""
    use_class_weights: bool = True
    """Multiply by loss.class_weights."""
    ignore_false_negatives: ClassNames = field(default_factory=list)
    """Classes whose misses are free in this term (besides loss.ignore_false_negatives)."""

    def settings(self) -> dict:
        """The term's own settings, as keyword arguments of its loss function."""
        common = {f.name for f in dataclasses.fields(LossTerm)}
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in common}


@dataclass
class LossConfig:
    """The loss: a weighted sum of terms, sharing class weights and classes whose misses are free.

    YAML: `loss: {terms: [...], class_weights: ..., ...}`; one term may be written alone,
    `loss: jaccard` or `loss: {name: tversky, alpha: 0.7, class_weights: balanced}`, and a bare
    name in `terms` (`- jaccard`) is a term with its defaults.
    """

    terms: list[LossTerm] = field(default_factory=lambda: [term_class("cross_entropy")()])
    """Terms `{name: <loss>, weight: 1.0, <its settings>}`; at most one cost_sensitive (the decision's costs)."""
    class_weights: Union[str, PerClass, None] = "none"
    """none | a strategy computed over the training set (segtrain.class_weights.STRATEGIES) | [w0, ...] |
    {class: w}; scaled so that the loss keeps its unweighted scale."""
    class_weights_from: Literal["data", "sampled"] = "sampled"
    """The frequencies the class-weight strategies use: the training set's pixels (data), or the pixels expected in
    the training crops under data.sampling (sampled; the same as data without sampling)."""
    max_weight: Optional[Annotated[float, Bound(">=", 1.0)]] = None
    """Cap on the scaled class weights (>= 1, since they average 1)."""
    ignore_false_negatives: ClassNames = field(default_factory=list)
    """Classes whose misses are free in every term, while predicting them where they are not still costs."""

    def free_misses(self, term: LossTerm, classes: list[str]) -> list[int]:
        """Class indices whose misses are free in `term`: the section's ignore_false_negatives and the term's."""
        names = [*self.ignore_false_negatives, *term.ignore_false_negatives]
        return sorted({list(classes).index(name) for name in names})


@functools.cache
def term_class(name: str) -> type:
    """The dataclass of loss term `name`: LossTerm's fields, then its loss function's settings.

    A setting's name, type (its annotation) and default are those of the function's keyword
    argument (`segtrain.losses.functional.term_settings`); its meaning is in the function's docstring.
    """
    from segtrain.losses.functional import TERMS, term_settings

    fields = [("name", str, field(default=name))]
    for p in term_settings(TERMS[name]):
        fields.append((p.name, Any if p.annotation is p.empty else p.annotation, field(default=p.default)))
    return dataclasses.make_dataclass(name.title().replace("_", "") + "Term", fields, bases=(LossTerm,))


@dataclass
class TrainConfig:
    """The training loop."""

    epochs: int = 20
    """Epochs to train (not used with `budget`, whose plan sets them)."""
    steps_per_epoch: Optional[int] = None
    """Optimizer steps per epoch; null = ceil(training images / batch_size) (with `budget`: chosen by the plan)."""
    budget: Any = None
    """Train for this wall-clock time instead of `epochs`: a duration such as 20m, 1h30m, 90s or 1.5h, or a number
    of minutes (stored as e.g. 1h30m). The step time is measured first and the steps, epochs and learning-rate
    schedule are planned to end within it (`segtrain.engine.budget`; the plan is budget.json in the run folder).
    null: train `epochs` epochs."""
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
    steps_per_execution: Union[int, Literal["auto"]] = "auto"
    """Optimizer steps run inside one compiled call; the losses, progress bar, NaN and signal checks are read once per
    call. auto: 32 on a GPU, 8 on the CPU. Checkpoints still fall exactly on epoch ends and checkpoint_every_steps."""
    freeze_encoder_epochs: NonNegative = 0.0
    """With model.encoder: train the decoder alone for this many epochs (the encoder frozen, its BatchNorm in
    inference mode), then the whole model. Under a budget, epochs of the planned schedule."""
    freeze_encoder_steps: Optional[int] = None
    """Like freeze_encoder_epochs, in optimizer steps (set one of the two)."""
    encoder_lr_scale: Positive = 0.1
    """With model.encoder: the encoder's learning rate is the schedule's times this once it is unfrozen."""
    jit_compile: Union[bool, Literal["auto"]] = "auto"
    """Compile the train and validation steps with XLA. auto: on a CUDA GPU with one replica and deterministic off;
    off on the CPU (no gain measured there) and where XLA fails (several replicas, deterministic ops)."""

    @property
    def budget_seconds(self) -> Optional[float]:
        """`budget` in seconds (None without a budget)."""
        from segtrain.value_types import parse_duration

        return None if self.budget is None else parse_duration(self.budget)


@dataclass
class PredictConfig:
    """How eval and predict turn probabilities into masks."""

    decision: Literal["argmax", "cost", "threshold"] = "argmax"
    """argmax; cost: least expected cost under the loss's cost matrix; threshold: binary only."""
    threshold: Optional[float] = None
    """Foreground threshold on q (the calibrated, prior-corrected probability the rule reads) for decision=threshold."""
    tile_size: Optional[int] = None
    """Tile side for images larger than one tile; null: whole images up to 2048 x 2048 pixels in one call, tiles of
    1024 beyond (`segtrain.policy.inference`)."""
    overlap: float = 0.25
    tta: bool = False
    """Average over flips at test time."""
    batch_size: int = 4
    """Tiles per forward pass."""
    fp_cost: Optional[PerClass] = None
    """Costs for decision=cost, per class (list or {class: cost}); see the `cost_sensitive` loss term."""
    fn_cost: Optional[PerClass] = None
    cost_matrix: Optional[CostMatrix] = None
    """Full K x K decision cost matrix C[true][pred]; overrides fp_cost/fn_cost. Without any of the three,
    decision=cost uses the cost_sensitive loss term's matrix (segtrain.decision.decision_cost_matrix)."""
    calibrate: bool = True
    """Use the temperature in the run's policy.json (fitted by `fit` and `segtrain calibrate`) wherever
    probabilities become decisions or are written out; false: the model's own probabilities."""
    prior_correction: Literal["none", "weights", "tuned"] = "none"
    """Undo the training class weights before deciding, q = p / w**tau normalised (`segtrain.policy.prior`):
    none (tau 0), weights (tau 1), tuned (tau chosen by `segtrain tune` on a labelled split)."""
    tuned: bool = True
    """Apply the tuned operating point in the run's policy.json (written by `segtrain tune`: threshold, tau, class
    biases, post-processing) when present and chosen under the current settings; false: the config's settings only."""
    min_size: Optional[ClassSizes] = None
    """Post-processing, {class: N}: remove connected components of the class smaller than N pixels
    (`segtrain.policy.postprocess`); `segtrain tune` chooses it per class. null: off until tuned."""
    max_hole: Optional[ClassSizes] = None
    """Post-processing, {class: M}: fill holes of the class smaller than M pixels. null: off until tuned."""


@dataclass
class TrackingConfig:
    """Experiment tracking (an optional extra)."""

    backend: Literal["none", "mlflow"] = "none"
    """mlflow: log params, per-epoch metrics, the final per-class metrics and the run folder to MLflow."""
    uri: Optional[str] = None
    """MLflow tracking URI: a folder, file:///..., or sqlite:///file.db; null: $MLFLOW_TRACKING_URI if set, else
    mlruns/ in the working directory."""
    experiment: str = "segtrain"
    """MLflow experiment name."""


@dataclass
class Config:
    """A whole segtrain config."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """Experiment tracking; `tracking: mlflow` is short for {backend: mlflow} (`_expand_shorthands`)."""

    @property
    def num_classes(self) -> int:
        return len(self.data.classes)

    def to_dict(self) -> dict:
        """The config as plain data (the run's config.yaml). Under `train.budget` without `train.epochs` (the budget
        plans the epochs, budget.json records them): an unused default of 20 epochs would mislead."""
        tree = dataclasses.asdict(self)
        if self.train.budget is not None:
            del tree["train"]["epochs"]
        return tree


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
        _expand_shorthands(raw)
        apply_override(raw, item)
    config = config_from_dict(raw)
    config.data.root = resolve_data_root(config.data.root, path)
    weights = config.model.encoder_weights
    if weights not in ("imagenet", "none") and not Path(weights).is_absolute() and (path.parent / weights).exists():
        config.model.encoder_weights = str((path.parent / weights).resolve())  # like data.root: the config's folder
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


SHORTHANDS = {"tracking": "backend"}
"""Sections a plain value may stand for: `tracking: mlflow` is {backend: mlflow}."""


def _expand_shorthands(raw: dict) -> None:
    """`section: value` -> `section: {key: value}` for SHORTHANDS, so sub-keys combine with it in any order."""
    for section, key in SHORTHANDS.items():
        if isinstance(raw.get(section), str):
            raw[section] = {key: raw[section]}


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
    if len(steps) == 1 and steps[0] in SHORTHANDS and isinstance(value, str) and isinstance(raw.get(steps[0]), dict):
        raw[steps[0]][SHORTHANDS[steps[0]]] = value  # `tracking=mlflow` keeps tracking.uri set before it
        return
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
    _expand_shorthands(raw)
    classes = _build_dataclass(DataConfig, raw.get("data"), "data").classes  # for the settings about classes
    _check_classes(classes)
    config = _build_dataclass(Config, raw, "", classes)
    _check_semantics(config)
    return config


def loss_config(section: Any, class_names: list[str]) -> LossConfig:
    """A LossConfig as it is, or a raw `loss` section (a name or a mapping, as in YAML) validated now."""
    if isinstance(section, LossConfig):
        return section
    return _build_loss(section, "loss", list(class_names))


def check_predict(config: Config) -> None:
    """Decision settings that depend on other sections: checked on loading, and by eval and predict again after
    their command-line overrides."""
    predict = config.predict
    own_costs = any(costs is not None for costs in (predict.fp_cost, predict.fn_cost, predict.cost_matrix))
    if predict.decision == "cost" and not own_costs and not any(t.name == "cost_sensitive" for t in config.loss.terms):
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


def _build_dataclass(cls, raw: Any, path: str, classes: Optional[list] = None, owner: str = ""):
    """An instance of dataclass `cls` from a mapping; `classes` (data.classes) checks the settings about classes."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping of keys, got {raw!r}.")
    hints = typing.get_type_hints(cls, include_extras=True)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        dotted = f"{path}.{key}" if path else str(key)
        if key not in names:
            raise ConfigError(f"{dotted}: unknown key{owner}.{_did_you_mean(key, names, 'Valid keys')}")
        kwargs[key] = _coerce(value, hints[key], dotted, classes)
    return cls(**kwargs)


def _did_you_mean(word: Any, choices, listing: Optional[str] = None) -> str:
    """The hint ` Did you mean 'x'?` for the closest choice (or one that begins `word`, or that `word` begins),
    else ` {listing}: a, b.` (nothing without a listing)."""
    word, choices = str(word), [str(c) for c in choices]
    close = difflib.get_close_matches(word, choices, n=1)
    close = close or [c for c in choices if word and (c.startswith(word) or word.startswith(c))]
    if close:
        return f" Did you mean '{close[0]}'?"
    return f" {listing}: {', '.join(choices)}." if listing else ""


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Annotated:
        base, *extras = typing.get_args(tp)
        return next((e.description for e in extras if isinstance(e, ByClass)), None) or _type_name(base)
    if tp is Any:
        return "any value"
    if tp is float:
        return "a number"
    if tp is bool:
        return "true or false"
    if tp is LossTerm:
        return "a loss name or a mapping with 'name'"
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


def _kind_matches(value: Any, tp) -> bool:
    """Whether `tp` takes values of `value`'s kind (mapping, list, text, number, true/false, null), contents aside."""
    origin = typing.get_origin(tp)
    if origin is Annotated:
        return _kind_matches(value, typing.get_args(tp)[0])
    if origin in (Union, types.UnionType):
        return any(_kind_matches(value, a) for a in typing.get_args(tp))
    if tp is Any:
        return True
    if tp is type(None):
        return value is None
    if origin is dict or dataclasses.is_dataclass(tp):
        return isinstance(value, dict)
    if origin is list:
        return isinstance(value, (list, tuple))
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return parse_number(value) is not None
    return isinstance(value, str)


def _coerce(value: Any, tp, path: str, classes: Optional[list] = None):
    """`value` checked against type `tp` (and its bounds, and data.classes when given), in its stored form."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if tp is LossConfig:
        return _build_loss(value, path, classes)
    if tp is LossTerm:
        return _build_term(value, path, classes)
    if dataclasses.is_dataclass(tp):
        return _build_dataclass(tp, value, path, classes)
    if origin is Annotated:
        base, *extras = typing.get_args(tp)
        value = _coerce(value, base, path, classes)
        for extra in extras:
            if isinstance(extra, Bound):
                extra.check(value, path)
            elif isinstance(extra, ByClass) and classes is not None:
                value = extra.resolve(value, path, classes)
        return value
    if origin in (Union, types.UnionType):
        return _coerce_union(value, tp, path, classes)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value in allowed:
            return value
        raise ConfigError(f"{path}: {value!r} is not one of {', '.join(map(str, allowed))}.{_did_you_mean(value, allowed)}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}.")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{path}[{i}]", classes) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}.")
        key_tp, val_tp = typing.get_args(tp)
        return {_coerce(k, key_tp, f"{path}.{k}"): _coerce(v, val_tp, f"{path}.{k}", classes) for k, v in value.items()}
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


def _coerce_union(value: Any, tp, path: str, classes: Optional[list]):
    args = typing.get_args(tp)
    if value is None and type(None) in args:
        return None
    members = [a for a in args if a is not type(None)]
    if len(members) > 1:  # those that take the value's kind, so that a single one's own message comes through
        members = [a for a in members if _kind_matches(value, a)] or members
    if len(members) == 1:
        return _coerce(value, members[0], path, classes)
    for arg in members:
        try:
            return _coerce(value, arg, path, classes)
        except ConfigError:
            continue
    raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}.")


# ---------------------------------------------------------------------------- the loss section

_LOSS_SECTION_KEYS = ("class_weights", "class_weights_from", "max_weight", "ignore_false_negatives")


def _build_loss(raw: Any, path: str, classes: Optional[list]) -> LossConfig:
    """The loss section, from its long form or from one term written alone (whose keys then sit at `path`)."""
    if isinstance(raw, str) or isinstance(raw, dict) and "name" in raw and "terms" not in raw:
        one = {"name": raw} if isinstance(raw, str) else raw
        section = {k: v for k, v in one.items() if k in _LOSS_SECTION_KEYS}
        term = _build_term({k: v for k, v in one.items() if k not in section}, path, classes)
        loss, paths = _build_dataclass(LossConfig, section, path, classes), [path]
        loss.terms = [term]
    elif raw is None or isinstance(raw, dict):
        loss = _build_dataclass(LossConfig, raw, path, classes)
        paths = [f"{path}.terms[{i}]" for i in range(len(loss.terms))]
    else:
        raise ConfigError(f"{path}: expected a loss name (e.g. jaccard) or a mapping with 'terms', got {raw!r}.")
    _check_loss(loss, paths)
    return loss


def _build_term(raw: Any, path: str, classes: Optional[list]) -> LossTerm:
    from segtrain.losses.functional import TERMS

    if isinstance(raw, str):
        raw = {"name": raw}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a loss name or a mapping with 'name', got {raw!r}.")
    name = raw.get("name")
    if name is None:
        raise ConfigError(f"{path}.name: missing; choose from {', '.join(TERMS)}.")
    if name not in list(TERMS):
        where = path if path == "loss" and set(raw) == {"name"} else f"{path}.name"
        raise ConfigError(f"{where}: unknown loss {name!r}.{_did_you_mean(name, TERMS, 'Choose from')}")
    return _build_dataclass(term_class(name), raw, path, classes, owner=f" for {name}")


def _check_loss(loss: LossConfig, paths: list[str]) -> None:
    """Checks across the terms, and of the settings that bind terms to decisions (costs) and to the data (weights)."""
    if not loss.terms:
        raise ConfigError("loss.terms: expected a non-empty list, e.g. [{name: cross_entropy, weight: 1.0}].")
    if sum(term.weight for term in loss.terms) <= 0:
        raise ConfigError(f"{paths[0]}.weight: at least one loss term needs a weight > 0.")
    cost_paths = [path for term, path in zip(loss.terms, paths) if term.name == "cost_sensitive"]
    if len(cost_paths) > 1:
        raise ConfigError(f"{cost_paths[1]}: only one cost_sensitive term is allowed (its costs are the decision's).")
    for term, path in zip(loss.terms, paths):
        if term.name == "cost_sensitive" and term.cost_matrix is not None and (term.fp_cost, term.fn_cost) != (None, None):
            raise ConfigError(f"{path}.cost_matrix: give either cost_matrix or fp_cost/fn_cost, not both.")
        if term.name == "tversky" and term.alpha + term.beta == 0 and term.smooth == 0:
            raise ConfigError(f"{path}.alpha: alpha, beta and smooth cannot all be 0.")
    if loss.class_weights is None:
        loss.class_weights = "none"
    if isinstance(loss.class_weights, str) and loss.class_weights not in STRATEGIES:
        raise ConfigError(f"loss.class_weights: unknown strategy {loss.class_weights!r}."
                          f"{_did_you_mean(loss.class_weights, STRATEGIES, 'Choose from')} "
                          "Or give the weights: a list, or a mapping class -> weight.")


# ---------------------------------------------------------------------------- semantic checks


def _check_semantics(config: Config) -> None:
    """Checks within and across sections that types cannot express (ConfigError naming the key)."""
    _check_mask(config.data.mask, config.data.classes)
    _check_model(config.model)
    _check_data(config.data, config.model.divisor)
    _check_train(config)
    _check_predict_values(config.predict, config.model.divisor)
    check_predict(config)


def _check_classes(classes: list[str]) -> None:
    if len(classes) < 2:
        raise ConfigError("data.classes: name at least two classes, e.g. [background, road].")
    if len(set(classes)) != len(classes):
        raise ConfigError("data.classes: class names must be unique.")
    for i, name in enumerate(classes):
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise ConfigError(
                f"data.classes[{i}]: {name!r} is not a valid class name; use letters, digits, '_', '.' or '-' "
                "(names appear in file names and CSV columns)."
            )


def _check_mask(mask: MaskConfig, classes: list[str]) -> None:
    chosen = [name for name in ("values", "threshold", "palette") if getattr(mask, name) is not None]
    if len(chosen) > 1:
        raise ConfigError(f"data.mask: set only one of values, threshold, palette (got {', '.join(chosen)}).")
    if mask.threshold is not None:
        if len(classes) != 2:
            raise ConfigError("data.mask.threshold: a threshold makes two classes; data.classes must name exactly two.")
        if not 0 <= mask.threshold < 65535:
            raise ConfigError(f"data.mask.threshold: {mask.threshold} is outside 0..65534; masks hold values 0..255 "
                              "(8-bit) or 0..65535 (16-bit).")
    if mask.values is not None:
        _check_mask_values(mask, classes)
    if mask.palette is not None:
        _check_palette(mask, classes)
    for i, value in enumerate(mask.ignore):
        ok = isinstance(value, int) and not isinstance(value, bool) or (
            isinstance(value, list) and len(value) == 3 and all(isinstance(c, int) for c in value)
        )
        if ok:
            ok = all(0 <= c <= 255 for c in value) if isinstance(value, list) else 0 <= value <= 65535
        if not ok:
            raise ConfigError(
                f"data.mask.ignore[{i}]: expected a raw mask value 0..65535 or an [r, g, b] colour (0..255), "
                f"got {value!r}."
            )


def _check_mask_values(mask: MaskConfig, classes: list[str]) -> None:
    for raw_value, cls in mask.values.items():
        if not 0 <= raw_value <= 65535:
            raise ConfigError(f"data.mask.values.{raw_value}: raw mask values are 0..255 in 8-bit masks, 0..65535 in "
                              "16-bit masks.")
        if not 0 <= cls < len(classes):
            raise ConfigError(
                f"data.mask.values.{raw_value}: class index {cls} is out of range; "
                f"use 0..{len(classes) - 1} (data.classes has {len(classes)} names)."
            )
        if raw_value in mask.ignore:
            raise ConfigError(f"data.mask.values.{raw_value}: this value is also in data.mask.ignore; keep one.")
    unreachable = [name for i, name in enumerate(classes) if i not in mask.values.values()]
    if unreachable:
        raise ConfigError(
            f"data.mask.values: no raw value maps to class(es) {', '.join(unreachable)}; "
            "map a value to each class in data.classes."
        )


def _check_palette(mask: MaskConfig, classes: list[str]) -> None:
    for name, colour in mask.palette.items():
        if name not in classes:
            raise ConfigError(f"data.mask.palette.{name}: not a class name; use one of {', '.join(classes)}.")
        if len(colour) != 3 or not all(0 <= c <= 255 for c in colour):
            raise ConfigError(f"data.mask.palette.{name}: expected [r, g, b] with values 0..255, got {colour}.")
    missing = [c for c in classes if c not in mask.palette]
    if missing:
        raise ConfigError(f"data.mask.palette: no colour for class(es) {', '.join(missing)}.")
    colours = [tuple(c) for c in mask.palette.values()]
    for name, colour in mask.palette.items():
        if colours.count(tuple(colour)) > 1:
            raise ConfigError(f"data.mask.palette.{name}: colour {colour} is used by another class too.")
        if list(colour) in mask.ignore:
            raise ConfigError(f"data.mask.palette.{name}: colour {colour} is also in data.mask.ignore.")


def _check_model(model: ModelConfig) -> None:
    if model.depth < 1 or model.depth > 7:
        raise ConfigError(f"model.depth: {model.depth} is out of range; use 1..7 (4 is usual).")
    if model.base_filters < 1:
        raise ConfigError("model.base_filters: must be a positive integer, e.g. 16.")
    if not 0.0 <= model.dropout < 1.0:
        raise ConfigError("model.dropout: must be in [0, 1).")
    from segtrain.encoders.catalog import ENCODER_NAMES

    if model.encoder != "none" and model.encoder not in ENCODER_NAMES:
        raise ConfigError(f"model.encoder: {model.encoder!r} is not a known backbone."
                          f"{_did_you_mean(model.encoder, ENCODER_NAMES)} Use none or one of {', '.join(ENCODER_NAMES)}.")
    if model.decoder_filters is not None and (len(model.decoder_filters) != 5 or min(model.decoder_filters) < 1):
        raise ConfigError("model.decoder_filters: expected 5 positive widths, deepest first, e.g. [256, 128, 64, 32, 16].")


def _check_data(data: DataConfig, divisor: int) -> None:
    """The data section's sizes; `divisor` = 2**model.depth."""
    if data.crop is not None and (data.crop <= 0 or data.crop % divisor):
        raise ConfigError(
            f"data.crop: {data.crop} is not a positive multiple of {divisor} (2**model.depth, or 32 with "
            "model.encoder); "
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
    if data.val_fraction is not None and not 0.0 < data.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction: {data.val_fraction} is not a share of the images; use e.g. 0.2 "
                          "(or null to read the val_split folder).")
    _check_sampling(data)
    _check_augment(data.augment)


def _check_augment(augment: AugmentConfig) -> None:
    """data.augment: ranges as [low, high], angles within a half turn; `elastic: true/false` resolved."""
    for name in ("scale", "blur"):
        value = getattr(augment, name)
        if value is not None and (len(value) != 2 or value[0] > value[1]):
            raise ConfigError(f"data.augment.{name}: expected [low, high] with low <= high, got {value!r}.")
    if augment.blur is not None and augment.blur[1] > 10:
        raise ConfigError(f"data.augment.blur: sigma up to {augment.blur[1]:g} pixels is more than 10; use e.g. [0, 1].")
    if augment.rotate > 180:
        raise ConfigError(f"data.augment.rotate: {augment.rotate:g} degrees is more than 180 (the largest turn).")
    if augment.elastic is True:
        augment.elastic = ElasticConfig()
    elif augment.elastic is False:
        augment.elastic = None


def _check_sampling(data: DataConfig) -> None:
    """data.sampling: known classes, shares in [0, 1] summing to <= 1, and a crop to centre."""
    for name, share in data.sampling.items():
        class_index(name, f"data.sampling.{name}", data.classes)
        if not 0.0 <= share <= 1.0:
            raise ConfigError(f"data.sampling.{name}: a share of the training crops must be in [0, 1], got {share!r}.")
    total = sum(data.sampling.values())
    if total > 1.0 + 1e-9:
        raise ConfigError(f"data.sampling: the shares sum to {total:g} > 1; they are fractions of the training crops "
                          "(the rest are placed uniformly).")
    if data.sampling and data.crop is None:
        raise ConfigError("data.sampling: class-aware sampling centres training crops on class pixels and needs "
                          "data.crop (e.g. data.crop: 128); remove data.sampling to train on whole images.")


def _check_predict_values(predict: PredictConfig, divisor: int) -> None:
    """The predict section's own ranges; `divisor` = 2**model.depth (see check_predict for the rest)."""
    if predict.threshold is not None and not 0.0 < predict.threshold < 1.0:
        raise ConfigError("predict.threshold: must be between 0 and 1.")
    if not 0.0 <= predict.overlap < 1.0:
        raise ConfigError("predict.overlap: must be in [0, 1).")
    if predict.batch_size < 1:
        raise ConfigError("predict.batch_size: must be at least 1.")
    if predict.tile_size is not None and (predict.tile_size <= 0 or predict.tile_size % divisor):
        raise ConfigError(f"predict.tile_size: must be a positive multiple of {divisor} (2**model.depth, or 32 with "
                          "model.encoder).")


def _check_train(config: Config) -> None:
    """Checks of the train section (ConfigError naming the key)."""
    train = config.train
    if train.epochs < 1:
        raise ConfigError("train.epochs: must be at least 1.")
    if train.budget is not None:
        from segtrain.value_types import format_duration, parse_duration

        train.budget = format_duration(parse_duration(train.budget, "train.budget"))  # one spelling: 1h30m
    if train.steps_per_execution != "auto" and train.steps_per_execution < 1:
        raise ConfigError("train.steps_per_execution: must be at least 1 (or auto).")
    if train.jit_compile is True and train.deterministic:
        raise ConfigError("train.jit_compile: XLA has no deterministic implementation of some U-Net gradients "
                          "(MaxPool); use jit_compile: false (or auto) with train.deterministic: true.")
    if train.jit_compile is True and train.distribute in ("mirrored", "multi_worker"):
        raise ConfigError("train.jit_compile: XLA steps under several replicas are not supported (variables live on "
                          "other devices); use jit_compile: false (or auto) with train.distribute: "
                          f"{train.distribute}.")
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
    if train.freeze_encoder_steps is not None and train.freeze_encoder_steps < 0:
        raise ConfigError("train.freeze_encoder_steps: must be 0 or more (or null).")
    if train.freeze_encoder_steps is not None and train.freeze_encoder_epochs:
        raise ConfigError("train.freeze_encoder_steps: set it or train.freeze_encoder_epochs, not both.")
    if (train.freeze_encoder_epochs or train.freeze_encoder_steps) and config.model.encoder == "none":
        raise ConfigError("train.freeze_encoder_epochs: there is no encoder to freeze; set model.encoder or remove it.")
    if train.checkpoint_every_steps is not None and train.checkpoint_every_steps < 1:
        raise ConfigError("train.checkpoint_every_steps: must be at least 1 (or null for epoch ends only).")
    columns = monitor_columns(config.data.classes)
    if train.monitor not in columns:
        raise ConfigError(
            f"train.monitor: {train.monitor!r} is not a history column.{_did_you_mean(train.monitor, columns)} "
            f"Use one of {', '.join(columns)}."
        )


def monitor_columns(classes: list[str]) -> list[str]:
    """Columns of history.csv that train.monitor can name."""
    columns = ["loss", "val_loss", "val_mean_iou", "val_pixel_accuracy"]
    for name in classes:
        columns += [f"val_iou_{name}", f"val_dice_{name}"]
    return columns
