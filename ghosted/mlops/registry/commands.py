"""The registry's read-only and by-hand commands: the recorded base fingerprint, the list of versions, promote
and rollback of the champion alias."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from ghosted.errors import GhostedError
from ghosted.mlops.registry.champion import alias, champion, history, set_champion, timestamp
from ghosted.mlops.registry.connection import (
    DB_TIMEOUT_S,
    NoRegistry,
    connect,
    find_model,
    mlflow_errors,
    model_version,
    model_versions,
    registered_model,
    registry_lock,
)
from ghosted.mlops.registry.names import (
    CHAMPION,
    FINGERPRINT_TAG,
    HISTORY_TAG,
    PROTOCOL_TAG,
    PROVENANCE_TAG,
    SHA_TAG,
    STATE_TAG,
    check_name,
)

if TYPE_CHECKING:
    from ghosted.config import RegistryConfig


def recorded_fingerprint(reg: RegistryConfig, name: str, db_timeout: float = DB_TIMEOUT_S) -> str | None:
    """The base fingerprint of the last version registered under `name` (None if nothing is, or no registry)."""
    try:
        client = connect(reg, create=False, db_timeout=db_timeout)
    except NoRegistry:
        return None
    with mlflow_errors(reg):
        model = find_model(client, check_name(name))
        return None if model is None else model.tags.get(FINGERPRINT_TAG)


def _float(v: str | None) -> float | None:
    try:
        return None if v is None else float(v)
    except ValueError:
        return None


def list_versions(reg: RegistryConfig, name: str | None = None, db_timeout: float = DB_TIMEOUT_S) -> list[dict]:
    """Every version (of `name`, or of every registered model) with its gate verdict and numbers."""
    client = connect(reg, create=False, db_timeout=db_timeout)
    rows = []
    with mlflow_errors(reg):
        models = [registered_model(client, check_name(name))] if name else list(client.search_registered_models())
        for m in sorted(models, key=lambda m: m.name):
            champ = alias(m)
            for v in model_versions(client, m.name):
                t = v.tags
                rows.append({"name": m.name, "version": str(v.version), "champion": str(v.version) == champ,
                             "gate": t.get("gate", "-"), "rank_by": t.get("rank_by"),
                             "rank_value": _float(t.get("rank_value")), "retained_acc": _float(t.get("retained_acc")),
                             "removed_layers": t.get("removed_layers"), "method": t.get("method"),
                             "healed": t.get("healed") == "true",
                             "base_fingerprint": t.get(FINGERPRINT_TAG), "gate_reason": t.get("gate_reason"),
                             "checkpoint_sha256": t.get(SHA_TAG), "protocol_sha256": t.get(PROTOCOL_TAG),
                             "provenance": t.get(PROVENANCE_TAG), "registration": t.get(STATE_TAG),
                             "created": time.strftime("%Y-%m-%d %H:%M", time.localtime(v.creation_timestamp / 1000)),
                             "description": v.description})
    return rows


def promote(reg: RegistryConfig, name: str, version: str | int, db_timeout: float = DB_TIMEOUT_S) -> dict:
    """Move the champion alias to a version by hand (the gate is not consulted; the tag says so)."""
    client = connect(reg, create=False, db_timeout=db_timeout)
    with mlflow_errors(reg), registry_lock(reg):
        v = model_version(client, check_name(name), version)
        previous = champion(client, name)
        if previous == str(v.version):
            return {"name": name, "champion": previous, "previous": previous, "changed": False}
        set_champion(client, name, str(v.version), "promoted by hand")
        client.set_model_version_tag(name, str(v.version), "promoted", timestamp())
    return {"name": name, "champion": str(v.version), "previous": previous, "changed": True,
            "gate": v.tags.get("gate", "-")}


def rollback(reg: RegistryConfig, name: str, db_timeout: float = DB_TIMEOUT_S) -> dict:
    """Give the champion alias back to the version that held it before the current one."""
    client = connect(reg, create=False, db_timeout=db_timeout)
    with mlflow_errors(reg), registry_lock(reg):
        model = registered_model(client, check_name(name))
        current = alias(model)
        if current is None:
            raise GhostedError(f"model '{name}' has no champion to roll back")
        hist = history(model)
        while hist and hist[-1] == current:
            hist.pop()
        existing = {str(v.version) for v in model_versions(client, name)}
        while hist and hist[-1] not in existing:  # skip deleted versions
            hist.pop()
        if not hist:
            raise GhostedError(f"model '{name}' has no earlier champion than version {current} to roll back to")
        previous = hist[-1]
        client.set_registered_model_alias(name, CHAMPION, previous)
        client.set_registered_model_tag(name, HISTORY_TAG, ",".join(hist))
        client.set_model_version_tag(name, current, "rolled_back", timestamp())
    return {"name": name, "champion": previous, "previous": current}
