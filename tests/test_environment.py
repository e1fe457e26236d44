"""The machine description and error records every JSON carries, on the CPU."""

from __future__ import annotations

import pytest
import torch

from stem_cli import environment as env


def test_failed_allocation_parsing():
    assert env.failed_allocation_gib(RuntimeError("Tried to allocate 512.00 MiB")) == pytest.approx(0.5)
    assert env.failed_allocation_gib(RuntimeError("out of memory")) is None


def test_is_oom_reads_types_and_messages():
    assert env.is_oom(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert env.is_oom(RuntimeError("triton: out of memory"))  # wrapped by another library
    assert not env.is_oom(RuntimeError("No available kernel"))


def test_slug_and_error_text():
    assert env.slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert env.slug("  ") == "unknown"
    assert env.error_text(RuntimeError("bad\n  shape")) == "RuntimeError: bad shape"
    assert len(env.error_text(RuntimeError("x" * 1000), limit=40)) == 40


def test_environment_on_the_cpu():
    described = env.environment(torch.device("cpu"), None)
    assert described["device"] == "cpu" and described["torch"] == torch.__version__
    assert {"python", "triton", "transformers", "cpu_threads"} <= set(described)
    assert "gpu" not in described and "nvml" not in described
