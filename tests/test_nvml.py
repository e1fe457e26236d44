"""NvmlSampler on a machine without a GPU, and against a fake pynvml with known readings."""

from __future__ import annotations

import statistics
import sys
import time
import types

import pytest

from stem_cli.nvml import NvmlSampler, nvml_status


class FakeNVMLError(Exception):
    pass


def fake_pynvml(fail: tuple[str, ...] = (), init_error: bool = False) -> types.ModuleType:
    """A pynvml stand-in whose readings change on every call; `returned` logs every reading
    and `calls` counts calls per function, so tests can recompute what the sampler saw."""
    m = types.ModuleType("pynvml")
    m.NVMLError = FakeNVMLError
    m.NVML_CLOCK_SM, m.NVML_CLOCK_MEM, m.NVML_TEMPERATURE_GPU = 1, 2, 0
    m.returned = {key: [] for key in ("sm", "mem", "power_mw", "temp", "util", "used")}
    m.calls = {}
    ticks = iter(range(10**9))

    def reading(key: str, base: float, step: float, fn: str):
        m.calls[fn] = m.calls.get(fn, 0) + 1
        if fn in fail:
            raise FakeNVMLError("Not Supported")
        value = base + step * (next(ticks) % 7)  # varies, so mean, min and max differ
        m.returned[key].append(value)
        return value

    def init():
        if init_error:
            raise FakeNVMLError("Driver Not Loaded")

    m.nvmlInit = init
    m.nvmlDeviceGetHandleByIndex = lambda index: f"handle{index}"

    def clock(handle, kind):
        return reading("sm", 1400, 15, "clock_sm") if kind == m.NVML_CLOCK_SM else reading("mem", 2600, 1, "clock_mem")

    m.nvmlDeviceGetClockInfo = clock
    m.nvmlDeviceGetPowerUsage = lambda handle: reading("power_mw", 300_000, 1234, "nvmlDeviceGetPowerUsage")
    m.nvmlDeviceGetTemperature = lambda handle, sensor: reading("temp", 60, 1, "nvmlDeviceGetTemperature")
    m.nvmlDeviceGetUtilizationRates = lambda handle: types.SimpleNamespace(
        gpu=reading("util", 50, 7, "nvmlDeviceGetUtilizationRates"), memory=0
    )
    m.nvmlDeviceGetMemoryInfo = lambda handle: types.SimpleNamespace(
        used=reading("used", 2**30, 2**20, "nvmlDeviceGetMemoryInfo"), total=80 * 2**30
    )
    m.nvmlDeviceGetName = lambda handle: b"NVIDIA H100 80GB HBM3"
    m.nvmlSystemGetDriverVersion = lambda: "570.86.15"

    def limit(handle):
        raise FakeNVMLError("Not Supported")

    m.nvmlDeviceGetPowerManagementLimit = limit
    return m


def test_no_gpu_on_this_machine():
    if nvml_status()[0]:
        pytest.skip("NVML works here; the no-GPU path is covered by the fake tests below")
    sampler = NvmlSampler()
    assert sampler.available is False
    assert sampler.reason and "NVML" in sampler.reason
    with sampler as same:
        assert same is sampler
    assert sampler.summary() is None and sampler.static_info() is None


def test_init_failure_and_missing_module(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(init_error=True))
    sampler = NvmlSampler()
    assert not sampler.available and "Driver Not Loaded" in sampler.reason
    assert nvml_status() == (False, sampler.reason)
    with sampler:
        pass
    assert sampler.summary() is None

    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    sampler = NvmlSampler()
    assert not sampler.available and "pynvml" in sampler.reason
    with sampler:
        pass
    assert sampler.summary() is None


def test_statistics_match_the_readings(monkeypatch):
    fake = fake_pynvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    sampler = NvmlSampler(interval_s=0.005)
    assert sampler.available and sampler.reason is None
    with sampler:
        time.sleep(0.1)
    summary = sampler.summary()
    got = fake.returned
    assert summary["samples"] == len(got["sm"]) > 2  # enter + exit + periodic ones
    assert summary["sm_clock_mhz"] == pytest.approx(
        {"mean": statistics.mean(got["sm"]), "min": min(got["sm"]), "max": max(got["sm"])}
    )
    assert summary["mem_clock_mhz"]["max"] == max(got["mem"])
    watts = [mw / 1000 for mw in got["power_mw"]]
    assert summary["power_w"] == pytest.approx({"mean": statistics.mean(watts), "max": max(watts)})
    assert summary["temperature_c"] == pytest.approx({"mean": statistics.mean(got["temp"]), "max": max(got["temp"])})
    assert summary["gpu_util_pct"] == pytest.approx({"mean": statistics.mean(got["util"]), "max": max(got["util"])})
    assert summary["mem_used_bytes"] == {"max": max(got["used"])}


def test_unsupported_query_is_none_and_not_retried(monkeypatch):
    fake = fake_pynvml(fail=("nvmlDeviceGetPowerUsage",))
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    sampler = NvmlSampler(interval_s=0.005)
    with sampler:
        time.sleep(0.05)
    summary = sampler.summary()
    assert summary["power_w"] is None
    assert fake.calls["nvmlDeviceGetPowerUsage"] == 1
    assert summary["temperature_c"]["max"] == max(fake.returned["temp"])
    assert summary["samples"] > 2

    info = sampler.static_info()
    assert info == {
        "name": "NVIDIA H100 80GB HBM3",
        "driver_version": "570.86.15",
        "memory_total_bytes": 80 * 2**30,
        "power_limit_w": None,  # the fake's limit query raises
    }


def test_thread_stops_promptly_and_sampler_is_reusable(monkeypatch):
    fake = fake_pynvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    sampler = NvmlSampler(interval_s=30.0)  # long interval: exit must not wait for it
    with sampler:
        thread = sampler._thread
        assert thread.is_alive() and thread.daemon
        start = time.perf_counter()
    assert time.perf_counter() - start < 1.0
    assert not thread.is_alive()
    assert sampler.summary()["samples"] == 2  # an instant region still has enter + exit samples

    first = len(fake.returned["sm"])
    with sampler:
        pass
    assert sampler.summary()["samples"] == 2  # describes the second block only
    assert sampler.summary()["sm_clock_mhz"]["max"] == max(fake.returned["sm"][first:])
