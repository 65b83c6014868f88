"""benchmarks/encoders.py on its tiny settings (synthetic sets, two one-step epochs per run): both parts print their
tables. Run in this process with tests/helpers.py's stand-in for MobileNetV3Small (the script's plumbing is what is
checked here; the real backbones are built and traced in tests/test_encoders.py, where each costs seconds)."""

import keras
import pytest

from tests.helpers import run_benchmark_in_process, tiny_mobilenet

pytestmark = pytest.mark.slow


def table_rows(lines: list[str], first_cell: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines if line.startswith(f"| {first_cell}")]


def run_in_process(monkeypatch, capsys, *args: str) -> list[str]:
    monkeypatch.setattr(keras.applications, "MobileNetV3Small", tiny_mobilenet)
    return run_benchmark_in_process("encoders.py", *args, monkeypatch=monkeypatch, capsys=capsys)


def test_encoders_tiny_prints_the_speed_table_and_the_four_fine_tuning_rows(monkeypatch, capsys):
    lines = run_in_process(monkeypatch, capsys, "--tiny")
    speed = [r for r in table_rows(lines, "unet") if len(r) == 5]
    assert [r[0] for r in speed] == ["unet (today's)", "unet_mobilenetv3small"]
    assert speed[0][4] == "1.00x" and all(float(r[2]) > 0 for r in speed)
    header = "| model | encoder weights | frozen phase | training minutes | steps | mean IoU | road IoU |"
    table = lines[lines.index(header):]
    rows = table_rows(table, "unet")
    assert [(r[1], r[2]) for r in rows] == [("-", "-"), ("none (random)", "no"), ("pretrained on tiny_a", "no"),
                                            ("pretrained on tiny_a", "2 epochs")]
    assert all(r[4] == "2" for r in rows)  # two one-step epochs each
    assert all(0.0 <= float(r[5]) <= 1.0 and 0.0 <= float(r[6]) <= 1.0 for r in rows)
