"""ghosted search: the most layers whose pruned model passes the gate (see ghosted/search.py)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ghosted.cli.prune_cmd import (
    _calib_args,
    _calibration,
    _check_out,
    _load,
    _log,
    _model_args,
    _refuse_ghost_model,
    params_file,
)
from ghosted.errors import GhostedError

# CLI flag -> SearchConfig field (None-defaulted so the YAML `search:` section can fill in; CLI wins).
SEARCH_FLAGS = ("min_remove", "max_remove", "shortlist", "split_shortlist", "max_cuts", "finalists", "distill")


def search_settings(args: argparse.Namespace):
    """(prune template, SearchConfig, EvalSettings, GateConfig) from defaults < --config sections < flags."""
    from ghosted.cli.eval_cmd import eval_settings
    from ghosted.config import PruneConfig, build, merged

    params = params_file(args)
    template = {k: v for k, v in params.raw.get("prune", {}).items() if k not in ("remove", "layers")}
    prune = build(PruneConfig, {**template, "remove": 1}, "prune")  # each plan sets its own layers
    search = merged(params.search, {f: getattr(args, f, None) for f in SEARCH_FLAGS}, "search")
    evaluation = eval_settings(args)
    if not evaluation.ppl and not evaluation.tasks:
        raise GhostedError("search needs an evaluation for the gate: the eval: section has no ppl and no tasks")
    return prune, search, evaluation, params.gate


def cmd_search(args: argparse.Namespace) -> int:
    from ghosted.solve.search import SEARCH_JSON, run_search, write_search

    t0 = time.perf_counter()
    prune, search, evaluation, gate = search_settings(args)
    _check_out(args.out, args.force)
    _refuse_ghost_model(args.model)
    loaded = _load(args)
    calib = _calibration(args, loaded)
    _log(args, f"calibration: {calib.n} x {calib.seq_len} tokens from {calib.source} (sha256 {calib.sha256[:12]})")
    outcome = run_search(loaded, calib, prune, search, evaluation, gate, progress=not args.quiet,
                         log=lambda m: _log(args, m))
    outcome.doc["wall_seconds"] = time.perf_counter() - t0
    write_search(loaded, calib, outcome, args.out, force=args.force)
    doc = outcome.doc
    _log(args, f"{doc['message']}; {doc['full_evaluations']} full evaluations, {doc['wall_seconds']:.0f}s; "
               f"wrote {args.out / SEARCH_JSON}")
    chosen = doc["chosen"]
    print(json.dumps({"out": str(args.out), "chosen": None if chosen is None else
                      {k: chosen[k] for k in ("k", "removed", "recovery", "checkpoint")},
                      "message": doc["message"], "full_evaluations": doc["full_evaluations"],
                      "wall_seconds": round(doc["wall_seconds"], 1)}))
    return 0 if chosen is not None else 1  # nothing passed: the report is written, but there is no model to use


def add_parser(sub) -> None:
    from ghosted.config import SearchConfig as S
    from ghosted.config import default

    p = sub.add_parser(
        "search", help="find the most layers whose pruned model passes the gate (writes search.json + checkpoint)",
        description="Screen pruning plans (one or two cuts, ghost recovery) by held-out calibration loss from one "
                    "shared calibration pass, then binary-search the number of removed layers with full "
                    "evaluations (the eval: section) judged by the gate: section. Writes OUT/search.json, "
                    "OUT/search.md, OUT/frontier.png and the chosen model in OUT/checkpoint. Exit status 1 "
                    "(with search.json saying chosen: null) when no plan in the range passes.")
    _model_args(p)
    _calib_args(p)
    g = p.add_argument_group("search")
    g.add_argument("--min-remove", type=int, help="smallest number of layers searched (default: a fifth of them)")
    g.add_argument("--max-remove", type=int, help="largest number of layers searched (default: half of them)")
    g.add_argument("--shortlist", type=int, help=f"single blocks screened per k (default {default(S, 'shortlist')})")
    g.add_argument("--split-shortlist", type=int,
                   help=f"two-cut plans screened per k (default {default(S, 'split_shortlist')})")
    g.add_argument("--max-cuts", type=int, help=f"1: contiguous blocks only (default {default(S, 'max_cuts')})")
    g.add_argument("--finalists", type=int,
                   help=f"screened plans per k evaluated in full, best first, until one passes "
                        f"(default {default(S, 'finalists')})")
    g.add_argument("--distill", type=int, metavar="STEPS",
                   help="also distill each evaluated plan's ghosts this many steps and report both rows (default 0)")
    p.add_argument("--out", type=Path, required=True, help="output folder (search.json, report, checkpoint)")
    p.add_argument("--force", action="store_true", help="replace an existing ghosted output folder")
    p.set_defaults(func=cmd_search)
