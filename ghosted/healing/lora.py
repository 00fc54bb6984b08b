"""LoRA adapters on frozen linears, hand-rolled: y = x W^T + b + s (x A^T) B^T, merged as W <- W + s B A.

A [r, d_in] starts uniform in +-1/sqrt(d_in), B [d_out, r] at zero, so an adapter starts as the identity change
and the merged model equals the trained one exactly (up to float rounding). s = ALPHA / r. nn.Linear keeps W as
[d_out, d_in]; transformers' Conv1D (GPT-2) as [d_in, d_out], so its merge adds (s B A)^T.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ghosted.errors import GhostedError

ALPHA_PER_RANK = 2.0  # s = 2: the common alpha = 2 r


def is_linear(module: nn.Module) -> bool:
    """nn.Linear or transformers' Conv1D: the projections an adapter wraps."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def linear_sides(module: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of a linear: its weight is [d_out, d_in] (nn.Linear) or [d_in, d_out] (Conv1D)."""
    a, b = module.weight.shape
    return (int(a), int(b)) if type(module).__name__ == "Conv1D" else (int(b), int(a))


class Adapter(nn.Module):
    """The low-rank change of one linear: x -> s (x A^T) B^T."""

    def __init__(self, d_in: int, d_out: int, rank: int, generator: torch.Generator) -> None:
        super().__init__()
        bound = 1.0 / math.sqrt(d_in)
        self.A = nn.Parameter(torch.rand(rank, d_in, generator=generator) * (2 * bound) - bound)  # [r, d_in]
        self.B = nn.Parameter(torch.zeros(d_out, rank))  # [d_out, r]
        self.scale = ALPHA_PER_RANK

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.A.T.to(x.dtype)) @ self.B.T.to(x.dtype) * self.scale

    def delta(self) -> torch.Tensor:
        """s B A: the change of the weight as nn.Linear holds it, [d_out, d_in] (float32)."""
        return self.scale * (self.B.detach().float() @ self.A.detach().float())


def make_adapters(linears: dict[str, nn.Module], rank: int, seed: int) -> nn.ModuleDict:
    """One adapter per linear (names as given, dots made safe), on each linear's device; deterministic for the
    seed and the order of `linears`."""
    gen = torch.Generator().manual_seed(seed)
    out = nn.ModuleDict()
    for name, lin in linears.items():
        d_in, d_out = linear_sides(lin)
        if rank > min(d_in, d_out):
            raise GhostedError(f"--lora-rank (heal.lora_rank) {rank} is above the smaller side of {name} "
                               f"({d_in} x {d_out}): use --lora-rank {min(d_in, d_out)} or less")
        out[key(name)] = Adapter(d_in, d_out, rank, gen).to(lin.weight.device)
    return out


def key(name: str) -> str:
    """A module path as a ModuleDict key (no dots)."""
    return name.replace(".", "__")


def hook(linear: nn.Module, adapter: Adapter) -> torch.utils.hooks.RemovableHandle:
    """Add the adapter's output to the linear's (a forward hook; the caller owns the handle)."""
    def add(_module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        return out + adapter(args[0])

    return linear.register_forward_hook(add)


@torch.no_grad()
def merge(linear: nn.Module, adapter: Adapter) -> None:
    """W <- W + s B A in the linear's own layout and dtype (the adapter is no longer needed afterwards)."""
    delta = adapter.delta().to(linear.weight.device)
    if type(linear).__name__ == "Conv1D":
        delta = delta.T
    linear.weight.add_(delta.to(linear.weight.dtype))
