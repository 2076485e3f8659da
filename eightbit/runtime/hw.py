"""Facts about the host CPU that decide how int8 kernels behave."""

from __future__ import annotations

import functools
import platform
from pathlib import Path


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags from /proc/cpuinfo (empty where unavailable)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")


def has_vnni() -> bool:
    """True when u8 x s8 dot products accumulate straight to int32 (AVX-512 VNNI, AVX-VNNI or AMX).

    Without it, x86 int8 kernels (ONNX Runtime's, oneDNN's) use VPMADDUBSW, whose int16 pairwise sums
    saturate for large u8 x s8 products.
    """
    return bool(cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"})


def saturation_risk() -> bool:
    """True on x86 CPUs without VNNI, where 8-bit weights can overflow int16 intermediate sums."""
    return is_x86() and not has_vnni()
