"""Timers that tell the truth about asynchronous GPU work.

On a GPU every interval is a pair of CUDA events recorded on the current stream,
read only after one synchronisation at the end; host clocks around asynchronous
launches would measure the launches, not the work. On the CPU work is
synchronous, so the host clock is right there.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager

import torch


class Interval:
    """Time one region: `with Interval(device) as t: ...; t.ms()` (synchronises on read)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.end.record()
        else:
            self.seconds = time.perf_counter() - self.t0

    def ms(self) -> float:
        if self.cuda:
            self.end.synchronize()
            return self.start.elapsed_time(self.end)
        return self.seconds * 1e3


class StageTimer:
    """Sums time per named stage across many short regions (e.g. every layer of a forward)."""

    def __init__(self, device: torch.device):
        self.device = device
        self._open: list[tuple[str, Interval]] = []

    @contextmanager
    def stage(self, name: str):
        interval = Interval(self.device)
        with interval:
            yield
        self._open.append((name, interval))

    def collect(self) -> dict[str, float]:
        """Milliseconds per stage since the last collect (one synchronisation)."""
        totals: dict[str, float] = defaultdict(float)
        for name, interval in self._open:
            totals[name] += interval.ms()
        self._open.clear()
        return dict(totals)
