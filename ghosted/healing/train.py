"""What healing trains and the training itself.

The plan (HealPlan, decided from the checkpoint's lineage before anything trains): every weight of the kept
layer just before and just after each cut (`adjacent`), LoRA adapters on the linears of every other kept layer
(`lora`), and the ghost parameters (`ghosts`, ghosted.solve.distill.ghost_params: never an exportable ghost's
identity map or its sink detector). The loss is the KL to the dense teacher over its top-k tokens and the rest (ghosted.solve.distill.kd_train:
AdamW, warm-up and cosine, held-out next-token loss every eval_every steps, early stopping). At the end the best
held-out state is put back, or, when no evaluation beat the start, the starting values; the adapters are merged
into their linears and their hooks removed, so nothing of LoRA remains in the model.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ghosted.config.heal import HealConfig
from ghosted.errors import GhostedError
from ghosted.healing import lora
from ghosted.healing.data import HealData
from ghosted.method import arch
from ghosted.method.surgery import HookOwner, ghost_site, runs
from ghosted.solve.distill import KDRun, ghost_params, kd_train


@dataclass(frozen=True)
class HealPlan:
    """What trains, in the pruned model's layer indices."""

    adjacent: list[int]  # layers trained in full
    lora: list[int]  # layers whose linears get adapters
    lora_rank: int
    ghosts: bool

    def to_dict(self) -> dict:
        return asdict(self)


def adjacent_layers(removed: list[int], num_layers: int) -> list[int]:
    """The kept layers just before and just after each cut of `removed` (dense indices), as pruned indices."""
    out = set()
    for s, b in runs(removed):
        if s > 0:
            out.add(s - 1 - sum(1 for r in removed if r < s - 1))
        site = ghost_site((s, b), removed)
        if site < num_layers:
            out.add(site)
    return sorted(out)


def plan_heal(model: nn.Module, removed: list[int], cfg: HealConfig) -> HealPlan:
    """The HealPlan of `cfg.train` for a pruned model whose dense layers `removed` are gone."""
    n = arch.num_layers(model)
    adjacent = adjacent_layers(removed, n) if "adjacent" in cfg.train else []
    lora_layers = [i for i in range(n) if i not in adjacent] if "lora" in cfg.train else []
    has_ghosts = "ghosts" in cfg.train and bool(getattr(model, "ghosts", None))
    return HealPlan(adjacent, lora_layers, cfg.lora_rank, has_ghosts)


def check_plan(model: nn.Module, plan: HealPlan) -> None:
    """Refuse, before any pass, an adapter rank a linear of the plan cannot hold."""
    sides = {name: lora.linear_sides(lin) for name, lin in _linears(model, plan.lora).items()}
    if not sides:
        return
    name = min(sides, key=lambda n: min(sides[n]))
    d_in, d_out = sides[name]
    if plan.lora_rank > min(d_in, d_out):
        raise GhostedError(f"--lora-rank (heal.lora_rank) {plan.lora_rank} is above the smaller side of layer "
                           f"{name} ({d_in} x {d_out}): use --lora-rank {min(d_in, d_out)} or less")


def _linears(model: nn.Module, layers: list[int]) -> dict[str, nn.Module]:
    """Every linear inside the given layers, by its path under the layer list ("12.mlp.down_proj")."""
    blocks = arch.get_layers(model)
    return {f"{i}.{name}": mod for i in layers for name, mod in blocks[i].named_modules() if lora.is_linear(mod)}


def count_params(params: list[nn.Parameter]) -> int:
    return sum(p.numel() for p in params)


@dataclass
class Trained:
    """How the training went, and which state the model now holds ("healed" or "unhealed")."""

    run: KDRun
    kept: str
    params: dict[str, int]


def autocast_for(device: torch.device) -> Callable[[], AbstractContextManager]:
    if device.type == "cuda":
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext


def heal_model(model: nn.Module, plan: HealPlan, data: HealData, teacher: tuple[torch.Tensor, torch.Tensor],
               cfg: HealConfig, progress: bool = True, log: Callable[[str], None] = print,
               deadline: float | None = None) -> Trained:
    """Train `plan` on `data` against the teacher's top-k (values, indices: one row per fit window), in place.

    Afterwards the model holds the best held-out state with the adapters merged, or its starting values when
    training never lowered the held-out loss; either way no hook or adapter remains."""
    blocks = arch.get_layers(model)
    full = [p for i in plan.adjacent for p in blocks[i].parameters()]
    linears = _linears(model, plan.lora)
    adapters = lora.make_adapters(linears, plan.lora_rank, cfg.seed)
    ghosts = ghost_params(model) if plan.ghosts else []
    params = full + list(adapters.parameters()) + ghosts
    counts = {"adjacent": count_params(full), "lora": count_params(list(adapters.parameters())),
              "ghosts": count_params(ghosts)}
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    start = [p.detach().clone() for p in full + ghosts]
    hooks = HookOwner()
    ids = data.calib.input_ids
    try:
        for p, _ in frozen:
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        hooks.own([lora.hook(lin, adapters[lora.key(name)]) for name, lin in linears.items()])
        run = kd_train(model, params, ids, data.fit, ids[data.heldout], *teacher, cfg,
                       lambda: [p.detach().clone() for p in params], progress, log, desc="heal",
                       autocast=autocast_for(next(model.parameters()).device), deadline=deadline, tail=True)
    finally:
        hooks.remove()
        for p, req in frozen:
            p.requires_grad_(req)
    with torch.no_grad():
        if run.best_state is not None:
            for p, best in zip(params, run.best_state):
                p.copy_(best)
            for name, lin in linears.items():
                lora.merge(lin, adapters[lora.key(name)])
        else:
            for p, before in zip(full + ghosts, start):
                p.copy_(before)
    model.eval()
    return Trained(run, "healed" if run.best_state is not None else "unhealed", counts)
