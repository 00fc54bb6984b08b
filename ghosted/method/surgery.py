"""Apply a pruning plan to a model in place: fold what folds, remove layers, hook the ghosts.

Never deep-copies the model. Layer indices in a plan are the DENSE model's (see capture.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch.utils.hooks import RemovableHandle

from ghosted._remote.modeling_ghosted import Ghost, attach_ghosts
from ghosted.errors import GhostedError
from ghosted.method import arch, removal
from ghosted.method.fold import fold_rotations
from ghosted.method.linalg import fold_down_proj
from ghosted.method.operator import Operator

Pair = tuple[int, int]


def runs(removed: list[int]) -> list[Pair]:
    """Maximal runs of consecutive removed layers as cuts (s, s+k)."""
    out: list[Pair] = []
    for i in sorted(set(removed)):
        if out and out[-1][1] == i:
            out[-1] = (out[-1][0], i + 1)
        else:
            out.append((i, i + 1))
    return out


def ghost_site(cut: Pair, removed: list[int]) -> int:
    """Index, in the pruned model, of the first kept layer after the cut (== new layer count at the end)."""
    _, b = cut
    return b - sum(1 for r in removed if r < b)


@dataclass
class GhostSpec:
    site: int
    rank: int | None = None
    bias: bool = False
    cut: Pair = (0, 0)
    sink_shift: bool = False
    norm: bool = False
    shift: bool = False  # token shift (modeling_ghosted.previous_states)
    detect: bool = False  # sink detector (token policy detect)
    raw: bool = True  # maps h itself; False: h + n(h) W_n + b only (--exportable; its weight is the identity)

    def as_config(self) -> dict:
        out = {"site": self.site, "rank": self.rank, "bias": self.bias, "cut": list(self.cut)}
        if self.sink_shift:
            out["sink_shift"] = True
        if self.norm:
            out["norm"] = True
        if self.shift:
            out["shift"] = True
        if self.detect:
            out["detect"] = True
        if not self.raw:
            out["raw"] = False
        return out


@dataclass
class Applied:
    """What apply() did, for the checkpoint metadata."""

    ghosts: list[GhostSpec] = field(default_factory=list)
    folded: list[str] = field(default_factory=list)


@dataclass
class SurgeryPlan:
    """What a set of per-cut operators does to a model, decided once for apply() and temporarily_pruned().
    Folds use dense layer indices and happen before removal; ghosts sit in the pruned model."""

    removed: list[int]
    down_folds: list[tuple[Pair, Operator]] = field(default_factory=list)  # T into layer s-1's down projection
    scale_after: list[tuple[int, float]] = field(default_factory=list)  # (first kept dense layer after a cut, c)
    ghosts: list[tuple[GhostSpec, Operator]] = field(default_factory=list)  # hooked: full or lowrank
    rotations: list[tuple[int, torch.Tensor, float]] = field(default_factory=list)  # foldable c Q: (b, Q, c)


def plan_surgery(model: torch.nn.Module, removed: list[int], operators: dict[Pair, Operator],
                 fold_later: bool) -> SurgeryPlan:
    """Sort each cut's operator into a weight fold or a hooked ghost.

    fold_later: fold a scalar (where exact) or a foldable c Q into the weights of every later layer (a saved
    checkpoint); otherwise hook it as c I or c Q (a temporary plan: no later weights to save and restore).
    A foldable operator's T always folds into layer s-1's down projection."""
    spec = arch.get_arch(model)
    removed = sorted(set(removed))
    cuts = runs(removed)
    if set(operators) - set(cuts):
        raise GhostedError(f"operators for cuts {sorted(set(operators) - set(cuts))} that are not removed runs {cuts}")
    plan = SurgeryPlan(removed)
    for cut, op in sorted(operators.items()):
        if op.kind == "identity":
            continue
        if op.kind == "fold_down":
            plan.down_folds.append((cut, op))
            continue
        if op.kind == "scalar" and fold_later and spec.scalar_fold_exact:
            plan.scale_after.append((cut[1], float(op.scale)))
            continue
        if op.kind == "scalar":
            op = Operator("full", W=float(op.scale) * torch.eye(model.config.hidden_size, dtype=torch.float64))
        if op.kind == "rotate":  # foldable: T into layer s-1; c Q folded through the norms, or hooked
            if op.T is not None:
                plan.down_folds.append((cut, op))
            if fold_later:
                plan.rotations.append((cut[1], op.W, float(op.scale)))
                continue
            op = Operator("full", W=float(op.scale) * op.W.to(torch.float64))  # fold.py: the same logits
        if op.kind not in ("full", "lowrank"):
            raise GhostedError(f"cannot apply a {op.kind!r} operator (cut {cut}): not a fold and not a ghost")
        rank = op.U.shape[1] if op.kind == "lowrank" else None
        plan.ghosts.append((GhostSpec(ghost_site(cut, removed), rank=rank, bias=op.bias is not None, cut=cut,
                                      sink_shift=op.sink_shift is not None, norm=op.Wn is not None,
                                      shift=op.Wp is not None, detect=op.detect_w is not None,
                                      raw=op.info.get("form") != "deci"), op))
    return plan


class HookOwner:
    """Owns the forward hooks it was handed and removes exactly those, through their handles."""

    def __init__(self) -> None:
        self._handles: list[RemovableHandle] = []

    def own(self, handles: list[RemovableHandle]) -> None:
        self._handles.extend(handles)

    def remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()


def _scale_writers(layer: torch.nn.Module, spec: arch.ArchSpec, factor: float) -> None:
    for path in spec.residual_writers:
        mod = arch.layer_submodule(layer, path)
        mod.weight.data.mul_(factor)
        if getattr(mod, "bias", None) is not None:
            mod.bias.data.mul_(factor)


@torch.no_grad()
def apply(model: torch.nn.Module, removed: list[int], operators: dict[Pair, Operator]) -> Applied:
    """Prune `removed` (dense indices) and install one operator per cut; returns what was installed."""
    spec = arch.get_arch(model)
    L = arch.num_layers(model)
    plan = plan_surgery(model, removed, operators, fold_later=True)
    layers = arch.get_layers(model)
    applied = Applied()
    for cut, op in plan.down_folds:
        _fold_replaceme(model, spec, list(layers), cut, op)
        applied.folded.append(f"T into layer {cut[0] - 1} {spec.mlp_down}")
    if plan.scale_after:
        # h_b ~ c h_s. Dividing every later residual write by c keeps each later state exactly 1/c times the
        # compensated one; every read goes through a scale-invariant norm, so the logits are unchanged.
        for i in range(L):
            factor = 1.0
            for b, c in plan.scale_after:
                if i >= b:
                    factor /= c
            if factor != 1.0 and i not in plan.removed:
                _scale_writers(layers[i], spec, factor)
        applied.folded.append("scalar compensation into the residual writers of later layers")
    if plan.rotations:
        if plan.ghosts or plan.scale_after:  # they would act in the unrotated basis of the stream
            raise GhostedError("a folded rotation cannot be combined with ghosts or scalar folds in one plan")
        applied.folded.append(fold_rotations(model, plan.rotations, plan.removed))

    removal.remove_layers(model, plan.removed)
    if plan.ghosts:
        install_ghosts(model, plan.ghosts)  # permanent: the hooks stay, as when the checkpoint is loaded
    applied.ghosts = [g for g, _ in plan.ghosts]
    return applied


def _fold_replaceme(model: torch.nn.Module, spec: arch.ArchSpec, layers: list, cut: Pair, op: Operator) -> None:
    """W_down <- T^T W_down in the last kept layer before the cut (dense index s - 1)."""
    s = cut[0]
    if s == 0:
        raise GhostedError("replaceme needs a kept layer before the cut; the cut starts at layer 0")
    if not spec.fold_exact:
        raise GhostedError(f"replaceme cannot be folded exactly into {spec.name} (a norm follows its MLP); "
                           "use --recovery ghost or linearpatch")
    down = arch.layer_submodule(layers[s - 1], spec.mlp_down)
    w, bias = fold_down_proj(down.weight.data, None if down.bias is None else down.bias.data, op.T,
                             spec.down_is_conv1d)
    down.weight.data.copy_(w)
    if bias is not None:
        down.bias.data.copy_(bias)


def install_ghosts(model: torch.nn.Module, entries: list[tuple[GhostSpec, Operator]]) -> list[RemovableHandle]:
    """Hook ghosts (fresh model.ghosts) and copy in the operators' weights, in the model's dtype; returns the
    hooks' handles."""
    spec = arch.get_arch(model)
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    handles = attach_ghosts(model, [g.as_config() for g, _ in entries], spec.layers, spec.final_norm)
    for g, op in entries:
        mod: Ghost = model.ghosts[str(g.site)]
        mod.to(device=device, dtype=dtype)
        if op.kind == "lowrank":
            mod.U.data.copy_(op.U)
            mod.V.data.copy_(op.V)
        else:
            mod.weight.data.copy_(op.W)
        if op.bias is not None:
            mod.bias.data.copy_(op.bias)
        if op.sink_shift is not None:
            mod.sink_shift.data.copy_(op.sink_shift)
        if op.Wn is not None:
            mod.norm_weight.data.copy_(op.Wn)
        if op.Wp is not None:
            mod.shift_weight.data.copy_(op.Wp)
        if op.detect_w is not None:
            mod.detect_weight.data.copy_(op.detect_w)
            mod.detect_bias.data.copy_(op.detect_b.reshape(1))
            mod.detect_shift.data.copy_(op.detect_shift)
    return handles


@contextmanager
def temporarily_pruned(model: torch.nn.Module, removed: list[int],
                       operators: dict[Pair, Operator] | None = None) -> Iterator[torch.nn.Module]:
    """The model with `removed` layers skipped (and residual ghosts hooked), restored afterwards.

    Used to measure candidate plans (greedy selection, held-out loss) without copying weights.
    Folded operators (ReplaceMe's T, also foldable's) change weights for the duration and are undone
    afterwards; foldable's c Q is hooked as a ghost (its fold in fold.py gives the same logits).
    """
    spec = arch.get_arch(model)
    plan = plan_surgery(model, removed, operators or {}, fold_later=False)
    layers = list(arch.get_layers(model))
    saved_ghosts = getattr(model, "ghosts", None)
    hooks = HookOwner()
    saved_weights: list[tuple[torch.nn.Module, torch.Tensor, torch.Tensor | None]] = []
    undo: removal.RemovalUndo | None = None
    try:
        for cut, op in plan.down_folds:  # fold now (dense indices), restore the weights afterwards
            down = arch.layer_submodule(layers[cut[0] - 1], spec.mlp_down)
            saved_weights.append((down, down.weight.data.clone(),
                                  None if down.bias is None else down.bias.data.clone()))
            _fold_replaceme(model, spec, layers, cut, op)
        undo = removal.remove_layers(model, plan.removed)
        if plan.ghosts:
            hooks.own(install_ghosts(model, plan.ghosts))
        yield model
    finally:
        hooks.remove()
        if undo is not None:
            undo.restore()
        for mod, w, b in saved_weights:
            mod.weight.data.copy_(w)
            if b is not None:
                mod.bias.data.copy_(b)
        if saved_ghosts is not None:
            model.ghosts = saved_ghosts
        elif hasattr(model, "ghosts"):
            del model.ghosts
