"""The optional CUDA extension: built where it can be, loaded lazily, clean errors elsewhere."""
import shutil
import subprocess
import sys

import pytest
import torch

from lora_da import _extension

CAN_BUILD = torch.version.cuda is not None and (shutil.which("nvcc") or shutil.os.path.exists("/usr/local/cuda/bin/nvcc"))


def test_import_does_not_load_the_extension():
    code = "import sys, lora_da; print('lora_da._C' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


@pytest.mark.skipif(not CAN_BUILD, reason="torch is not a CUDA build or nvcc is missing: nothing to build")
def test_extension_was_built_and_registers_its_ops():
    assert _extension.load_error() is None
    assert hasattr(torch.ops.lora_da, "axpy_")


@pytest.mark.skipif(not CAN_BUILD, reason="torch is not a CUDA build or nvcc is missing: nothing to build")
def test_meta_kernel_and_clean_error_on_cpu_tensors():
    y = torch.empty(5, device="meta")
    assert _extension.axpy_(y, torch.empty(5, device="meta"), 2.0).shape == (5,)
    with pytest.raises(RuntimeError, match="shapes differ"):
        _extension.axpy_(torch.empty(5, device="meta"), torch.empty(4, device="meta"), 1.0)
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        _extension.axpy_(torch.zeros(3), torch.zeros(3), 1.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_axpy_on_gpu_matches_torch():
    gen = torch.Generator(device="cuda").manual_seed(0)
    for n in (0, 1, 1000, 70001):
        x = torch.randn(n, device="cuda", generator=gen)
        y = torch.randn(n, device="cuda", generator=gen)
        want = y + 0.5 * x
        _extension.axpy_(y, x, 0.5)
        torch.testing.assert_close(y, want)


@pytest.mark.skipif(not CAN_BUILD, reason="torch is not a CUDA build or nvcc is missing: nothing to build")
def test_fisher_op_schema_and_argument_checks_on_meta():
    meta = dict(device="meta")
    x, mask, grad = torch.empty(10, 7, **meta), torch.empty(10, **meta), torch.empty(10, 5, **meta)
    ops = _extension.ops()
    ops.fisher_update_(x, mask, [grad], torch.empty(7, 7, **meta), [torch.empty(5, 7, **meta)], [torch.empty(5, **meta)])
    with pytest.raises(RuntimeError, match="G 0 must be contiguous fp32"):
        ops.fisher_update_(x, mask, [grad], None, [torch.empty(4, 7, **meta)], [torch.empty(5, **meta)])
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        ops.fisher_update_(x.double(), mask, [], None, [], [])
    with pytest.raises(NotImplementedError, match="CPU"):
        ops.fisher_update_(torch.zeros(3, 2), torch.ones(3), [], None, [], [])
