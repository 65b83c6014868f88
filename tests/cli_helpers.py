"""Helpers for tests that drive the CLI: a tiny config writer, an in-process invoker, a folder digest."""

import hashlib
import json

import yaml
from click.testing import CliRunner

from segtrain.cli import cli

TINY = {
    "model": {"depth": 2, "base_filters": 4},
    "data": {"classes": ["background", "stripe"], "mask": {"threshold": 127}, "crop": 16, "batch_size": 4},
    "loss": {"terms": [{"name": "cross_entropy"}], "class_weights": "balanced"},
    "train": {"epochs": 2, "steps_per_epoch": 2, "learning_rate": 0.01, "seed": 1},
}
"""A config that trains in seconds on the stripes data set of tests/conftest.py."""


def write_config(path, root, base=TINY, **sections):
    """`base` with data.root set and some sections updated, written as YAML to `path`."""
    config = json.loads(json.dumps(base))
    config["data"]["root"] = str(root)
    for name, values in sections.items():
        config.setdefault(name, {}).update(values)
    path.write_text(yaml.safe_dump(config))
    return path


def invoke(*args):
    """Run `segtrain ARGS...` in this process; exceptions other than Click's propagate."""
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def folder_digest(folder):
    """One hash of every file's relative path and bytes: equal digests mean an untouched folder."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()
