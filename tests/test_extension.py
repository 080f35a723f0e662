"""The optional CUDA extension: built where it can be, loaded lazily, clean errors elsewhere."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lora_da import _extension

CAN_BUILD = torch.version.cuda is not None and (shutil.which("nvcc") or shutil.os.path.exists("/usr/local/cuda/bin/nvcc"))


def test_import_does_not_load_the_extension():
    code = "import sys, lora_da; print('lora_da._C' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


def registered_ops():
    """Names of every op the extension registers (``lora_da::...``)."""
    _extension.ops()
    return sorted(schema.name for schema in torch._C._jit_get_all_schemas() if schema.name.startswith("lora_da::"))


def fisher_update_arguments(device):
    """Odd sizes, a mask with counted and masked tokens, two modules on one input."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(37, 19, generator=gen)
    grads = [torch.randn(37, m, generator=gen) for m in (11, 5)]
    mask = torch.rand(37, generator=gen) < 0.6
    to = lambda t: t.to(device)  # noqa: E731
    return (to(x), to(mask), [to(g) for g in grads], to(torch.zeros(19, 19)), [to(torch.zeros(m, 19)) for m in (11, 5)],
            [to(torch.zeros(m)) for m in (11, 5)])


OPCHECK_ARGUMENTS = {"lora_da::fisher_update_": fisher_update_arguments}


@pytest.mark.skipif(not CAN_BUILD, reason="torch is not a CUDA build or nvcc is missing: nothing to build")
def test_extension_was_built_and_registers_the_statistics_op_only():
    assert _extension.load_error() is None
    assert registered_ops() == ["lora_da::fisher_update_"]


@pytest.mark.skipif(not CAN_BUILD, reason="torch is not a CUDA build or nvcc is missing: nothing to build")
@pytest.mark.parametrize("device", ["meta"] + (["cuda"] if torch.cuda.is_available() else []))
def test_opcheck_every_registered_op(device):
    """torch.library.opcheck (schema, fake tensors, autograd registration, AOT dispatch) of every
    op, on meta tensors everywhere and on CUDA tensors where a GPU is present."""
    for name in registered_ops():
        op = getattr(torch.ops.lora_da, name.split("::")[1]).default
        torch.library.opcheck(op, OPCHECK_ARGUMENTS[name](device))


@pytest.mark.skipif(not CAN_BUILD, reason="torch is not a CUDA build or nvcc is missing: nothing to build")
def test_fisher_op_schema_and_argument_checks_on_meta():
    meta = dict(device="meta")
    x, mask, grad = torch.empty(10, 7, **meta), torch.empty(10, **meta), torch.empty(10, 5, **meta)
    ops = _extension.ops()
    ops.fisher_update_(x, mask, [grad], torch.empty(7, 7, **meta), [torch.empty(5, 7, **meta)], [torch.empty(5, **meta)])
    ops.fisher_update_(x, mask, [grad], torch.empty(7, 7, **meta), [torch.empty(5, 7, **meta)], [torch.empty(5, **meta)], 4)
    with pytest.raises(RuntimeError, match=r"counted must be in \[0, T\]"):
        ops.fisher_update_(x, mask, [grad], None, [torch.empty(5, 7, **meta)], [torch.empty(5, **meta)], 11)
    with pytest.raises(RuntimeError, match="G 0 must be contiguous fp32"):
        ops.fisher_update_(x, mask, [grad], None, [torch.empty(4, 7, **meta)], [torch.empty(5, **meta)])
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        ops.fisher_update_(x.double(), mask, [], None, [], [])
    with pytest.raises(NotImplementedError, match="CPU"):
        ops.fisher_update_(torch.zeros(3, 2), torch.ones(3), [], None, [], [])


@pytest.mark.skipif(_extension.load_error() is not None, reason="the CUDA extension is not built here")
def test_built_extension_carries_ptx_for_newer_gpus():
    """The default arch list ends in +PTX: GPUs newer than the listed ones JIT-compile it at load."""
    import importlib.util

    import nvidia

    wheel = [Path(folder) / "cu13" / "bin" / "cuobjdump" for folder in nvidia.__path__]  # nvidia-cuda-cuobjdump
    cuobjdump = shutil.which("cuobjdump") or str(next(path for path in wheel if path.exists()))
    library = importlib.util.find_spec("lora_da._C").origin
    listed = subprocess.run([cuobjdump, "--list-ptx", library], capture_output=True, text=True, check=True).stdout
    assert "sm_90" in listed, listed
