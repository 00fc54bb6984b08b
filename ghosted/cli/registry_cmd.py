"""register, registry list | promote | rollback: thin wrappers over ghosted.mlops.registry (MLflow)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path


def _tracking_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="params file whose `gate:` and `registry:` sections apply")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else "
                                          "registry.tracking_uri of --config, else sqlite:///mlflow.db in the "
                                          "current folder)")
    from ghosted.mlops.registry import DB_TIMEOUT_S

    p.add_argument("--db-timeout", type=_seconds, default=None, metavar="S",
                   help=f"retry a SQLite database locked by another process for S seconds (default {DB_TIMEOUT_S:g})")


def _seconds(text: str) -> float:
    import math

    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not (math.isfinite(v) and v >= 0):
        raise argparse.ArgumentTypeError(f"expected a finite number of seconds >= 0, got {text!r}")
    return v


def _timeout(args: argparse.Namespace) -> dict:
    return {} if args.db_timeout is None else {"db_timeout": args.db_timeout}


def _quiet_mlflow() -> None:
    # MLflow and alembic announce every database migration on INFO, and MLflow draws a progress bar for every
    # local artifact copy: keep the CLI's output to its results. MLflow sets its loggers up on import.
    import os

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        import mlflow  # noqa: F401
    except ImportError:
        pass
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _config(args: argparse.Namespace):
    """(gate, registry) settings: --tracking-uri, else MLFLOW_TRACKING_URI, else the params file's, else the default."""
    import os

    from ghosted.mlops.registry.settings import load_config

    _quiet_mlflow()
    return load_config(args.config, args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or None)


def _gate_text(res: dict) -> str:
    return f"gate {res['gate']}" + (f" ({'; '.join(res['reasons'])})" if res["reasons"] else "")


def cmd_register(args: argparse.Namespace) -> int:
    import sys

    from ghosted.config import RegistryConfig, load_params
    from ghosted.evaluation.gate import apply_gate
    from ghosted.mlops.dvc import registration_skipped
    from ghosted.mlops.registry import read_json, register

    gate, reg = _config(args)
    if args.name is not None:  # --name= (empty) is refused by RegistryConfig, not ignored
        reg = RegistryConfig(reg.tracking_uri, reg.experiment, args.name)
    switch = load_params(args.config).registry  # registry.register / .experiments (load_config keeps the URI)
    dense, pruned = read_json(args.dense_metrics, "dense metrics"), read_json(args.metrics, "pruned metrics")
    verdict = apply_gate(dense, pruned, gate)
    why = registration_skipped(switch, verdict.passed, args.register)
    if why is None:
        res = register(args.checkpoint, args.metrics, args.dense_metrics, gate, reg, scores=args.scores,
                       reports=args.reports,
                       log=lambda m: None if args.quiet else print(m, file=sys.stderr, flush=True), **_timeout(args))
    else:
        res = _reports_only(args, gate, reg, verdict, dense, pruned, why)
    if args.compact_metrics:
        _write_compact(args, gate, verdict, dense, pruned)
    if not args.quiet:
        if why is not None:
            print(f"{res['name']}: no new version: {_gate_text(res)}; {res['decision']}", file=sys.stderr)
        elif res["registered"]:
            print(f"{res['name']} version {res['version']}: {_gate_text(res)}; {res['decision']}", file=sys.stderr)
        else:
            champ = f"version {res['champion']}" if res["champion"] else "none"
            print(f"{res['name']}: this checkpoint (sha256 {res['checkpoint_sha256'][:12]}) is already version "
                  f"{res['version']}; not registered again.\n"
                  f"  {_gate_text(res)} on these metrics; version {res['version']} was registered with gate "
                  f"{res['recorded_gate']}; champion: {champ} (unchanged)", file=sys.stderr)
    print(json.dumps(res, default=float))
    return 0


def _reports_only(args: argparse.Namespace, gate, reg, verdict, dense: dict, pruned: dict, why: str) -> dict:
    """The register stage without a registration: the same reports, nothing written to MLflow."""
    import sys

    from ghosted.checkpoint.meta import read_meta
    from ghosted.checkpoint.verify import verified
    from ghosted.errors import GhostedError
    from ghosted.mlops.registry import read_json, registered_name
    from ghosted.mlops.registry.provenance import check
    from ghosted.reporting.pipeline_report import write_reports

    if not Path(args.checkpoint).is_dir():
        raise GhostedError(f"checkpoint folder not found: {args.checkpoint}")
    sha = verified(args.checkpoint).sha256  # the same refusals as a registration
    meta = read_meta(args.checkpoint).to_dict()  # the `ghosted` block as written, as `register` reads it
    checked = check(Path(args.checkpoint), sha, meta, Path(args.metrics), pruned,
                    Path(args.dense_metrics), dense)  # the same refusals as a registration
    if checked.warning and not args.quiet:
        print(f"warning: {checked.warning}", file=sys.stderr)
    res = {"name": reg.name or registered_name(str(meta.get("base_model"))), "version": None, "run_id": None,
           "gate": "pass" if verdict.passed else "fail", "reasons": list(verdict.reasons),
           "ppl_ratio": verdict.ppl_ratio, "retained_acc": verdict.retained_acc, "champion_moved": False,
           "champion": None, "decision": f"not registered: {why}", "tracking_uri": reg.tracking_uri,
           "registered": False, "protocol_sha256": checked.protocol_sha256, "provenance_warning": checked.warning}
    if args.reports:
        table = read_json(args.scores, "scores") if args.scores is not None else None
        shown = {**res, "version": "(not registered)", "run_id": "-", "champion": None}
        write_reports(args.reports, meta, dense, pruned, table, verdict, gate, shown)
    return res


def _write_compact(args: argparse.Namespace, gate, verdict, dense: dict, pruned: dict) -> None:
    from ghosted.io import write_json_atomic
    from ghosted.mlops.dvc import compact_metrics

    write_json_atomic(args.compact_metrics, compact_metrics(dense, pruned, verdict, gate.acc_metric))


def _table(rows: list[dict]) -> str:
    head = ("NAME", "VERSION", "CREATED", "GATE", "PPL RATIO", "RETAINED", "REMOVED", "METHOD", "CHAMPION")
    body = [(r["name"], r["version"], r["created"], r["gate"],
             "-" if r["rank_value"] is None else f"{r['rank_value']:.4f} ({r['rank_by']})",
             "-" if r["retained_acc"] is None else f"{r['retained_acc']:.4f}",
             r["removed_layers"] or "-", f"{r['method'] or '-'}{' healed' if r['healed'] else ''}",
             "*" if r["champion"] else "") for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip() for line in (head, *body)]
    fails = [f"  v{r['version']} ({r['name']}): {r['gate_reason']}" for r in rows if r["gate"] == "fail"]
    return "\n".join(lines + (["", "gate failures:", *fails] if fails else []))


def cmd_list(args: argparse.Namespace) -> int:
    from ghosted.mlops.registry import list_versions

    _, reg = _config(args)
    rows = list_versions(reg, args.name, **_timeout(args))
    print(json.dumps(rows, default=float, indent=2) if args.json else (_table(rows) if rows else "no versions"))
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    from ghosted.mlops.registry import promote

    _, reg = _config(args)
    res = promote(reg, args.name, args.version, **_timeout(args))
    if res["changed"]:
        print(f"{args.name}: champion is now version {res['champion']} (was {res['previous'] or 'none'}; "
              f"gate {res['gate']})")
    else:
        print(f"{args.name}: version {res['champion']} is already the champion")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    from ghosted.mlops.registry import rollback

    _, reg = _config(args)
    res = rollback(reg, args.name, **_timeout(args))
    print(f"{args.name}: champion rolled back from version {res['previous']} to version {res['champion']}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("register", help="log a pruned checkpoint to MLflow, register it, apply the gate",
                       description="Log an MLflow run for CKPT_DIR (params from its `ghosted` block, metrics from the "
                                   "two evaluation JSONs, the checkpoint as an MLflow pyfunc model that generates "
                                   "text), register it as a new version of ghosted-<base model>, and move the "
                                   "`champion` alias to it if it passes the gate and beats the champion (a champion "
                                   "measured on another evaluation protocol is not compared). A checkpoint "
                                   "whose content is already a version is not registered again (the command names "
                                   "the version and still reports the gate). Refused: pruned metrics that are not "
                                   "this checkpoint's own evaluation, dense metrics of another base model, and a "
                                   "dense/pruned pair measured on different protocols.")
    p.add_argument("checkpoint", type=Path, metavar="CKPT_DIR", help="folder written by `ghosted prune` or `fuse`")
    p.add_argument("--metrics", type=Path, required=True, help="`ghosted eval` results of the pruned checkpoint")
    p.add_argument("--dense-metrics", type=Path, required=True, help="`ghosted eval` results of the dense base model")
    p.add_argument("--scores", type=Path, help="`ghosted score` table: adds per-layer plots to the reports")
    p.add_argument("--reports", type=Path, help="write gate.json, plots and summary.md here and log them to the run")
    p.add_argument("--name", help="registered model name (default: ghosted-<base model>)")
    p.add_argument("--register", choices=("true", "false", "on_pass"),
                   help="register a version: always, never (reports only) or if the gate passes "
                        "(default: registry.register of --config, else true)")
    p.add_argument("--compact-metrics", type=Path, metavar="JSON",
                   help="also write the decisive numbers here (the pipeline's `dvc metrics show` file)")
    p.add_argument("-q", "--quiet", action="store_true", help="print only the JSON result")
    _tracking_args(p)
    p.set_defaults(func=cmd_register)

    r = sub.add_parser("registry", help="list versions, promote one, roll the champion back",
                       description="The MLflow model registry of ghosted checkpoints.")
    rs = r.add_subparsers(dest="registry_command", metavar="ACTION")
    rs.required = True
    p = rs.add_parser("list", help="versions with their gate verdict; * marks the champion")
    p.add_argument("--name", help="only this registered model")
    p.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    _tracking_args(p)
    p.set_defaults(func=cmd_list)
    p = rs.add_parser("promote", help="make VERSION the champion by hand (the gate is not consulted)")
    p.add_argument("name", metavar="NAME")
    p.add_argument("version", metavar="VERSION")
    _tracking_args(p)
    p.set_defaults(func=cmd_promote)
    p = rs.add_parser("rollback", help="give the champion alias back to the previous champion")
    p.add_argument("name", metavar="NAME")
    _tracking_args(p)
    p.set_defaults(func=cmd_rollback)
