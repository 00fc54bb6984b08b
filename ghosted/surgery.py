"""Apply a pruning plan to a model in place: fold what folds, remove layers, hook the ghosts.

Never deep-copies the model. Layer indices in a plan are the DENSE model's (see capture.py).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch

from . import arch
from ._remote.modeling_ghosted import Ghost, attach_ghosts
from .errors import GhostedError
from .fold import fold_rotations
from .linalg import Operator, fold_down_proj

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

    def as_config(self) -> dict:
        out = {"site": self.site, "rank": self.rank, "bias": self.bias, "cut": list(self.cut)}
        if self.sink_shift:
            out["sink_shift"] = True
        return out


@dataclass
class Applied:
    """What apply() did, for the checkpoint metadata."""

    ghosts: list[GhostSpec] = field(default_factory=list)
    folded: list[str] = field(default_factory=list)


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
    removed = sorted(set(removed))
    cuts = runs(removed)
    if set(operators) - set(cuts):
        raise GhostedError(f"operators for cuts {sorted(set(operators) - set(cuts))} that are not removed runs {cuts}")
    layers = arch.get_layers(model)
    applied = Applied()
    residual_ops: dict[Pair, Operator] = {}
    scale_after: list[tuple[int, float]] = []  # (first kept dense layer after the cut, scalar)
    rotations: list = []  # foldable: (first kept dense layer after the cut, Q, c)
    for cut, op in sorted(operators.items()):
        s, b = cut
        if op.kind == "identity":
            continue
        if op.kind == "fold_down":
            _fold_replaceme(model, spec, list(layers), cut, op)
            applied.folded.append(f"T into layer {s - 1} {spec.mlp_down}")
        elif op.kind == "rotate":  # foldable: T (if any) into layer s-1 now, c Q into the later layers below
            if op.T is not None:
                _fold_replaceme(model, spec, list(layers), cut, op)
                applied.folded.append(f"T into layer {s - 1} {spec.mlp_down}")
            rotations.append((b, op.W, float(op.scale)))
        elif op.kind == "scalar" and spec.scalar_fold_exact:
            scale_after.append((b, float(op.scale)))
        else:
            residual_ops[cut] = op if op.kind != "scalar" else Operator(
                "full", W=float(op.scale) * torch.eye(model.config.hidden_size, dtype=torch.float64))
    if scale_after:
        # h_b ~ c h_s. Dividing every later residual write by c keeps each later state exactly 1/c times the
        # compensated one; every read goes through a scale-invariant norm, so the logits are unchanged.
        for i in range(L):
            factor = 1.0
            for b, c in scale_after:
                if i >= b:
                    factor /= c
            if factor != 1.0 and i not in removed:
                _scale_writers(layers[i], spec, factor)
        applied.folded.append("scalar compensation into the residual writers of later layers")
    if rotations:
        applied.folded.append(fold_rotations(model, rotations, removed))

    arch.remove_layers(model, removed)

    ghost_entries = []
    for cut, op in sorted(residual_ops.items()):
        rank = op.U.shape[1] if op.kind == "lowrank" else None
        g = GhostSpec(ghost_site(cut, removed), rank=rank, bias=op.bias is not None, cut=cut,
                      sink_shift=op.sink_shift is not None)
        applied.ghosts.append(g)
        ghost_entries.append((g, op))
    if ghost_entries:
        install_ghosts(model, ghost_entries)
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


def install_ghosts(model: torch.nn.Module, entries: list[tuple[GhostSpec, Operator]]) -> None:
    """Hook ghosts (fresh model.ghosts) and copy in the operators' weights, in the model's dtype."""
    spec = arch.get_arch(model)
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    attach_ghosts(model, [g.as_config() for g, _ in entries], spec.layers, spec.final_norm)
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


@contextmanager
def temporarily_pruned(model: torch.nn.Module, removed: list[int],
                       operators: dict[Pair, Operator] | None = None) -> Iterator[torch.nn.Module]:
    """The model with `removed` layers skipped (and residual ghosts hooked), restored afterwards.

    Used to measure candidate plans (greedy selection, held-out loss) without copying weights.
    Folded operators (ReplaceMe) change weights for the duration and are undone afterwards.
    """
    spec = arch.get_arch(model)
    layers = arch.get_layers(model)
    parent_path, _, attr = spec.layers.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    saved_layers = list(layers)
    cfg = model.config
    saved_cfg = {k: getattr(cfg, k) for k in (spec.num_layers_key, *spec.per_layer_keys, *arch._GENERIC_PER_LAYER_KEYS)
                 if hasattr(cfg, k)}
    saved_cfg = {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in saved_cfg.items()}
    saved_idx = []
    for layer in saved_layers:
        for path in spec.layer_idx_attrs:
            owner_path, _, name = path.rpartition(".")
            owner = layer.get_submodule(owner_path) if owner_path else layer
            if hasattr(owner, name):
                saved_idx.append((owner, name, getattr(owner, name)))
    had_ghosts = hasattr(model, "ghosts")
    saved_ghosts = model.ghosts if had_ghosts else None
    handles_before = _hook_snapshot(model)
    saved_weights: list = []
    try:
        for cut, op in sorted((operators or {}).items()):
            if op.kind == "fold_down" or op.T is not None:  # fold now (dense indices), restore the weights afterwards
                down = arch.layer_submodule(saved_layers[cut[0] - 1], spec.mlp_down)
                saved_weights.append((down, down.weight.data.clone(),
                                      None if down.bias is None else down.bias.data.clone()))
                _fold_replaceme(model, spec, saved_layers, cut, op)
        arch.remove_layers(model, removed)
        entries = []
        for cut, op in sorted((operators or {}).items()):
            if op.kind in ("identity", "fold_down"):
                continue
            if op.kind == "scalar":
                op = Operator("full", W=float(op.scale) * torch.eye(model.config.hidden_size, dtype=torch.float64))
            if op.kind == "rotate":  # foldable's c Q, hooked (fold.py folds it with equal logits)
                op = Operator("full", W=float(op.scale) * op.W)
            if op.kind not in ("full", "lowrank"):
                raise ValueError(f"temporarily_pruned cannot apply a {op.kind} operator")
            rank = op.U.shape[1] if op.kind == "lowrank" else None
            entries.append((GhostSpec(ghost_site(cut, removed), rank=rank, bias=op.bias is not None, cut=cut,
                                      sink_shift=op.sink_shift is not None), op))
        if entries:
            install_ghosts(model, entries)
        yield model
    finally:
        _restore_hooks(model, handles_before)
        for mod, w, b in saved_weights:
            mod.weight.data.copy_(w)
            if b is not None:
                mod.bias.data.copy_(b)
        setattr(parent, attr, torch.nn.ModuleList(saved_layers))
        for k, v in saved_cfg.items():
            setattr(cfg, k, v)
        for owner, name, value in saved_idx:
            setattr(owner, name, value)
        if had_ghosts:
            model.ghosts = saved_ghosts
        elif hasattr(model, "ghosts"):
            del model.ghosts


def _hook_snapshot(model: torch.nn.Module) -> dict[int, set]:
    return {id(m): set(m._forward_pre_hooks) for m in model.modules()}


def _restore_hooks(model: torch.nn.Module, snapshot: dict[int, set]) -> None:
    """Drop pre-hooks added since the snapshot (ghost hooks of a temporary plan)."""
    for m in model.modules():
        keep = snapshot.get(id(m), set())
        for key in list(m._forward_pre_hooks):
            if key not in keep:
                del m._forward_pre_hooks[key]
                m._forward_pre_hooks_with_kwargs.pop(key, None)
