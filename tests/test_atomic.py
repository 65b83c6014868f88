import pytest

from segtrain.atomic import atomic_path, write_text_atomic


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
