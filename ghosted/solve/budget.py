"""Budgets of `ghosted search --target`: what a plan costs, and the smallest removal that meets a target.

A plan's figures are what its checkpoint stores: every tensor of the dense model (a tied embedding and head
once), less the removed layers' tensors, plus each cut's recovery (its ghost's tensors: a two-cut plan carries
two). `params` counts them; `mb` is their bytes in the dtype the model is loaded and saved in (float32 unless
--dtype says otherwise), in MB of 10^6 bytes; `speedup` is the ideal prefill speed-up L / (L - k).

Before a plan is solved its recovery is counted at its largest form under the prune: settings (every optional
vector of the ghost: bias, sink shift, sink detector; at most 4 d + 1 more than it will hold), so a plan chosen
for a budget meets it; a solved plan's figures count its actual operators.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ghosted.config.target import MB, RELATIVE_SLACK, Target
from ghosted.errors import GhostedError
from ghosted.method import arch
from ghosted.method.operator import Operator
from ghosted.method.surgery import Pair, plan_surgery, runs


def _ghost_numel(d: int, **flags: object) -> int:
    from ghosted._remote.modeling_ghosted import Ghost

    with torch.device("meta"):  # shapes only: nothing is allocated
        return sum(t.numel() for t in Ghost(d, **flags).state_dict().values())


@dataclass(frozen=True)
class Costs:
    """What the dense model stores, per layer and in all, and the largest recovery of one cut."""

    num_layers: int
    params: int  # every stored tensor (a tied embedding and head once)
    bytes: int
    layer_params: tuple[int, ...]
    layer_bytes: tuple[int, ...]
    itemsize: int  # bytes per recovery parameter: the model's dtype (ghosts are saved in it)
    dtype: str
    cut_bound: int  # params of one cut's recovery at its largest form (module docstring)

    def figures(self, removed: list[int], recovery_params: int) -> dict:
        """A plan's budget figures, its recovery counted as `recovery_params`."""
        L, k = self.num_layers, len(removed)
        params = self.params - sum(self.layer_params[i] for i in removed) + recovery_params
        size = self.bytes - sum(self.layer_bytes[i] for i in removed) + recovery_params * self.itemsize
        return {"params": params, "recovery_params": recovery_params, "speedup": L / (L - k), "bytes": size,
                "mb": size / MB, "dtype": self.dtype}

    def bound(self, removed: list[int]) -> dict:
        """The figures of a plan not solved yet: each cut at its largest recovery."""
        return self.figures(removed, len(runs(removed)) * self.cut_bound)


def _stored(module: torch.nn.Module) -> list[torch.Tensor]:
    """The tensors save_pretrained writes for `module`: parameters (shared ones once) and persistent buffers."""
    keys = set(module.state_dict())
    out = list(module.parameters())
    out += [b for name, b in module.named_buffers() if name in keys]
    return out


def model_costs(model: torch.nn.Module, rank: int | None = None, norm: bool = False, shift: bool = False) -> Costs:
    """The Costs of a dense model whose cuts get ghosts (prune.rank, norm_features, token_shift)."""
    dense = _stored(model)
    layers = [_stored(layer) for layer in arch.get_layers(model)]
    dtype = next(model.parameters()).dtype
    d = model.config.hidden_size
    bound = _ghost_numel(d, rank=rank, bias=True, sink_shift=True, norm=norm, shift=shift, detect=True)
    return Costs(len(layers), sum(t.numel() for t in dense), sum(t.numel() * t.element_size() for t in dense),
                 tuple(sum(t.numel() for t in ts) for ts in layers),
                 tuple(sum(t.numel() * t.element_size() for t in ts) for ts in layers),
                 torch.empty((), dtype=dtype).element_size(), str(dtype).removeprefix("torch."), bound)


def recovery_params(model: torch.nn.Module, removed: list[int], operators: dict[Pair, Operator]) -> int:
    """The parameters the solved operators add to the checkpoint: the ghosts installed (an identity cut adds none)."""
    d = model.config.hidden_size
    plan = plan_surgery(model, removed, operators, fold_later=True)
    return sum(_ghost_numel(d, **{k: v for k, v in g.as_config().items() if k not in ("site", "cut")})
               for g, _ in plan.ghosts)


def meets(target: Target, fig: dict) -> bool:
    """Whether figures (Costs.figures/bound) meet the target, up to rounding of its decimal form."""
    if target.kind == "speedup":
        return fig["speedup"] >= target.value * (1 - RELATIVE_SLACK)
    have = fig["params"] if target.kind == "params" else fig["mb"]
    return have <= target.value * (1 + RELATIVE_SLACK)


def human(kind: str, x: float) -> str:
    """A figure as people say it: 134.52M params, x1.304, 538.1 MB."""
    if kind == "speedup":
        return f"x{x:.3f}"
    if kind == "memory":
        return f"{x:.1f} MB" if x >= 10 else f"{x:.3f} MB"
    for unit, size in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if x >= size:
            return f"{x / size:.2f}{unit}"
    return f"{x:.0f}"


def _value(kind: str, fig: dict) -> float:
    return fig["speedup"] if kind == "speedup" else fig["params"] if kind == "params" else fig["mb"]


def smallest_k(target: Target, costs: Costs) -> int:
    """The fewest layers whose removal meets the target with one cut (the cheapest recovery); the range of
    what can be reached in the error when none can, or when the dense model already meets it."""
    L = costs.num_layers
    best = {k: min((costs.bound(list(range(s, s + k))) for s in range(L - k + 1)), key=lambda f: _value(target.kind, f))
            for k in range(1, L)}
    reach = (f"reachable with this model: {human(target.kind, _value(target.kind, best[1]))} (1 layer removed) to "
             f"{human(target.kind, _value(target.kind, best[L - 1]))} ({L - 1} of {L} layers removed)")
    dense = {"speedup": 1.0, "params": costs.params, "mb": costs.bytes / MB}
    if meets(target, dense):
        raise GhostedError(f"--target {target.text}: the dense model already meets it "
                           f"({human(target.kind, _value(target.kind, dense))}), nothing to remove; {reach}")
    for k in range(1, L):
        if meets(target, best[k]):
            return k
    raise GhostedError(f"--target {target.text}: no plan meets it; {reach}")
