"""Narrow filters for messages that dependencies print at calls lora_da makes, which a user cannot
act on (README, "Troubleshooting"); nothing else is filtered."""
from __future__ import annotations

import contextlib
import logging
import warnings

# bitsandbytes' CPU backend, imported with peft, tries to fetch a hub kernel on AVX-512 BF16
# CPUs; offline that fails, it says so and uses its own kernel
BNB_HUB_KERNEL_LOGGER = "bitsandbytes.backends.cpu.ops"
BNB_HUB_KERNEL_MESSAGE = "Failed to load CPU gemm_4bit_forward from kernels-community"
# peft.get_peft_model reads transformers' deprecated ``is_gradient_checkpointing``
PEFT_CHECKPOINTING_WARNING = "`is_gradient_checkpointing` is deprecated"


class _DropPrefix(logging.Filter):
    """Drops the records whose message starts with ``prefix``."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


@contextlib.contextmanager
def dependency_noise_filtered():
    """Within the block: bitsandbytes' hub-kernel warning and PEFT's ``is_gradient_checkpointing``
    FutureWarning are dropped; every other record and warning passes."""
    logger = logging.getLogger(BNB_HUB_KERNEL_LOGGER)
    drop = _DropPrefix(BNB_HUB_KERNEL_MESSAGE)
    logger.addFilter(drop)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=PEFT_CHECKPOINTING_WARNING, category=FutureWarning)
            yield
    finally:
        logger.removeFilter(drop)

