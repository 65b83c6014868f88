"""The quality benchmarks (segtrain against plain Keras, costs, the data variants, tune and prior correction) on their
tiny settings, in a file of their own so that pytest-xdist can run it beside tests/test_benchmarks.py; in this process
(none of them changes a process-wide setting), which saves each its own TensorFlow start."""

import pytest

from tests.helpers import run_benchmark_in_process

pytestmark = pytest.mark.slow


@pytest.fixture
def run_script(monkeypatch, capsys):
    return lambda name, *args: run_benchmark_in_process(name, *args, monkeypatch=monkeypatch, capsys=capsys)


def table_rows(lines: list[str], first_cell: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines if line.startswith(f"| {first_cell}")]


def test_data_variants_tiny_prints_every_variant(run_script):
    lines = run_script("data_variants.py", "--tiny", "--variants", "both")  # sampling and augmentation at once
    rows = table_rows(lines, "tiny")
    assert [(r[1], r[2], r[3]) for r in rows] == [("both", "best", "4"), ("both", "last", "4")]  # steps
    assert all(0.0 <= float(r[5]) <= 1.0 for r in rows)  # fg IoU


def test_data_variants_tiny_under_a_budget_reports_the_planned_steps(run_script):
    lines = run_script("data_variants.py", "--tiny", "--budget", "2s", "--variants", "plain")
    rows = table_rows(lines, "tiny")
    assert [(r[1], r[2]) for r in rows] == [("plain", "best"), ("plain", "last")]
    assert rows[0][3] == rows[1][3] and int(rows[0][3]) >= 1  # the budget's planned steps, one run
    assert any(line.startswith("tiny: a budget of 2s per run") for line in lines)


def test_prior_correction_tiny_prints_the_rows_and_both_temperature_tables(run_script):
    lines = run_script("prior_correction.py", "--tiny")
    names = [r[0].replace(" (nothing written)", "") for r in table_rows(lines, "none") + table_rows(lines, "median")]
    assert names == ["none", "none + tuned (class biases)", "median_frequency", "median_frequency + weights (tau 1)",
                     "median_frequency + tuned (tau, class biases)", "median_frequency + tuned + post-processing"]
    temperature_rows = [r[0] for r in table_rows(lines, "T = 1") + table_rows(lines, "one T") +
                        table_rows(lines, "per-class T")]
    assert len(temperature_rows) == 6  # T = 1, one T, per-class T for each of the two models
    assert all(0.0 <= float(r[3]) <= 1.0 for r in table_rows(lines, "per-class T"))  # mean IoU


def test_operating_point_tiny_prints_calibration_and_the_tuned_rows(run_script):
    lines = run_script("operating_point.py", "--tiny", "--objectives", "f1")
    assert any(line.startswith("calibration on val_b: T = ") for line in lines)
    names = [r[0] for r in table_rows(lines, "argmax") + table_rows(lines, "tuned")]
    assert names == ["argmax (untuned)", "tuned for f1", "tuned for f1 + post-processing"]


def test_quality_tiny_prints_a_per_class_table_for_segtrain_and_the_plain_script(run_script):
    lines = run_script("quality.py", "--tiny")
    header = lines.index("| set | run | minutes | steps | class | IoU | F1 | precision | recall |")
    rows = [line for line in lines[header + 2:] if line.startswith("| tiny |")]
    runs = {row.split("|")[2].strip().split(" (")[0] for row in rows}
    assert runs == {"segtrain best.keras", "segtrain last.keras", "plain Keras"}
    assert len(rows) == 6  # two classes for each of the three runs


def test_cost_tradeoff_tiny_prints_the_three_cost_settings(run_script):
    lines = run_script("cost_tradeoff.py", "--tiny")
    rows = [line for line in lines if line.startswith("| high") or line.startswith("| default")]
    assert [row.split("|")[1].strip().split(" (")[0] for row in rows] == ["high fn_cost", "default costs",
                                                                          "high fp_cost"]
    assert any(line.startswith("recall high-to-low") for line in lines)
    assert lines[-1].startswith("ratio: ")


def test_plan_vs_hand_tiny_prints_both_configs(run_script):
    lines = run_script("plan_vs_hand.py", "--tiny")
    rows = table_rows(lines, "tiny")
    assert [r[1].split()[0] for r in rows][-2:] == ["plan", "hand"]
    assert all(0.0 <= float(r[4]) <= 1.0 for r in rows[-2:])  # mean IoU
