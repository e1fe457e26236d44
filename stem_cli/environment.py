"""What a measurement was taken on, and how a failed one is recorded.

Every JSON the tool or its benchmarks write carries the machine and the versions
next to the numbers: device properties (GPU name, SM count, capability, memory) are
recorded, never branched on. An out-of-memory is an expected outcome of a sweep,
so it is recognised here and stored with the allocation that failed.

A leaf: imports torch and the standard library only.
"""

from __future__ import annotations

import platform
import re
from importlib import metadata
from typing import Any

import torch


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def slug(text: str) -> str:
    """A file-name piece: 'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def software() -> dict[str, str | None]:
    """The versions the numbers depend on."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": package_version("triton"),
        "transformers": package_version("transformers"),
    }


def gpu_properties(device: torch.device) -> dict[str, Any]:
    """Name, SM count, compute capability and memory of one CUDA device."""
    props = torch.cuda.get_device_properties(device)
    return {
        "name": props.name,
        "sm_count": props.multi_processor_count,
        "capability": f"{props.major}.{props.minor}",
        "total_memory_bytes": props.total_memory,
    }


def environment(device: torch.device, sampler_info: dict | None) -> dict[str, Any]:
    """What the numbers were measured on: device properties (never the name to branch on), versions."""
    env: dict[str, Any] = {"device": device.type, **software(), "cpu_threads": torch.get_num_threads()}
    if device.type == "cuda":
        props = gpu_properties(device)
        env.update(
            gpu=props["name"],
            sm_count=props["sm_count"],
            capability=props["capability"],
            total_memory_gib=props["total_memory_bytes"] / 2**30,
            cuda=torch.version.cuda,
        )
        env["nvml"] = sampler_info
    return env


_ALLOC = re.compile(r"Tried to allocate ([\d.]+) ([KMGT]i?B)")
_UNIT = {"KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12}


def is_oom(error: BaseException) -> bool:
    # torch.compile and Triton wrap CUDA OOMs in their own exception types: read the message too.
    return isinstance(error, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in str(error).lower()


def failed_allocation_gib(error: BaseException) -> float | None:
    """The allocation an OOM reports as failed ("Tried to allocate 2.00 GiB"), in GiB."""
    match = _ALLOC.search(str(error))
    return float(match.group(1)) * _UNIT[match.group(2)] / 2**30 if match else None


def error_text(error: BaseException, limit: int = 300) -> str:
    """One line for a JSON field: 'Type: message', whitespace collapsed, at most `limit` characters."""
    text = " ".join(str(error).split()) or type(error).__name__
    return f"{type(error).__name__}: {text}"[:limit]


def provenance() -> dict[str, Any]:
    """Which stem wrote a result file: its version and, in a git checkout, the commit (with '+dirt' when edited)."""
    import subprocess
    from pathlib import Path

    from stem_cli import __version__

    commit = None
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "-C", str(root), "describe", "--always", "--dirty=+dirt", "--abbrev=12"],
                             capture_output=True, text=True, timeout=5)
        commit = out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        pass
    return {"stem_version": __version__, "git_commit": commit}
