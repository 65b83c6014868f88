import json

import numpy as np
import pytest

from segtrain.atomic import atomic_path, json_text, write_csv, write_json, write_text_atomic


def test_replaces_the_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "sub" / "a.json"
    write_text_atomic("one", target)
    write_text_atomic("two", target)
    assert target.read_text() == "two"
    assert sorted(p.name for p in target.parent.iterdir()) == ["a.json"]


def test_a_failed_write_keeps_the_previous_file(tmp_path):
    target = tmp_path / "a.keras"
    write_text_atomic("good", target)
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            assert tmp.suffix == ".keras" and tmp.parent == tmp_path  # Keras needs the suffix
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "good"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.keras"]


def test_written_files_follow_the_umask(tmp_path):
    import os

    old = os.umask(0o022)
    try:
        write_text_atomic("x", tmp_path / "a.txt")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644


def test_json_handles_numpy_values_and_nan(tmp_path):
    path = tmp_path / "sub" / "m.json"  # parent created
    write_json({"a": np.float32(0.5), "b": np.int64(3), "c": float("nan"), "d": np.array([1.0, np.nan]),
                "e": np.bool_(True), "f": (float("inf"), -float("inf")), "g": np.float64(2.5)}, path)
    assert json.loads(path.read_text()) == {"a": 0.5, "b": 3, "c": None, "d": [1.0, None], "e": True,
                                            "f": [None, None], "g": 2.5}
    assert path.read_text().endswith("}\n")
    assert json.loads(json_text({"x": [np.nan]})) == {"x": [None]}


def test_json_failed_write_keeps_old_file(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text('{"old": 1}')
    with pytest.raises(TypeError):
        write_json({"bad": object()}, path)
    assert json.loads(path.read_text()) == {"old": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_csv_columns_in_order_of_first_appearance(tmp_path):
    path = tmp_path / "t.csv"
    write_csv([{"a": 1, "b": None}, {"b": 0.1, "c": "x,y"}, {"a": 2.0}], path)
    assert path.read_text().splitlines() == ["a,b,c", "1,,", ',0.1,"x,y"', "2.0,,"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.csv"]
