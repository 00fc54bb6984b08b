"""The one timing and memory harness of `ghosted bench` and `ghosted eval --efficiency`.

- timed(fn, device, repeats): the median and every run's milliseconds, with torch.cuda.synchronize around
  each timed region on CUDA (kernels are asynchronous: without it a timer measures the launch).
- peak_memory(device): a context manager that fills a dict on exit with the peak memory over its body
  and the rise over what was in use when it began.
  CUDA: torch.cuda.max_memory_allocated (reset at entry), absolute, weights included.
  CPU on Linux: the process's resident high-water mark (VmHWM, reset to the current RSS through
  /proc/self/clear_refs at entry). RSS counts everything the process touches in that window, and memory
  the allocator keeps from earlier work is reused without raising it: compare models each measured in a
  fresh process, never with CUDA numbers. Elsewhere: None, method "unavailable".
"""

from __future__ import annotations

import contextlib
import re
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

_PROC_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")

CUDA = "cuda_max_memory_allocated"
LINUX_RSS = "linux_peak_rss"
UNAVAILABLE = "unavailable"


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, repeats: int) -> tuple[float, list[float]]:
    """Run fn `repeats` times; (median ms, every run's ms)."""
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), times


def proc_bytes(field: str) -> int | None:
    """VmRSS / VmHWM / ... of this process from /proc (Linux), else None."""
    try:
        match = re.search(rf"^{field}:\s+(\d+)\s+kB", _PROC_STATUS.read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None


def reset_cpu_peak() -> bool:
    """Reset this process's resident high-water mark to its current RSS; False where /proc cannot."""
    try:
        _CLEAR_REFS.write_text("5")  # "5" resets VmHWM to the current RSS
    except OSError:
        return False
    return proc_bytes("VmHWM") is not None


def memory_method(device: torch.device) -> str:
    """How peak_memory measures on this device."""
    if device.type == "cuda":
        return CUDA
    return LINUX_RSS if reset_cpu_peak() else UNAVAILABLE


@contextlib.contextmanager
def peak_memory(device: torch.device, method: str | None = None) -> Iterator[dict[str, int | None]]:
    """Yields a dict filled on exit with peak_memory_bytes and peak_memory_delta_bytes (None: unmeasured)."""
    method = method or memory_method(device)
    out: dict[str, int | None] = {"peak_memory_bytes": None, "peak_memory_delta_bytes": None}
    if method == CUDA:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        yield out
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        out.update(peak_memory_bytes=peak, peak_memory_delta_bytes=peak - before)
    elif method == LINUX_RSS:
        reset_cpu_peak()
        before = proc_bytes("VmRSS")
        yield out
        peak = proc_bytes("VmHWM")
        if peak is not None and before is not None:
            out.update(peak_memory_bytes=peak, peak_memory_delta_bytes=max(peak - before, 0))
    else:
        yield out
