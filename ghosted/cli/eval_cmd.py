"""eval (one model: perplexity, zero-shot, efficiency) and compare (a pruning grid against the dense model)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ghosted.cli.common import (
    calib_args,
    calib_settings,
    command_line,
    eval_settings,
    load_options,
    logger,
    model_args,
    params_file,
    quiet_libraries,
    write_json,
)
from ghosted.cli.options import add_options
from ghosted.errors import GhostedError
from ghosted.json_io import read_json


def _eval_args(p: argparse.ArgumentParser, seq_len: bool) -> None:
    from ghosted.config import EvalSettings

    add_options(p, EvalSettings, group="evaluation", skip=() if seq_len else ("seq_len",))


def _efficiency_settings(args: argparse.Namespace):
    """EfficiencySettings from defaults < the `efficiency:` section of --config < flags."""
    from ghosted.config import EfficiencySettings, resolve

    return resolve(EfficiencySettings, "efficiency", params_file(args).raw.get("efficiency"), vars(args))


# --------------------------------------------------------------------------- eval


def cmd_eval(args: argparse.Namespace) -> int:
    with quiet_libraries(args):
        return _eval(args)


def _eval(args: argparse.Namespace) -> int:
    from ghosted.api import evaluate
    from ghosted.checkpoint.verify import checked_model

    for model in (args.model, args.baseline):  # a checkpoint is verified before any of its files is read
        if model is not None:
            checked_model(model)
    t0 = time.perf_counter()
    settings = eval_settings(args)
    want_eff = args.efficiency or args.baseline is not None
    result = evaluate(args.model, settings, efficiency=_efficiency_settings(args) if want_eff else None,
                      baseline=args.baseline, dtype=args.dtype, device=args.device,
                      device_map=getattr(args, "device_map", None), progress=not args.quiet, log=logger(args))
    result["command"] = command_line(args, "eval")
    result["seconds"] = time.perf_counter() - t0
    if args.out:
        write_json(args.out, result)
    summary = {"out": str(args.out) if args.out else None, "model": result["model"],
               "ppl": {s: v["ppl"] for s, v in result["ppl"].items()},
               "zeroshot_average": result["zeroshot"]["average"]["acc_norm"] if result["zeroshot"] else None,
               "seconds": round(result["seconds"], 1)}
    if "efficiency" in result and "ratios" in result["efficiency"]:
        summary["efficiency_ratios"] = result["efficiency"]["ratios"]
    print(json.dumps(summary if args.out else result, default=float))
    return 0


# --------------------------------------------------------------------------- compare


def compare_config(args: argparse.Namespace):
    """CompareConfig from CLI > YAML (`prune:`, `eval:`, `calibration:`) > defaults."""
    from ghosted.config import CompareConfig, PruneConfig, parse_ks, resolve

    yaml_prune = params_file(args).raw.get("prune", {})
    template = {k: v for k, v in yaml_prune.items() if k not in ("remove", "layers", "recovery")}
    prune = resolve(PruneConfig, "prune", {**template, "remove": 1}, vars(args), only=("select",))
    # The perplexity windows are as long as the calibration windows unless the YAML `eval:` says otherwise.
    settings = eval_settings(args, seq_len=calib_settings(args).seq_len)
    return CompareConfig(ks=parse_ks(args.remove), methods=args.recovery, prune=prune,
                         evaluation=settings)


def cmd_compare(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from ghosted.api import compare

    cfg = compare_config(args)
    params = params_file(args)
    if not args.calib:
        params = replace(params, calibration=calib_settings(args))
    with quiet_libraries(args):
        result = compare(args.model, cfg, args.out_dir, params=params, calibration=args.calib, merge=args.merge,
                         record={"command": command_line(args, "compare")}, progress=not args.quiet,
                         log=logger(args), **load_options(args))
    print(json.dumps({"out_dir": str(args.out_dir), "cells": len(result["cells"]),
                      "failed": sum(1 for c in result["cells"] if c.get("error")),
                      "wall_seconds": round(result["wall_seconds"], 1)}))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from ghosted.reporting.compare_report import write_report

    src = args.out_dir / "compare.json"
    if not src.is_file():
        raise GhostedError(f"{src} not found: write it with `ghosted compare ... --out-dir {args.out_dir}`")
    result = read_json(src, "compare result", fix="rerun `ghosted compare`")
    if not isinstance(result, dict) or not isinstance(result.get("cells"), list):
        raise GhostedError(f"{src} is not a compare result (no list of cells): rerun `ghosted compare`")
    paths = write_report(result, args.out_dir)
    print(json.dumps({"out_dir": str(args.out_dir), "files": [p.name for p in paths]}))
    return 0


# --------------------------------------------------------------------------- parsers


def add_parser(sub) -> None:
    from ghosted.config import CompareConfig, EfficiencySettings, PruneConfig

    p = sub.add_parser("eval", help="perplexity, zero-shot accuracy and (optionally) efficiency of one model",
                       description="Evaluate MODEL (dense, or a pruned folder written by `ghosted prune`): "
                                   "perplexity on text sources, zero-shot accuracy through lm-eval, and with "
                                   "--efficiency size, latency, throughput and peak memory.")
    model_args(p, layerwise=False)
    _eval_args(p, seq_len=True)
    e = p.add_argument_group("efficiency")
    e.add_argument("--efficiency", action="store_true",
                   help="also measure parameters, checkpoint size, prefill latency, decode tokens/s at batch 1 "
                        "and 8, and peak memory (in a fresh process per model)")
    e.add_argument("--baseline", help="dense model to measure in the same run for pruned/dense ratios "
                                      "(implies --efficiency)")
    add_options(p, EfficiencySettings, groups={"efficiency": e}, group="efficiency")
    p.add_argument("--out", type=Path, help="write the results JSON here (atomically); without it, print it")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("compare", help="grid of layers removed x recovery method vs the dense model, with a report",
                       description="One shared calibration pass, then for each number of removed layers and each "
                                   "recovery method: solve, evaluate the pruned model in memory, and write "
                                   "compare.json, compare.md and plots to --out-dir.")
    model_args(p)
    calib_args(p)  # --seq-len here sets both the calibration and the perplexity windows
    groups = add_options(p, CompareConfig)
    add_options(p, PruneConfig, only=("select",), groups=groups, into="grid")
    _eval_args(p, seq_len=False)
    p.add_argument("--out-dir", type=Path, required=True, help="report folder (compare.json, compare.md, *.png)")
    p.add_argument("--merge", type=Path, default=None, metavar="COMPARE_JSON",
                   help="an earlier compare.json with the same model, calibration and evaluation settings: keep "
                        "its dense model and cells, run only the cells it lacks (e.g. a new --recovery)")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("report", help="regenerate compare.md and the plots from a compare.json",
                       description="Rewrite compare.md and the PNG plots in OUT_DIR from OUT_DIR/compare.json "
                                   "(written by `ghosted compare`), without re-running anything.")
    p.add_argument("out_dir", type=Path, help="folder holding compare.json")
    p.set_defaults(func=cmd_report)
