"""Which code path an estimate runs: the config's `estimate_impl` ('auto', 'triton', 'torch') on a device.

Shared by every selector with a fused estimate (stem, xattention, flexprefill, minference): 'auto' runs the
Triton kernels on CUDA and torch ops on the CPU (where Triton would need its interpreter); 'triton' is an
error where it cannot run, never a silent fallback."""

from __future__ import annotations

import importlib.util
import os

import torch

from stem_cli.config import ConfigError


def estimate_path(config, device: torch.device, method: str = "stem") -> str:
    """'triton' or 'torch' for `config.estimate_impl` on `device`."""
    device = torch.device(device)
    if config.estimate_impl == "torch":
        return "torch"
    if config.estimate_impl == "triton":
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ConfigError(f"estimate_impl='triton' needs a CUDA device (or TRITON_INTERPRET=1), not {device.type}: "
                              "use 'auto' or 'torch'")
        return "triton"
    if device.type != "cuda":
        return "torch"
    if importlib.util.find_spec("triton") is None:
        from stem_cli.executor import notice_once

        notice_once(f"select:no-triton:{method}",
                    f"{method}: triton is not installed; the estimate runs as torch ops on the GPU (slower)")
        return "torch"
    return "triton"


def kernel_path(config, device, method: str, covers) -> str:
    """estimate_path, narrowed to a kernel that covers only some shapes: `covers()` (called only on the
    Triton path, so the CPU never imports the kernel) gives (covered, why not). 'triton' asked for an
    uncovered shape is a ConfigError; 'auto' then runs torch and says so once."""
    path = estimate_path(config, device, method)
    if path != "triton":
        return path
    covered, why = covers()
    if covered:
        return path
    if config.estimate_impl == "triton":
        raise ConfigError(f"estimate_impl='triton' cannot run {method} at {why}: use 'torch' (or 'auto')")
    from stem_cli.executor import notice_once

    notice_once(f"{method}:kernel-uncovered", f"{method}: {why}; the estimate runs as torch ops (slower)")
    return "torch"


def last_rows_path(config, device, method: str, rows: int) -> str:
    """The code path of blocks.last_rows_sums (kernels/last_rows.py takes up to its MAX_ROWS rows)."""

    def covers():
        from stem_cli.kernels import last_rows

        return last_rows.supported(rows), f"{rows} last rows (the kernel takes <= {last_rows.MAX_ROWS})"

    return kernel_path(config, device, method, covers)
