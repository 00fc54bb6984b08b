"""A decided plan (removed layers, one operator per cut, how it was chosen) and its persistence: the solution
folder (operators.safetensors + plan.json) and the checkpoint built from it."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ghosted.checkpoint.meta import LINEAGE, CheckpointMeta, SolveMeta, is_ghost_class
from ghosted.errors import GhostedError
from ghosted.json_io import need, read_json
from ghosted.method import arch
from ghosted.method.operator import OPERATOR_TENSORS, Operator
from ghosted.method.sums import F64
from ghosted.method.surgery import Pair, apply
from ghosted.models import Loaded, fingerprint
from ghosted.version import __version__


@dataclass
class Solution:
    """The decided plan: removed layers, one operator per cut, and everything about how it was chosen."""

    removed: list[int]
    operators: dict[Pair, Operator]
    meta: SolveMeta = field(default_factory=SolveMeta)
    # the same operators fitted on the fit windows only (the held-out windows left out), when a held-out
    # comparison will follow: distillation starts from these, so its guard compares like with like
    fit_operators: dict[Pair, Operator] | None = None


def save_solution(sol: Solution, out_dir: Path, force: bool = False,
                  also: Callable[[Path], None] | None = None) -> None:
    """operators.safetensors + plan.json, atomically (io.atomic_dir); `also(folder)` adds files to the same
    atomic write (the search report of a searched plan)."""
    from safetensors.torch import save_file

    from ghosted.io import atomic_dir

    with atomic_dir(out_dir, force=force, kind="solution") as tmp:
        tensors, ops = {}, {}
        for (s, b), op in sol.operators.items():
            key = f"{s}-{b}"
            entry = {"kind": op.kind, "scale": op.scale, "info": op.info}
            for name in OPERATOR_TENSORS:
                t = getattr(op, name)
                if t is not None:
                    tensors[f"{key}.{name}"] = t.to(F64).contiguous().cpu()
            ops[key] = entry
        save_file(tensors or {"_empty": torch.zeros(1)}, str(tmp / "operators.safetensors"))
        plan = {"removed": sol.removed, "operators": ops, "meta": sol.meta.to_dict()}
        (tmp / "plan.json").write_text(json.dumps(plan, indent=2, default=float) + "\n")
        if also is not None:
            also(tmp)


def load_solution(path: Path) -> Solution:
    """A solution folder written by save_solution."""
    from safetensors.torch import load_file

    from ghosted.checks import reading

    path = Path(path)
    if not (path / "plan.json").exists():
        raise GhostedError(f"{path} has no plan.json: make it with `ghosted solve`")
    with reading(path, "solution folder", "make it again with `ghosted solve`"):
        fix = "make it again with `ghosted solve`"
        plan = read_json(path / "plan.json", "solution folder", fix=fix, expect=dict)
        for key, kind in (("operators", dict), ("removed", list), ("meta", dict)):
            need(plan, key, kind, path / "plan.json", "solution folder", fix)
        tensors = load_file(str(path / "operators.safetensors"))
        ops = {}
        for key, e in plan["operators"].items():
            s, b = (int(x) for x in key.split("-"))
            kw = {n: tensors.get(f"{key}.{n}") for n in OPERATOR_TENSORS}
            ops[(s, b)] = Operator(e["kind"], scale=e["scale"], info=e["info"], **kw)
        return Solution(plan["removed"], ops, SolveMeta.from_dict(plan["meta"]))


def build_checkpoint(loaded: Loaded, sol: Solution, calib_sha256: str, out_dir: Path,
                     force: bool = False) -> CheckpointMeta:
    """Apply the solution to the loaded model IN PLACE and save the checkpoint; returns its ghosted block."""
    from ghosted.checkpoint import format as checkpoint

    model = loaded.model
    base_arch = (getattr(model.config, "architectures", None) or [type(model).__name__])[0]
    if is_ghost_class(base_arch):
        raise GhostedError("this model is already a ghosted checkpoint: prune its dense base model instead")
    applied = apply(model, sol.removed, sol.operators)
    lineage = sol.meta.to_dict()
    meta = CheckpointMeta.from_dict({
        "version": __version__,
        "base_model": loaded.ref.name,
        "base_fingerprint": fingerprint(loaded.ref),
        "base_architecture": base_arch,
        "calibration_sha256": calib_sha256,
        "ghosts": [g.as_config() for g in applied.ghosts],
        "folded": applied.folded,
        **{k: lineage[k] for k in LINEAGE if k in lineage},
        "num_layers": arch.num_layers(model),
    })
    checkpoint.save(model, loaded.tokenizer, out_dir, meta, force=force)
    return meta
