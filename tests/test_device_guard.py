"""Every kernel launch runs with its tensors' device current: with a model over several GPUs
(device_map="auto") the token buffers flush on the main thread, whose current device is cuda:0.
Without several GPUs the launches are replaced by stand-ins that record the device the guard made
current; with two or more, the kernels run on cuda:1 from cuda:0."""
import contextlib

import pytest
import torch

from lora_da import dispatch
from lora_da.kernels import fisher_triton, gram_triton, reference, triton_setup


def test_the_guard_makes_a_gpu_current_and_leaves_the_cpu_alone():
    assert isinstance(triton_setup.on_device(torch.device("cuda", 1)), torch.cuda.device)
    assert isinstance(triton_setup.on_device(torch.device("cpu")), contextlib.nullcontext)


def test_every_triton_launch_runs_inside_the_guard(monkeypatch):
    current, launches = [], []

    @contextlib.contextmanager
    def recording_guard(device):
        current.append(device)
        try:
            yield
        finally:
            current.pop()

    class Kernel:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((self.name, current[-1] if current else None))

    for module in (fisher_triton, gram_triton):
        monkeypatch.setattr(module, "on_device", recording_guard)
    monkeypatch.setattr(fisher_triton, "_z_upper_kernel", Kernel("Z"))
    monkeypatch.setattr(fisher_triton, "_g_kernel", Kernel("G"))
    monkeypatch.setattr(gram_triton, "_inner_kernel", Kernel("inner products"))
    x, grads, mask = torch.randn(2, 3, 5), [torch.randn(2, 3, 4), torch.randn(2, 3, 2)], torch.ones(2, 3, dtype=torch.bool)
    fisher_triton.fisher_update(x, mask, grads, torch.zeros(5, 5), [torch.zeros(4, 5), torch.zeros(2, 5)],
                                [torch.zeros(4), torch.zeros(2)])
    fisher_triton.fisher_update(x, mask, [], torch.zeros(5, 5), [], [], counted=6)
    gram_triton.inner_products(torch.randn(2, 7, 3), torch.randn(2, 7, 4))
    cpu = torch.device("cpu")
    assert launches == [("Z", cpu), ("G", cpu), ("G", cpu), ("Z", cpu), ("inner products", cpu)]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs (the guard's launches are checked above)")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_kernels_on_the_second_gpu_from_the_first(backend):
    device = torch.device("cuda", 1)
    impl = dispatch.resolve("fisher_update", backend, device, torch.float32)
    gen = torch.Generator().manual_seed(0)
    x, g = torch.randn(3, 40, 24, generator=gen), torch.randn(3, 40, 16, generator=gen)
    mask = torch.rand(3, 40, generator=gen) < 0.7
    want = [torch.zeros(24, 24), torch.zeros(16, 24), torch.zeros(16)]
    reference.fisher_update(x, mask, [g], want[0], [want[1]], [want[2]])
    got = [t.to(device) for t in (torch.zeros(24, 24), torch.zeros(16, 24), torch.zeros(16))]
    with torch.cuda.device(0):
        impl.fn(x.to(device), mask.to(device), [g.to(device)], got[0], [got[1]], [got[2]])
    torch.cuda.synchronize(device)
    upper = torch.ones(24, 24, dtype=torch.bool).triu()
    torch.testing.assert_close(got[0].cpu()[upper], want[0][upper], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[1].cpu(), want[1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[2].cpu(), want[2], rtol=1e-4, atol=1e-4)
