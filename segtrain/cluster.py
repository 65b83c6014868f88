"""Which process of a multi-worker run this is, read from TF_CONFIG alone (no TensorFlow), so the run folder's
owner is known before training starts: only the chief writes it."""

from __future__ import annotations

import json
import os
from typing import Optional

from segtrain.errors import ConfigError


def tf_config() -> Optional[dict]:
    """TF_CONFIG parsed and checked (None when unset); a malformed one is a ConfigError naming the fix."""
    text = os.environ.get("TF_CONFIG")
    if not text:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        raise ConfigError("TF_CONFIG: not valid JSON; see the README's multi-machine section.") from None
    if not isinstance(value, dict) or not isinstance(value.get("cluster"), dict):
        raise ConfigError('TF_CONFIG: expected {"cluster": {...}, "task": {"type": ..., "index": ...}}.')
    task = value.get("task", {})
    if isinstance(task, dict) and "type" in task:
        members = value["cluster"].get(task["type"])
        index = task.get("index", 0)
        if not isinstance(members, list) or not isinstance(index, int) or not 0 <= index < len(members):
            raise ConfigError(
                f"TF_CONFIG: task {task.get('type')!r} index {index!r} is not in the cluster "
                f"({', '.join(f'{k}: {len(v)}' for k, v in value['cluster'].items() if isinstance(v, list))}); "
                "give each process its own index from 0."
            )
    return value


def is_chief_task(cluster: dict, task_type: Optional[str], task_id: Optional[int]) -> bool:
    """With a `chief` task in the cluster, only the chief; otherwise worker 0 (TF's convention)."""
    if task_type is None:
        return True
    if "chief" in cluster:
        return task_type == "chief"
    return task_type == "worker" and int(task_id or 0) == 0


def is_non_chief_process() -> bool:
    """True when TF_CONFIG names this process as a task other than the chief (it must not write the run folder).

    Read from the environment only (no TensorFlow work), so the CLI can decide before training starts.
    """
    try:
        config = tf_config()
    except ConfigError:
        return False
    if config is None or not isinstance(config.get("task"), dict):
        return False
    task = config["task"]
    return not is_chief_task(config["cluster"], task.get("type"), task.get("index"))
