"""The Triton kernels' offsets are 64-bit where they can pass 2^31: Z's rows at n > 46 340 (a
405B down_proj input has n = 53 248) and G's at m * n > 2^31. Under the interpreter, rows placed
2^30 elements apart put the third row past 2^31, where a 32-bit offset wraps (run in a child
process: a wrapped offset writes outside the tensor)."""
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import torch
    from lora_da.kernels import fisher_triton, reference

    stride = 2 ** 30  # elements between rows: row 2 starts at 2^31 (8 GiB of address space, 3 pages touched)
    rows, n, tokens = 3, 5, 7
    torch.manual_seed(0)
    x, grad = torch.randn(1, tokens, n), torch.randn(1, tokens, rows)
    mask = torch.ones(1, tokens, dtype=torch.bool)
    mask[0, -2:] = False
    z_wide = torch.empty(2 * stride + n).as_strided((rows, n), (stride, 1))  # Z's first 3 rows, n = 5 columns
    g_wide = torch.empty(2 * stride + n).as_strided((rows, n), (stride, 1))
    z_wide.fill_(0.0), g_wide.fill_(0.0)
    y = torch.zeros(rows)
    z_narrow = torch.zeros(n, n)
    fisher_triton.fisher_update(x[..., :rows], mask, [], z_wide[:, :rows], [], [])  # Z [3, 3] with row stride 2^30
    fisher_triton.fisher_update(x, mask, [grad], None, [g_wide], [y])
    reference.fisher_update(x, mask, [], z_narrow, [], [])
    g_want, y_want = torch.zeros(rows, n), torch.zeros(rows)
    reference.fisher_update(x, mask, [grad], None, [g_want], [y_want])
    upper = torch.triu(torch.ones(rows, rows, dtype=torch.bool))
    print(float((z_wide[:, :rows] - z_narrow[:rows, :rows])[upper].abs().max()), float((g_wide - g_want).abs().max()))
""")


def test_offsets_past_two_to_the_31():
    pytest.importorskip("triton")
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TRITON_INTERPRET": "1"})
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-2000:]}"
    z_error, g_error = map(float, done.stdout.split())
    assert z_error < 1e-5 and g_error < 1e-5, done.stdout
