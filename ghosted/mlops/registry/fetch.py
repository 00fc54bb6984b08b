"""A registered version's checkpoint for a command that reads it (`ghosted export models:/NAME@ALIAS`): downloaded
from the version's pyfunc model (artifact `checkpoint`), checked against the content sha256 the registry recorded
when the version was registered (its `checkpoint_sha256` tag, in the registry database), then verified."""

from __future__ import annotations

import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from ghosted.errors import GhostedError
from ghosted.io import temp_dir
from ghosted.mlops.registry.connection import (
    DB_TIMEOUT_S,
    connect,
    mlflow_errors,
    model_version,
    registered_model,
)
from ghosted.mlops.registry.names import SHA_TAG, check_name

if TYPE_CHECKING:
    from ghosted.config import RegistryConfig

SCHEME = "models:/"
_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>[^/@]+))$")


def is_model_uri(ref: str | Path) -> bool:
    """Whether a model argument names a registered version (models:/NAME@ALIAS or models:/NAME/VERSION)."""
    return str(ref).startswith(SCHEME)


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """(name, alias, version) of models:/NAME@ALIAS or models:/NAME/VERSION; a one-line error for anything else."""
    m = _URI.match(str(uri))
    if m is None or (m["version"] is not None and not m["version"].isdigit()):
        raise GhostedError(f"{uri!r} is not a registered model URI: use models:/NAME@ALIAS (e.g. "
                           "models:/ghosted-smollm2-135m@champion) or models:/NAME/VERSION")
    return check_name(m["name"]), m["alias"], m["version"]


def _version(client, name: str, alias: str | None, version: str | None):
    """The registered version an alias or number names; a one-line error listing what there is."""
    model = registered_model(client, name)
    if alias is None:
        return model_version(client, name, str(version))
    if alias not in model.aliases:
        known = ", ".join(f"{a} (version {v})" for a, v in sorted(model.aliases.items())) or "none"
        raise GhostedError(f"model '{name}' has no alias '{alias}'; its aliases: {known}")
    return client.get_model_version(name, str(model.aliases[alias]))


def _download(version, dest: Path, uri: str) -> Path:
    """The version's checkpoint artifact (where its MLmodel says), downloaded under dest."""
    import mlflow.artifacts

    from ghosted.mlops.serving import checkpoint_path

    source = str(version.source).rstrip("/")

    def fetch(rel: str, into: Path) -> Path:
        into.mkdir()
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{source}/{rel}", dst_path=str(into),
                                                        tracking_uri=uri))

    rel = checkpoint_path(fetch("MLmodel", dest / "mlmodel"))
    return fetch(rel, dest / "checkpoint")


@contextmanager
def registered_checkpoint(reg: RegistryConfig, uri: str, db_timeout: float = DB_TIMEOUT_S) -> Iterator[Path]:
    """A local copy of the checkpoint of the version `uri` names, whose content is the sha256 the registry recorded
    for it and which passed verify; removed on exit."""
    from ghosted.checkpoint.verify import verified

    name, alias, number = parse_model_uri(uri)
    client = connect(reg, create=False, db_timeout=db_timeout)
    with temp_dir(tempfile.gettempdir(), "ghosted-fetch") as tmp:  # marked: a killed run's is swept
        with mlflow_errors(reg):
            v = _version(client, name, alias, number)
            want = v.tags.get(SHA_TAG)
            if not want:
                raise GhostedError(f"{uri}: version {v.version} of '{name}' records no {SHA_TAG}, so its checkpoint "
                                   "cannot be checked: register the checkpoint again")
            try:
                local = _download(v, Path(tmp), reg.tracking_uri)
            except OSError as exc:
                raise GhostedError(f"{uri}: cannot read the checkpoint of version {v.version} from {v.source} "
                                   f"({exc.strerror or exc})") from exc
        got = verified(local).sha256
        if got != want:
            raise GhostedError(f"{uri}: the stored checkpoint of version {v.version} (sha256 {got[:12]}) is not the "
                               f"one registered (sha256 {want[:12]}): the artifact store was changed after "
                               "registration; register the checkpoint again")
        yield local
