"""Resident memory of this process (Linux /proc), for the benchmarks that report peaks."""
from pathlib import Path


def resident_bytes(field: str = "VmRSS") -> int:
    """VmRSS (now) or VmHWM (peak since the last ``reset_peak``) of this process, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak() -> None:
    """Restart the high-water mark VmHWM from the current resident set."""
    Path("/proc/self/clear_refs").write_text("5")
