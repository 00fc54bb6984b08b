"""The settings of the registry commands: the `gate:` and `registry:` sections of a params file, resolved.

The sections themselves are typed in ghosted/config.py; this resolves the tracking URI (a relative SQLite path
is relative to the params file, a --tracking-uri to the current folder).
"""

from __future__ import annotations

from pathlib import Path

from ghosted.config import GateConfig, RegistryConfig, load_params


def absolute_uri(uri: str, base: Path) -> str:
    """sqlite:///relative.db -> sqlite:////abs/base/relative.db; other URIs unchanged."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/") and ":memory:" not in uri:
        return prefix + str((base / uri[len(prefix):]).resolve())
    return uri


def load_config(path: Path | None, tracking_uri: str | None = None) -> tuple[GateConfig, RegistryConfig]:
    """The `gate:` and `registry:` sections of a params file; --tracking-uri wins over the file."""
    params = load_params(path)
    reg = params.registry
    base = Path(path).resolve().parent if path is not None else Path.cwd()
    uri = absolute_uri(tracking_uri, Path.cwd()) if tracking_uri else absolute_uri(reg.tracking_uri, base)
    return params.gate, RegistryConfig(uri, reg.experiment, reg.name)
