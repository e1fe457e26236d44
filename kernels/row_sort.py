"""Row sorts and cross-program tickets shared by PrHS's kernels (Triton device functions; no kernel here).

_sort(x, descending): tl.sort of a whole 1-D block in one program (bitonic). The interpreter runs
tl.sort's network op by op in Python (seconds per 1024 keys): under TRITON_INTERPRET=1 the CPU tests
sort with numpy instead, so they check everything around the sort; the compiled tl.sort is checked on
the GPU by tests/bench/decode.py against the same PyTorch definitions.

_arrive(ticket, members) -> whether this program is the last of `members` programs to arrive at the
int32 counter `ticket` (which must be 0 before the first arrives; the last one sets it back to 0, so a
CUDA graph replays with the counters it captured). What every program stored before arriving is
visible to the last one (a CTA barrier, then a gpu-scope acq_rel atomic: CUTLASS's split-K semaphore
pattern); the last one reads it with .cg loads (L2, never a stale L1 line). This lets one launch do
what needed a second launch after it: a reduction over rows, a merge of chunks.
"""

from __future__ import annotations

import os

import numpy as np
import triton
import triton.language as tl

BIG = tl.constexpr(2**62)  # beyond every position: pads that sort last in ascending order
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
MAX_SORT = 8192  # the widest row sorted in one program

if INTERPRET:
    def _sort(x, descending=False):
        from triton.runtime.interpreter import TensorHandle

        data = np.sort(x.handle.data, kind="stable")
        if descending:
            data = np.ascontiguousarray(data[::-1])
        return tl.core.tensor(TensorHandle(data, x.handle.dtype), x.type)
else:
    @triton.jit
    def _sort(x, descending: tl.constexpr = False):
        return tl.sort(x, descending=descending)


@triton.jit
def _arrive(ticket, members):
    tl.debug_barrier()  # every thread's stores of this program are done before the release
    seen = tl.atomic_add(ticket, 1, sem="acq_rel", scope="gpu")
    last = seen == members - 1
    if last:
        tl.atomic_xchg(ticket, 0, sem="relaxed", scope="gpu")  # ready for the next launch (graph replay)
    return last
