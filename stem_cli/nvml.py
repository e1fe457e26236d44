"""GPU telemetry (clocks, power, temperature, utilisation, memory) sampled by NVML in a
background thread while a timed region runs, so a timing can be read next to the clocks
and power the GPU actually ran at. Everything degrades to "not available" without a GPU."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any


def _init_nvml() -> tuple[Any, str | None]:
    """(pynvml module, None) after a successful nvmlInit, or (None, reason)."""
    try:
        import pynvml  # resolved at call time, so tests can inject a fake module
    except Exception as error:  # ImportError, or a broken install
        return None, f"pynvml not importable: {error}"
    try:
        pynvml.nvmlInit()  # reference counted by NVML, so repeated calls are cheap and safe
    except Exception as error:  # NVMLError: no driver / no GPU; anything else must not crash either
        return None, f"NVML not available: {error}"
    return pynvml, None


def nvml_status() -> tuple[bool, str | None]:
    """(True, None) when NVML works on this machine, else (False, why not)."""
    nvml, reason = _init_nvml()
    return nvml is not None, reason


def _stats(values: list[float], keys: tuple[str, ...]) -> dict[str, float] | None:
    if not values:
        return None  # the query never worked on this GPU
    every = {"mean": sum(values) / len(values), "min": min(values), "max": max(values)}
    return {key: every[key] for key in keys}


class NvmlSampler:
    """Context manager: samples one GPU every `interval_s` seconds while the with-block runs.

    Reusable: each with-block starts a fresh set of samples and summary() describes the last one.
    """

    def __init__(self, device_index: int = 0, interval_s: float = 0.05):
        self.device_index = device_index
        self.interval_s = interval_s
        self.available = False
        self.reason: str | None = None
        self._samples: list[dict[str, float | None]] = []
        self._failed: set[str] = set()  # queries that raised once; NVML will not change its mind
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._nvml, self.reason = _init_nvml()
        if self._nvml is None:
            return
        try:
            self._handle = self._nvml.nvmlDeviceGetHandleByIndex(device_index)
        except Exception as error:
            self._nvml, self.reason = None, f"NVML device {device_index} not available: {error}"
            return
        self.available = True

    def _queries(self) -> dict[str, Callable[[], float]]:
        nvml, handle = self._nvml, self._handle
        return {
            "sm_clock_mhz": lambda: nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_SM),
            "mem_clock_mhz": lambda: nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_MEM),
            "power_w": lambda: nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0,  # NVML reports mW
            "temperature_c": lambda: nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU),
            "gpu_util_pct": lambda: nvml.nvmlDeviceGetUtilizationRates(handle).gpu,
            "mem_used_bytes": lambda: nvml.nvmlDeviceGetMemoryInfo(handle).used,
        }

    def _sample(self) -> None:
        sample: dict[str, float | None] = {}
        for field, query in self._queries().items():
            if field in self._failed:
                sample[field] = None
                continue
            try:
                sample[field] = float(query())
            except Exception:  # NVMLError_NotSupported and friends: telemetry must never break a run
                self._failed.add(field)
                sample[field] = None
        self._samples.append(sample)

    def _run(self) -> None:
        # wait() returns True as soon as __exit__ sets the event, so stopping takes no full interval.
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> NvmlSampler:
        self._samples = []
        if not self.available:
            return self
        self._stop.clear()
        self._sample()  # one sample before the thread, so even an instant region reports
        self._thread = threading.Thread(target=self._run, name="nvml-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        self._sample()  # after the join, so the sample list is never appended to concurrently

    def static_info(self) -> dict[str, Any] | None:
        """name, driver_version, memory_total_bytes, power_limit_w (None where a query fails)."""
        if not self.available:
            return None
        nvml, handle = self._nvml, self._handle

        def ask(query: Callable[[], Any]) -> Any:
            try:
                value = query()
            except Exception:
                return None
            return value.decode() if isinstance(value, bytes) else value  # old pynvml returned bytes

        limit_mw = ask(lambda: nvml.nvmlDeviceGetPowerManagementLimit(handle))
        return {
            "name": ask(lambda: nvml.nvmlDeviceGetName(handle)),
            "driver_version": ask(nvml.nvmlSystemGetDriverVersion),
            "memory_total_bytes": ask(lambda: nvml.nvmlDeviceGetMemoryInfo(handle).total),
            "power_limit_w": None if limit_mw is None else limit_mw / 1000.0,
        }

    def summary(self) -> dict[str, Any] | None:
        """Statistics over the samples of the last with-block; None without NVML or samples."""
        if not self.available or not self._samples:
            return None

        def column(field: str) -> list[float]:
            return [s[field] for s in self._samples if s.get(field) is not None]

        full, mean_max = ("mean", "min", "max"), ("mean", "max")
        return {
            "samples": len(self._samples),
            "sm_clock_mhz": _stats(column("sm_clock_mhz"), full),
            "mem_clock_mhz": _stats(column("mem_clock_mhz"), full),
            "power_w": _stats(column("power_w"), mean_max),
            "temperature_c": _stats(column("temperature_c"), mean_max),
            "gpu_util_pct": _stats(column("gpu_util_pct"), mean_max),
            "mem_used_bytes": _stats(column("mem_used_bytes"), ("max",)),
        }
