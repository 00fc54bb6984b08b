"""prune, calibrate, score, solve, fuse."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ghosted.cli.common import (
    calib_args,
    calib_settings,
    load_options,
    log,
    logger,
    model_args,
    out_args,
    params_file,
    prune_config,
    search_params,
    write_json,
)
from ghosted.cli.options import add_options
from ghosted.errors import GhostedError


def _prune_args(p: argparse.ArgumentParser) -> None:
    from ghosted.config import PruneConfig

    add_options(p, PruneConfig, group="recovery")


def _loaded(args: argparse.Namespace):
    from ghosted.api import open_model

    return open_model(args.model, log=logger(args), **load_options(args))


def _calibration(args: argparse.Namespace, loaded):
    from ghosted.api import calibration_for

    return calibration_for(loaded, None if args.calib else calib_settings(args), args.calib)


def _run_params(args: argparse.Namespace, **sections):
    """The --config params with the sections the flags resolved (calibration unless a --calib folder is given)."""
    from dataclasses import replace

    if not getattr(args, "calib", None):
        sections.setdefault("calibration", calib_settings(args))
    return replace(params_file(args), **sections)


# --------------------------------------------------------------------------- commands


def cmd_prune(args: argparse.Namespace) -> int:
    from ghosted.api import prune
    from ghosted.io_owned import check_out_file

    t0 = time.perf_counter()
    cfg = prune_config(args)
    check_out_file(args.summary, "--summary")
    res = prune(args.model, _run_params(args, prune=cfg), args.out, calibration=args.calib, force=args.force,
                progress=not args.quiet, log=logger(args), **load_options(args))
    summary = {"out": str(args.out), "removed_layers": res.removed_layers, "num_layers": res.num_layers,
               "recovery": res.recovery, "ridge": res.meta["ridge"], "guard": res.meta["guard"],
               "calibration_relative_residual": res.meta["calibration_relative_residual"],
               "params": res.params, "params_dense": res.params_dense,
               "ratio": None if res.params_ratio is None else round(res.params_ratio, 4),
               "seconds": round(time.perf_counter() - t0, 1)}
    if args.summary:
        write_json(args.summary, {**summary, "solve": res.meta})
    size = f", {res.params:,} parameters ({summary['ratio']}x the dense {res.params_dense:,})" if res.params_ratio else ""
    log(args, f"wrote {args.out}: {res.num_layers} layers, recovery {res.recovery}, {res.ghosts} ghost(s){size}, "
              f"{summary['seconds']}s")
    print(json.dumps(summary, default=float))
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from ghosted.checks import check_seq_len
    from ghosted.corpora import build_calibration, save_calibration
    from ghosted.io_owned import check_out_dir
    from ghosted.models import load_tokenizer

    c = calib_settings(args)
    check_out_dir(args.out, args.force)
    tok, config = load_tokenizer(args.model)
    check_seq_len(config, c.seq_len)
    calib = build_calibration(tok, c.source, c.n, c.seq_len, c.seed)
    save_calibration(calib, args.out, force=args.force)
    print(json.dumps({"out": str(args.out), "n": calib.n, "seq_len": calib.seq_len, "sha256": calib.sha256}))
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from ghosted.io_owned import check_out_file
    from ghosted.solve.solver import score

    check_out_file(args.out, "--out")
    loaded = _loaded(args)
    calib = _calibration(args, loaded)
    table = score(loaded, calib, args.remove, progress=not args.quiet)
    print(format_scores(table))
    if args.out:
        write_json(args.out, table)
    return 0


def format_scores(table: dict) -> str:
    lines = [f"per layer i (BI = 1 - cos(h_i, h_i+1)), {table['tokens']} tokens", "layer      BI  angular"]
    for i, (bi, ang) in enumerate(zip(table["layers"]["bi"], table["layers"]["angular"])):
        lines.append(f"{i:5d} {bi:7.4f} {ang:8.4f}")
    if "blocks" in table:
        k = table["k"]
        best = min(range(len(table["blocks"]["angular"])), key=lambda s: table["blocks"]["angular"][s])
        lines.append(f"\nper block of {k} layers starting at s (removes s..s+{k - 1})")
        lines.append("start angular  cosine")
        for s, (a, c) in enumerate(zip(table["blocks"]["angular"], table["blocks"]["cosine"])):
            lines.append(f"{s:5d} {a:7.4f} {c:7.4f}" + ("  <- angular pick" if s == best else ""))
    return "\n".join(lines)


def cmd_solve(args: argparse.Namespace) -> int:
    from ghosted.api import refuse_ghost_model
    from ghosted.io_owned import check_out_dir
    from ghosted.solve.solver import save_solution, solve

    searching = params_file(args).search.enabled and args.remove is None and args.layers is None
    if searching:
        params = search_params(args)  # every section checked before the model loads
        if params.search.heal:
            raise GhostedError("search.heal heals checkpoints and the solve stage writes operators: turn it off and "
                               "use heal.enabled (the pipeline's heal stage after fuse)")
    else:
        cfg = prune_config(args)
    check_out_dir(args.out, args.force)
    refuse_ghost_model(args.model)
    loaded = _loaded(args)
    calib = _calibration(args, loaded)
    if searching:
        sol, also = _searched_solution(args, loaded, calib, params)
    else:
        sol, also = solve(loaded, calib, cfg, progress=not args.quiet, log=logger(args)), None
    sol.meta = sol.meta.updated(calibration_sha256=calib.sha256)
    save_solution(sol, args.out, force=args.force, also=also)
    print(json.dumps({"out": str(args.out), "removed_layers": sol.removed, "ridge": sol.meta.ridge,
                      "guard": sol.meta.guard.to_dict()}, default=float))
    return 0


def _searched_solution(args: argparse.Namespace, loaded, calib, params):
    """search.enabled in --config: the plan `ghosted search` chooses (the most layers that pass the gate), and a
    writer that puts its report (search.json, search.md, frontier.png) next to the operators."""
    from ghosted.api import prune_template
    from ghosted.reporting.search_report import write_report_files
    from ghosted.solve.search import run_search

    log(args, "search.enabled: searching for the most layers that pass the gate (prune.remove is not used)")
    outcome = run_search(loaded, calib, prune_template(params), params.search, params.eval, params.gate,
                         progress=not args.quiet, log=logger(args))
    doc = outcome.doc
    if outcome.chosen is None or not doc["chosen"]["passed"]:
        raise GhostedError(f"search: {doc['message']}; nothing to fuse or register (widen search.min_remove/"
                           "max_remove, loosen search.target or relax the gate)")
    log(args, f"search: {doc['message']} ({doc['full_evaluations']} full evaluations)")
    outcome.chosen.meta = outcome.chosen.meta.updated(
        search={"chosen_k": doc["chosen"]["k"], "full_evaluations": doc["full_evaluations"]})
    return outcome.chosen, lambda folder: write_report_files(doc, folder)


def cmd_fuse(args: argparse.Namespace) -> int:
    from ghosted.api import refuse_ghost_model
    from ghosted.checks import check_solution
    from ghosted.io_owned import check_out_dir
    from ghosted.solve.solver import build_checkpoint, load_solution

    sol = load_solution(args.ops)
    check_out_dir(args.out, args.force)
    refuse_ghost_model(args.model)
    loaded = _loaded(args)
    check_solution(sol, loaded.model, args.ops)
    meta = build_checkpoint(loaded, sol, sol.meta.to_dict().get("calibration_sha256", ""), args.out, force=args.force)
    print(json.dumps({"out": str(args.out), "num_layers": meta.num_layers, "ghosts": len(meta.ghost_list)}))
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("prune", help="remove layers, fit the recovery, save a checkpoint",
                       description="Remove layers from MODEL, fit one recovery operator per cut on calibration "
                                   "data, and save a Hugging Face checkpoint to --out.")
    model_args(p)
    calib_args(p)
    _prune_args(p)
    p.add_argument("--out", type=Path, required=True, help="output checkpoint folder (written atomically)")
    p.add_argument("--summary", type=Path, help="also write the run summary JSON here")
    p.add_argument("--force", action="store_true", help="replace --out if it is an earlier ghosted output "
                   "(a folder ghosted did not write is never replaced)")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("calibrate", help="build and save the calibration windows")
    p.add_argument("model", help="model whose tokenizer is used")
    p.add_argument("--config", type=Path, help="YAML file with a `calibration:` section")
    calib_args(p)
    out_args(p, "output folder (tokens.safetensors + calibration.json)")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("score", help="per-layer and per-block selection scores")
    model_args(p)
    calib_args(p)
    p.add_argument("--remove", type=int, help="also score every contiguous block of this many layers")
    p.add_argument("--out", type=Path, help="write the table as JSON")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("solve", help="choose the layers and fit the operators (no checkpoint)")
    model_args(p)
    calib_args(p)
    _prune_args(p)
    out_args(p, "output folder (operators.safetensors + plan.json)")
    p.set_defaults(func=cmd_solve)

    p = sub.add_parser("fuse", help="apply a solved plan to the model and save the checkpoint")
    model_args(p)
    p.add_argument("--ops", type=Path, required=True, help="folder written by `ghosted solve`")
    out_args(p, "output checkpoint folder")
    p.set_defaults(func=cmd_fuse)
