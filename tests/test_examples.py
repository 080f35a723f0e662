"""The examples the README points to run as they are."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_initialize_peft_example_runs():
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "initialize_peft.py")], capture_output=True,
                         text=True, check=True, cwd=ROOT)
    assert "model.layers.1.self_attn.v_proj: lora_A (4, 32), lora_B (16, 4)" in out.stdout
    assert "modules     14 (rank 4)" in out.stdout


def test_trainer_example_starts_from_lora_da_and_trains():
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "train_with_trainer.py"), "--steps", "2"],
                         capture_output=True, text=True, check=True, cwd=ROOT)
    assert "modules     14 (rank 4)" in out.stdout
    line = next(line for line in out.stdout.splitlines() if line.startswith("first logged loss"))
    zero, data_aware = (float(part.split()[-1]) for part in line.split(":", 1)[1].split(","))
    assert abs(zero - data_aware) > 1e-4, line
