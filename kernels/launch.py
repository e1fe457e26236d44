"""Programmatic dependent launch (PDL) for the decode step's small kernels.

A decode step is a chain of short kernels (PrHS: 5 per sparse layer, about 4 us each on an
H200), so the gap between one kernel's end and the next one's start is a large part of the
step. With PDL (compute capability 9.0 and newer) a kernel launched with `launch_pdl` may be
scheduled while the kernel before it still runs: its programs start, and wait at
`griddepcontrol.wait` until that kernel has finished and its writes are visible. Every kernel
here waits before its first global read or write, so the order of the stream is kept exactly:
kernel n + 1 starts its work only after kernel n, which itself waited for kernel n - 1, has
completed. Each also says `griddepcontrol.launch_dependents` at once, so the next kernel's
programs are placed while this one runs. CUDA graphs capture the launch attribute.

PDL is None (the default): on where the device allows it (read from its compute capability);
True / False force it (the decode benchmark times both in one run). The interpreter has no
inline assembly, so kernels run without it there.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
PDL: bool | None = None
MIN_CAPABILITY = 9  # griddepcontrol: sm_90 and newer

_capable: dict[int, bool] = {}


def pdl_supported(device: torch.device) -> bool:
    if INTERPRET or device.type != "cuda":
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _capable:
        _capable[index] = torch.cuda.get_device_capability(index)[0] >= MIN_CAPABILITY
    return _capable[index]


def pdl_options(device: torch.device) -> dict:
    """Keyword arguments for a launch of a kernel that calls wait_for_prior_grid(USE_GDC): empty without PDL."""
    use = pdl_supported(device) if PDL is None else (PDL and pdl_supported(device))
    return {"USE_GDC": True, "launch_pdl": True} if use else {}


@triton.jit
def wait_for_prior_grid(USE_GDC: tl.constexpr):
    """The first statement of a PDL kernel: wait for the previous kernel, then let the next one be placed."""
    if USE_GDC:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
