"""The solver's kernels against their PyTorch references (Triton under the interpreter on CPUs)."""
import pytest
import torch

from lora_da import dispatch
from lora_da.kernels import reference

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TRITON = dispatch.find("inner_products", "triton")
pytestmark = [pytest.mark.skipif(TRITON.check(DEVICE, torch.float64) is not None,
                                 reason=str(TRITON.check(DEVICE, torch.float64))),
              pytest.mark.usefixtures("poisoned_empty")]

SHAPES = [  # (batch, n, p, q)
    (1, 1, 1, 1),  # a single row
    (3, 0, 4, 5),  # no rows: zeros
    (2, 37, 19, 5),  # odd sizes inside one tile
    (2, 300, 33, 40),  # several tiles, a row tail past the first slice of rows
    (4, 513, 7, 70),  # p != q, three slices of rows, the last one short
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch,n,p,q", SHAPES)
def test_inner_products_match_reference(batch, n, p, q, dtype):
    gen = torch.Generator().manual_seed(batch * 1000 + n + p + q)
    a = torch.randn(batch, n, p, generator=gen, dtype=torch.float64).to(DEVICE, dtype)
    b = (torch.randn(batch, n, q, generator=gen, dtype=torch.float64) * 1e3).to(DEVICE, dtype)
    out = torch.full((batch, p, q), float("nan"), dtype=torch.float64, device=DEVICE)
    TRITON.fn(a, b, out=out)
    want = reference.inner_products(a, b)
    # fp32 products are exact in fp64: both precisions agree with the reference to fp64 rounding
    scale = (a.double().abs().transpose(1, 2) @ b.double().abs()).clamp_min(1.0)
    assert bool(((out - want).abs() <= 1e-13 * scale).all())


def test_inner_products_of_strided_views():
    """Blocks sliced out of wider ones (the Rayleigh-Ritz basis, [X, Q]) need not be copied."""
    gen = torch.Generator().manual_seed(7)
    wide = torch.randn(3, 130, 50, generator=gen, dtype=torch.float64).to(DEVICE)
    a, b = wide[:, :, 3:20], wide.transpose(1, 2).contiguous().transpose(1, 2)[:, :, 10:45]
    torch.testing.assert_close(TRITON.fn(a, b), reference.inner_products(a, b), rtol=1e-13, atol=1e-12)


def test_solver_uses_the_reference_on_cpu_unless_told():
    assert dispatch.resolve("inner_products", "auto", torch.device("cpu"), torch.float64).backend == "torch"
    impl = dispatch.resolve("inner_products", "cuda", torch.device("cpu"), torch.float64, missing_is_auto=True)
    assert impl.backend == "torch"
