"""benchmarks/encoders.py on its tiny settings (synthetic sets, MobileNetV3Small): both parts print their tables."""

import pytest

from tests.helpers import run_benchmark_script as run_script

pytestmark = pytest.mark.slow


def table_rows(lines: list[str], first_cell: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines if line.startswith(f"| {first_cell}")]


def test_encoders_tiny_prints_the_speed_table_and_the_four_fine_tuning_rows():
    lines = run_script("encoders.py", "--tiny", timeout=600)
    speed = [r for r in table_rows(lines, "unet") if len(r) == 5]
    assert [r[0] for r in speed] == ["unet (today's)", "unet_mobilenetv3small"]
    assert speed[0][4] == "1.00x" and all(float(r[2]) > 0 for r in speed)
    header = "| model | encoder weights | frozen phase | training minutes | steps | mean IoU | road IoU |"
    table = lines[lines.index(header):]
    rows = table_rows(table, "unet")
    assert [(r[1], r[2]) for r in rows] == [("-", "-"), ("none (random)", "no"), ("pretrained on tiny_a", "no"),
                                            ("pretrained on tiny_a", "2 epochs")]
    assert all(0.0 <= float(r[5]) <= 1.0 and 0.0 <= float(r[6]) <= 1.0 for r in rows)
