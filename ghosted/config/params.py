"""The params root and its one reader: every section of a params file, typed and checked up front."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ghosted.config.evaluation import EfficiencySettings, EvalSettings, GateConfig
from ghosted.config.heal import HealConfig
from ghosted.config.runs import RegistryConfig, SearchConfig, SweepConfig
from ghosted.config.sections import CalibrationConfig, PruneConfig
from ghosted.config.typed import build, flag_of
from ghosted.config.yaml_io import load_yaml
from ghosted.errors import GhostedError, brief

SECTIONS: dict[str, type] = {"calibration": CalibrationConfig, "prune": PruneConfig, "eval": EvalSettings,
                             "gate": GateConfig, "registry": RegistryConfig, "sweep": SweepConfig,
                             "search": SearchConfig, "efficiency": EfficiencySettings, "heal": HealConfig}


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
    efficiency: EfficiencySettings = field(default_factory=EfficiencySettings)  # ghosted eval --efficiency
    heal: HealConfig = field(default_factory=HealConfig)  # ghosted heal
    path: Path | None = None  # the file it came from (relative registry URIs resolve against its folder)
    raw: dict[str, dict] = field(default_factory=dict, compare=False)  # each section as written in the file


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A params file as a mapping of sections, read by the one safe YAML reader (ghosted.config.yaml_io: size,
    depth, aliases and duplicate keys bounded); a missing file, bad YAML or a bad layout is one line."""
    doc = load_yaml(path)
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise GhostedError(f"{path}: a params file is a mapping of sections "
                           f"({', '.join(['model', *SECTIONS])}), got {type(doc).__name__}")
    unknown = [k for k in doc if k not in ("model", *SECTIONS)]
    if unknown:
        close = difflib.get_close_matches(str(unknown[0])[:100], ["model", *SECTIONS], n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise GhostedError(f"{path}: unknown section {brief(unknown[0])}; {hint}known: {', '.join(['model', *SECTIONS])}")
    for name in SECTIONS:
        if doc.get(name) is not None and not isinstance(doc[name], dict):
            raise GhostedError(f"{path}: the `{name}:` section must be a mapping of options, got {brief(doc[name])}")
    return doc


def load_params(path: str | Path | None = None) -> Params:
    """Every section of a params file, typed and checked up front (None: all defaults)."""
    if path is None:
        return Params()
    doc = read_yaml(path)
    model = doc.get("model")
    if model is not None and not isinstance(model, str):
        raise GhostedError(f"{path}: model = {brief(model)}: expected a model name, folder or hub id (a string)")
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


def resolve(cls: type, section: str, file_values: Mapping[str, Any] | None, flags: Mapping[str, Any],
            only: Iterable[str] | None = None) -> Any:
    """The one merge: defaults < the params-file section < command-line flags (a flag given as None is unset).

    `flags` maps flag destinations (n_seqs, calib_source, ...) to values, e.g. vars(args); `only` limits which
    fields flags may set. A flag of a `one_of` group drops the file's value of the group's other fields."""
    allowed = None if only is None else set(only)
    values = dict(file_values or {})
    given: dict[str, Any] = {}
    groups: dict[str, list[str]] = {}
    for f in fields(cls):
        flag = flag_of(f)
        if flag.one_of:
            groups.setdefault(flag.one_of, []).append(f.name)
        if flag.cli and (allowed is None or f.name in allowed) and flags.get(flag.dest) is not None:
            given[f.name] = flags[flag.dest]
    for name in given:
        one_of = flag_of(next(f for f in fields(cls) if f.name == name)).one_of
        for other in groups.get(one_of or "", []):
            if other != name and other not in given:
                values.pop(other, None)
    return build(cls, {**values, **given}, section)
