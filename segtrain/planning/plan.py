"""The plan: every config value the rules chose, in the order the config is written, with the facts behind them.

`make_plan(fingerprint, device, memory, budget_seconds)` runs the rules in dependency order (device and memory
first, from `resources`; the mask section from `encoding`; then those of `rules`: depth before the crop, the crop
before the model size, the batch before the learning rate, the model before the schedule) and returns a `Plan`:
dotted config key -> `Decision`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from segtrain.encoders.catalog import ENCODER_STRIDE
from segtrain.planning import resources, rules
from segtrain.planning.encoding import Decision, mask_section
from segtrain.planning.fingerprint import Fingerprint

DEFAULT_BUDGET = 20 * 60


@dataclass
class Plan:
    """The chosen values by dotted config key (`data.crop`), and the notes for the config's header."""

    fingerprint: Fingerprint
    device: Decision
    memory: Decision
    budget_seconds: float
    entries: dict = field(default_factory=dict)
    term_reasons: list = field(default_factory=list)
    """One comment per loss term (the last: its include_background)."""
    notes: list = field(default_factory=list)

    def __getitem__(self, key: str) -> Decision:
        return self.entries[key]

    def value(self, key: str):
        return self.entries[key].value

    def to_dict(self) -> dict:
        """The config's values as a mapping of sections (what `segtrain.config.config_from_dict` reads)."""
        out: dict = {}
        for key, decision in self.entries.items():
            if decision.value is None and not decision.reason:
                continue
            node = out
            *parents, last = key.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[last] = decision.value
        return out


def make_plan(fp: Fingerprint, device: Optional[str] = None, memory: Optional[int] = None,
              budget_seconds: float = DEFAULT_BUDGET) -> Plan:
    """The plan for a fingerprint on `device` ("cpu" | "gpu", None: detected) with `memory` bytes (None: the device's
    default) and a time budget in seconds."""
    device_decision = resources.device(device)
    dev = device_decision.value
    memory_decision = resources.memory_target(dev, memory)
    plan = Plan(fp, device_decision, memory_decision, budget_seconds)
    e = plan.entries
    host_memory = memory_decision.value if dev == "cpu" else resources.memory_target("cpu").value

    names = fp.names.value
    e["data.root"] = Decision(fp.root, f"{fp.pairs} train / {fp.val_pairs} val pairs" if fp.val_split
                              else f"{fp.pairs} train pairs; no val/ split")
    e["data.classes"] = fp.names
    e["data.mask"] = Decision(mask_section(fp.encoding.value, names, fp.ignore.value), fp.encoding.reason)

    cache = rules.cache(fp, host_memory, dev)
    depth = rules.depth(fp)
    first_crop = rules.crop(fp, depth.value, dev)
    crop, filters, batch = rules.model_size(fp, first_crop.value, depth.value, dev, memory_decision.value,
                                            budget_seconds, rules.cache_bytes(fp) if cache.value == "memory" else 0)
    e["data.crop"] = Decision(crop.value, first_crop.reason + (f"; {crop.reason}" if crop.reason else ""))
    e["data.batch_size"] = batch
    e["data.cache"] = cache
    e["data.normalize"] = rules.normalize(fp)
    e["data.sampling"] = rules.sampling(fp, crop.value)
    e["data.augment"] = rules.augmentation(fp, budget_seconds)
    e["data.val_split"] = rules.val_split(fp)
    e["data.val_fraction"] = rules.val_fraction(fp)
    e["model.depth"] = depth
    e["model.base_filters"] = filters
    encoder = rules.encoder(fp, dev)
    e["model.encoder"] = encoder
    if encoder.value != "none":
        e["model.encoder_weights"] = Decision("imagenet", "found in Keras's cache")
        if crop.value % ENCODER_STRIDE:
            e["data.crop"] = Decision(max(ENCODER_STRIDE, crop.value // ENCODER_STRIDE * ENCODER_STRIDE),
                                      e["data.crop"].reason + f"; a multiple of the encoder's stride {ENCODER_STRIDE}")
        e["data.batch_size"] = Decision(batch.value, batch.reason + " (the plain U-Net's memory model)")

    terms = rules.loss_terms(fp)
    background = rules.include_background(fp)
    terms.value[-1]["include_background"] = background.value
    e["loss.terms"] = terms
    plan.term_reasons = ["", f"include_background: {background.reason}"]
    strategy, cap = rules.class_weights(fp)
    e["loss.class_weights"] = strategy
    e["loss.max_weight"] = cap

    epochs, steps = rules.schedule(fp, crop.value, depth.value, filters.value, batch.value, dev, budget_seconds)
    if has_budget_key():
        e["train.budget"] = rules.budget(budget_seconds, epochs)
    else:
        e["train.epochs"] = epochs
        e["train.steps_per_epoch"] = steps
    e["train.learning_rate"] = rules.learning_rate(batch.value)
    e["train.warmup_epochs"] = rules.warmup(epochs.value, estimated="train.budget" in e)
    e["train.seed"] = Decision(0, "fixed: the same data and seed train the same model")
    e["train.monitor"] = rules.monitor(fp)

    for decision in (fp.ignore, fp.encoding, fp.names, *e.values()):
        for note in decision.notes:
            if note not in plan.notes:
                plan.notes.append(note)
    return plan


def has_budget_key() -> bool:
    """Whether this segtrain's config has `train.budget` (fit then plans the epochs for a wall-clock budget)."""
    from segtrain.config import TrainConfig

    return "budget" in {f.name for f in dataclasses.fields(TrainConfig)}
