"""The statistics op (PyTorch reference) against per-token loops, and the dispatch layer."""
import zlib

import pytest
import torch

from lora_da import dispatch
from lora_da.kernels import reference

pytestmark = pytest.mark.usefixtures("poisoned_empty")

SHAPES = [  # (B, L, n, [m_k])
    (1, 1, 5, [3]),  # a single token
    (2, 7, 13, [11, 5, 13]),  # odd sizes, several modules on one input
    (3, 0, 4, [6]),  # zero tokens
    (4, 9, 33, [17]),
    (2, 9, 400, [7]),  # several panels of the reference's Z update, the last one short
]


def naive(x, mask, grads):
    """fp64 per-token loops: Z, G_k, y_k, per-sequence sums."""
    b, length, n = x.shape
    x = x.double()
    z = torch.zeros(n, n, dtype=torch.float64)
    out = []
    for g in grads:
        g = g.double()
        big_g = torch.zeros(g.shape[-1], n, dtype=torch.float64)
        y = torch.zeros(g.shape[-1], dtype=torch.float64)
        seq = torch.zeros(b, g.shape[-1], dtype=torch.float64)
        for i in range(b):
            for t in range(length):
                big_g += torch.outer(g[i, t], x[i, t])
                if mask[i, t]:
                    y += g[i, t] ** 2
                    seq[i] += g[i, t]
        out.append((big_g, y, seq))
    for i in range(b):
        for t in range(length):
            if mask[i, t]:
                z += torch.outer(x[i, t], x[i, t])
    return z, out


def make_mask(b, length, kind, generator):
    if kind == "all_masked":
        return torch.zeros(b, length, dtype=torch.bool)
    if kind == "tails":  # right padding of random length
        keep = torch.randint(0, length + 1, (b,), generator=generator)
        return torch.arange(length)[None, :] < keep[:, None]
    return torch.rand(b, length, generator=generator) < 0.6


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mask_kind", ["tails", "random", "all_masked"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_fisher_update_matches_loops(shape, mask_kind, dtype):
    b, length, n, ms = shape
    gen = torch.Generator().manual_seed(zlib.crc32(f"{shape}{mask_kind}".encode()))
    x = torch.randn(b, length, n, generator=gen).to(dtype)
    grads = [torch.randn(b, length, m, generator=gen).to(dtype) for m in ms]
    mask = make_mask(b, length, mask_kind, gen)
    acc = torch.promote_types(torch.float32, dtype)
    # accumulators start from arbitrary values: the op must add, not overwrite
    z0 = torch.randn(n, n, generator=gen).to(acc)
    g0 = [torch.randn(m, n, generator=gen).to(acc) for m in ms]
    y0 = [torch.rand(m, generator=gen).to(acc) for m in ms]
    z, gs, ys = z0.clone(), [g.clone() for g in g0], [y.clone() for y in y0]
    seqs = [torch.full((b, m), float("nan"), dtype=acc) for m in ms]  # poisoned: must be written
    reference.fisher_update(x, mask, grads, z, gs, ys)
    for grad, seq in zip(grads, seqs):
        reference.write_sequence_sums(grad, mask, seq)
    want_z, want = naive(x, mask, grads)
    tol = {"atol": 1e-9, "rtol": 1e-9} if acc == torch.float64 else {"atol": 1e-4, "rtol": 1e-5}
    torch.testing.assert_close(torch.triu(z).double(), torch.triu(z0.double() + want_z), **tol)
    for k, (want_g, want_y, want_seq) in enumerate(want):
        torch.testing.assert_close(gs[k].double(), g0[k].double() + want_g, **tol)
        torch.testing.assert_close(ys[k].double(), y0[k].double() + want_y, **tol)
        torch.testing.assert_close(seqs[k].double(), want_seq, **tol)


def test_fisher_update_accumulates_over_calls_and_skips_z():
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(2, 5, 7, generator=gen) for _ in range(3)]
    gs = [torch.randn(2, 5, 4, generator=gen) for _ in range(3)]
    mask = torch.ones(2, 5, dtype=torch.bool)
    z, big_g, y = torch.zeros(7, 7), torch.zeros(4, 7), torch.zeros(4)
    for x, g in zip(xs, gs):
        reference.fisher_update(x, mask, [g], z, [big_g], [y])
    x_all, g_all = torch.cat(xs), torch.cat(gs)
    want_z, [(want_g, want_y, _)] = naive(x_all, torch.ones(6, 5, dtype=torch.bool), [g_all])
    torch.testing.assert_close(torch.triu(z).double(), torch.triu(want_z), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(big_g.double(), want_g, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(y.double(), want_y, atol=1e-4, rtol=1e-5)
    untouched = torch.zeros(4, 7)
    reference.fisher_update(xs[0], mask, [gs[0]], None, [untouched], [torch.zeros(4)])
    assert untouched.abs().sum() > 0


def test_dispatch_auto_takes_torch_on_cpu_and_says_so(caplog):
    dispatch._announced.clear()
    with caplog.at_level("INFO", logger="lora_da"):
        impl = dispatch.resolve("fisher_update", "auto", torch.device("cpu"), torch.float32)
        dispatch.resolve("fisher_update", "auto", torch.device("cpu"), torch.float32)
    assert impl.backend == "torch" and impl.fn is reference.fisher_update
    assert caplog.text.count("uses backend 'torch'") == 1


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_dispatch_explicit_backend_that_cannot_run_says_why(backend):
    with pytest.raises(RuntimeError, match=f"backend '{backend}' cannot run .*torch.float64 stays on the torch"):
        dispatch.resolve("fisher_update", backend, torch.device("cuda"), torch.float64)
    with pytest.raises(RuntimeError, match="CUDA tensors, not cpu"):
        dispatch.resolve("fisher_update", "cuda", torch.device("cpu"), torch.float32)


def test_dispatch_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        dispatch.resolve("fisher_update", "triton", torch.device("cpu"), torch.float32)


def test_dispatch_auto_never_interprets_on_cpu():
    assert dispatch.resolve("fisher_update", "auto", torch.device("cpu"), torch.float16).backend == "torch"


def test_dispatch_environment_variable(monkeypatch):
    monkeypatch.setenv("LORA_DA_BACKEND", "torch")
    assert dispatch.requested_backend("auto") == "torch"
    assert dispatch.requested_backend("cuda") == "cuda"  # an explicit config wins


def test_dispatch_check_reason_is_reported():
    dispatch.register("test_only_op", "cuda", lambda: None, check=lambda device, dtype: "needs a GPU")
    try:
        with pytest.raises(RuntimeError, match="needs a GPU"):
            dispatch.resolve("test_only_op", "cuda", torch.device("cpu"), torch.float32)
    finally:
        del dispatch._REGISTRY["test_only_op"]
