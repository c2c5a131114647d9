"""What machine a bench ran on: CPU model and the flags that decide precisions, cores, memory,
the GPU (through torch, when CUDA is visible) and the versions of the libraries measured.

Figures from different machines are never mixed: every bench result carries this record, and
the plan names the machine its rates came from.
"""

from __future__ import annotations

import os
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from care_scale.inference.precision import cpu_flags, usable_cores

#: The CPU flags that change which precisions run natively (AVX2-only vs AVX-512 BF16 / VNNI /
#: AMX machines); the record keeps these, not the whole flag list.
RELEVANT_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16",
                  "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "amx_fp16")

#: Distributions whose versions a bench records (absent ones are recorded as None).
LIBRARIES = ("care-scale", "torch", "numpy", "onnxruntime", "onnxruntime-gpu", "tensorrt",
             "cucim", "cucim-cu12", "openslide-python", "openslide-bin", "tifffile",
             "imagecodecs")


def cpu_model(cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    """The first CPU's model name (``platform.processor()`` where /proc/cpuinfo lacks it)."""
    try:
        for line in Path(cpuinfo).read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def library_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def gpu() -> dict[str, Any] | None:
    """Name, memory and compute capability of CUDA device 0; None without one (or torch)."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
            "capability": f"{props.major}.{props.minor}", "count": torch.cuda.device_count(),
            "cuda": torch.version.cuda}


def hardware(flags: frozenset[str] | None = None) -> dict[str, Any]:
    """The record every bench result carries (JSON-ready)."""
    flags = cpu_flags() if flags is None else flags
    return {
        "cpu_model": cpu_model(),
        "cpu_flags": [f for f in RELEVANT_FLAGS if f in flags],
        "cores": usable_cores(),
        "machine_cores": os.cpu_count(),
        "memory_gib": memory_gib(),
        "gpu": gpu(),
        "python": platform.python_version(),
        "libraries": library_versions(),
    }


def describe(record: dict[str, Any]) -> str:
    """One line naming the machine, as every figure quoting a bench should."""
    flags = ", ".join(record["cpu_flags"]) or "no AVX2"
    gpu_text = (f"{record['gpu']['count']}x {record['gpu']['name']} "
                f"({record['gpu']['memory_gib']} GiB)" if record.get("gpu") else "no GPU")
    return f"{record['cpu_model']}, {record['cores']} cores ({flags}), {gpu_text}"


__all__ = ["LIBRARIES", "RELEVANT_FLAGS", "cpu_model", "describe", "gpu", "hardware",
           "library_versions", "memory_gib", "usable_cores"]
