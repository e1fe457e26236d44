"""Programmatic dependent launch (PDL) for the decode step's small kernels, and the device facts they read.

A decode step is a chain of short kernels (PrHS: 5 per sparse layer, about 4 us each on an
H200 at batch 1), so the gap between one kernel's end and the next one's start is a large
part of the step. With PDL (compute capability 9.0 and newer) a kernel launched with
`launch_pdl` may be scheduled while the kernel before it still runs: its programs start, and
wait at `griddepcontrol.wait` until that kernel has finished and its writes are visible.
Every kernel here waits before its first global read or write, so the order of the stream
is kept exactly: kernel n + 1 starts its work only after kernel n, which itself waited for
kernel n - 1, has completed. Each also says `griddepcontrol.launch_dependents` at once, so
the next kernel's programs are placed while this one runs. CUDA graphs capture the launch
attribute.

When. Measured on an H200 (132 SMs; 32 layers of a Llama-3-8B-shaped cache in a CUDA graph,
tests/bench/decode.py, one run each, profiles/decode-20261203-*): at batch 1 (8 rows of
sequences x KV heads) PDL took PrHS from 0.924 to 0.879 ms per token at 128K and from 0.690
to 0.611 at 32K, and split-K dense from 4.06 to 4.02 ms; at batch 16 (128 rows) it made every
step slower (PrHS 6.22 -> 6.55 ms at 128K, 1.30 -> 1.38 at 2K): there the kernels are long,
launch gaps a small part (why it is slower there was not profiled; the early-placed programs
may compete with the running ones). So
PDL = None (the default) uses it for a step of at most SMALL_ROWS_PER_SM rows per SM (the
bound lies between those two measurements: 8 / 132 rows per SM faster, 128 / 132 slower),
on a device that has it; True / False force it (the decode benchmark times all three). The
interpreter has no inline assembly, so kernels run without PDL there.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
PDL: bool | None = None
MIN_CAPABILITY = 9  # griddepcontrol: sm_90 and newer
SMALL_ROWS_PER_SM = 0.25  # PDL by default up to this many rows (sequences x KV heads) per SM: see above

# griddepcontrol in the Triton language (with the launcher's launch_pdl option; in 3.6 and 3.9): a Triton without it runs no PDL
TRITON_HAS_GDC = hasattr(getattr(getattr(tl, "extra", None), "cuda", None), "gdc_wait")

_properties: dict[int, tuple[int, int]] = {}  # device index -> (major capability, SM count)


def _device_facts(device: torch.device) -> tuple[int, int]:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _properties:
        props = torch.cuda.get_device_properties(index)
        _properties[index] = (props.major, props.multi_processor_count)
    return _properties[index]


def sm_count(device: torch.device) -> int:
    return _device_facts(device)[1]


def pdl_supported(device: torch.device) -> bool:
    return not INTERPRET and TRITON_HAS_GDC and device.type == "cuda" and _device_facts(device)[0] >= MIN_CAPABILITY


def pdl_options(device: torch.device, rows: int) -> dict:
    """Keyword arguments for a launch of a kernel that calls wait_for_prior_grid(USE_GDC) in a step of `rows`
    rows (sequences x KV heads): empty without PDL."""
    if PDL is False or not pdl_supported(device):
        return {}
    if PDL is None and rows > SMALL_ROWS_PER_SM * sm_count(device):
        return {}
    return {"USE_GDC": True, "launch_pdl": True}


@triton.jit
def wait_for_prior_grid(USE_GDC: tl.constexpr):
    """The first statement of a PDL kernel: wait for the previous kernel, then let the next one be placed."""
    if USE_GDC:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
