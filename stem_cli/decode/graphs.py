"""Decode steps at the memory limit: a static KV cache, CUDA-graph capture and replay, the dense baseline.

A decode step is a few small kernels per layer; at batch 1 launching them costs
more than the work (eager dense SDPA: about 1.2 ms per layer on an H100 at any
length, against 0.13 ms of KV reads at 128K). What a user serving a model runs
instead is one CUDA graph per step over a preallocated cache, so the baseline
that speed-ups are quoted against is that:

- StaticCache: per-layer K/V buffers (B, Hkv, capacity, d) allocated once; a
  step writes its token into slot `length` (copy_, no allocation) and attends to
  the view [:length], so the tensors a graph captured keep their addresses.
  `distinct` < layers lets layers share buffers cyclically (a benchmark whose
  caches would not fit: each layer still reads its own full cache from memory,
  since one layer's cache is far larger than the L2 cache at those sizes).
- GraphStep: fn() warmed up on a side stream, captured once, replayed; on the
  CPU (or capture=False) replay just calls fn, which is what the tests drive.
- dense_decode_step: every layer's attention of one query over its cache, with
  SDPA (FlashAttention / cuDNN decode kernels) or the Triton split-K kernel
  (kernels/sparse_decode.py with no index: flash-decoding).

The memory-traffic limit of a dense step is its KV bytes (kv_bytes) over the
device's copy bandwidth (measured by the benchmark, tests/bench/decode.py).
A graph is captured at one cache length: its kernels' shapes are fixed, so a
generation loop would capture one per length bucket; the benchmark times the
replay of the step at each context length.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


class StaticCache:
    """Preallocated K/V per layer; `length` valid positions (the same for every layer)."""

    def __init__(self, layers: int, batch: int, kv_heads: int, head_dim: int, capacity: int, *, device, dtype,
                 distinct: int | None = None, generator: torch.Generator | None = None):
        self.layers, self.capacity = layers, capacity
        self.distinct = min(layers, distinct or layers)
        shape = (batch, kv_heads, capacity, head_dim)
        if generator is None:
            make = lambda: torch.zeros(shape, device=device, dtype=dtype)  # noqa: E731
        else:
            make = lambda: torch.randn(shape, device=device, dtype=dtype, generator=generator)  # noqa: E731
        self.buffers = [(make(), make()) for _ in range(self.distinct)]
        self.length = 0

    def buffer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.buffers[layer % self.distinct]

    def fill(self, length: int) -> None:
        """Declare the first `length` positions valid (a pre-fill wrote them, or random contents stand in)."""
        if not 0 <= length <= self.capacity:
            raise ValueError(f"length {length} outside the cache's capacity {self.capacity}")
        self.length = length

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write this step's keys/values (B, Hkv, n, d) of one layer at positions [length, length + n)."""
        n = k.shape[2]
        if self.length + n > self.capacity:
            raise ValueError(f"cache full: {self.length} + {n} positions exceed the capacity {self.capacity}")
        bk, bv = self.buffer(layer)
        bk[:, :, self.length:self.length + n].copy_(k)
        bv[:, :, self.length:self.length + n].copy_(v)

    def advance(self, n: int = 1) -> None:
        """After every layer appended: the new positions become valid."""
        self.fill(self.length + n)

    def view(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(k, v) (B, Hkv, length, d): slices of the buffers (fixed addresses for a graph)."""
        bk, bv = self.buffer(layer)
        return bk[:, :, :self.length], bv[:, :, :self.length]

    def kv_bytes(self, length: int | None = None) -> int:
        """Bytes of K and V a dense step reads over all layers at `length` positions."""
        bk = self.buffers[0][0]
        n = self.length if length is None else length
        return 2 * self.layers * bk.shape[0] * bk.shape[1] * n * bk.shape[3] * bk.element_size()


class GraphStep:
    """fn() as one CUDA graph: replay() re-runs its kernels with no launch overhead and returns the captured
    output (fn must read and write only tensors whose addresses stay fixed). On the CPU, or with
    capture=False, replay() calls fn."""

    def __init__(self, fn: Callable, device: torch.device | str, *, warmup: int = 2, capture: bool = True):
        self.fn = fn
        self.device = torch.device(device)
        self.captured = capture and self.device.type == "cuda"
        self.graph = None
        self.output = None
        if self.captured:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):  # warm-up off the capture stream: compiles, autotunes, allocates
                for _ in range(warmup):
                    fn()
            torch.cuda.current_stream(self.device).wait_stream(side)
            torch.cuda.synchronize(self.device)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.output = fn()
        else:
            for _ in range(warmup):
                self.output = fn()

    def replay(self):
        if self.graph is None:
            self.output = self.fn()
            return self.output
        self.graph.replay()
        return self.output


def dense_decode(query, key, value, scale: float, kernel: str = "sdpa") -> torch.Tensor:
    """(B, Hq, 1, d) attention of one query over the whole cache view (no mask: every position valid)."""
    if kernel == "sdpa":
        return F.scaled_dot_product_attention(query, key, value, scale=scale, enable_gqa=key.shape[1] != query.shape[1])
    if kernel == "split-k":
        from stem_cli.kernels.sparse_decode import sparse_decode_attention

        return sparse_decode_attention(query, key, value, None, scale=scale)
    raise ValueError(f"unknown dense decode kernel {kernel!r}: use sdpa or split-k")


def dense_decode_step(cache: StaticCache, queries: torch.Tensor, scale: float, kernel: str = "sdpa") -> list[torch.Tensor]:
    """Every layer's dense attention for one step: queries (L, B, Hq, 1, d), a static buffer the caller fills."""
    return [dense_decode(queries[i], *cache.view(i), scale, kernel) for i in range(cache.layers)]
