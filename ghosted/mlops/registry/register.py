"""`register`: one MLflow run and (unless the checkpoint already is one) one new version per pruned checkpoint.

The steps, in order: read and check the inputs (the metrics are the checkpoint's own and of one protocol:
provenance.py) and apply the gate (`prepare`, no MLflow yet); under the lock,
recover what dead registers left and stop if this checkpoint's content is already a version; create the run
(owned by this process) and log params, metrics, dataset inputs, the pyfunc model and the metrics files; under
the lock again, create the version with its gate and decision tags (`registration=pending`), move the alias,
then mark it `done`; last, the reports. A crash between any two steps leaves what `recovery.recover` repairs.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ghosted.mlops.registry.faults as faults
from ghosted.errors import GhostedError
from ghosted.evaluation.gate import Verdict, apply_gate
from ghosted.io import temp_dir
from ghosted.json_io import read_json as bounded_json
from ghosted.mlops.registry.champion import champion, decide, description, set_champion
from ghosted.mlops.registry.connection import (
    DB_TIMEOUT_S,
    Client,
    connect,
    experiment_id,
    find_model,
    mlflow_errors,
    model_versions,
    registry_lock,
)
from ghosted.mlops.registry.evaluation import dataset_inputs, evaluation_params, read_json, split_evaluation
from ghosted.mlops.registry.names import (
    DECISION_TAG,
    FINGERPRINT_TAG,
    GGUF_REASON_TAG,
    GGUF_TAG,
    GIT_COMMIT_TAG,
    MODEL_ARTIFACT,
    OWNER_TAG,
    PROTOCOL_TAG,
    PROVENANCE_TAG,
    SHA_TAG,
    STATE_TAG,
    Log,
    check_name,
    checkpoint_sha256,
    flatten_params,
    git_info,
    heal_metrics,
    heal_params,
    lineage,
    nolog,
    param_key,
    registered_name,
)
from ghosted.mlops.registry.provenance import Checked, check
from ghosted.mlops.registry.recovery import owner, recover

if TYPE_CHECKING:
    from ghosted.config import GateConfig, RegistryConfig


@dataclass(frozen=True)
class Submission:
    """What one register logs, read and computed before MLflow is touched."""

    checkpoint: Path
    pruned_metrics: Path
    dense_metrics: Path
    meta: dict
    dense: dict
    pruned: dict
    table: dict | None
    verdict: Verdict
    name: str
    sha: str
    run_tags: dict[str, str]
    version_tags: dict[str, str]
    params: dict[str, str]
    metrics: dict[str, float]
    provenance: Checked


def _read_meta(checkpoint: Path) -> dict:
    """The `ghosted` block of a checkpoint's config.json (read here: importing the checkpoint package costs torch)."""
    cfg = checkpoint / "config.json"
    if not cfg.is_file():
        raise GhostedError(f"{checkpoint} has no config.json")
    try:
        meta = bounded_json(cfg, "model config", expect=dict).get("ghosted") or {}
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
        raise GhostedError(f"{cfg}: not a valid config.json ({exc})") from exc
    return meta if isinstance(meta, dict) else {}


def _provenance_tags(checked: Checked) -> dict[str, str]:
    """The evaluations' protocol (what the champion rule compares), or the warning tag of metrics without one."""
    if checked.protocol_sha256 is None:
        return {PROVENANCE_TAG: "missing"}
    return {PROVENANCE_TAG: "checked", PROTOCOL_TAG: checked.protocol_sha256}


def _gguf_tags(meta: dict) -> dict[str, str]:
    """What `ghosted export --gguf` writes for this checkpoint: `gguf` = the llama.cpp architecture, or "no" with
    `gguf_reason`."""
    from ghosted.checkpoint.gguf import gguf_form

    form, why = gguf_form(meta)
    return {GGUF_TAG: form} if form else {GGUF_TAG: "no", GGUF_REASON_TAG: (why or "no GGUF form")[:4000]}


def _version_tags(meta: dict, git: dict[str, str], sha: str, verdict: Verdict, gate: GateConfig,
                  checked: Checked) -> dict[str, str]:
    """Lineage, the tree's state, the content hash, the GGUF form, the protocol and the gate's verdict with its
    numbers."""
    return {**lineage(meta), **{k: v for k, v in git.items() if k != GIT_COMMIT_TAG}, SHA_TAG: sha,
            **_gguf_tags(meta), **_provenance_tags(checked),
            "gate": "pass" if verdict.passed else "fail", "rank_by": gate.rank_by,
            **({"rank_value": repr(verdict.rank_value)} if verdict.rank_value is not None else {}),
            **({"retained_acc": repr(verdict.retained_acc)} if verdict.retained_acc is not None else {}),
            **{f"ppl_ratio.{param_key(s)}": repr(r) for s, r in verdict.ppl_ratio.items()},
            **({"gate_reason": verdict.reason[:4000]} if not verdict.passed else {})}


def _run_params(meta: dict, gate: GateConfig, dense: dict, pruned: dict) -> dict[str, str]:
    """The checkpoint's settings (its heal recipe as heal.*), the gate's thresholds and the evaluations'
    configuration."""
    return {**flatten_params({k: v for k, v in meta.items() if k not in ("ghosts", "folded", "heal", "healed")}),
            **heal_params(meta), "num_ghosts": str(len(meta.get("ghosts") or [])),
            **flatten_params(asdict(gate), "gate."), **evaluation_params(dense, pruned)}


def _run_metrics(meta: dict, dense: dict, pruned: dict, verdict: Verdict) -> dict[str, float]:
    """The evaluations' measurements, what healing did and the gate's ratios."""
    return {**split_evaluation(dense, "dense")[0], **split_evaluation(pruned, "pruned")[0], **heal_metrics(meta),
            "gate/pass": float(verdict.passed),
            **{f"gate/ppl_ratio/{param_key(s)}": r for s, r in verdict.ppl_ratio.items() if math.isfinite(r)},
            **({"gate/retained_acc": verdict.retained_acc} if verdict.retained_acc is not None else {})}


def prepare(checkpoint: Path, pruned_metrics: Path, dense_metrics: Path, gate: GateConfig, reg: RegistryConfig,
            scores: Path | None = None, log: Log = nolog) -> Submission:
    """Verify the checkpoint (its content hash comes with the verdict), read and check the other inputs (the
    metrics' provenance included), apply the gate: a one-line error on bad input."""
    from ghosted.checkpoint.verify import verified

    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        raise GhostedError(f"checkpoint folder not found: {checkpoint}")
    log(f"verifying {checkpoint}")
    sha = verified(checkpoint).sha256  # a checkpoint `ghosted verify` refuses is never registered
    meta = _read_meta(checkpoint)
    if not meta.get("base_fingerprint"):
        raise GhostedError(f"{checkpoint}/config.json has no `ghosted` block: register a folder written by "
                           "`ghosted prune` or `ghosted fuse`")
    dense, pruned = read_json(dense_metrics, "dense metrics"), read_json(pruned_metrics, "pruned metrics")
    table = read_json(scores, "scores") if scores is not None else None
    verdict = apply_gate(dense, pruned, gate)
    name = check_name(reg.name or registered_name(meta["base_model"]))
    checked = check(checkpoint, sha, meta, Path(pruned_metrics), pruned, Path(dense_metrics), dense)
    if checked.warning:
        log(f"warning: {checked.warning}")
    git = git_info()
    return Submission(checkpoint, pruned_metrics, dense_metrics, meta, dense, pruned, table, verdict, name, sha,
                      run_tags={**lineage(meta), **git, **_provenance_tags(checked)},
                      version_tags=_version_tags(meta, git, sha, verdict, gate, checked),
                      params=_run_params(meta, gate, dense, pruned), metrics=_run_metrics(meta, dense, pruned, verdict),
                      provenance=checked)


def _result(name: str, version: str, run_id: str, verdict: Verdict, **extra: Any) -> dict:
    return {"name": name, "version": version, "run_id": run_id, "gate": "pass" if verdict.passed else "fail",
            "reasons": list(verdict.reasons), "ppl_ratio": verdict.ppl_ratio, "retained_acc": verdict.retained_acc,
            **extra}


def _write_reports(sub: Submission, gate: GateConfig, reports: Path, result: dict) -> None:
    from ghosted.reporting.pipeline_report import write_reports

    write_reports(reports, sub.meta, sub.dense, sub.pruned, sub.table, sub.verdict, gate, result)


def _find_checkpoint(client: Client, name: str, sha: str):
    """The version of `name` whose checkpoint has this sha256, or None."""
    if find_model(client, name) is None:
        return None
    return next((v for v in model_versions(client, name) if v.tags.get(SHA_TAG) == sha), None)


def _already(sub: Submission, v, current: str | None, gate: GateConfig, reg: RegistryConfig,
             reports: Path | None) -> dict:
    """The result (and reports) of a checkpoint that already is version `v`: nothing registered."""
    res = _result(sub.name, str(v.version), v.run_id or "", sub.verdict, registered=False,
                  duplicate_of=str(v.version), recorded_gate=v.tags.get("gate", "-"), champion_moved=False,
                  champion=current,
                  decision=f"already registered as version {v.version}: nothing registered, champion "
                           f"{'version ' + current if current else 'none'} unchanged",
                  checkpoint_sha256=sub.sha, protocol_sha256=sub.provenance.protocol_sha256,
                  provenance_warning=sub.provenance.warning, tracking_uri=reg.tracking_uri)
    if reports is not None:
        _write_reports(sub, gate, reports, res)
    return res


def _log_run(client: Client, run_id: str, sub: Submission, log: Log) -> None:
    """Params and metrics (in MLflow's batch limits), dataset inputs, the pyfunc model and both metrics files."""
    from mlflow.entities import Metric, Param

    from ghosted.mlops.serving import RUN_KEY, SHA_KEY, checkpoint_path, save_pyfunc

    now = int(time.time() * 1000)
    params_list = [Param(k, v) for k, v in sub.params.items()]
    metrics_list = [Metric(k, v, now, 0) for k, v in sub.metrics.items()]
    for i in range(0, max(len(params_list), len(metrics_list)), 100):  # MLflow batch limits
        client.log_batch(run_id, metrics=metrics_list[i:i + 100], params=params_list[i:i + 100])
    client.log_inputs(run_id, datasets=dataset_inputs(sub.meta, sub.dense, sub.pruned, log))
    log(f"logging {sub.checkpoint} as an MLflow pyfunc model to run {run_id}")
    with temp_dir(tempfile.gettempdir(), "ghosted-register") as tmp:  # marked: a killed run's is swept
        model_dir = save_pyfunc(sub.checkpoint, Path(tmp) / MODEL_ARTIFACT,
                                {SHA_TAG: sub.sha, "registered_name": sub.name}, {SHA_KEY: sub.sha, RUN_KEY: run_id})
        copied = checkpoint_sha256(model_dir / checkpoint_path(model_dir / "MLmodel"))
        if copied != sub.sha:  # the folder changed after it was verified: log only what was verified
            raise GhostedError(f"{sub.checkpoint} changed while it was being registered (sha256 {sub.sha[:12]} when "
                               f"verified, {copied[:12]} when copied): nothing registered; run again")
        client.log_artifacts(run_id, str(model_dir), MODEL_ARTIFACT)
    for p in (sub.dense_metrics, sub.pruned_metrics):
        client.log_artifact(run_id, str(p), "metrics")


def _new_version(client: Client, run, sub: Submission) -> tuple[str, bool, str, str | None]:
    """(version, alias moved?, decision, champion before) of a new version of the run's model. Under the lock."""
    name, meta = sub.name, sub.meta
    if find_model(client, name) is None:
        client.create_registered_model(name, description=f"ghosted checkpoints of {meta['base_model']}")
    current = champion(client, name)
    moved, decision = decide(client, name, sub.version_tags, current)
    # Gate and decision tags go in with the version (one transaction), the alias moves after: a crash
    # in between leaves a `pending` version that the next register completes.
    mv = client.create_model_version(
        name, source=f"{run.info.artifact_uri}/{MODEL_ARTIFACT}", run_id=run.info.run_id,
        tags={**sub.version_tags, DECISION_TAG: decision[:4000], STATE_TAG: "pending"},
        description=description(sub.version_tags, decision))
    version = str(mv.version)
    faults.point("version-created")
    if moved:
        set_champion(client, name, version, "gate")
        faults.point("alias-moved")
    client.set_registered_model_tag(name, FINGERPRINT_TAG, meta["base_fingerprint"])
    client.set_registered_model_tag(name, "base_model", str(meta["base_model"]))
    client.set_model_version_tag(name, version, STATE_TAG, "done")
    return version, moved, decision, current


def _record(client: Client, run, sub: Submission, gate: GateConfig, reg: RegistryConfig, reports: Path | None,
            log: Log) -> dict:
    """Fill the run, register its version (unless a concurrent register took this checkpoint), write the reports."""
    run_id = run.info.run_id
    _log_run(client, run_id, sub, log)
    with registry_lock(reg):
        existing = _find_checkpoint(client, sub.name, sub.sha)  # registered by a concurrent register meanwhile
        if existing is not None:
            client.set_tag(run_id, "duplicate_of", f"{sub.name}/{existing.version}")
            client.set_terminated(run_id)
            return _already(sub, existing, champion(client, sub.name), gate, reg, reports)
        version, moved, decision, current = _new_version(client, run, sub)
    result = _result(sub.name, version, run_id, sub.verdict, registered=True, champion_moved=moved,
                     champion=version if moved else current,
                     decision=f"version {version} is the {decision}" if moved else decision,
                     checkpoint_sha256=sub.sha, protocol_sha256=sub.provenance.protocol_sha256,
                     provenance_warning=sub.provenance.warning, tracking_uri=reg.tracking_uri)
    if reports is not None:
        _write_reports(sub, gate, reports, result)
        client.log_artifacts(run_id, str(reports), "reports")
    client.set_terminated(run_id)
    return result


def register(checkpoint: Path, pruned_metrics: Path, dense_metrics: Path, gate: GateConfig, reg: RegistryConfig,
             scores: Path | None = None, reports: Path | None = None, log: Log = nolog,
             db_timeout: float = DB_TIMEOUT_S) -> dict:
    """Log the run and the pyfunc model, register a new version unless this checkpoint already is one, apply the
    gate, maybe move the champion. The result's `registered` says whether a version was created."""
    sub = prepare(checkpoint, pruned_metrics, dense_metrics, gate, reg, scores, log)
    client = connect(reg, create=True, db_timeout=db_timeout)
    with mlflow_errors(reg):
        exp_id = experiment_id(client, reg)
        with registry_lock(reg):
            recover(client, exp_id, sub.name, log)
            existing = _find_checkpoint(client, sub.name, sub.sha)
            if existing is not None:
                return _already(sub, existing, champion(client, sub.name), gate, reg, reports)
        run = client.create_run(exp_id, run_name=f"{sub.name}-r{len(sub.meta.get('removed_layers') or [])}-"
                                                  f"{sub.meta.get('recovery')}",
                                tags={**sub.run_tags, SHA_TAG: sub.sha, OWNER_TAG: owner()})
        faults.point("run-created")
        try:
            return _record(client, run, sub, gate, reg, reports, log)
        except BaseException:
            try:
                client.set_terminated(run.info.run_id, status="FAILED")
            except Exception:  # noqa: BLE001 - the original error matters more; the next register marks it
                pass
            raise
