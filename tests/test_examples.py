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
