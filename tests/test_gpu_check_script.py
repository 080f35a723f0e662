"""The GPU check script's logic, exercised on CPU with tiny shapes (--smoke)."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_smoke(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "TRITON_INTERPRET": "1"}
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--smoke"], env=env, check=True,
                   capture_output=True, text=True, cwd=ROOT)
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [r["op"] for r in report["records"]] == ["Z", "Z", "Z+G+y", "Z+G+y"]
    for record in report["records"]:
        assert set(record["ms"]) == {"torch_fp32_addmm", "torch_bf16_mm", "torch_fp64_z", "triton", "triton_compacted",
                                     "triton_mixed_compacted"}
        assert all(v > 0 for v in record["tflops"].values())
    assert len(report["targets"]["mixed_over_fp32_kernel"]) == 1 + 4  # the target and each record's ratio
    assert (tmp_path / "gpu_check.txt").read_text().startswith("{")
    solver = report["solver"]
    assert solver["returncode"] == 0
    (row,) = solver["records"]
    assert row["rank"] == 2 and row["modules"] == 14 and len(row["seconds"]) == 2
    assert row["seconds_small_eigh_on_device"] > 0
    assert 0 < row["max_residual"] <= 1e-7
    run = report["end_to_end"]
    assert run["returncode"] == 0 and run["modules"] == 7 and run["counted_tokens"] == 16 * 32
    assert run["init_seconds"] >= run["collect_seconds"] + run["solve_seconds"] > 0 and run["train_seconds"] > 0
    assert run["statistics_bytes"] > 0 and run["peak_bytes"] is None  # no accelerator on CPU
    assert 1.5 < run["collect_floor_ratio"] < 2.5


def test_z_kernel_registers_report(tmp_path):
    """The register report compiles the Triton Z kernel for a GPU without one; the config added
    for fp64 Z assembles without spills at each flush."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "z_kernel_registers.py"), "--targets", "sm_90a",
                    "--configs", "64, 64, 0, 8, 3"], env={**env, "OUT": str(tmp_path)}, check=True,
                   capture_output=True, text=True, cwd=ROOT)
    records = json.loads((tmp_path / "z_kernel_registers.json").read_text())["records"]
    assert [r["flush"] for r in records] == [0, 64, 256]
    assert all(0 < r["registers"] <= 255 and r["spill stores"] == r["spill loads"] == 0 for r in records)
