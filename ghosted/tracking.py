"""Experiment tracking, the quality gate and the model registry: the one module that talks to MLflow.

`register` logs one MLflow run per pruned checkpoint (params: the checkpoint's `ghosted` block and the
evaluation settings; metrics: the dense and pruned evaluation JSONs and the gate's ratios; artifacts: the
checkpoint folder, both metrics files and the reports), registers the checkpoint folder as a new version
of the registered model `ghosted-<base model>`, tags that version with its lineage, and applies the gate:

- gate (thresholds from the `gate:` section of params.yaml; a threshold set to null skips its check, a
  check whose numbers are missing fails):
    * every perplexity source in both files: pruned PPL / dense PPL <= max_ppl_ratio;
    * retained accuracy = pruned zero-shot average / dense average (`acc_metric`) >= min_retained_acc;
- champion: a version that passes takes the `champion` alias when it is better than the current champion.
  Better means: no champion yet; or a different base-model fingerprint (a new base supersedes the old one:
  ratios against different dense models are not comparable); or, on the same base, a lower PPL ratio on
  `rank_by` (wiki by default), ties broken by higher retained accuracy;
- a version that fails records the reasons in its `gate_reason` tag and its description; nothing moves.

The registered model's tags hold `champion_history` (the versions that held the alias, oldest first;
`rollback` pops it) and `base_fingerprint`: the fingerprint of the last base model registered, whatever its
gate verdict. flows/recompress.py compares the current fingerprint against it.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from .config import DEFAULT_TRACKING_URI, GateConfig, RegistryConfig, load_params  # noqa: F401
from .errors import GhostedError

CHAMPION = "champion"
HISTORY_TAG = "champion_history"
FINGERPRINT_TAG = "base_fingerprint"

Log = Callable[[str], None]


def _nolog(_msg: str) -> None:
    pass


# --------------------------------------------------------------------------- settings


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


# --------------------------------------------------------------------------- the gate (pure)


def read_json(path: Path, what: str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise GhostedError(f"{what} file not found: {path}")
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise GhostedError(f"{path}: not valid JSON ({exc.msg}); write it with `ghosted eval --out`") from exc
    if not isinstance(doc, dict):
        raise GhostedError(f"{path}: expected a JSON object, as `ghosted eval --out` writes")
    return doc


def perplexities(results: Mapping[str, Any]) -> dict[str, float]:
    """{source: ppl} from a `ghosted eval` results JSON."""
    return {src: float(v["ppl"]) for src, v in (results.get("ppl") or {}).items()
            if isinstance(v, Mapping) and isinstance(v.get("ppl"), (int, float))}


def zeroshot_average(results: Mapping[str, Any], metric: str) -> float | None:
    avg = (results.get("zeroshot") or {}).get("average") or {}
    v = avg.get(metric)
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


@dataclass(frozen=True)
class Verdict:
    """The gate's decision and the numbers behind it."""

    passed: bool
    reasons: tuple[str, ...]
    ppl_ratio: dict[str, float]
    retained_acc: float | None
    rank_value: float | None  # ppl_ratio[rank_by]: lower is better

    @property
    def reason(self) -> str:
        return "; ".join(self.reasons)


def apply_gate(dense: Mapping[str, Any], pruned: Mapping[str, Any], cfg: GateConfig) -> Verdict:
    """Compare the pruned model's evaluation with the dense one's under the thresholds in cfg."""
    dp, pp = perplexities(dense), perplexities(pruned)
    ratios = {s: pp[s] / dp[s] for s in dp if s in pp and dp[s] > 0}
    reasons: list[str] = []
    if cfg.max_ppl_ratio is not None:
        if not ratios:
            reasons.append("no perplexity source in both metrics files")
        for s, r in ratios.items():
            if not r <= cfg.max_ppl_ratio:  # also catches nan
                reasons.append(f"{s} perplexity ratio {r:.3f} > max_ppl_ratio {cfg.max_ppl_ratio}")
    da, pa = zeroshot_average(dense, cfg.acc_metric), zeroshot_average(pruned, cfg.acc_metric)
    retained = pa / da if da and pa is not None else None
    if cfg.min_retained_acc is not None:
        if retained is None:
            reasons.append(f"no zero-shot average {cfg.acc_metric} in both metrics files")
        elif not retained >= cfg.min_retained_acc:
            reasons.append(f"retained accuracy {retained:.3f} < min_retained_acc {cfg.min_retained_acc}")
    rank = ratios.get(cfg.rank_by)
    if rank is None:
        reasons.append(f"no {cfg.rank_by} perplexity in both metrics files to rank by (gate.rank_by)")
    return Verdict(not reasons, tuple(reasons), ratios, retained, rank)


def gate_report(verdict: Verdict, cfg: GateConfig, dense: Mapping[str, Any], pruned: Mapping[str, Any]) -> dict:
    """gate.json: the verdict and the headline numbers (one compact row in `dvc metrics show`)."""
    def headline(doc: Mapping[str, Any]) -> dict:
        return {"ppl": perplexities(doc), cfg.acc_metric: zeroshot_average(doc, cfg.acc_metric)}

    return {"passed": verdict.passed, "ppl_ratio": verdict.ppl_ratio,
            "retained_acc": verdict.retained_acc, "dense": headline(dense), "pruned": headline(pruned),
            "rank_by": cfg.rank_by, "rank_value": verdict.rank_value,
            "thresholds": {"max_ppl_ratio": cfg.max_ppl_ratio, "min_retained_acc": cfg.min_retained_acc,
                           "acc_metric": cfg.acc_metric},
            "reasons": list(verdict.reasons)}


def beats(candidate: Mapping[str, str], champion: Mapping[str, str] | None) -> tuple[bool, str]:
    """Whether a gate-passing version should take the alias from the champion; both as version tags."""
    if champion is None:
        return True, "first version to pass the gate"
    if candidate.get(FINGERPRINT_TAG) != champion.get(FINGERPRINT_TAG):
        return True, "new base model (fingerprint differs from the champion's)"
    if candidate.get("rank_by") != champion.get("rank_by") or "rank_value" not in champion:
        return True, "the champion was not ranked by the same perplexity source"
    rank_by = candidate["rank_by"]
    c, h = float(candidate["rank_value"]), float(champion["rank_value"])
    if c < h:
        return True, f"lower {rank_by} PPL ratio ({c:.4f} < {h:.4f})"
    ca, ha = _float(candidate.get("retained_acc")), _float(champion.get("retained_acc"))
    if c == h and ca is not None and (ha is None or ca > ha):
        return True, f"same {rank_by} PPL ratio, higher retained accuracy ({ca:.4f})"
    return False, f"not better than the champion: {rank_by} PPL ratio {c:.4f} >= {h:.4f}"


def _float(v: str | None) -> float | None:
    try:
        return None if v is None else float(v)
    except ValueError:
        return None


# --------------------------------------------------------------------------- names, lineage, flattening


def registered_name(base_model: str) -> str:
    """ghosted-<base>: shipped name as is, a folder's last component, a hub id with / -> --."""
    ref = str(base_model).rstrip("/")
    if Path(ref).expanduser().exists() or ref.startswith((".", "/", "~")) or ref.count("/") > 1:
        ref = Path(ref).name
    ref = re.sub(r"[^A-Za-z0-9._-]+", "-", ref.replace("/", "--")).strip("-.") or "model"
    return f"ghosted-{ref}"


def git_info(cwd: Path | None = None) -> dict[str, str]:
    """The repo's commit (and whether the tree is dirty), if this runs inside a git checkout."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"git_commit": commit, "git_dirty": str(dirty).lower()}


def lineage(meta: Mapping[str, Any]) -> dict[str, str]:
    """Version tags that say where a checkpoint came from (from its config.json `ghosted` block)."""
    removed = meta.get("removed_layers") or []
    out = {"base_model": meta.get("base_model"), FINGERPRINT_TAG: meta.get("base_fingerprint"),
           "removed_layers": ",".join(str(i) for i in removed), "num_removed": len(removed),
           "num_layers": meta.get("num_layers"), "method": meta.get("recovery"),
           "calibration_sha256": meta.get("calibration_sha256"), "ridge": meta.get("ridge"),
           "token_policy": meta.get("token_policy"), "guard_fallback": (meta.get("guard") or {}).get("fallback"),
           "ghosted_version": meta.get("version")}
    return {k: str(v) for k, v in out.items() if v is not None}


def _key(part: Any) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(part)).strip("_") or "_"


def flatten_numbers(doc: Any, prefix: str) -> dict[str, float]:
    """Finite numeric leaves of a JSON document as {'prefix/a/b': x} (lists and strings skipped)."""
    out: dict[str, float] = {}
    if isinstance(doc, Mapping):
        for k, v in doc.items():
            out.update(flatten_numbers(v, f"{prefix}/{_key(k)}"))
    elif isinstance(doc, (int, float)) and not isinstance(doc, bool) and math.isfinite(doc):
        out[prefix] = float(doc)
    return out


def flatten_params(doc: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Scalar and list leaves of a settings block as MLflow params ('a.b' -> str)."""
    out: dict[str, str] = {}
    for k, v in doc.items():
        key = f"{prefix}{_key(k)}"
        if isinstance(v, Mapping):
            out.update(flatten_params(v, key + "."))
        elif isinstance(v, (list, tuple)):
            out[key] = json.dumps(v, default=str)[:500]
        elif v is not None:
            out[key] = str(v)[:500]
    return out


# --------------------------------------------------------------------------- reports (pure files)


def score_records(scores: Mapping[str, Any], removed: list[int]) -> tuple[list[dict], list[dict]]:
    """Per-layer and per-block rows for `dvc plots` (lists of records), from a `ghosted score` table."""
    layers = scores.get("layers") or {}
    rows = [{"layer": i, "bi": bi, "angular": ang, "removed": int(i in removed)}
            for i, (bi, ang) in enumerate(zip(layers.get("bi", []), layers.get("angular", [])))]
    blocks = scores.get("blocks") or {}
    brows = [{"start": s, "angular": a, "cosine": c}
             for s, (a, c) in enumerate(zip(blocks.get("angular", []), blocks.get("cosine", [])))]
    return rows, brows


def plot_layer_scores(rows: list[dict], title: str, path: Path) -> None:
    """Per-layer BI and angular distance with the removed layers shaded (PNG, Agg canvas, no pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8.0, 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    xs = [r["layer"] for r in rows]
    ax.plot(xs, [r["bi"] for r in rows], marker=".", label="Block Influence 1 - cos(h_i, h_i+1)")
    ax.plot(xs, [r["angular"] for r in rows], marker=".", label="angular distance(h_i, h_i+1)")
    for r in rows:
        if r["removed"]:
            ax.axvspan(r["layer"] - 0.5, r["layer"] + 0.5, color="tab:red", alpha=0.12, linewidth=0)
    ax.set_xlabel("layer i (dense index; shaded: removed)")
    ax.set_ylabel("score (low = removable)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110, metadata={"Software": None})


def summary_markdown(meta: Mapping[str, Any], dense: Mapping, pruned: Mapping, verdict: Verdict, cfg: GateConfig,
                     registration: Mapping[str, Any], plots: list[str]) -> str:
    """summary.md: what was registered, the quality table and the gate and champion decisions."""
    dp, pp = perplexities(dense), perplexities(pruned)
    lines = [f"# {registration['name']} version {registration['version']}", "",
             "Generated by `ghosted register`; do not edit by hand.", "",
             f"- Base model: {meta.get('base_model')} ({meta.get('base_fingerprint')})",
             f"- Removed layers: {','.join(map(str, meta.get('removed_layers', [])))} of "
             f"{meta.get('num_layers_dense')} (recovery {meta.get('recovery')})",
             f"- Calibration sha256: {meta.get('calibration_sha256')}",
             f"- MLflow run: {registration['run_id']}", "",
             "| metric | dense | pruned | ratio |", "|---|---|---|---|"]
    for s in sorted(set(dp) | set(pp)):
        r = verdict.ppl_ratio.get(s)
        lines.append(f"| {Path(s).name if '/' in s else s} PPL | {_fmt(dp.get(s))} | {_fmt(pp.get(s))} | "
                     f"{_fmt(r)} |")
    da, pa = zeroshot_average(dense, cfg.acc_metric), zeroshot_average(pruned, cfg.acc_metric)
    if da is not None or pa is not None:
        lines.append(f"| zero-shot average {cfg.acc_metric} | {_fmt(da)} | {_fmt(pa)} | {_fmt(verdict.retained_acc)} |")
    lines += ["", f"Gate (max PPL ratio {cfg.max_ppl_ratio}, min retained accuracy {cfg.min_retained_acc}): "
              + ("**pass**" if verdict.passed else f"**fail**: {verdict.reason}"), "",
              f"Champion: {registration['decision']} (champion now: "
              f"{'version ' + str(registration['champion']) if registration['champion'] else 'none'})", ""]
    for p in plots:
        lines += [f"![{p}]({p})", ""]
    return "\n".join(lines)


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"


def write_reports(out_dir: Path, meta: Mapping[str, Any], dense: Mapping, pruned: Mapping, scores: Mapping | None,
                  verdict: Verdict, cfg: GateConfig, registration: Mapping[str, Any]) -> list[Path]:
    """gate.json, layer_scores.json, block_scores.json, layer_scores.png and summary.md, each written atomically."""
    import os
    import tempfile

    from .io import write_json_atomic, write_text_atomic

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "gate.json"]
    write_json_atomic(written[0], gate_report(verdict, cfg, dense, pruned))
    plots: list[str] = []
    if scores:
        rows, brows = score_records(scores, list(meta.get("removed_layers") or []))
        write_json_atomic(out_dir / "layer_scores.json", rows)
        write_json_atomic(out_dir / "block_scores.json", brows)
        fd, tmp = tempfile.mkstemp(prefix=".layer_scores.", suffix=".png", dir=out_dir)
        os.close(fd)
        try:
            plot_layer_scores(rows, f"{meta.get('base_model')}: selection scores, removed "
                                    f"{','.join(map(str, meta.get('removed_layers', [])))}", Path(tmp))
            os.replace(tmp, out_dir / "layer_scores.png")
        finally:
            Path(tmp).unlink(missing_ok=True)
        plots.append("layer_scores.png")
        written += [out_dir / "layer_scores.json", out_dir / "block_scores.json", out_dir / "layer_scores.png"]
    write_text_atomic(out_dir / "summary.md", summary_markdown(meta, dense, pruned, verdict, cfg, registration, plots))
    written.append(out_dir / "summary.md")
    return written


# --------------------------------------------------------------------------- MLflow


def _client(cfg: RegistryConfig):
    try:
        from mlflow import MlflowClient
    except ImportError as exc:
        raise GhostedError("tracking needs MLflow: pip install -e '.[pipeline]'") from exc
    return MlflowClient(tracking_uri=cfg.tracking_uri, registry_uri=cfg.tracking_uri)


@contextmanager
def _mlflow_errors(cfg: RegistryConfig) -> Iterator[None]:
    """MLflow failures as one line naming the tracking URI."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as exc:
        msg = str(exc.message if hasattr(exc, "message") else exc).splitlines()[0][:300]
        raise GhostedError(f"MLflow at {cfg.tracking_uri}: {msg}") from exc


def _not_found(exc: Exception) -> bool:
    return getattr(exc, "error_code", "") == "RESOURCE_DOES_NOT_EXIST"


def _artifact_root(uri: str) -> str | None:
    """Artifacts of a SQLite store live beside the database, in mlruns/ (not in the cwd)."""
    if uri.startswith("sqlite:////"):
        return str(Path(uri[len("sqlite:///"):]).parent / "mlruns")
    return None


def _experiment_id(client, cfg: RegistryConfig) -> str:
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(cfg.experiment)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(cfg.experiment, artifact_location=_artifact_root(cfg.tracking_uri))
    except MlflowException:  # created concurrently
        exp = client.get_experiment_by_name(cfg.experiment)
        if exp is None:
            raise
        return exp.experiment_id


def _registered_model(client, name: str):
    """The registered model, or a one-line error listing the known names."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(name)
    except MlflowException as exc:
        if not _not_found(exc):
            raise
    known = sorted(m.name for m in client.search_registered_models())
    raise GhostedError(f"no registered model '{name}'; known: {', '.join(known) or 'none yet (run ghosted register)'}")


def _version(client, name: str, version: str | int):
    from mlflow.exceptions import MlflowException

    _registered_model(client, name)
    try:
        return client.get_model_version(name, str(version))
    except MlflowException as exc:
        if not _not_found(exc):
            raise
    versions = sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
    raise GhostedError(f"model '{name}' has no version {version}; versions: {', '.join(map(str, versions)) or 'none'}")


def _alias(model) -> str | None:
    v = model.aliases.get(CHAMPION)
    return None if v is None else str(v)


def _champion(client, name: str) -> str | None:
    return _alias(client.get_registered_model(name))


def _history(model) -> list[str]:
    return [v for v in (model.tags.get(HISTORY_TAG) or "").split(",") if v]


def _set_champion(client, name: str, version: str, how: str) -> None:
    """Move the alias and push the version on the history tag (last 200 kept)."""
    client.set_registered_model_alias(name, CHAMPION, version)
    hist = _history(client.get_registered_model(name)) + [str(version)]
    client.set_registered_model_tag(name, HISTORY_TAG, ",".join(hist[-200:]))
    client.set_model_version_tag(name, version, "champion_since", f"{_now()} ({how})")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def register(checkpoint: Path, pruned_metrics: Path, dense_metrics: Path, gate: GateConfig, reg: RegistryConfig,
             scores: Path | None = None, reports: Path | None = None, log: Log = _nolog) -> dict:
    """Log the run, register the checkpoint as a new version, apply the gate, maybe move the champion."""
    from .checkpoint import read_meta

    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        raise GhostedError(f"checkpoint folder not found: {checkpoint}")
    meta = read_meta(checkpoint)
    if not meta.get("base_fingerprint"):
        raise GhostedError(f"{checkpoint}/config.json has no `ghosted` block: register a folder written by "
                           "`ghosted prune` or `ghosted fuse`")
    dense, pruned = read_json(dense_metrics, "dense metrics"), read_json(pruned_metrics, "pruned metrics")
    table = read_json(scores, "scores") if scores is not None else None
    verdict = apply_gate(dense, pruned, gate)
    name = reg.name or registered_name(meta["base_model"])
    tags = {**lineage(meta), **git_info()}
    version_tags = {**tags, "gate": "pass" if verdict.passed else "fail", "rank_by": gate.rank_by,
                    **({"rank_value": repr(verdict.rank_value)} if verdict.rank_value is not None else {}),
                    **({"retained_acc": repr(verdict.retained_acc)} if verdict.retained_acc is not None else {}),
                    **{f"ppl_ratio.{_key(s)}": repr(r) for s, r in verdict.ppl_ratio.items()},
                    **({"gate_reason": verdict.reason[:4000]} if not verdict.passed else {})}
    params = {**flatten_params({k: v for k, v in meta.items() if k not in ("ghosts", "folded")}),
              "num_ghosts": str(len(meta.get("ghosts") or [])),
              **flatten_params(asdict(gate), "gate."), **flatten_params(pruned.get("settings") or {}, "eval.")}
    metrics = {**flatten_numbers(dense, "dense"), **flatten_numbers(pruned, "pruned"),
               "gate/pass": float(verdict.passed),
               **{f"gate/ppl_ratio/{_key(s)}": r for s, r in verdict.ppl_ratio.items() if math.isfinite(r)},
               **({"gate/retained_acc": verdict.retained_acc} if verdict.retained_acc is not None else {})}
    client = _client(reg)
    from mlflow.entities import Metric, Param

    with _mlflow_errors(reg):
        exp_id = _experiment_id(client, reg)
        run = client.create_run(exp_id, run_name=f"{name}-r{len(meta.get('removed_layers') or [])}-"
                                                  f"{meta.get('recovery')}", tags=tags)
        run_id = run.info.run_id
        try:
            now = int(time.time() * 1000)
            params_list = [Param(k, v) for k, v in params.items()]
            metrics_list = [Metric(k, v, now, 0) for k, v in metrics.items()]
            for i in range(0, max(len(params_list), len(metrics_list)), 100):  # MLflow batch limits
                client.log_batch(run_id, metrics=metrics_list[i:i + 100], params=params_list[i:i + 100])
            log(f"logging {checkpoint} to run {run_id}")
            client.log_artifacts(run_id, str(checkpoint), "checkpoint")
            for p in (dense_metrics, pruned_metrics):
                client.log_artifact(run_id, str(p), "metrics")
            try:
                client.get_registered_model(name)
            except Exception as exc:  # noqa: BLE001 - MlflowException; anything else re-raised below
                if not _not_found(exc):
                    raise
                client.create_registered_model(name, description=f"ghosted checkpoints of {meta['base_model']}")
            mv = client.create_model_version(name, source=f"{run.info.artifact_uri}/checkpoint", run_id=run_id,
                                             tags=version_tags)
            version = str(mv.version)
            current = _champion(client, name)
            if verdict.passed:
                champ_tags = client.get_model_version(name, current).tags if current else None
                moved, why = beats(version_tags, champ_tags)
                if moved:
                    _set_champion(client, name, version, "gate")
                    decision = f"version {version} is the new champion: {why}"
                else:
                    decision = f"champion stays version {current}: {why}"
            else:
                moved, decision = False, f"gate failed, champion unchanged: {verdict.reason}"
            client.set_model_version_tag(name, version, "champion_decision", decision[:4000])
            client.update_model_version(name, version, description=(
                f"gate {'passed' if verdict.passed else 'FAILED: ' + verdict.reason}. {decision}")[:4000])
            client.set_registered_model_tag(name, FINGERPRINT_TAG, meta["base_fingerprint"])
            client.set_registered_model_tag(name, "base_model", str(meta["base_model"]))
            result = {"name": name, "version": version, "run_id": run_id, "gate": "pass" if verdict.passed else "fail",
                      "reasons": list(verdict.reasons), "ppl_ratio": verdict.ppl_ratio,
                      "retained_acc": verdict.retained_acc, "champion_moved": moved,
                      "champion": version if moved else current, "decision": decision,
                      "tracking_uri": reg.tracking_uri}
            if reports is not None:
                write_reports(reports, meta, dense, pruned, table, verdict, gate, result)
                client.log_artifacts(run_id, str(reports), "reports")
            client.set_terminated(run_id)
        except BaseException:
            client.set_terminated(run_id, status="FAILED")
            raise
    return result


def recorded_fingerprint(reg: RegistryConfig, name: str) -> str | None:
    """The base fingerprint of the last version registered under `name` (None if nothing is)."""
    from mlflow.exceptions import MlflowException

    client = _client(reg)
    with _mlflow_errors(reg):
        try:
            return client.get_registered_model(name).tags.get(FINGERPRINT_TAG)
        except MlflowException as exc:
            if _not_found(exc):
                return None
            raise


def list_versions(reg: RegistryConfig, name: str | None = None) -> list[dict]:
    """Every version (of `name`, or of every registered model) with its gate verdict and numbers."""
    client = _client(reg)
    rows = []
    with _mlflow_errors(reg):
        models = [_registered_model(client, name)] if name else list(client.search_registered_models())
        for m in sorted(models, key=lambda m: m.name):
            champ = _alias(m)
            for v in sorted(client.search_model_versions(f"name='{m.name}'"), key=lambda v: int(v.version)):
                t = v.tags
                rows.append({"name": m.name, "version": str(v.version), "champion": str(v.version) == champ,
                             "gate": t.get("gate", "-"), "rank_by": t.get("rank_by"),
                             "rank_value": _float(t.get("rank_value")), "retained_acc": _float(t.get("retained_acc")),
                             "removed_layers": t.get("removed_layers"), "method": t.get("method"),
                             "base_fingerprint": t.get(FINGERPRINT_TAG), "gate_reason": t.get("gate_reason"),
                             "created": time.strftime("%Y-%m-%d %H:%M", time.localtime(v.creation_timestamp / 1000)),
                             "description": v.description})
    return rows


def promote(reg: RegistryConfig, name: str, version: str | int) -> dict:
    """Move the champion alias to a version by hand (the gate is not consulted; the tag says so)."""
    client = _client(reg)
    with _mlflow_errors(reg):
        v = _version(client, name, version)
        previous = _champion(client, name)
        if previous == str(v.version):
            return {"name": name, "champion": previous, "previous": previous, "changed": False}
        _set_champion(client, name, str(v.version), "promoted by hand")
        client.set_model_version_tag(name, str(v.version), "promoted", _now())
    return {"name": name, "champion": str(v.version), "previous": previous, "changed": True,
            "gate": v.tags.get("gate", "-")}


def rollback(reg: RegistryConfig, name: str) -> dict:
    """Give the champion alias back to the version that held it before the current one."""
    client = _client(reg)
    with _mlflow_errors(reg):
        model = _registered_model(client, name)
        current = _alias(model)
        if current is None:
            raise GhostedError(f"model '{name}' has no champion to roll back")
        hist = _history(model)
        while hist and hist[-1] == current:
            hist.pop()
        existing = {str(v.version) for v in client.search_model_versions(f"name='{name}'")}
        while hist and hist[-1] not in existing:  # skip deleted versions
            hist.pop()
        if not hist:
            raise GhostedError(f"model '{name}' has no earlier champion than version {current} to roll back to")
        previous = hist[-1]
        client.set_registered_model_alias(name, CHAMPION, previous)
        client.set_registered_model_tag(name, HISTORY_TAG, ",".join(hist))
        client.set_model_version_tag(name, current, "rolled_back", _now())
    return {"name": name, "champion": previous, "previous": current}
