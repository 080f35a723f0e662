"""The authors' own factors on the golden tiny model: BA per module within tolerance."""
import pytest
import torch

from conftest import golden_errors

VARIANTS = ["default", "no_variance", "strong_variance"]
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # Triton interpreted on CPU, compiled on a GPU


def relative_errors(golden, variant, dtype, device="cpu", **overrides):
    """BA's relative error per module against the golden variant."""
    path, manifest, batches = golden
    return golden_errors(path / "model", batches, manifest["variants"][variant], path / f"expected-{variant}.safetensors",
                         dtype, device, **overrides)["BA"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_golden_fp64(golden, variant):
    errors = relative_errors(golden, variant, torch.float64)
    assert len(errors) == 14
    assert max(errors.values()) <= 5e-5, errors


@pytest.mark.parametrize("variant", VARIANTS)
def test_golden_fp32(golden, variant):
    """An fp32 model, Z summed in fp64 (the default): the errors stay near fp64's (about 5e-6
    measured). Z summed in fp32 takes the rounding floor of its sums as damping where that exceeds
    the authors' (see tests/test_invariants.py), so it is not compared with their factors."""
    errors = relative_errors(golden, variant, torch.float32)
    assert max(errors.values()) <= 1e-4, errors


@pytest.mark.parametrize("variant", VARIANTS)
def test_golden_fp32_triton(golden, variant):
    """The Triton kernels inside the whole pipeline."""
    errors = relative_errors(golden, variant, torch.float32, KERNEL_DEVICE, backend="triton")
    assert max(errors.values()) <= 1e-4, errors


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA extension's kernels run on a GPU")
@pytest.mark.parametrize("variant", VARIANTS)
def test_golden_fp32_cuda(golden, variant):
    """The CUDA C++ kernels inside the whole pipeline."""
    errors = relative_errors(golden, variant, torch.float32, "cuda", backend="cuda")
    assert max(errors.values()) <= 1e-4, errors


@pytest.mark.parametrize("variant", VARIANTS)
def test_golden_fp64_randomized_solver(golden, variant):
    errors = relative_errors(golden, variant, torch.float64, solver="randomized")
    assert max(errors.values()) <= 1e-4, errors
