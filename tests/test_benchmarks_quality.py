"""The quality benchmarks added with tune, prior correction and the data variants, on their tiny settings (a file of
their own so that pytest-xdist can run it beside tests/test_benchmarks.py)."""

import pytest

from tests.helpers import run_benchmark_script as run_script

pytestmark = pytest.mark.slow


def table_rows(lines: list[str], first_cell: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines if line.startswith(f"| {first_cell}")]


def test_data_variants_tiny_prints_every_variant():
    lines = run_script("data_variants.py", "--tiny", "--variants", "both")  # sampling and augmentation at once
    rows = table_rows(lines, "tiny")
    assert [(r[1], r[2]) for r in rows] == [("both", "best"), ("both", "last")]
    assert all(0.0 <= float(r[3]) <= 1.0 for r in rows)


def test_prior_correction_tiny_prints_the_five_rows_and_a_verdict():
    lines = run_script("prior_correction.py", "--tiny")
    names = [r[0] for r in table_rows(lines, "none") + table_rows(lines, "median_frequency")]
    assert names == ["none", "median_frequency", "median_frequency + weights (tau 1)",
                     "median_frequency + tuned (tau, class biases)", "median_frequency + tuned + post-processing"]
    assert "both uncorrected rows" in lines[-1]


def test_operating_point_tiny_prints_calibration_and_the_tuned_rows():
    lines = run_script("operating_point.py", "--tiny", "--objectives", "f1")
    assert any(line.startswith("calibration on val_b: T = ") for line in lines)
    names = [r[0] for r in table_rows(lines, "argmax") + table_rows(lines, "tuned")]
    assert names == ["argmax (untuned)", "tuned for f1", "tuned for f1 + post-processing"]
