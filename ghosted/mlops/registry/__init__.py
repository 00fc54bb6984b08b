"""The MLflow model registry of ghosted checkpoints: the one package that talks to MLflow.

`register` logs one MLflow run per pruned checkpoint (params: the checkpoint's `ghosted` block, the gate's
thresholds and the evaluations' configuration; metrics: the evaluations' measurements and the gate's ratios, the
two told apart by `is_configuration`; dataset inputs: the calibration set and every evaluation set with its sha256;
the tag `mlflow.source.git.commit`; artifacts: the checkpoint as an MLflow pyfunc model (ghosted/mlops/serving.py),
both metrics files and the reports), registers that model as a new version of `ghosted-<base model>`, tags the
version with its lineage, the gate's verdict (ghosted/evaluation/gate.py) and the champion decision, and moves the
`champion` alias when the version passes and beats the champion.

- Provenance: the pruned metrics must be the evaluation of this checkpoint's content, the dense ones of its base
  model, both of one protocol (`protocol_sha256`, a version tag); the champion rule ranks only versions of the same
  protocol. Metrics without a provenance block (an older `ghosted eval`) are accepted with `provenance=missing`.
- Idempotent: a checkpoint whose content sha256 is already a version of the model is not registered again;
  the result names that version and still carries the gate's verdict on the given metrics.
- Crash-safe: a version is created with its gate and decision tags and `registration=pending`, the alias moves,
  then `registration=done`. The next register (under the lock) marks runs whose register process died as
  FAILED and completes pending versions, so no version is left without a decision.
- Concurrency: for SQLite stores every decision and alias move happens under a file lock next to the database
  (`<db>.lock`), so the champion is a compare-and-set across processes. A tracking server has no such lock:
  concurrent registers against one server may race on the alias.
- A locked SQLite database is retried with backoff for `db_timeout` seconds, then ends in one line; read-only
  calls (list, the fingerprint lookup) never create a database or folders.

The registered model's tags hold `champion_history` (the versions that held the alias, oldest first;
`rollback` pops it) and `base_fingerprint`: the fingerprint of the last base model registered, whatever its
gate verdict. flows/recompress.py compares the current fingerprint against it.

Modules: names (tag names, model name, lineage, hashing), evaluation (params, metrics and dataset inputs from
the evaluation JSONs), provenance (the metrics are the checkpoint's own and of one protocol, or refused), connection (client, retries, errors, lock, lookups), champion (the alias and the
decision), recovery (owners of runs, repairing dead registers), register, commands (read-only and by-hand),
settings (the `gate:` and `registry:` sections of a params file), faults (named crash points, for the tests).
"""

from ghosted.mlops.registry.commands import list_versions, promote, recorded_fingerprint, rollback
from ghosted.mlops.registry.connection import DB_TIMEOUT_S, LOCK_TIMEOUT_S, NoRegistry, registry_lock, sqlite_path
from ghosted.mlops.registry.evaluation import (
    CONFIG_KEYS,
    DATASET_CONTEXT,
    DIGEST_LEN,
    dataset_inputs,
    evaluation_params,
    is_configuration,
    read_json,
    split_evaluation,
)
from ghosted.mlops.registry.names import (
    CHAMPION,
    DECISION_TAG,
    FINGERPRINT_TAG,
    GIT_COMMIT_TAG,
    HISTORY_TAG,
    MODEL_ARTIFACT,
    OWNER_TAG,
    SHA_TAG,
    STATE_TAG,
    Log,
    checkpoint_sha256,
    flatten_params,
    git_info,
    lineage,
    registered_name,
)
from ghosted.mlops.registry.recovery import recover
from ghosted.mlops.registry.register import register
from ghosted.mlops.registry.settings import load_config

__all__ = [
    "CHAMPION", "CONFIG_KEYS", "DATASET_CONTEXT", "DB_TIMEOUT_S", "DECISION_TAG", "DIGEST_LEN", "FINGERPRINT_TAG",
    "GIT_COMMIT_TAG", "HISTORY_TAG", "LOCK_TIMEOUT_S", "MODEL_ARTIFACT", "OWNER_TAG", "SHA_TAG", "STATE_TAG", "Log",
    "NoRegistry", "checkpoint_sha256", "dataset_inputs", "evaluation_params", "flatten_params", "git_info",
    "is_configuration", "lineage", "list_versions", "load_config", "promote", "read_json", "recorded_fingerprint",
    "recover", "register", "registered_name", "registry_lock", "rollback", "split_evaluation", "sqlite_path",
]
