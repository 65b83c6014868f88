"""Each benchmark script runs on its tiny setting and prints its result line (not a benchmark itself)."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import run_benchmark_in_process, run_benchmark_script

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"


def run_script(name: str, *args: str, timeout: int = 240) -> list[str]:
    return run_benchmark_script(name, *args, timeout=timeout)


@pytest.fixture
def run_in_process(monkeypatch, capsys):
    return lambda name, *args: run_benchmark_in_process(name, *args, monkeypatch=monkeypatch, capsys=capsys)


def final_ratio(lines: list[str]) -> float:
    last = lines[-1]
    assert last.startswith("ratio: "), last
    value = float(last.split(":", 1)[1])
    assert math.isfinite(value) and value > 0, last
    return value


@pytest.mark.parametrize("name", ["fit_throughput.py", "pipeline_throughput.py", "memory.py", "predict_throughput.py",
                                  "step_overhead.py", "eval_speed.py", "plan_memory.py"])
def test_speed_and_memory_benchmarks_print_a_final_ratio(name, run_in_process):
    # in this process: none of them changes a process-wide setting (the GPU script, which sets a dtype policy and
    # hides devices, runs in its own below)
    lines = run_in_process(name, "--tiny")
    final_ratio(lines)
    assert any("median" in line for line in lines), "figures must be medians"


def test_every_benchmark_script_is_covered():
    scripts = {p.name for p in BENCHMARKS.glob("*.py") if not p.name.startswith("_")}
    covered = {"fit_throughput.py", "pipeline_throughput.py", "memory.py", "gpu_mixed_precision.py", "quality.py",
               "cost_tradeoff.py", "plain_keras_baseline.py", "predict_throughput.py", "step_overhead.py",
               "data_variants.py", "prior_correction.py", "operating_point.py", "eval_speed.py", "plan_memory.py",
               "plan_vs_hand.py", "encoders.py"}
    assert scripts <= covered, f"benchmarks without a smoke test: {sorted(scripts - covered)}"


def test_gpu_benchmark_without_a_gpu_says_it_did_not_run():
    result = subprocess.run([sys.executable, str(BENCHMARKS / "gpu_mixed_precision.py"), "--tiny"],
                            capture_output=True, text=True, cwd=REPO, timeout=120,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "no GPU" in result.stdout and "not run" in result.stdout
    assert "ratio:" not in result.stdout


def test_gpu_benchmark_code_path_runs_on_the_cpu_when_allowed():
    lines = run_script("gpu_mixed_precision.py", "--tiny", "--allow-cpu")
    final_ratio(lines)
    assert any(line.startswith("pipeline efficiency") for line in lines)
