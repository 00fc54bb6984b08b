"""The sections of the bigger runs: `registry:`, `sweep:`, `search:`, the compare grid and ghost distillation."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from ghosted.config.evaluation import EvalSettings
from ghosted.config.target import parse_target
from ghosted.config.typed import (
    DEFAULT_TRACKING_URI,
    MAX_BATCH,
    MAX_LAYERS,
    MAX_SEED,
    MAX_STEPS,
    REGISTER_MODES,
    _typed,
    _whole,
    between,
    build,
    check_registry_name,
    option,
    twice,
)
from ghosted.errors import GhostedError, brief


@dataclass(frozen=True)
class RegistryConfig:
    """`registry:` where runs and versions go. A relative SQLite path is relative to the params file."""

    tracking_uri: str = DEFAULT_TRACKING_URI
    experiment: str = "ghosted"
    name: str | None = None  # registered model name; default ghosted-<base model>
    # Which runs become versions: true (every run, pass or fail: failures keep their reasons), false (reports
    # only), on_pass (runs that pass the gate). `dvc exp run` registers only with experiments: true.
    register: bool | str = True
    experiments: bool = False

    def __post_init__(self) -> None:
        _typed(self, "registry")
        mode = {True: "true", False: "false"}.get(self.register, self.register)  # type: ignore[call-overload]
        if mode not in REGISTER_MODES:
            raise GhostedError(f"registry.register = {brief(self.register)}: expected true, false or on_pass")
        object.__setattr__(self, "register", mode)
        if not self.tracking_uri:
            raise GhostedError("registry.tracking_uri must be an MLflow URI, e.g. sqlite:///mlflow.db")
        check_registry_name(self.experiment, "registry.experiment")
        if self.name is not None:
            check_registry_name(self.name, "registered model name (--name, registry.name)")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> RegistryConfig:
        return build(cls, d, "registry")


MAX_WORKERS = 1_024  # sweep worker processes, threads per worker
MAX_GRID_COUNTS = 64  # layer counts of a compare or sweep grid


def _sweep_eval() -> EvalSettings:
    return EvalSettings(ppl=("wiki", "ptb"), ppl_windows=8, tasks=())


@dataclass(frozen=True)
class SweepConfig:
    """`sweep:` a (layers removed) x (recovery) grid on a Dask cluster, one shared calibration pass."""

    remove: tuple[int, ...] = option((6, 9), "layer counts of the grid", cli=False, bounds=between(1, MAX_LAYERS))
    # "none" is a method here (plain removal): [none] alone compares the dense model with plain removal
    recovery: tuple[str, ...] = option(("none", "ghost"), "recovery methods of the grid", cli=False)
    eval: EvalSettings = field(default_factory=_sweep_eval)
    workers: int = option(2, "local cluster worker processes", cli=False, bounds=between(1, MAX_WORKERS))
    threads_per_worker: int = option(1, "torch threads per task", cli=False, bounds=between(1, MAX_WORKERS))
    address: str | None = None  # tcp://scheduler:8786: a running Dask cluster instead of the local one

    def __post_init__(self) -> None:
        _typed(self, "sweep")
        object.__setattr__(self, "recovery", parse_methods(self.recovery, "sweep.recovery"))
        if not self.remove or len(set(self.remove)) != len(self.remove) or len(self.remove) > MAX_GRID_COUNTS:
            raise GhostedError(f"sweep.remove needs 1 to {MAX_GRID_COUNTS} distinct layer counts, got "
                               f"{brief(list(self.remove))}")


@dataclass(frozen=True)
class SearchConfig:
    """`search:` ghosted search: the most layers whose pruned model passes the gate (prune: gives the rest)."""

    min_remove: int | None = option(None, "smallest number of layers searched (default: a fifth of them)",
                                    bounds=between(1, MAX_LAYERS, note="below the model's layer count"))
    max_remove: int | None = option(None, "largest number of layers searched (default: half of them)",
                                    bounds=between(1, MAX_LAYERS, note="below the model's layer count"))
    # single blocks per k screened by held-out loss: the best by angular distance (+ the best boundary error)
    shortlist: int = option(3, "single blocks screened per k, at most (default {default})", bounds=between(1, 1024))
    split_shortlist: int = option(2, "two-cut plans screened per k, at most (default {default})",
                                  bounds=between(0, 1024))
    max_cuts: int = option(2, "1: contiguous blocks only (default {default})", bounds=between(1, 2))
    # More than one finalist because the plan with the best screening loss can still miss the gate while the
    # runner-up passes: screening is a proxy for the full evaluation.
    finalists: int = option(2, "screened plans per k evaluated in full, best first, until one passes; at most "
                               "the plans screened (default {default})", bounds=between(1, 64))
    distill: int = option(0, "also distill each evaluated plan's ghosts this many steps and report both rows "
                             "(default 0)", metavar="STEPS", bounds=between(0, MAX_STEPS))
    # A budget instead of the gate deciding k: the fewest layers whose removal meets it, then the best plan of
    # those that meet it (ghosted.solve.budget); the gate still judges it.
    target: str | None = option(None, "the most accurate plan within a budget, instead of the most layers that pass "
                                      "the gate: params=N (100M, 1e8: after pruning, the ghosts included), "
                                      "speedup=X (ideal prefill L/(L-k), e.g. 1.3) or memory=MB (weights and ghosts "
                                      "in the saved dtype, e.g. 400 or 400MB)", metavar="KIND=VALUE")
    heal: bool = option(False, "also heal each evaluated plan's checkpoint with the heal: recipe and report both "
                               "rows; the gate may pick the healed one")
    # The pipeline (`dvc repro`, flows.compress): the solve stage searches for the plan (the gate: and eval:
    # sections decide) instead of removing prune.remove layers; fuse, evaluate and register then run on it.
    enabled: bool = option(False, "the pipeline's solve stage searches instead of removing prune.remove layers",
                           cli=False)

    def __post_init__(self) -> None:
        _typed(self, "search")
        if self.min_remove is not None and self.max_remove is not None and self.min_remove > self.max_remove:
            raise GhostedError(f"search.min_remove ({self.min_remove}) is above search.max_remove ({self.max_remove})")
        if self.target is not None:
            parse_target(self.target)  # a bad target is one line before anything loads
            if self.min_remove is not None or self.max_remove is not None:
                raise GhostedError(f"--target (search.target) {self.target} decides how many layers go: drop "
                                   "--min-remove/--max-remove (search.min_remove/max_remove)")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> SearchConfig:
        return build(cls, d, "search")


_COMPARE_METHODS = "none,linearpatch,replaceme,ghost"


@dataclass(frozen=True)
class CompareConfig:
    """A (layers removed) x (recovery method) grid; `prune` is the template every cell's PruneConfig copies."""

    ks: tuple[int, ...] = option(help="numbers of layers to remove, e.g. 6,9", name="remove", group="grid",
                                 text=True, required=True)
    methods: tuple[str, ...] = option(help=f"recovery methods, comma-separated (default {_COMPARE_METHODS})",
                                      name="recovery", group="grid", text=True, cli_default=_COMPARE_METHODS)
    prune: Any = option(help="PruneConfig template: selection, token policy, ridge, guard, ...", cli=False)
    evaluation: EvalSettings = option(help="the evaluation of every cell", default_factory=EvalSettings, cli=False)

    def __post_init__(self) -> None:

        if not self.ks or len(self.ks) > MAX_GRID_COUNTS:
            raise GhostedError(f"--remove needs 1 to {MAX_GRID_COUNTS} layer counts, e.g. --remove 6,9")
        if any(isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_LAYERS for k in self.ks):
            raise GhostedError(f"--remove takes whole numbers >= 1 and <= {MAX_LAYERS}, got {brief(list(self.ks))}")
        if len(set(self.ks)) != len(self.ks):
            raise GhostedError(f"--remove lists a count twice ({twice(self.ks)})")
        object.__setattr__(self, "methods", parse_methods(self.methods, "--recovery"))
        if not self.evaluation.tasks and not self.evaluation.ppl:
            raise GhostedError("nothing to evaluate: give --tasks or --ppl (not both 'none')")
        for cell in self.cells():  # every cell's config is valid before anything runs
            self.cell_config(*cell)

    def cells(self) -> list[tuple[int, str]]:
        """Grid order: k ascending, methods in the order given."""
        return [(k, m) for k in sorted(self.ks) for m in self.methods]

    def cell_config(self, k: int, method: str):
        return replace(self.prune, remove=k, layers=None, recovery=method)


def parse_methods(value: str | tuple[str, ...] | list[str], key: str) -> tuple[str, ...]:
    """The recovery methods of a grid ('none,ghost' or a list), each known and listed once. Here 'none' is a method
    (plain removal), not an empty list: --recovery none alone compares the dense model with plain removal."""
    from ghosted.method.recovery import RECOVERY

    items = value.split(",") if isinstance(value, str) else [str(v) for v in value]
    methods = tuple(s.strip() for s in items if s.strip())
    if not methods:
        raise GhostedError(f"{key} needs at least one recovery method, e.g. none,ghost")
    for m in methods:
        RECOVERY.get(m)
    if len(set(methods)) != len(methods):
        raise GhostedError(f"{key} lists a method twice ({brief(twice(methods))})")
    return methods


def parse_ks(text: str) -> tuple[int, ...]:
    """'6,9' -> (6, 9): the layer counts of a compare grid."""
    try:
        return tuple(int(x) for x in str(text).split(",") if x.strip())
    except ValueError as exc:
        raise GhostedError(f"--remove takes layer counts like 6,9, got {brief(text)}") from exc


@dataclass(frozen=True)
class DistillConfig:
    """How the recovery parameters are trained (steps = 0: no distillation, the training-free default)."""

    steps: int = 0
    lr: float = 2e-5
    top_k: int = 32  # teacher log-probs cached per token
    batch_size: int = 2  # windows per step
    warmup: float = 0.05  # fraction of steps with a linear warm-up
    weight_decay: float = 0.0  # toward zero would pull W away from identity: off by default
    eval_every: int = 10  # steps between held-out evaluations
    patience: int = 3  # evaluations without improvement before stopping
    seed: int = 0

    def __post_init__(self) -> None:
        for name, low, high in (("steps", 0, MAX_STEPS), ("top_k", 1, 1024), ("batch_size", 1, MAX_BATCH),
                                ("eval_every", 1, MAX_STEPS), ("patience", 1, MAX_STEPS), ("seed", 0, MAX_SEED)):
            _whole(getattr(self, name), low, f"distill.{name}", high)
        if not (math.isfinite(self.lr) and 0 < self.lr <= 1):
            raise GhostedError(f"distill.lr must be a finite number in (0, 1], got {brief(self.lr)}")
        if not 0 <= self.warmup < 1:
            raise GhostedError(f"distill.warmup must be in [0, 1), got {brief(self.warmup)}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise GhostedError(f"distill.weight_decay must be a finite number >= 0, got {brief(self.weight_decay)}")
