"""The champion alias: who holds it, its history, moving it, and the decision whether a new version takes it.

The registered model's tag `champion_history` holds the versions that held the alias, oldest first (`rollback`
pops it). Every move happens under registry_lock, so for SQLite stores the champion is a compare-and-set across
processes.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

from ghosted.evaluation.gate import beats
from ghosted.mlops.registry.connection import Client
from ghosted.mlops.registry.names import CHAMPION, HISTORY_TAG, PROTOCOL_TAG


def alias(model) -> str | None:
    """The version that holds the champion alias of a registered model, or None."""
    v = model.aliases.get(CHAMPION)
    return None if v is None else str(v)


def champion(client: Client, name: str) -> str | None:
    """The champion version of the registered model `name`, or None."""
    return alias(client.get_registered_model(name))


def history(model) -> list[str]:
    """The versions that held the alias, oldest first."""
    return [v for v in (model.tags.get(HISTORY_TAG) or "").split(",") if v]


def timestamp() -> str:
    """Now, as the registry's by-hand tags write it."""
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def set_champion(client: Client, name: str, version: str, how: str) -> None:
    """Move the alias and push the version on the history tag (last 200 kept). Call under registry_lock."""
    client.set_registered_model_alias(name, CHAMPION, version)
    hist = history(client.get_registered_model(name))
    if not hist or hist[-1] != str(version):
        client.set_registered_model_tag(name, HISTORY_TAG, ",".join((hist + [str(version)])[-200:]))
    client.set_model_version_tag(name, version, "champion_since", f"{timestamp()} ({how})")


def decide(client: Client, name: str, tags: Mapping[str, str], current: str | None) -> tuple[bool, str]:
    """(move the alias?, the decision text) for a version with these tags against the current champion."""
    if tags.get("gate") != "pass":
        return False, f"gate failed, champion unchanged: {tags.get('gate_reason', '')}"
    champ_tags = client.get_model_version(name, current).tags if current else None
    moved, why = beats(tags, champ_tags)
    if moved:
        return True, f"new champion: {why}"
    if champ_tags is not None and champ_tags.get(PROTOCOL_TAG) != tags.get(PROTOCOL_TAG):
        why = (why.replace("the champion", f"version {current}", 1) + "; promote by hand with "
               f"`ghosted registry promote {name} VERSION` if this version is better")
    return False, f"champion stays version {current}: {why}"


def description(tags: Mapping[str, str], decision: str) -> str:
    """A version's description: its gate verdict and the champion decision."""
    gate = "passed" if tags.get("gate") == "pass" else f"FAILED: {tags.get('gate_reason', '')}"
    return f"gate {gate}. {decision}"[:4000]
