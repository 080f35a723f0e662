"""Every kernel backend of the statistics op against the PyTorch reference and an fp64 truth.

A kernel passes when its error against fp64 is at most twice the reference's error in the same
precision, plus a small absolute term. Accumulators start from random values (the op adds), Z's
lower triangle (which it must not read into the upper one) starts poisoned with NaN, and so does
every fresh float tensor (``poisoned_empty``). The per-sequence sums are the dispatch layer's
(``reference.write_sequence_sums``), not the kernels'.
"""
import pytest
import torch

from lora_da import dispatch
from lora_da.kernels import reference
from lora_da.memory import HELD_ROWS_PER_FEATURE
from lora_da.statistics import Z_FP32_TILES

pytestmark = pytest.mark.usefixtures("poisoned_empty")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = [b for b in ("triton", "cuda") if dispatch.find("fisher_update", b).check(DEVICE, torch.float32) is None]
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE.type == "cuda" else [])

SHAPES = [  # (B, L, n, [m_k], mask kind)
    (1, 1, 5, [3], "all"),  # a single token
    (2, 7, 37, [19, 5, 37], "tails"),  # odd sizes, several modules on one input (q/k/v-like)
    (3, 0, 9, [6], "all"),  # zero tokens
    (2, 9, 20, [33], "none"),  # every token masked
    (3, 11, 48, [17, 40], "random"),  # several small tiles, scattered counted tokens
]
# Real sizes: many of the GPU's 64- and 128-wide tiles with ragged tails, thousands of tokens (under
# the interpreter too, which runs the GPU's tile shapes on problems this big)
LARGE_SHAPES = [
    (4, 1000, 576, [576, 192, 192], "tails"),  # SmolLM2's q/k/v input, T = 4000
    (2, 1531, 1000, [997], "runs"),  # masked runs across many token tiles, one sequence masked whole
    (3, 700, 200, [130, 260], "random"),
    (2, 1500, 300, [301], "none"),
]
LARGE_CASES = [(shape, dtype) for shape in LARGE_SHAPES for dtype in DTYPES] if DEVICE.type == "cuda" else [
    (shape, torch.float16 if shape[4] == "random" else torch.float32) for shape in LARGE_SHAPES]


def make_inputs(b, length, n, ms, kind, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, length, n, generator=gen)
    grads = [torch.randn(b, length, m, generator=gen) for m in ms]
    if kind == "all":
        mask = torch.ones(b, length, dtype=torch.bool)
    elif kind == "none":
        mask = torch.zeros(b, length, dtype=torch.bool)
    elif kind == "tails":
        keep = torch.randint(0, length + 1, (b,), generator=gen)
        mask = torch.arange(length)[None, :] < keep[:, None]
    elif kind == "runs":
        mask = torch.ones(b, length, dtype=torch.bool)
        mask[0] = False
        for row in range(1, b):
            start = 0
            while start < length:
                start += int(torch.randint(50, 300, (1,), generator=gen))
                stop = start + int(torch.randint(150, 400, (1,), generator=gen))
                mask[row, start:stop] = False
                start = stop
    else:
        mask = torch.rand(b, length, generator=gen) < 0.5
    to = lambda t: t.to(DEVICE, dtype)  # noqa: E731
    return to(x), mask.to(DEVICE), [to(g) for g in grads]


def accumulators(n, ms, seed, poison):
    """Random Z, G, y; with ``poison`` Z's strictly lower triangle (which the op may update or not,
    but never reads into the upper one) is NaN."""
    gen = torch.Generator().manual_seed(seed + 1)
    z = torch.randn(n, n, generator=gen)
    if poison:
        z[torch.ones(n, n, dtype=torch.bool).tril(-1)] = float("nan")
    acc = {
        "z": z,
        "g": [torch.randn(m, n, generator=gen) for m in ms],
        "y": [torch.rand(m, generator=gen) for m in ms],
    }
    return {k: (v.to(DEVICE) if torch.is_tensor(v) else [t.to(DEVICE) for t in v]) for k, v in acc.items()}


def run(fn, x, mask, grads, acc):
    fn(x, mask, grads, acc["z"], acc["g"], acc["y"])
    return acc


def assert_within_twice_reference(kernel, ref, truth, name):
    scale = truth.abs().max().item() + 1.0
    kernel_err = (kernel.double() - truth).abs().max().item()
    ref_err = (ref.double() - truth).abs().max().item()
    assert kernel_err <= 2 * ref_err + 1e-5 * scale, f"{name}: kernel error {kernel_err:.3g}, reference {ref_err:.3g}"


def shape_id(shape) -> str:
    return f"{shape[0]}x{shape[1]}x{shape[2]}-{shape[4]}"


@pytest.mark.skipif(not BACKENDS, reason="no kernel backend can run here")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_kernel_matches_reference(backend, dtype, shape):
    check_against_reference(backend, dtype, shape)


@pytest.mark.skipif(not BACKENDS, reason="no kernel backend can run here")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,dtype", LARGE_CASES, ids=lambda c: shape_id(c) if isinstance(c, tuple) else str(c))
def test_kernel_matches_reference_at_real_sizes(backend, dtype, shape):
    check_against_reference(backend, dtype, shape)
    if backend == "triton" and DEVICE.type == "cpu":  # the interpreter ran the GPU's tiles, not its own 16-wide ones
        from lora_da.kernels import fisher_triton

        assert fisher_triton._z_upper_kernel.best_config.kwargs["BLOCK_N"] in (64, 128)
        assert fisher_triton._g_kernel.best_config.kwargs["BLOCK_M"] in (64, 128)


def check_against_reference(backend, dtype, shape):
    """The backend's statistics of random inputs of ``shape`` in ``dtype`` against the reference
    and an fp64 truth, everything the op writes included (upper triangle of Z, G, y)."""
    b, length, n, ms, kind = shape
    x, mask, grads = make_inputs(b, length, n, ms, kind, dtype, seed=n + length)
    impl = dispatch.resolve("fisher_update", backend, DEVICE, dtype)
    got = run(impl.fn, x, mask, grads, accumulators(n, ms, n, True))
    ref = run(reference.fisher_update, x, mask, grads, accumulators(n, ms, n, True))
    truth = run(reference.fisher_update, x.double(), mask, [g.double() for g in grads],
                {k: (v.double() if torch.is_tensor(v) else [t.double() for t in v])
                 for k, v in accumulators(n, ms, n, False).items()})
    upper = torch.triu(torch.ones(n, n, dtype=torch.bool, device=DEVICE))
    assert_within_twice_reference(got["z"][upper], ref["z"][upper], truth["z"][upper], "Z (upper triangle)")
    for k in range(len(ms)):
        assert_within_twice_reference(got["g"][k], ref["g"][k], truth["g"][k], f"G[{k}]")
        assert_within_twice_reference(got["y"][k], ref["y"][k], truth["y"][k], f"y[{k}]")


@pytest.mark.skipif(not BACKENDS, reason="no kernel backend can run here")
@pytest.mark.parametrize("backend", BACKENDS)
def test_kernel_accumulates_over_calls(backend):
    n, ms = 21, [13, 8]
    impl = dispatch.resolve("fisher_update", backend, DEVICE, torch.float32)
    got = accumulators(n, ms, 0, False)
    ref = accumulators(n, ms, 0, False)
    for seed in range(3):
        x, mask, grads = make_inputs(2, 5 + seed, n, ms, "tails", torch.float32, seed)
        run(impl.fn, x, mask, grads, got)
        run(reference.fisher_update, x, mask, grads, ref)
    upper = torch.triu(torch.ones(n, n, dtype=torch.bool, device=DEVICE))
    torch.testing.assert_close(got["z"][upper], ref["z"][upper], rtol=1e-5, atol=1e-5)
    for k in range(len(ms)):
        torch.testing.assert_close(got["g"][k], ref["g"][k], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got["y"][k], ref["y"][k], rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not BACKENDS, reason="no kernel backend can run here")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fisher", ["sequence_lowrank", "diagonal"])
@pytest.mark.parametrize("input_factor_dtype,buffer_tokens",
                         [("float64", 0), ("float32", 0), ("float32", 4096), ("mixed", 0), ("mixed", 4096),
                          ("auto", 4096)],
                         ids=["fp64 Z", "fp32 Z", "fp32 Z, compacted chunks", "mixed Z", "mixed Z, compacted chunks",
                              "auto Z, compacted chunks"])
def test_collect_statistics_with_backend_equals_torch(backend, fisher, input_factor_dtype, buffer_tokens, monkeypatch):
    """fp32 and mixed Z go through the kernel (``float64`` Z stays on torch; mixed on a half-precision
    model, whose products fp32 holds exactly; ``auto`` as mixed with the Triton kernel, as float64
    with the CUDA extension); with buffering (``diagonal`` only) the kernels read compacted chunks
    gathered across batches."""
    import lora_da
    from conftest import random_batches, tiny_llama
    from lora_da import memory

    monkeypatch.setattr(memory, "BUFFER_SHARE_OF_ACCUMULATORS", 1e6)  # chunks as large as asked on a tiny model
    half = torch.bfloat16 if DEVICE.type == "cuda" else torch.float16
    model = tiny_llama(seed=30, dtype=half if input_factor_dtype in ("mixed", "auto") else torch.float32).to(DEVICE)
    batches = random_batches([6, 7, 8], seed=31, padding="left")
    cfg = lora_da.LoraDAConfig(output_fisher=fisher, token_mask="labels", input_factor_dtype=input_factor_dtype,
                               buffer_tokens=buffer_tokens, population_size=9)
    calls = []
    find = dispatch.find

    def spy(op, backend_name):
        impl = find(op, backend_name)
        calls.append((backend_name, impl.backend))
        return impl

    monkeypatch.setattr(dispatch, "find", spy)
    want = lora_da.collect_statistics(model, batches, cfg, backend="torch", progress=False)
    calls.clear()
    got = lora_da.collect_statistics(model, batches, cfg, backend=backend, progress=False)
    kernel_z = input_factor_dtype == "mixed" or (input_factor_dtype == "auto" and backend == "triton")
    # the torch reference is asked for fp64 products only (no input's rows are held to the end)
    assert all(e.num_tokens > HELD_ROWS_PER_FEATURE * e.z_sum.shape[0] for e in got.inputs.values())
    assert bool(calls) == (input_factor_dtype in ("float64", "auto") and not kernel_z)
    wanted = torch.float32 if input_factor_dtype == "float32" else torch.float64
    assert all(e.z_sum.dtype == wanted for e in got.inputs.values())
    assert got.config[Z_FP32_TILES] == kernel_z and not want.config[Z_FP32_TILES]

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    for key in want.inputs:
        assert rel(got.inputs[key].z_sum, want.inputs[key].z_sum) <= 1e-5
    for name in want.modules:
        for field in ("g_sum", "y_sum") + (("sequence_sums",) if fisher == "sequence_lowrank" else ()):
            assert rel(getattr(got.modules[name], field), getattr(want.modules[name], field)) <= 1e-5, (name, field)


@pytest.mark.skipif(DEVICE.type != "cuda" or not BACKENDS, reason="bf16 kernels are checked on a GPU")
@pytest.mark.parametrize("backend", BACKENDS)
def test_collect_statistics_bf16_model(backend):
    """bf16 model on GPU: the kernels' statistics differ from the fp32-accumulating reference by no
    more than twice what rounding the exact result to bf16 (PyTorch's bf16 matmul) costs."""
    import lora_da
    from conftest import random_batches, tiny_llama

    model = tiny_llama(seed=32, dtype=torch.bfloat16).to(DEVICE)
    batches = random_batches([4, 3], seed=33)
    want = lora_da.collect_statistics(model, batches, backend="torch", progress=False)
    got = lora_da.collect_statistics(model, batches, backend=backend, progress=False)

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    pairs = [(got.inputs[k].z_sum, want.inputs[k].z_sum) for k in want.inputs]
    pairs += [(getattr(got.modules[n], f), getattr(want.modules[n], f)) for n in want.modules for f in ("g_sum", "y_sum")]
    for kernel, exact in pairs:
        assert rel(kernel, exact) <= 2 * rel(exact.bfloat16().float(), exact) + 1e-6


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton does not run here")
def test_triton_kernels_are_tuned_per_token_bucket():
    """Unbuffered calls see a few hundred tokens and buffered ones thousands: each bucket of T gets its own tiles."""
    from lora_da.kernels import fisher_triton

    assert [fisher_triton.token_bucket(t) for t in (0, 1, 256, 257, 4096, 5000, 10**6)] == [
        256, 256, 256, 512, 4096, 8192, 16384]
    assert "T_BUCKET" in fisher_triton._z_upper_kernel.keys and "T_BUCKET" in fisher_triton._g_kernel.keys
    assert "COMPACTED" in fisher_triton._z_upper_kernel.keys  # reading rows directly may favour other tiles


@pytest.mark.skipif("cuda" not in BACKENDS, reason="the CUDA extension runs on a GPU")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_backend_is_bitwise_reproducible(dtype):
    """cuBLAS products and y summed in a fixed order, without atomics: the same bits on every run
    (several Z block shapes, modules of equal widths batched together)."""
    b, length, n, ms, kind = (3, 400, 600, [300, 300, 77], "random")
    x, mask, grads = make_inputs(b, length, n, ms, kind, dtype, seed=7)
    impl = dispatch.resolve("fisher_update", "cuda", DEVICE, dtype)
    first, second = (run(impl.fn, x, mask, grads, accumulators(n, ms, 3, False)) for _ in range(2))
    assert torch.equal(first["z"], second["z"])
    for k in range(len(ms)):
        assert torch.equal(first["g"][k], second["g"][k]) and torch.equal(first["y"][k], second["y"][k])


@pytest.mark.parametrize("backend", ["torch"] + BACKENDS)
@pytest.mark.parametrize("counted", [0, 1, 61, 90])
def test_kernel_reads_compacted_tokens(backend, counted):
    """With ``counted`` (the mask is 1 on the first rows only, as the collector's buffers lay
    them out) Z reads those rows directly: the same sums as through the mask."""
    tokens, n, ms = 90, 300, [19, 19, 5]
    x, _, grads = make_inputs(1, tokens, n, ms, "all", torch.float32, seed=11)
    mask = (torch.arange(tokens, device=DEVICE) < counted)[None]
    impl = dispatch.resolve("fisher_update", backend, DEVICE, torch.float32)
    got = accumulators(n, ms, 5, True)
    impl.fn(x, mask, grads, got["z"], got["g"], got["y"], counted=counted)
    want = run(reference.fisher_update, x, mask, grads, accumulators(n, ms, 5, True))
    upper = torch.triu(torch.ones(n, n, dtype=torch.bool, device=DEVICE))
    torch.testing.assert_close(got["z"][upper], want["z"][upper], rtol=1e-5, atol=1e-4)
    for k in range(len(ms)):
        torch.testing.assert_close(got["g"][k], want["g"][k], rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(got["y"][k], want["y"][k], rtol=1e-5, atol=1e-4)


@pytest.mark.skipif("triton" not in BACKENDS, reason="the Triton kernels cannot run here")
@pytest.mark.parametrize("buffer_tokens", [0, 4096], ids=["per batch", "compacted chunks"])
def test_auto_sums_inputs_with_few_tokens_per_feature_exactly(buffer_tokens, monkeypatch):
    """``auto`` with the Triton kernel on a half-precision model holds each input's counted rows
    until they outnumber HELD_ROWS_PER_FEATURE times its features: an input with fewer (Z singular
    or nearly so, where fp32 rounding breaks the damping) gets fp64 products, the torch backend's
    Z bit for bit, and the kernel's tile sums are not flagged."""
    import lora_da
    from conftest import random_batches, tiny_llama
    from lora_da import memory

    monkeypatch.setattr(memory, "BUFFER_SHARE_OF_ACCUMULATORS", 1e6)
    half = torch.bfloat16 if DEVICE.type == "cuda" else torch.float16
    model = tiny_llama(seed=32, dtype=half).to(DEVICE)
    batches = random_batches([2, 3, 4], seed=31, padding="left")
    cfg = lora_da.LoraDAConfig(output_fisher="diagonal", token_mask="labels", buffer_tokens=buffer_tokens,
                               population_size=9)
    want = lora_da.collect_statistics(model, batches, cfg, backend="torch", progress=False)
    got = lora_da.collect_statistics(model, batches, cfg, backend="triton", progress=False)
    tokens_per_feature = [e.num_tokens / e.z_sum.shape[0] for e in got.inputs.values()]
    assert max(tokens_per_feature) <= HELD_ROWS_PER_FEATURE and max(tokens_per_feature) > 1
    for key, entry in want.inputs.items():
        assert torch.equal(got.inputs[key].z_sum, entry.z_sum), key
    assert not got.config[Z_FP32_TILES]
