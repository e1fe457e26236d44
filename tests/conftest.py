import os

# Without a GPU, Triton kernels run in Triton's interpreter on the CPU; the switch
# must be set before triton is first imported.
try:
    import torch

    _cuda = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _cuda = False
if not _cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

# Tiny test models make many small ops; on a 2-core machine the intra-op thread pool
# costs far more than it saves on them (ms instead of us per matmul).
torch.set_num_threads(1)
