"""Compute kernels of lora_da (importable as ``lora_da.kernels``).

``reference`` holds the plain PyTorch implementation of every op: the test oracle and the
CPU path. Accelerated implementations live beside it and are reached only through
``lora_da.dispatch``; nothing here imports Triton or CUDA code at import time. ``massive`` is how
the kernels sum Z into fp64 (the default on GPUs), with its PyTorch reference.
"""
