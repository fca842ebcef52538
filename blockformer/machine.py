"""What CPU this is: its model name and feature flags, read once from /proc/cpuinfo (never assumed)."""
from __future__ import annotations

import functools
import platform
from pathlib import Path


@functools.lru_cache(maxsize=None)
def cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_name() -> str:
    """The CPU model written beside every figure ('Intel(R) Xeon(R) Processor', 'AMD EPYC ...')."""
    for line in cpuinfo().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    """Feature flags of the first core, e.g. {'avx512f', 'avx512_bf16', 'amx_bf16', ...}."""
    for line in cpuinfo().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def check_device(device: str) -> None:
    """One line for a device torch cannot name or this machine does not have ('banana', 'cuda' on a CPU machine)."""
    import torch
    from .errors import BlockformerError
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError):
        raise BlockformerError(f"--device {device!r} is not a device (cpu, cuda, cuda:1, mps, ...)") from None
    have = {"cpu": True, "cuda": torch.cuda.is_available(),
            "mps": getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()}
    if not have.get(kind, False):
        raise BlockformerError(f"--device {device}: this machine has no {kind} device")
