"""The authors' factors for their further options (``golden-extras``): each variant reproduced by
both solvers in fp64 and fp32, and each option shown to matter."""
import pytest
import torch

from conftest import golden_errors

VARIANTS = ["balanced", "output_damping_ratio", "normalized_variance", "delta_power"]
OPTION_OFF = {  # each variant with its option at the default
    "balanced": {"balance_factors": False},
    "output_damping_ratio": {"output_damping_ratio": None},
    "normalized_variance": {"normalize_variance_guidance": False},
    "delta_power": {"delta_normalization_power": 1.0, "delta_normalization_reference": 1.0},
}
TOLERANCE = {(torch.float64, "exact"): 5e-5, (torch.float64, "randomized"): 1e-4,
             (torch.float32, "exact"): 1e-4, (torch.float32, "randomized"): 1e-4}


def errors(golden, golden_extras, variant, dtype, **overrides):
    path, manifest = golden_extras
    return golden_errors(golden[0] / "model", golden[2], manifest["variants"][variant],
                         path / f"expected-{variant}.safetensors", dtype, **overrides)


@pytest.mark.parametrize("solver", ["exact", "randomized"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_golden_extras(golden, golden_extras, variant, dtype, solver):
    found = errors(golden, golden_extras, variant, dtype, solver=solver)
    # balanced factors do not depend on the basis inside the subspace: compared one by one too
    compared = ["BA", "lora_A", "lora_B"] if variant == "balanced" else ["BA"]
    assert len(found["BA"]) == 14
    for key in compared:
        assert max(found[key].values()) <= TOLERANCE[(dtype, solver)], (key, found[key])


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_option_changes_the_factors(golden, golden_extras, variant):
    """Without its option a variant misses the authors' factors by far more than the tolerance
    (balancing keeps BA and changes lora_A and lora_B)."""
    found = errors(golden, golden_extras, variant, torch.float64, **OPTION_OFF[variant])
    key = "lora_A" if variant == "balanced" else "BA"
    assert max(found[key].values()) > 1e-2, found[key]
    if variant == "balanced":
        assert max(found["BA"].values()) <= 5e-5
