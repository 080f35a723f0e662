"""The kernels' fp64 path for Z (``input_factor_dtype`` "mixed" and "auto" on GPUs,
``lora_da.kernels.massive``): the scheme against fp64 truth on inputs with massive activations and
on sums that fp32 absorbs, and every kernel backend against the scheme's PyTorch reference
(``split_gram``), masked and compacted, at sizes that span many of the GPU's tiles (the interpreter
runs those tiles on CPU)."""
import pytest
import torch

from lora_da import dispatch
from lora_da.kernels import massive
from lora_da.kernels.massive import (FLUSH_TOKENS, FLUSH_TOKENS_SLOW_FP64 as FLUSH_TOKENS_SLOW, MASSIVE, MAX_MASSIVE,
                                    flush_tokens, massive_features, split_gram)

pytestmark = pytest.mark.usefixtures("poisoned_empty")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = [b for b in ("triton", "cuda") if dispatch.find("fisher_update", b).check(DEVICE, torch.float32) is None]
EPS32 = torch.finfo(torch.float32).eps
# the flush each backend's fp64 Z sums its fp32 partials over: the Triton kernel's, the whole call (cuBLAS)
FLUSH = {"triton": flush_tokens(DEVICE), "cuda": None}


def massive_inputs(tokens: int, n: int, seed: int, dtype=torch.float32, every: int = 61) -> torch.Tensor:
    """x [tokens, n] like a down_proj input: small values of rank n // 2 plus noise, and every
    ``every``-th token (a sequence's first) with values of 2784 and 948 in features 3 and n - 5
    (SmolLM2's layer 11 has them at 1229 and 1487), rounded to ``dtype``."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, n // 2, generator=gen) @ torch.randn(n // 2, n, generator=gen) * 0.05
    x += 1e-3 * torch.randn(tokens, n, generator=gen)
    x[::every, 3] = 2784.0
    x[::every, n - 5] = 948.0
    return x.to(dtype)


def test_massive_features_are_the_outliers_of_counted_rows():
    x = massive_inputs(300, 40, seed=0)
    assert massive_features(x).tolist() == [3, 35]
    weights = torch.ones(300)
    weights[::61] = 0  # the massive tokens not counted: nothing is massive
    assert massive_features(x, weights).tolist() == []
    assert massive_features(x[:0]).tolist() == []
    assert massive_features(torch.ones(8, 40)).tolist() == []
    wide = torch.ones(8, 100)
    wide[0, :40] = torch.arange(1.0, 41.0) * 1e3  # 40 features over MASSIVE x the median: the largest MAX_MASSIVE
    assert massive_features(wide).tolist() == list(range(40 - MAX_MASSIVE, 40))
    wide[0, :40] = MASSIVE * 0.99
    assert massive_features(wide).tolist() == []


def test_massive_columns_are_summed_once_in_fp64():
    x = massive_inputs(200, 24, seed=1, dtype=torch.float64)
    weights = (torch.rand(200, generator=torch.Generator().manual_seed(2)) < 0.7).double()
    z = torch.zeros(24, 24, dtype=torch.float64)
    features = torch.tensor([3, 7, 19])
    massive.add_massive_columns(z, x, weights, features)
    truth = x.T @ (x * weights[:, None])
    keep = torch.zeros(24, 24, dtype=torch.bool)
    keep[features, :] = keep[:, features] = True
    torch.testing.assert_close(z[keep], truth[keep], rtol=1e-14, atol=0)
    assert bool((z[~keep] == 0).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_split_gram_keeps_fp64_accuracy_where_fp32_sums_lose_it(dtype):
    """On inputs whose massive token spans two features, fp32 sums err by about eps32 ||Z||; the
    scheme's error stays 1000 times below that, and so does that of the smallest eigenvalues."""
    n, tokens = 96, 2000
    x = massive_inputs(tokens, n, seed=3, dtype=dtype)
    mask = torch.rand(tokens, generator=torch.Generator().manual_seed(4)) < 0.9
    wide = x.double() * mask.double()[:, None]
    truth = wide.T @ wide
    got = torch.zeros(n, n, dtype=torch.float64)
    split_gram(got, x, mask, FLUSH_TOKENS)
    rest = x.float() * mask.float()[:, None]
    single = (rest.T @ rest).double()

    def norm(e):
        return float(torch.linalg.eigvalsh(e).abs().max())

    scale = norm(truth)
    assert norm(single - truth) > 0.05 * EPS32 * scale  # the case fp32 sums get wrong
    assert norm(got - truth) < 1e-3 * norm(single - truth)
    smallest = torch.linalg.eigvalsh(truth)[:4]
    assert float((torch.linalg.eigvalsh(got)[:4] - smallest).abs().max()) < 1e-9 * scale


CASES = [  # (tokens, n, mask kind, compacted)
    (1500, 300, "random", False),  # several 128-wide tiles of Z with a tail, token tiles with scattered masks
    (1000, 200, "tails", True),  # compacted: the counted tokens first
    (700, 130, "none", False),  # every token masked
    (0, 64, "all", False),  # zero tokens
    (900, 150, "massive masked", False),  # the massive tokens not counted: no massive features
]


def case_mask(tokens: int, kind: str, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if kind == "random":
        return torch.rand(tokens, generator=gen) < 0.6
    if kind == "tails":
        return torch.arange(tokens) < tokens - 137
    if kind == "none":
        return torch.zeros(tokens, dtype=torch.bool)
    mask = torch.ones(tokens, dtype=torch.bool)
    if kind == "massive masked":
        mask[::61] = False
    return mask


@pytest.mark.skipif(not BACKENDS, reason="no kernel backend can run here")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}-{c[2]}{'-compacted' if c[3] else ''}")
def test_kernel_fp64_z_matches_the_scheme(backend, case):
    """The kernel's fp64 Z (upper triangle, its lower one poisoned) against ``split_gram`` from
    the same random start: the massive rows and columns to fp64 rounding, the rest within the
    rounding of fp32 sums (eps32 sqrt(T) |X|^T |X|). A kernel that summed the massive features
    in fp32, added them twice, or kept Z in fp32 fails the first; one that lost tokens, the second."""
    tokens, n, kind, compacted = case
    dtype = torch.bfloat16 if DEVICE.type == "cuda" else torch.float16
    x = massive_inputs(tokens, n, seed=n, dtype=dtype).to(DEVICE)
    mask = case_mask(tokens, kind, seed=n).to(DEVICE)
    counted = int(mask.sum()) if compacted else None
    start = torch.randn(n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n)).to(DEVICE)
    want = start.clone()
    split_gram(want, x, mask, FLUSH[backend])
    got = start.clone()
    got[torch.ones(n, n, dtype=torch.bool, device=DEVICE).tril(-1)] = float("nan")
    impl = dispatch.resolve("fisher_update", backend, DEVICE, dtype)
    impl.fn(x.reshape(1, tokens, n), mask.reshape(1, tokens), [], got, [], [], counted=counted)
    upper = torch.ones(n, n, dtype=torch.bool, device=DEVICE).triu()
    features = massive_features(x, mask)
    exact = torch.zeros(n, n, dtype=torch.bool, device=DEVICE)
    exact[features, :] = exact[:, features] = True
    magnitude = (x.abs().double() * mask.double()[:, None])
    bound = magnitude.T @ magnitude
    error = (got - want).abs()
    assert not bool(got[upper].isnan().any())
    assert bool((error[upper & exact] <= 1e-13 * (bound[upper & exact] + 1)).all())
    assert bool((error[upper & ~exact] <= 4 * EPS32 * max(tokens, 1) ** 0.5 * bound[upper & ~exact] + 1e-12).all())
    assert got.dtype == torch.float64


def absorbing_inputs(tokens: int, n: int, dtype: torch.dtype) -> torch.Tensor:
    """x [tokens, n]: 4096 in every feature of the first token (nothing massive: every feature has
    it), 1/16 everywhere else. Each later token adds 2^-8 to every entry of Z, and a tile of 64
    of them 2^-2, under half the fp32 spacing (2) of the first token's 2^24: an fp32 sum that
    holds 2^24 drops them, tile after tile."""
    x = torch.full((tokens, n), 1 / 16, dtype=dtype)
    x[0] = 4096.0
    return x


def absorbed_bound(flush: int) -> float:
    """The most an fp32 sum flushed into fp64 every ``flush`` tokens can lose of
    absorbing_inputs' Z: the 2^-8 of each other token in the first token's group."""
    return (flush - 1) * 2.0 ** -8


@pytest.mark.parametrize("flush", [16, 64, 256])
def test_split_gram_flushes_fp32_sums_into_fp64(flush):
    """The reference loses at most what its first group's fp32 sum absorbs."""
    x = absorbing_inputs(1000, 12, torch.bfloat16)
    truth = x.double().T @ x.double()
    got = torch.zeros(12, 12, dtype=torch.float64)
    split_gram(got, x, torch.ones(1000, dtype=torch.bool), flush)
    assert float((got - truth).abs().max()) <= absorbed_bound(flush)


@pytest.mark.skipif("triton" not in BACKENDS, reason="the Triton kernels cannot run here")
@pytest.mark.parametrize("flush", [FLUSH_TOKENS, FLUSH_TOKENS_SLOW], ids=lambda f: f"flush{f}")
@pytest.mark.parametrize("compacted", [False, True], ids=["masked", "compacted"])
def test_triton_fp64_z_flushes_every_few_tokens(compacted, flush, monkeypatch):
    """The Triton kernel's fp64 Z on sums that fp32 absorbs, flushed every ``flush`` tokens (as on
    GPUs with fast and with slow fp64 units): within what one flush group can lose (its tiles
    summed in fp32 in the MMA's order), where the tiles' running fp32 sum over the call (the
    kernel's fp32 path) loses about 983 * 2^-8 (several of Z's tiles, a token tail, masked tokens
    in the middle)."""
    from lora_da.kernels import fisher_triton

    monkeypatch.setattr(fisher_triton, "flush_tokens", lambda device: flush)
    tokens, n = 1000, 40
    dtype = torch.bfloat16 if DEVICE.type == "cuda" else torch.float16
    x = absorbing_inputs(tokens, n, dtype).to(DEVICE)
    mask = torch.ones(tokens, dtype=torch.bool, device=DEVICE)
    if not compacted:
        mask[500:517] = False
    counted = tokens if compacted else None
    got = torch.zeros(n, n, dtype=torch.float64, device=DEVICE)
    got[torch.ones(n, n, dtype=torch.bool, device=DEVICE).tril(-1)] = float("nan")
    impl = dispatch.resolve("fisher_update", "triton", DEVICE, dtype)
    impl.fn(x.reshape(1, tokens, n), mask.reshape(1, tokens), [], got, [], [], counted=counted)
    wide = x.double() * mask.double()[:, None]
    truth = wide.T @ wide
    upper = torch.ones(n, n, dtype=torch.bool, device=DEVICE).triu()
    assert float((got - truth)[upper].abs().max()) <= absorbed_bound(flush)
