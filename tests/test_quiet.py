"""The main job prints only its own output; the filters for dependencies' noise drop only what they name."""
import logging
import os
import subprocess
import sys
import warnings

from lora_da.quiet import (BNB_HUB_KERNEL_LOGGER, BNB_HUB_KERNEL_MESSAGE, PEFT_CHECKPOINTING_WARNING,
                           dependency_noise_filtered)


def test_only_the_named_messages_are_dropped(caplog):
    logger = logging.getLogger(BNB_HUB_KERNEL_LOGGER)
    with caplog.at_level(logging.WARNING, logger=BNB_HUB_KERNEL_LOGGER), warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with dependency_noise_filtered():
            logger.warning(BNB_HUB_KERNEL_MESSAGE + ": %s", "offline")
            logger.warning("another bitsandbytes warning")
            warnings.warn(PEFT_CHECKPOINTING_WARNING + " and will be removed", FutureWarning)
            warnings.warn("another future warning", FutureWarning)
        logger.warning(BNB_HUB_KERNEL_MESSAGE + ": %s", "after the block")
    assert [r.getMessage() for r in caplog.records] == ["another bitsandbytes warning",
                                                        BNB_HUB_KERNEL_MESSAGE + ": after the block"]
    assert [str(w.message) for w in seen] == ["another future warning"]


def test_main_job_prints_no_dependency_warning(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "lora_da.demo", "--calibration", "2", "--calibration-batch-size", "2", "--steps", "1",
         "--batch-size", "2", "--eval", "4", "--rank", "2", "--output", str(tmp_path / "adapter")],
        capture_output=True, text=True, timeout=600, cwd=tmp_path, env=dict(os.environ, OMP_WAIT_POLICY="PASSIVE"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    noise = [line for line in done.stderr.splitlines() if "Warning" in line or "Could not find a config file" in line
             or "Failed to load" in line]
    assert not noise, noise
