"""segtrain/cluster.py: which process of a multi-worker run writes the run folder, from TF_CONFIG alone."""

import json

import pytest

from segtrain.errors import ConfigError


@pytest.mark.parametrize(
    "cluster, task, chief",
    [
        ({"worker": ["a:1", "b:1"]}, {"type": "worker", "index": 0}, True),
        ({"worker": ["a:1", "b:1"]}, {"type": "worker", "index": 1}, False),
        ({"chief": ["c:1"], "worker": ["a:1"]}, {"type": "chief", "index": 0}, True),
        ({"chief": ["c:1"], "worker": ["a:1"]}, {"type": "worker", "index": 0}, False),  # the chief task writes
    ],
)
def test_only_the_chief_writes(monkeypatch, cluster, task, chief):
    from segtrain.cluster import is_chief_task, is_non_chief_process

    assert is_chief_task(cluster, task["type"], task["index"]) is chief
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": cluster, "task": task}))
    assert is_non_chief_process() is (not chief)


@pytest.mark.parametrize("text, message", [
    ("{not json", "not valid JSON"),
    ('{"task": {}}', "expected {\"cluster\""),
    ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 1}}', "index 1 is not in the cluster"),
])
def test_a_malformed_tf_config_is_named(monkeypatch, text, message):
    from segtrain.cluster import is_non_chief_process, tf_config

    monkeypatch.setenv("TF_CONFIG", text)
    with pytest.raises(ConfigError) as error:
        tf_config()
    assert str(error.value).startswith("TF_CONFIG: ") and message in str(error.value)
    assert is_non_chief_process() is False  # fit reports the malformed TF_CONFIG itself, with the strategy


def test_without_tf_config_this_process_is_the_chief(monkeypatch):
    from segtrain.cluster import is_non_chief_process, tf_config

    monkeypatch.delenv("TF_CONFIG", raising=False)
    assert tf_config() is None
    assert is_non_chief_process() is False
