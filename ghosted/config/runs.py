"""The sections of the bigger runs: `registry:`, `sweep:`, `search:`, the compare grid and ghost distillation."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from ghosted.config.evaluation import EvalSettings
from ghosted.config.typed import DEFAULT_TRACKING_URI, REGISTER_MODES, _typed, _whole, build, option, parse_names, twice
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
        if not self.experiment:
            raise GhostedError("registry.experiment must name an MLflow experiment")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> RegistryConfig:
        return build(cls, d, "registry")


def _sweep_eval() -> EvalSettings:
    return EvalSettings(ppl=("wiki", "ptb"), ppl_windows=8, tasks=())


@dataclass(frozen=True)
class SweepConfig:
    """`sweep:` a (layers removed) x (recovery) grid on a Dask cluster, one shared calibration pass."""

    remove: tuple[int, ...] = (6, 9)
    recovery: tuple[str, ...] = ("none", "ghost")
    eval: EvalSettings = field(default_factory=_sweep_eval)
    workers: int = 2  # local cluster worker processes
    threads_per_worker: int = 1
    address: str | None = None  # tcp://scheduler:8786: a running Dask cluster instead of the local one

    def __post_init__(self) -> None:
        _typed(self, "sweep")
        from ghosted.method.recovery import RECOVERY

        object.__setattr__(self, "recovery", parse_names(self.recovery) or ())
        if not self.remove or len(set(self.remove)) != len(self.remove):
            raise GhostedError(f"sweep.remove needs distinct layer counts, got {brief(list(self.remove))}")
        for k in self.remove:
            _whole(k, 1, "sweep.remove[]")
        if not self.recovery or len(set(self.recovery)) != len(self.recovery):
            raise GhostedError(f"sweep.recovery needs distinct methods, got {brief(list(self.recovery))}")
        for m in self.recovery:
            RECOVERY.get(m)
        _whole(self.workers, 1, "sweep.workers")
        _whole(self.threads_per_worker, 1, "sweep.threads_per_worker")


@dataclass(frozen=True)
class SearchConfig:
    """`search:` ghosted search: the most layers whose pruned model passes the gate (prune: gives the rest)."""

    min_remove: int | None = option(None, "smallest number of layers searched (default: a fifth of them)")
    max_remove: int | None = option(None, "largest number of layers searched (default: half of them)")
    # single blocks per k screened by held-out loss: the best by angular distance (+ the best boundary error)
    shortlist: int = option(3, "single blocks screened per k (default {default})")
    split_shortlist: int = option(2, "two-cut plans screened per k (default {default})")
    max_cuts: int = option(2, "1: contiguous blocks only (default {default})")
    # More than one finalist because the plan with the best screening loss can still miss the gate while the
    # runner-up passes: screening is a proxy for the full evaluation.
    finalists: int = option(2, "screened plans per k evaluated in full, best first, until one passes "
                               "(default {default})")
    distill: int = option(0, "also distill each evaluated plan's ghosts this many steps and report both rows "
                             "(default 0)", metavar="STEPS")
    # The pipeline (`dvc repro`, flows.compress): the solve stage searches for the plan (the gate: and eval:
    # sections decide) instead of removing prune.remove layers; fuse, evaluate and register then run on it.
    enabled: bool = option(False, "the pipeline's solve stage searches instead of removing prune.remove layers",
                           cli=False)

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise GhostedError(f"search.enabled must be true or false, got {brief(self.enabled)}")
        for name in ("min_remove", "max_remove"):
            if getattr(self, name) is not None:
                _whole(getattr(self, name), 1, f"search.{name}")
        if self.min_remove is not None and self.max_remove is not None and self.min_remove > self.max_remove:
            raise GhostedError(f"search.min_remove ({self.min_remove}) is above search.max_remove ({self.max_remove})")
        _whole(self.shortlist, 1, "search.shortlist")
        _whole(self.split_shortlist, 0, "search.split_shortlist")
        if self.max_cuts not in (1, 2):
            raise GhostedError(f"search.max_cuts must be 1 or 2, got {brief(self.max_cuts)}")
        _whole(self.finalists, 1, "--finalists (search.finalists)")
        _whole(self.distill, 0, "--distill (search.distill)")

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
        from ghosted.method.recovery import RECOVERY

        if not self.ks:
            raise GhostedError("--remove needs at least one layer count, e.g. --remove 6,9")
        if any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in self.ks):
            raise GhostedError(f"--remove takes whole numbers >= 1, got {brief(list(self.ks))}")
        if len(set(self.ks)) != len(self.ks):
            raise GhostedError(f"--remove lists a count twice ({twice(self.ks)})")
        if not self.methods:
            raise GhostedError("--recovery needs at least one method, e.g. none,ghost")
        for m in self.methods:
            RECOVERY.get(m)
        if len(set(self.methods)) != len(self.methods):
            raise GhostedError(f"--recovery lists a method twice ({brief(twice(self.methods))})")
        if not self.evaluation.tasks and not self.evaluation.ppl:
            raise GhostedError("nothing to evaluate: give --tasks or --ppl (not both 'none')")
        for cell in self.cells():  # every cell's config is valid before anything runs
            self.cell_config(*cell)

    def cells(self) -> list[tuple[int, str]]:
        """Grid order: k ascending, methods in the order given."""
        return [(k, m) for k in sorted(self.ks) for m in self.methods]

    def cell_config(self, k: int, method: str):
        return replace(self.prune, remove=k, layers=None, recovery=method)


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
        for name, low in (("steps", 0), ("top_k", 1), ("batch_size", 1), ("eval_every", 1), ("patience", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise GhostedError(f"distill.{name} must be a whole number >= {low}, got {brief(v)}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise GhostedError(f"distill.lr must be a finite number > 0, got {brief(self.lr)}")
        if not 0 <= self.warmup < 1:
            raise GhostedError(f"distill.warmup must be in [0, 1), got {brief(self.warmup)}")
