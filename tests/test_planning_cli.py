"""`segtrain plan DATA_ROOT`: through the CLI (in process), exit codes, the config written and never replaced."""

import numpy as np

from segtrain.config import load_config
from tests.helpers import invoke, make_stripes_dataset


def test_plan_writes_a_config_that_loads(tmp_path):
    root = make_stripes_dataset(tmp_path / "stripes")
    out = tmp_path / "configs" / "stripes.yaml"
    result = invoke("plan", root, "--out", out, "--device", "cpu", "--memory", "2GB", "--budget", "5m")
    assert result.exit_code == 0, result.output
    assert f"Wrote {out}" in result.output and f"segtrain fit {out}" in result.output
    config = load_config(out)
    assert config.data.root == str(root.resolve())
    assert config.data.mask.threshold == 127 and config.data.classes == ["background", "foreground"]
    assert config.data.crop % 2**config.model.depth == 0
    assert config.data.augment.flip is False  # a 5-minute budget
    text = out.read_text()
    assert text.startswith("# Planned by `segtrain plan`") and "--memory 2.0 GB" in text


def test_an_existing_config_is_refused_and_left_unchanged(tmp_path):
    root = make_stripes_dataset(tmp_path / "stripes")
    out = tmp_path / "mine.yaml"
    out.write_text("# my own config\n")
    result = invoke("plan", root, "--out", out)
    assert result.exit_code == 2
    assert f"{out}: already exists" in result.output and "Traceback" not in result.output
    assert out.read_text() == "# my own config\n"


def test_a_missing_root_exits_2_naming_it(tmp_path):
    result = invoke("plan", tmp_path / "no_such_set", "--out", tmp_path / "x.yaml")
    assert result.exit_code == 2
    assert "no_such_set: data set folder not found" in result.output
    assert not (tmp_path / "x.yaml").exists()


def test_default_out_is_configs_folder_name_and_dash_prints(tmp_path, monkeypatch):
    root = make_stripes_dataset(tmp_path / "my_set")
    monkeypatch.chdir(tmp_path)
    result = invoke("plan", root, "--device", "cpu", "--memory", "2GB")
    assert result.exit_code == 0, result.output
    written = tmp_path / "configs" / "my_set.yaml"
    assert load_config(written).data.root == str(root.resolve())
    assert "root: ../my_set" in written.read_text()  # relative to the config's folder
    again = invoke("plan", root)  # the default file exists now: refused
    assert again.exit_code == 2 and "configs/my_set.yaml: already exists" in again.output
    printed = invoke("plan", root, "--out", "-", "--device", "cpu", "--memory", "2GB")
    assert printed.exit_code == 0 and printed.output.startswith("# Planned by")
    assert f"root: {root.resolve()}" in printed.output  # absolute on stdout


def test_bad_values_exit_2(tmp_path):
    root = make_stripes_dataset(tmp_path / "stripes", n_train=2, n_val=0)
    for args, message in ((["--budget", "soon"], "--budget"), (["--memory", "lots"], "--memory"),
                          (["--ignore", "1,2"], "--ignore"), (["--device", "tpu"], "--device")):
        result = invoke("plan", root, "--out", "-", *args)
        assert result.exit_code == 2 and message in result.output, result.output


def test_ignore_and_no_val_split_reach_the_config(tmp_path):
    from tests.helpers import write_pair

    rng = np.random.default_rng(0)
    root = tmp_path / "ids"
    for i in range(3):
        mask = np.zeros((32, 32), np.uint8)
        mask[4:12] = 1
        mask[20:26, 4:20] = 2
        mask[28:] = 9  # a value the user knows is unlabelled
        write_pair(root, "train", f"a{i}", rng.integers(0, 255, (32, 32, 3), dtype=np.uint8), mask)
    out = tmp_path / "ids.yaml"
    result = invoke("plan", root, "--out", out, "--ignore", "9", "--device", "cpu", "--memory", "2GB")
    assert result.exit_code == 0, result.output
    config = load_config(out)
    assert config.data.mask.ignore == [9] and config.data.classes == ["class_0", "class_1", "class_2"]
    text = out.read_text()
    assert "# no val/ split found: fit holds out 1 of the 3 train/ images" in text and "--ignore 9" in text
    assert config.data.val_fraction == 0.2 and "note: no val/ split found" in result.output


def test_planning_does_not_import_tensorflow(tmp_path):
    import subprocess
    import sys

    root = make_stripes_dataset(tmp_path / "stripes", n_train=2, n_val=0)
    code = ("import sys; from segtrain.cli import cli; "
            f"cli(['plan', {str(root)!r}, '--out', '-', '--device', 'cpu', '--memory', '2GB'], standalone_mode=False); "
            "assert 'tensorflow' not in sys.modules, 'tensorflow imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("# Planned by")
