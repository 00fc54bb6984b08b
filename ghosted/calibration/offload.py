"""The store of the states the layer-major pass carries between layers: in memory up to a byte budget, beyond it
in files of a temporary folder, so host memory holds about one layer's batch of states whatever N x T is."""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass

import torch

from ghosted.io import new_temp_dir

# States the layer-major pass keeps in memory before it spills the rest to files (ghosted prune --offload-budget).
DEFAULT_OFFLOAD_BUDGET = 4 * 2**30


@dataclass
class Spilled:
    """A state written to its own file: what it takes to read it back."""

    path: str
    shape: tuple
    dtype: torch.dtype
    device: torch.device
    nbytes: int


class OffloadStore:
    """Per-batch states: in memory up to `budget` bytes, beyond it each in its own file of a temporary folder
    (read back with torch.from_file when its batch comes up; close() removes the folder)."""

    def __init__(self, budget: int) -> None:
        self.budget, self.used, self.dir, self.count = budget, 0, None, 0
        self.spilled_bytes = 0  # the largest total on disk at any time (reported by the capture)
        self._on_disk = 0

    def put(self, t: torch.Tensor) -> torch.Tensor | Spilled:
        n = t.numel() * t.element_size()
        if self.used + n <= self.budget:
            self.used += n
            return t
        if self.dir is None:
            # a marked folder in the system's temp folder: a killed run's spill is removed by the next one
            self.dir = str(new_temp_dir(tempfile.gettempdir(), "ghosted-offload"))
        self.count += 1
        path = os.path.join(self.dir, f"{self.count}.bin")
        t.detach().contiguous().cpu().view(torch.uint8).numpy().tofile(path)  # the raw bytes, any dtype
        self._on_disk += n
        self.spilled_bytes = max(self.spilled_bytes, self._on_disk)
        return Spilled(path, tuple(t.shape), t.dtype, t.device, n)

    def get(self, h: torch.Tensor | Spilled, device: torch.device | None = None) -> torch.Tensor:
        if isinstance(h, torch.Tensor):
            return h if device is None else h.to(device)
        raw = torch.from_file(h.path, shared=False, size=h.nbytes, dtype=torch.uint8)
        return raw.view(h.dtype).reshape(h.shape).to(device if device is not None else h.device)

    def drop(self, h: torch.Tensor | Spilled) -> None:
        if isinstance(h, torch.Tensor):
            self.used -= h.numel() * h.element_size()
            return
        os.remove(h.path)
        self._on_disk -= h.nbytes

    def close(self) -> None:
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None
