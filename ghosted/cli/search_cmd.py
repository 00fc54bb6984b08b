"""ghosted search: the most layers whose pruned model passes the gate, or the best plan within a --target budget
(see ghosted/solve/search.py)."""

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
    keys = ("k", "removed", "recovery", "checkpoint", "passed", "reasons", "budget")
    print(json.dumps({"out": str(args.out), "target": doc["target"],
                      "chosen": None if chosen is None else {k: chosen[k] for k in keys},
                      "message": doc["message"], "full_evaluations": doc["full_evaluations"],
                      "wall_seconds": round(doc["wall_seconds"], 1)}))
    # nothing passed (or the target's plan fails the gate): the report is written, but no model to ship
    return 0 if chosen is not None and chosen["passed"] else 1


def add_parser(sub) -> None:
    from ghosted.config import SearchConfig

    p = sub.add_parser(
        "search", help="find the most layers whose pruned model passes the gate, or the best plan within a "
                       "--target budget (writes search.json + checkpoint)",
        description="Screen pruning plans (one or two cuts, ghost recovery) by held-out calibration loss from one "
                    "shared calibration pass, then binary-search the number of removed layers with full "
                    "evaluations (the eval: section) judged by the gate: section. With --target params=N | "
                    "speedup=X | memory=MB: the fewest layers whose removal meets the budget, and the best of its "
                    "plans that meet it, judged by the gate all the same. Writes OUT/search.json, OUT/search.md, "
                    "OUT/frontier.png and the chosen model in OUT/checkpoint. Exit status 1 when no plan in the "
                    "range passes (search.json says chosen: null, no checkpoint) or when the target's plan fails "
                    "the gate (its checkpoint is written, chosen.passed false with the reasons).")
    model_args(p)
    calib_args(p)
    add_options(p, SearchConfig, group="search")
    out_args(p, "output folder (search.json, report, checkpoint), written atomically as prune's --out")
    p.set_defaults(func=cmd_search)
