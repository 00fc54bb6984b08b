"""ghosted search: the most layers whose pruned model passes the gate (see ghosted/solve/search.py)."""

from __future__ import annotations

import argparse
import json

from ghosted.cli.common import calib_args, load_options, log, logger, model_args, out_args, search_params
from ghosted.cli.options import add_options


def cmd_search(args: argparse.Namespace) -> int:
    from ghosted.api import search
    from ghosted.reporting.search_report import SEARCH_JSON

    params = search_params(args)
    doc = search(args.model, params, args.out, calibration=args.calib, force=args.force, progress=not args.quiet,
                 log=logger(args), **load_options(args))
    log(args, f"{doc['message']}; {doc['full_evaluations']} full evaluations, {doc['wall_seconds']:.0f}s; "
              f"wrote {args.out / SEARCH_JSON}")
    chosen = doc["chosen"]
    print(json.dumps({"out": str(args.out), "chosen": None if chosen is None else
                      {k: chosen[k] for k in ("k", "removed", "recovery", "checkpoint")},
                      "message": doc["message"], "full_evaluations": doc["full_evaluations"],
                      "wall_seconds": round(doc["wall_seconds"], 1)}))
    return 0 if chosen is not None else 1  # nothing passed: the report is written, but there is no model to use


def add_parser(sub) -> None:
    from ghosted.config import SearchConfig

    p = sub.add_parser(
        "search", help="find the most layers whose pruned model passes the gate (writes search.json + checkpoint)",
        description="Screen pruning plans (one or two cuts, ghost recovery) by held-out calibration loss from one "
                    "shared calibration pass, then binary-search the number of removed layers with full "
                    "evaluations (the eval: section) judged by the gate: section. Writes OUT/search.json, "
                    "OUT/search.md, OUT/frontier.png and the chosen model in OUT/checkpoint. Exit status 1 "
                    "(with search.json saying chosen: null) when no plan in the range passes.")
    model_args(p)
    calib_args(p)
    add_options(p, SearchConfig, group="search")
    out_args(p, "output folder (search.json, report, checkpoint), written atomically as prune's --out")
    p.set_defaults(func=cmd_search)
