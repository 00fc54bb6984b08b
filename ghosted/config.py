"""One typed params root: every setting of every command, in frozen sections, read from YAML in one place.

Precedence everywhere: command-line flag > params file (YAML) > the defaults written once below. Each
section is a frozen dataclass; `build()` turns a mapping into one, rejecting unknown keys, wrong types and
non-finite numbers with a one-line GhostedError that names the key, the value and what is allowed, and the
section's own `__post_init__` checks ranges and cross-field rules. The CLI, the DVC stages (which call the
CLI with `--config params.yaml`), the Prefect flows and the registry all read their settings through
`load_params()` / `section()`; help texts quote the defaults from here (`default()`), so they cannot drift.
"""

from __future__ import annotations

import difflib
import math
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from ghosted.errors import GhostedError

PPL_SOURCES_HELP = "wiki, ptb, passages, ptb-train, a .txt/.jsonl file or hf:NAME:SPLIT:FIELD"
GUARDS = ("loss", "boundary", "off")
VARIANTS = ("rotate", "diag")
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
REGISTER_MODES = ("true", "false", "on_pass")


# --------------------------------------------------------------------------- typed building


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or null"
    if origin is tuple:
        return f"a list of {_type_name(typing.get_args(hint)[0])}s"
    if is_dataclass(hint):
        return "a mapping"
    return {int: "a whole number", float: "a number", str: "a string", bool: "true or false"}.get(hint, str(hint))


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """value checked against the field's type hint; lists become tuples, numbers must be finite."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        for inner in options[:-1]:
            try:
                return _coerce(value, inner, key)
            except GhostedError:
                pass
        try:
            return _coerce(value, options[-1], key)
        except GhostedError as exc:
            if "finite" in str(exc):
                raise
            raise GhostedError(f"{key} = {value!r}: expected {_type_name(hint)}") from None
    bad = GhostedError(f"{key} = {value!r}: expected {_type_name(hint)}")
    if origin is tuple:
        inner = typing.get_args(hint)[0]
        if isinstance(value, str):  # "1e-6,1e-2" / "wiki,ptb" as on the command line
            if inner is str:
                return value  # the section parses names itself ('none' means empty)
            parts = [p.strip() for p in value.split(",") if p.strip()]
            try:
                value = [inner(p) for p in parts]
            except ValueError:
                raise bad from None
        if isinstance(value, (int, float)) and not isinstance(value, bool) and inner is not str:
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise bad
        return tuple(_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value))
    if is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, Mapping):
            raise bad
        return build(hint, value, key)
    if hint is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        if not math.isfinite(value):
            raise GhostedError(f"{key} = {value!r}: expected a finite number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise bad
        return value
    return value


def build(cls: type, values: Mapping[str, Any] | None, section: str) -> Any:
    """A config section from a mapping: unknown keys, wrong types and non-finite numbers are one-line errors."""
    if values is None:
        values = {}
    if not isinstance(values, Mapping):
        raise GhostedError(f"{section}: expected a mapping of options, got {values!r}")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in fields(cls) if f.init]
    out = {}
    for k, v in values.items():
        if k not in known:
            close = difflib.get_close_matches(str(k), known, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise GhostedError(f"unknown {section} option '{k}'; {hint}known: {', '.join(known)}")
        out[k] = _coerce(v, hints[k], f"{section}.{k}")
    return cls(**out)


def _typed(cfg: Any, section: str) -> None:
    """Direct construction (the Python API) gets build()'s type and finiteness checks too."""
    hints = typing.get_type_hints(type(cfg))
    for f in fields(cfg):
        if f.init:
            object.__setattr__(cfg, f.name, _coerce(getattr(cfg, f.name), hints[f.name], f"{section}.{f.name}"))


def merged(base: Any, overrides: Mapping[str, Any], section: str) -> Any:
    """`base` (a section) with the given keys replaced, re-checked (e.g. command-line flags over the file)."""
    given = {k: v for k, v in overrides.items() if v is not None}
    if not given:
        return base
    return build(type(base), {**as_mapping(base), **given}, section)


def as_mapping(cfg: Any) -> dict[str, Any]:
    """A section as a plain dict (tuples as lists, nested sections as dicts): for JSON, YAML and hashing."""
    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return {f.name: plain(getattr(cfg, f.name) if not is_dataclass(getattr(cfg, f.name))
                          else as_mapping(getattr(cfg, f.name))) for f in fields(cfg) if f.init}


def default(cls: type, name: str) -> str:
    """A field's default as help text shows it (lists as 'a,b')."""
    f = {f.name: f for f in fields(cls)}[name]
    v = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
    if isinstance(v, tuple):
        return ",".join(_fmt_num(x) for x in v) if v else "none"
    return _fmt_num(v)


def _fmt_num(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _whole(value: Any, low: int, key: str) -> None:
    """key: '--flag (section.key)' or 'section.key'."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        name, _, where = key.partition(" (")
        raise GhostedError(f"{name} must be a whole number >= {low}, got {value!r}" + (f" ({where}" if where else ""))


# --------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class CalibrationConfig:
    """`calibration:` the token windows the statistics are taken on (ghosted calibrate)."""

    source: str = "passages"  # passages, wiki, ptb, ptb-train, a .txt/.jsonl file, hf:NAME:SPLIT:FIELD, or A+B
    n: int = 32  # windows
    seq_len: int = 512  # tokens per window
    seed: int = 0  # document shuffle

    def __post_init__(self) -> None:
        _typed(self, "calibration")
        if not self.source:
            raise GhostedError("calibration.source must name a text source, e.g. passages")
        _whole(self.n, 1, "--n-seqs (calibration.n)")
        _whole(self.seq_len, 2, "--seq-len (calibration.seq_len)")
        _whole(self.seed, 0, "--seed (calibration.seed)")


@dataclass(frozen=True)
class PruneConfig:
    """`prune:` everything that decides the pruned model. Rejects unknown keys and bad combinations."""

    remove: int | None = None  # how many layers (with a selection metric)
    layers: str | int | None = None  # or an explicit list: "13-18" / "13,15,20"
    select: str = "angular"
    recovery: str = "ghost"
    ridge: float | None = None  # None: chosen on held-out data from ridge_grid (ghost), 1e-6 otherwise
    ridge_grid: tuple[float, ...] = (1e-6, 1e-2)
    norm_features: bool = False  # ghost: also a d x d map of the scale-free state n(h) (linalg.solve_ghost)
    token_shift: bool = False  # with norm_features: also a d x d map of the previous token's n(h)
    rank: int | None = None
    variant: str = "rotate"
    fold: str = "auto"  # --recovery foldable: auto (the guard picks) | cq | replaceme | cq+replaceme
    token_policy: str = "auto"  # auto: the guard picks among the registered policies on held-out data
    holdout: float = 0.25  # fraction of calibration windows held out for the guard and ghost selection
    guard: str = "loss"  # loss | boundary | off
    shortlist: int = 4
    batch_size: int = 4
    distill: int = 0  # steps of ghost distillation after the training-free solve (0: training-free, the default)
    distill_lr: float = 2e-5  # SmolLM2-135M: 1e-4 overfits the 24 fit windows (see README, distillation)

    def __post_init__(self) -> None:
        _typed(self, "prune")
        from ghosted.method.fold import FOLDS
        from ghosted.method.policies import get_policy
        from ghosted.method.recovery import RECOVERY
        from ghosted.method.selection import SELECTION

        if (self.remove is None) == (self.layers is None):
            raise GhostedError("give exactly one of --remove K or --layers LIST")
        if isinstance(self.layers, int):  # `layers: 13` in YAML
            object.__setattr__(self, "layers", str(self.layers))
        if self.remove is not None:
            _whole(self.remove, 1, "--remove (prune.remove)")
        SELECTION.get(self.select)
        RECOVERY.get(self.recovery)
        get_policy(self.token_policy)
        if self.guard not in GUARDS:
            raise GhostedError(f"unknown guard '{self.guard}': use {', '.join(GUARDS)}")
        if not 0.0 <= self.holdout < 1.0:
            raise GhostedError(f"--holdout (prune.holdout) must be in [0, 1), got {self.holdout}")
        if self.ridge is not None and self.ridge < 0:
            raise GhostedError(f"--ridge (prune.ridge) must be >= 0, got {self.ridge}")
        if not self.ridge_grid or any(r < 0 for r in self.ridge_grid):
            raise GhostedError(f"--ridge-grid (prune.ridge_grid) needs values >= 0, got {list(self.ridge_grid)}")
        if self.rank is not None:
            _whole(self.rank, 1, "--rank (prune.rank)")
        if self.variant not in VARIANTS:
            raise GhostedError(f"--variant (prune.variant) must be {' or '.join(VARIANTS)}, got {self.variant}")
        if self.fold != "auto" and self.fold not in FOLDS:
            raise GhostedError(f"--fold (prune.fold) must be auto or one of {', '.join(FOLDS)}, got {self.fold}")
        _whole(self.shortlist, 1, "--shortlist (prune.shortlist)")
        _whole(self.batch_size, 1, "--batch-size (prune.batch_size)")
        _whole(self.distill, 0, "--distill (prune.distill)")
        if not self.distill_lr > 0:
            raise GhostedError(f"--distill-lr (prune.distill_lr) must be > 0, got {self.distill_lr}")
        if self.norm_features and self.recovery != "ghost":
            raise GhostedError(f"--norm-features (prune.norm_features) is a ghost option: it needs --recovery ghost, "
                               f"not {self.recovery}")
        if self.norm_features and self.rank is not None:
            raise GhostedError("a low-rank ghost has no norm features: drop --rank or --norm-features")
        if self.token_shift and not self.norm_features:
            raise GhostedError("--token-shift (prune.token_shift) extends the norm features: add --norm-features")
        if self.distill and self.recovery != "ghost":
            raise GhostedError(f"--distill trains ghost operators: it needs --recovery ghost, not {self.recovery}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> PruneConfig:
        return build(cls, d, "prune")


def parse_names(value: str | Sequence[str] | None) -> tuple[str, ...] | None:
    """'a,b' or ['a', 'b'] -> ('a', 'b'); 'none' -> (); None stays None (use the default)."""
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else [str(v) for v in value]
    items = [s.strip() for s in items if s.strip()]
    if items == ["none"]:
        return ()
    return tuple(items)


def check_tasks(tasks: tuple[str, ...]) -> None:
    from ghosted.evaluate.zeroshot import SUPPORTED_TASKS

    for name in tasks:
        if name not in SUPPORTED_TASKS:
            close = difflib.get_close_matches(name, SUPPORTED_TASKS, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise GhostedError(f"unknown task '{name}'; {hint}supported: {', '.join(SUPPORTED_TASKS)} (or 'none')")
    if len(set(tasks)) != len(tasks):
        raise GhostedError(f"--tasks {','.join(tasks)} names a task twice; list each task once")


def check_sources(sources: tuple[str, ...]) -> None:
    from ghosted.corpora import SHIPPED_SOURCES

    for s in sources:
        if s not in SHIPPED_SOURCES and not s.startswith("hf:") and not Path(s).expanduser().is_file():
            raise GhostedError(f"unknown perplexity source '{s}': use {PPL_SOURCES_HELP} (or 'none')")
    if len(set(sources)) != len(sources):
        raise GhostedError(f"--ppl {','.join(sources)} names a source twice; list each source once")


def _default_tasks() -> tuple[str, ...]:
    from ghosted.evaluate.zeroshot import DEFAULT_TASKS

    return tuple(DEFAULT_TASKS)


@dataclass(frozen=True)
class EvalSettings:
    """`eval:` what quality evaluation runs: perplexity sources and zero-shot tasks, and their sizes."""

    tasks: tuple[str, ...] = field(default_factory=_default_tasks)  # () for no zero-shot
    ppl: tuple[str, ...] = ("wiki", "ptb")  # () for no perplexity
    limit: int | None = None  # first N items of each task (None: all)
    ppl_windows: int = 32  # windows of seq_len tokens per perplexity source
    seq_len: int = 512
    batch_size: int = 8

    def __post_init__(self) -> None:
        _typed(self, "eval")
        object.__setattr__(self, "tasks", parse_names(self.tasks) or ())
        object.__setattr__(self, "ppl", parse_names(self.ppl) or ())
        check_tasks(self.tasks)
        check_sources(self.ppl)
        if self.limit is not None:
            _whole(self.limit, 1, "--limit (eval.limit)")
        _whole(self.ppl_windows, 1, "--ppl-windows (eval.ppl_windows)")
        _whole(self.seq_len, 2, "--seq-len (eval.seq_len)")
        _whole(self.batch_size, 1, "--batch-size (eval.batch_size)")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> EvalSettings:
        return build(cls, d, "eval")

    def as_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


@dataclass(frozen=True)
class EfficiencySettings:
    """Inputs of evaluate.efficiency.measure_efficiency (random prompts, greedy decoding)."""

    batch_sizes: tuple[int, ...] = (1, 8)
    prompt_len: int = 128
    new_tokens: int = 32
    repeats: int = 3

    def __post_init__(self) -> None:
        _typed(self, "efficiency")
        _whole(self.prompt_len, 1, "--prompt-len")
        _whole(self.new_tokens, 2, "--new-tokens")
        _whole(self.repeats, 1, "--repeats")
        if not self.batch_sizes or any(isinstance(b, bool) or not isinstance(b, int) or b < 1
                                       for b in self.batch_sizes):
            raise GhostedError(f"efficiency batch sizes must be whole numbers >= 1, got {self.batch_sizes}")


@dataclass(frozen=True)
class GateConfig:
    """`gate:` the quality bar a pruned checkpoint must clear before it can become the champion."""

    max_ppl_ratio: float | None = 2.0  # pruned / dense perplexity, every source
    min_retained_acc: float | None = 0.9  # pruned / dense zero-shot average
    rank_by: str = "wiki"  # the perplexity source whose ratio ranks candidates (lower is better)
    acc_metric: str = "acc_norm"  # key of the zero-shot `average` block (acc_norm, acc where a task has none)

    def __post_init__(self) -> None:
        _typed(self, "gate")
        for name in ("max_ppl_ratio", "min_retained_acc"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise GhostedError(f"gate.{name} must be a number > 0 or null, got {v!r}")
        if not self.rank_by:
            raise GhostedError("gate.rank_by must name a perplexity source, e.g. wiki")
        if not self.acc_metric:
            raise GhostedError("gate.acc_metric must name a metric, e.g. acc_norm")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> GateConfig:
        return build(cls, d, "gate")


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
            raise GhostedError(f"registry.register = {self.register!r}: expected true, false or on_pass")
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
            raise GhostedError(f"sweep.remove needs distinct layer counts, got {list(self.remove)}")
        for k in self.remove:
            _whole(k, 1, "sweep.remove[]")
        if not self.recovery or len(set(self.recovery)) != len(self.recovery):
            raise GhostedError(f"sweep.recovery needs distinct methods, got {list(self.recovery)}")
        for m in self.recovery:
            RECOVERY.get(m)
        _whole(self.workers, 1, "sweep.workers")
        _whole(self.threads_per_worker, 1, "sweep.threads_per_worker")


@dataclass(frozen=True)
class SearchConfig:
    """`search:` ghosted search: the most layers whose pruned model passes the gate (prune: gives the rest)."""

    min_remove: int | None = None  # smallest k searched (default: a fifth of the layers)
    max_remove: int | None = None  # largest k searched (default: half of the layers)
    shortlist: int = 3  # single blocks per k screened by held-out loss: the best by angular distance (+ the best boundary error)
    split_shortlist: int = 2  # two-cut plans per k screened by held-out loss (best summed angular distance)
    max_cuts: int = 2  # 1: contiguous blocks only
    # screened plans of a k evaluated in full, best held-out loss first, until one passes: k passes when one of
    # them does (SmolLM2-135M at 9 layers: the best-screened 11-19 fails at wiki x2.003, the next, 10-18, passes)
    finalists: int = 2
    distill: int = 0  # > 0: each evaluated plan also gets a distilled row (this many steps)
    # The pipeline (`dvc repro`, flows.compress): the solve stage searches for the plan (the gate: and eval:
    # sections decide) instead of removing prune.remove layers; fuse, evaluate and register then run on it.
    enabled: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise GhostedError(f"search.enabled must be true or false, got {self.enabled!r}")
        for name in ("min_remove", "max_remove"):
            if getattr(self, name) is not None:
                _whole(getattr(self, name), 1, f"search.{name}")
        if self.min_remove is not None and self.max_remove is not None and self.min_remove > self.max_remove:
            raise GhostedError(f"search.min_remove ({self.min_remove}) is above search.max_remove ({self.max_remove})")
        _whole(self.shortlist, 1, "search.shortlist")
        _whole(self.split_shortlist, 0, "search.split_shortlist")
        if self.max_cuts not in (1, 2):
            raise GhostedError(f"search.max_cuts must be 1 or 2, got {self.max_cuts!r}")
        _whole(self.finalists, 1, "--finalists (search.finalists)")
        _whole(self.distill, 0, "--distill (search.distill)")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> SearchConfig:
        return build(cls, d, "search")


# --------------------------------------------------------------------------- the root and the one reader


SECTIONS: dict[str, type] = {"calibration": CalibrationConfig, "prune": PruneConfig, "eval": EvalSettings,
                             "gate": GateConfig, "registry": RegistryConfig, "sweep": SweepConfig,
                             "search": SearchConfig}


@dataclass(frozen=True)
class Params:
    """The whole params file. `prune` is None when the file has no `prune:` section (it needs remove/layers)."""

    model: str | None = None
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    prune: PruneConfig | None = None
    eval: EvalSettings = field(default_factory=EvalSettings)
    gate: GateConfig = field(default_factory=GateConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    path: Path | None = None  # the file it came from (relative registry URIs resolve against its folder)
    raw: dict[str, dict] = field(default_factory=dict, compare=False)  # each section as written in the file


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The one YAML reader: a params file as a mapping of sections (missing file, bad YAML: one line)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise GhostedError(f"config file not found: {path}")
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise GhostedError(f"{path}: not valid YAML ({first})") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise GhostedError(f"{path}: cannot read the config file ({exc})") from exc
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise GhostedError(f"{path}: a params file is a mapping of sections "
                           f"({', '.join(['model', *SECTIONS])}), got {type(doc).__name__}")
    unknown = [k for k in doc if k not in ("model", *SECTIONS)]
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), ["model", *SECTIONS], n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise GhostedError(f"{path}: unknown section '{unknown[0]}'; {hint}known: {', '.join(['model', *SECTIONS])}")
    for name in SECTIONS:
        if doc.get(name) is not None and not isinstance(doc[name], dict):
            raise GhostedError(f"{path}: the `{name}:` section must be a mapping of options, got {doc[name]!r}")
    return doc


def load_params(path: str | Path | None) -> Params:
    """Every section of a params file, typed and checked up front (None: all defaults)."""
    if path is None:
        return Params()
    doc = read_yaml(path)
    model = doc.get("model")
    if model is not None and not isinstance(model, str):
        raise GhostedError(f"{path}: model = {model!r}: expected a model name, folder or hub id (a string)")
    raw = {name: dict(doc.get(name) or {}) for name in SECTIONS}
    try:
        built = {name: build(cls, raw[name], name) for name, cls in SECTIONS.items() if name != "prune"}
        prune_raw = raw["prune"]
        prune = None
        if prune_raw.get("remove") is not None or prune_raw.get("layers") is not None:
            prune = build(PruneConfig, prune_raw, "prune")
        else:  # a file without remove/layers still has its other prune options checked
            build(PruneConfig, {**prune_raw, "remove": 1}, "prune")
    except GhostedError as exc:
        raise GhostedError(f"{path}: {exc}") from None
    return Params(model=model, prune=prune, path=Path(path), raw=raw, **built)


__all__ = ["CalibrationConfig", "EfficiencySettings", "EvalSettings", "GateConfig", "Params", "PruneConfig",
           "RegistryConfig", "SearchConfig", "SweepConfig", "as_mapping", "build", "default", "load_params", "merged",
           "parse_names", "read_yaml"]
