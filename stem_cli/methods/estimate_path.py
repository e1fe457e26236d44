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
