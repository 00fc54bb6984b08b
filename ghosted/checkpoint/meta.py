"""What a solution and a checkpoint say about how they were made, as typed records (no torch).

A solution's plan.json `meta` is a SolveMeta, its `guard` a GuardRecord, and the `ghosted` block of a
checkpoint's config.json a CheckpointMeta. Each reads the JSON written so far and gives it back unchanged
(from_dict(d).to_dict() == d): a field the JSON does not hold stays absent, and keys this version does not
know are kept in `extra`. `read_config` / `checkpoint_meta` are the one reader of a folder's `ghosted` block,
and CheckpointMeta.has_ghosts the one answer to "is this a ghost checkpoint?".
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from ghosted.errors import GhostedError, brief
from ghosted.json_io import read_json


class _Absent:
    """A field the JSON does not hold (None is a value JSON can hold)."""

    def __repr__(self) -> str:
        return "ABSENT"

    def __bool__(self) -> bool:
        return False


ABSENT: Any = _Absent()


@dataclass(frozen=True)
class _Record:
    """Fields in the order the JSON is written; absent ones omitted; unknown keys kept in `extra`."""

    extra: dict[str, Any] = field(default_factory=dict, kw_only=True)

    _nested = {}  # noqa: RUF012 - per class (no annotation: not a field): the fields that hold a record

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Any:
        names = {f.name for f in fields(cls)} - {"extra"}
        known = {k: (cls._nested[k].from_dict(v) if k in cls._nested and isinstance(v, dict) else v)
                 for k, v in d.items() if k in names}
        return cls(**known, extra={k: v for k, v in d.items() if k not in names})

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name != "extra" and v is not ABSENT:
                out[f.name] = v.to_dict() if isinstance(v, _Record) else v
        out.update(self.extra)
        return out

    def has(self, name: str) -> bool:
        return getattr(self, name, ABSENT) is not ABSENT

    def updated(self, **changes: Any) -> Any:
        """A copy with `changes` (a field set here after the ones before it keeps its declared place)."""
        return replace(self, **changes)


@dataclass(frozen=True, kw_only=True)
class GuardRecord(_Record):
    """What the held-out guard compared and chose (ghosted.solve.guard); mode "off" when it did not run."""

    mode: str = ABSENT
    criterion: str = ABSENT
    scores: dict[str, float] = ABSENT  # "none" (plain removal) first, then each candidate in the order tried
    heldout_windows: int = ABSENT
    progressive: bool = ABSENT  # multi-cut plans of `ghosted search`: ghosts fitted upstream first
    chosen: str = ABSENT
    fallback: bool = ABSENT
    reason: str = ABSENT


@dataclass(frozen=True, kw_only=True)
class SolveMeta(_Record):
    """How a solution was decided: plan.json `meta` (ghosted.solve.solver.solve, search.solve_plan)."""

    _nested = {"guard": GuardRecord}  # noqa: RUF012

    removed_layers: list[int] = ABSENT
    cuts: list[list[int]] = ABSENT
    num_layers_dense: int = ABSENT
    recovery: str = ABSENT
    ridge: float = ABSENT
    token_policy: str = ABSENT
    token_policy_requested: str = ABSENT
    selection: dict[str, Any] = ABSENT
    guard: GuardRecord = ABSENT
    calibration_relative_residual: dict[str, float] = ABSENT
    capture_passes: int = ABSENT
    config: dict[str, Any] = ABSENT
    tokens_fit: dict[str, int] = ABSENT
    solve_seconds: float = ABSENT
    calibration: dict[str, Any] = ABSENT
    distill: dict[str, Any] = ABSENT
    distill_curve: list[Any] = ABSENT
    calibration_sha256: str = ABSENT
    search: dict[str, Any] = ABSENT


# the SolveMeta fields a checkpoint's lineage copies
LINEAGE = ("removed_layers", "cuts", "num_layers_dense", "recovery", "ridge", "token_policy", "guard", "distill",
           "calibration")


@dataclass(frozen=True, kw_only=True)
class CheckpointMeta(_Record):
    """The `ghosted` block of a checkpoint's config.json: lineage, ghosts, layout (checkpoint.format.save)."""

    _nested = {"guard": GuardRecord}  # noqa: RUF012

    version: str = ABSENT
    base_model: str = ABSENT
    base_fingerprint: str = ABSENT
    base_architecture: str = ABSENT
    calibration_sha256: str = ABSENT
    ghosts: list[dict[str, Any]] = ABSENT  # surgery.GhostSpec.as_config(), one per ghost site
    folded: list[str] = ABSENT
    removed_layers: list[int] = ABSENT
    cuts: list[list[int]] = ABSENT
    num_layers_dense: int = ABSENT
    recovery: str = ABSENT
    ridge: float = ABSENT
    token_policy: str = ABSENT
    guard: GuardRecord = ABSENT
    distill: dict[str, Any] = ABSENT
    calibration: dict[str, Any] = ABSENT
    num_layers: int = ABSENT
    format: int = ABSENT  # absent: format 1 of an older ghosted
    layers_path: str = ABSENT
    final_norm_path: str = ABSENT
    healed: bool = ABSENT  # written by `ghosted heal`: whether the weights were healed (false: kept, with the reason)
    heal: dict[str, Any] = ABSENT  # the heal record: recipe, plan, data, tokens, seconds, curve (ghosted.healing.run)

    @property
    def has_ghosts(self) -> bool:
        """A ghost checkpoint (its own model type, ghost code) rather than a plain one of the base architecture."""
        return bool(self.ghosts)

    @property
    def ghost_list(self) -> list[dict[str, Any]]:
        return list(self.ghosts or [])

    @property
    def is_legacy(self) -> bool:
        return self.format is ABSENT or self.format is None


def is_ghost_class(architecture: str) -> bool:
    """A loaded model of a ghost checkpoint (checkpoint.format.ghost_classes names its class Ghosted*)."""
    return str(architecture).startswith("Ghosted")


def read_config(folder: Path) -> dict[str, Any]:
    """A checkpoint's config.json, which must hold a `ghosted` block; GhostedError naming the problem."""
    folder = Path(folder)
    if not folder.is_dir():
        raise GhostedError(f"{folder} is not a folder")
    if not (folder / "config.json").is_file():
        raise GhostedError(f"{folder} has no config.json: not a model folder")
    doc = read_json(folder / "config.json", "model config")
    if not isinstance(doc, dict) or not isinstance(doc.get("ghosted"), dict):
        raise GhostedError(f"{folder} is not a ghosted checkpoint (config.json has no `ghosted` block)")
    return doc


def checkpoint_meta(folder: str | Path) -> CheckpointMeta | None:
    """The `ghosted` block of a model folder, None where the folder is no ghosted checkpoint (or unreadable:
    the loader then says what is wrong with it)."""
    cfg = Path(folder) / "config.json"
    try:
        block = read_json(cfg, "model config", expect=dict).get("ghosted") if cfg.is_file() else None
    except (OSError, GhostedError):
        return None
    return CheckpointMeta.from_dict(block) if isinstance(block, dict) else None


def read_meta(path: str | Path) -> CheckpointMeta:
    """The `ghosted` block of a folder's config.json (empty where it has none); GhostedError when unreadable."""
    cfg = Path(path) / "config.json"
    if not cfg.exists():
        raise GhostedError(f"{path} has no config.json")
    block = read_json(cfg, "model config", expect=dict).get("ghosted", {})
    try:
        return CheckpointMeta.from_dict(block)
    except (ValueError, AttributeError, TypeError) as exc:
        raise GhostedError(f"{path}/config.json: its `ghosted` block is not valid ({brief(str(exc), 120)})") from exc
