"""The operator a recovery method fits for one cut, as a value: what surgery applies and a checkpoint saves."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ghosted.method.sums import F64

# The tensor fields of an Operator (saved by prune.save_solution, checked by checks.check_solution).
OPERATOR_TENSORS = ("W", "bias", "U", "V", "T", "sink_shift", "Wn", "Wp", "detect_w", "detect_b", "detect_shift")


@dataclass
class Operator:
    """What a recovery method produced for one cut: W (and optional bias, low-rank factors, scalar)."""

    kind: str  # "full" | "lowrank" | "scalar" | "fold_down" | "rotate" | "identity"
    W: torch.Tensor | None = None  # [d, d]: h <- h W (kind == "rotate": h <- scale * h W, W orthogonal)
    bias: torch.Tensor | None = None  # [d]
    U: torch.Tensor | None = None  # [d, r]: h <- h + (h U) V^T
    V: torch.Tensor | None = None  # [d, r]
    scale: float | None = None  # kind == "scalar": h <- c h
    T: torch.Tensor | None = None  # kind == "fold_down": ReplaceMe transform of the MLP output [d, d]
    sink_shift: torch.Tensor | None = None  # [d]: position-0 tokens get h <- h + sink_shift instead (see capture)
    Wn: torch.Tensor | None = None  # [d, d], kind "full": h <- h W + n(h) Wn (+ b), n = scale_free (norm features)
    Wp: torch.Tensor | None = None  # [d, d], token shift: + n(h_{t-1}) Wp (modeling_ghosted.previous_states)
    # sink detector (token policy detect): h <- h + step(n(h) . detect_w + detect_b) detect_shift before the map,
    # step(z) = silu(z) - silu(z - 1) (modeling_ghosted.Ghost)
    detect_w: torch.Tensor | None = None  # [d]
    detect_b: torch.Tensor | None = None  # [1]
    detect_shift: torch.Tensor | None = None  # [d]
    info: dict = field(default_factory=dict)

    def matrix(self, d: int) -> torch.Tensor:
        """The dense d x d map on the residual at the cut (for scoring); fold_down has none."""
        eye = torch.eye(d, dtype=F64)
        if self.kind == "full":
            return self.W.to(F64)
        if self.kind == "lowrank":
            return eye + self.U.to(F64) @ self.V.to(F64).T
        if self.kind == "scalar":
            return self.scale * eye
        if self.kind == "rotate" and self.T is None:
            return self.scale * self.W.to(F64)
        if self.kind == "identity":
            return eye
        raise ValueError(f"operator kind {self.kind} has no residual matrix")
