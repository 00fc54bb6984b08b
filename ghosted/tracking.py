"""Settings of the registry commands: the `gate:` and `registry:` sections of params.yaml.

The gate itself is ghosted/gate.py (pure), the MLflow registry ghosted/registry.py, the files of
`ghosted register --reports` ghosted/pipeline_report.py and the registered pyfunc model ghosted/serving.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .errors import GhostedError

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


# --------------------------------------------------------------------------- settings


def _from_dict(cls, d: Mapping[str, Any] | None, section: str):
    d = dict(d or {})
    known = {f.name for f in fields(cls)}
    unknown = set(d) - known
    if unknown:
        raise GhostedError(f"unknown {section} option(s) {sorted(unknown)}; known: {sorted(known)}")
    return cls(**d)


@dataclass(frozen=True)
class GateConfig:
    """The quality bar a pruned checkpoint must clear before it can become the champion."""

    max_ppl_ratio: float | None = 1.5  # pruned / dense perplexity, every source
    min_retained_acc: float | None = 0.9  # pruned / dense zero-shot average
    rank_by: str = "wiki"  # the perplexity source whose ratio ranks candidates (lower is better)
    acc_metric: str = "acc_norm"  # key of the zero-shot `average` block (acc_norm, acc where a task has none)

    def __post_init__(self) -> None:
        for name in ("max_ppl_ratio", "min_retained_acc"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0):
                raise GhostedError(f"gate.{name} must be a number > 0 or null, got {v!r}")
        if not self.rank_by:
            raise GhostedError("gate.rank_by must name a perplexity source, e.g. wiki")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "GateConfig":
        return _from_dict(cls, d, "gate")


@dataclass(frozen=True)
class RegistryConfig:
    """Where runs and versions go. A relative SQLite path is relative to the params file (or the cwd)."""

    tracking_uri: str = DEFAULT_TRACKING_URI
    experiment: str = "ghosted"
    name: str | None = None  # registered model name; default ghosted-<base model>

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "RegistryConfig":
        return _from_dict(cls, d, "registry")


def absolute_uri(uri: str, base: Path) -> str:
    """sqlite:///relative.db -> sqlite:////abs/base/relative.db; other URIs unchanged."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/") and ":memory:" not in uri:
        return prefix + str((base / uri[len(prefix):]).resolve())
    return uri


def load_config(path: Path | None, tracking_uri: str | None = None) -> tuple[GateConfig, RegistryConfig]:
    """The `gate:` and `registry:` sections of a params file; --tracking-uri wins over the file."""
    doc: dict = {}
    if path is not None:
        import yaml

        if not Path(path).is_file():
            raise GhostedError(f"config file not found: {path}")
        try:
            doc = yaml.safe_load(Path(path).read_text()) or {}
        except yaml.YAMLError as exc:
            raise GhostedError(f"{path}: not valid YAML ({exc})") from exc
    gate = GateConfig.from_dict(doc.get("gate"))
    reg = RegistryConfig.from_dict(doc.get("registry"))
    base = Path(path).resolve().parent if path is not None else Path.cwd()
    uri = absolute_uri(tracking_uri, Path.cwd()) if tracking_uri else absolute_uri(reg.tracking_uri, base)
    return gate, RegistryConfig(uri, reg.experiment, reg.name)
