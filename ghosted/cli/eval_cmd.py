"""eval (one model: perplexity, zero-shot, efficiency) and compare (a pruning grid against the dense model)."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import shlex
import time
from collections.abc import Iterator
from pathlib import Path

from ghosted.cli.prune_cmd import (
    _calib_args,
    _calibration,
    _load,
    _log,
    _model_args,
    _write_json,
    calib_settings,
    params_file,
)
from ghosted.errors import GhostedError

# CLI flag -> EvalSettings field (None-defaulted so the YAML `eval:` section can fill in; CLI wins).
EVAL_FLAGS = ("tasks", "ppl", "limit", "ppl_windows", "batch_size")


def _eval_args(p: argparse.ArgumentParser, seq_len: bool) -> None:
    from ghosted.config import PPL_SOURCES_HELP, default
    from ghosted.config import EvalSettings as E

    g = p.add_argument_group("evaluation")
    g.add_argument("--tasks", help=f"zero-shot tasks, comma-separated (default: {default(E, 'tasks')}; "
                                   "'none' for no zero-shot)")
    g.add_argument("--limit", type=int, help="first N items of each task (default: all)")
    g.add_argument("--ppl", help=f"perplexity sources, comma-separated: {PPL_SOURCES_HELP} "
                                 f"(default {default(E, 'ppl')}; 'none' to skip)")
    g.add_argument("--ppl-windows", type=int, help=f"windows per perplexity source (default {default(E, 'ppl_windows')})")
    if seq_len:
        g.add_argument("--seq-len", type=int, help=f"tokens per perplexity window (default {default(E, 'seq_len')})")
    g.add_argument("--batch-size", type=int,
                   help=f"sequences per forward pass in evaluation (default {default(E, 'batch_size')})")


def eval_settings(args: argparse.Namespace, seq_len: int | None = None):
    """EvalSettings from defaults < the `eval:` section of --config < CLI flags."""
    from ghosted.config import EvalSettings, build

    merged = dict(params_file(args).raw.get("eval", {}))
    if seq_len is not None and "seq_len" not in merged:
        merged["seq_len"] = seq_len
    for flag in (*EVAL_FLAGS, "seq_len"):
        v = getattr(args, flag, None)
        if v is not None:
            merged[flag] = v
    return build(EvalSettings, merged, "eval")


def _command_line(args: argparse.Namespace, name: str, positional: str = "model") -> str:
    """The command as parsed (every flag given or defaulted, in parser order): enough to rerun it."""
    parts = ["ghosted", name, str(getattr(args, positional))]
    for key, value in vars(args).items():
        if key in (positional, "func", "command", "efficiency_worker") or value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        parts += [flag] if value is True else [flag, str(value)]
    return shlex.join(parts)


@contextlib.contextmanager
def _quiet_libraries(args: argparse.Namespace) -> Iterator[None]:
    """--quiet: no progress bars or info logs from the libraries either (errors still show); restored after."""
    if not getattr(args, "quiet", False):
        yield
        return
    import datasets
    from transformers.utils import logging as hf_logging

    saved = (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled(), datasets.is_progress_bar_enabled(),
             {n: logging.getLogger(n).level for n in ("lm_eval", "datasets")})
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()
    for name in saved[3]:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        yield
    finally:
        hf_logging.set_verbosity(saved[0])
        if saved[1]:
            hf_logging.enable_progress_bar()
        if saved[2]:
            datasets.enable_progress_bars()
        for name, level in saved[3].items():
            logging.getLogger(name).setLevel(level)


# --------------------------------------------------------------------------- eval


def _efficiency_settings(args: argparse.Namespace):
    from ghosted.config import EfficiencySettings

    given = {k: getattr(args, k) for k in ("prompt_len", "new_tokens", "repeats") if getattr(args, k) is not None}
    if args.efficiency_batch_sizes is not None:
        try:
            given["batch_sizes"] = tuple(int(x) for x in args.efficiency_batch_sizes.split(","))
        except ValueError as exc:
            raise GhostedError(f"--efficiency-batch-sizes takes e.g. 1,8, got '{args.efficiency_batch_sizes}'") from exc
    return EfficiencySettings(**given)


def cmd_eval(args: argparse.Namespace) -> int:
    with _quiet_libraries(args):
        return _eval(args)


def _eval(args: argparse.Namespace) -> int:
    from ghosted.evaluate.run import evaluate_model

    t0 = time.perf_counter()
    if args.efficiency_worker:
        return _efficiency_worker(args)
    settings = eval_settings(args)
    want_eff = args.efficiency or args.baseline is not None
    eff = _efficiency_settings(args) if want_eff else None
    if settings.ppl:  # fail before the (long) efficiency runs, not after
        from ghosted.checks import check_seq_len
        from ghosted.models import load_tokenizer

        check_seq_len(load_tokenizer(args.model)[1], settings.seq_len)
    result = evaluate_model(args.model, settings, dtype=args.dtype, device=args.device,
                            device_map=getattr(args, "device_map", None), efficiency=eff, baseline=args.baseline,
                            progress=not args.quiet, log=lambda m: _log(args, m))
    result["command"] = _command_line(args, "eval")
    result["seconds"] = time.perf_counter() - t0
    if args.out:
        _write_json(args.out, result)
    summary = {"out": str(args.out) if args.out else None, "model": result["model"],
               "ppl": {s: v["ppl"] for s, v in result["ppl"].items()},
               "zeroshot_average": result["zeroshot"]["average"]["acc_norm"] if result["zeroshot"] else None,
               "seconds": round(result["seconds"], 1)}
    if "efficiency" in result and "ratios" in result["efficiency"]:
        summary["efficiency_ratios"] = result["efficiency"]["ratios"]
    print(json.dumps(summary if args.out else result, default=float))
    return 0


def _efficiency_worker(args: argparse.Namespace) -> int:
    """Hidden: measure this one model in this (fresh) process and write the JSON (see evaluate.run.measure_isolated)."""
    from ghosted.evaluate.run import measure_loaded

    if args.out is None:
        raise GhostedError("--efficiency-worker needs --out")
    _write_json(args.out, measure_loaded(_load(args), _efficiency_settings(args)))
    return 0


# --------------------------------------------------------------------------- compare


def compare_config(args: argparse.Namespace):
    """CompareConfig from CLI > YAML (`prune:`, `eval:`, `calibration:`) > defaults."""
    from ghosted.config import PruneConfig, build, parse_names
    from ghosted.solve.compare import CompareConfig, parse_ks

    yaml_prune = params_file(args).raw.get("prune", {})
    template = {k: v for k, v in yaml_prune.items() if k not in ("remove", "layers", "recovery")}
    if args.select is not None:
        template["select"] = args.select
    ks = parse_ks(args.remove)
    methods = parse_names(args.recovery) or ()
    # The perplexity windows are as long as the calibration windows unless the YAML `eval:` says otherwise.
    settings = eval_settings(args, seq_len=calib_settings(args).seq_len)
    return CompareConfig(ks=ks, methods=methods, prune=build(PruneConfig, {**template, "remove": 1}, "prune"),
                         evaluation=settings)


def cmd_compare(args: argparse.Namespace) -> int:
    from ghosted.reporting.compare_report import write_report
    from ghosted.solve.compare import run_compare

    t0 = time.perf_counter()
    cfg = compare_config(args)
    if args.out_dir.exists() and not args.out_dir.is_dir():
        raise GhostedError(f"--out-dir {args.out_dir} exists and is not a folder")
    with _quiet_libraries(args):
        loaded = _load(args)
        calib = _calibration(args, loaded)
        partial = args.out_dir / "compare.partial.json"
        result = run_compare(loaded, calib, cfg, progress=not args.quiet, log=lambda m: _log(args, m),
                             partial_path=partial, merge=args.merge)
    result["command"] = _command_line(args, "compare")
    result["wall_seconds"] = time.perf_counter() - t0
    try:
        paths = write_report(result, args.out_dir)
    except Exception:  # never lose a long run to a plotting problem: keep the numbers, then fail
        _write_json(args.out_dir / "compare.json", result)
        raise
    partial.unlink(missing_ok=True)
    _log(args, f"wrote {', '.join(str(p) for p in paths)} in {result['wall_seconds']:.0f}s")
    print(json.dumps({"out_dir": str(args.out_dir), "cells": len(result["cells"]),
                      "failed": sum(1 for c in result["cells"] if c.get("error")),
                      "wall_seconds": round(result["wall_seconds"], 1)}))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from ghosted.reporting.compare_report import write_report

    src = args.out_dir / "compare.json"
    if not src.is_file():
        raise GhostedError(f"{src} not found: write it with `ghosted compare ... --out-dir {args.out_dir}`")
    try:
        result = json.loads(src.read_text())
    except json.JSONDecodeError as exc:
        raise GhostedError(f"{src} is not valid JSON ({exc.msg})") from exc
    if not isinstance(result, dict) or not isinstance(result.get("cells"), list):
        raise GhostedError(f"{src} is not a compare result (no list of cells): rerun `ghosted compare`")
    paths = write_report(result, args.out_dir)
    print(json.dumps({"out_dir": str(args.out_dir), "files": [p.name for p in paths]}))
    return 0


# --------------------------------------------------------------------------- parsers


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="perplexity, zero-shot accuracy and (optionally) efficiency of one model",
                       description="Evaluate MODEL (dense, or a pruned folder written by `ghosted prune`): "
                                   "perplexity on text sources, zero-shot accuracy through lm-eval, and with "
                                   "--efficiency size, latency, throughput and peak memory.")
    _model_args(p, layerwise=False)
    _eval_args(p, seq_len=True)
    e = p.add_argument_group("efficiency")
    e.add_argument("--efficiency", action="store_true",
                   help="also measure parameters, checkpoint size, prefill latency, decode tokens/s at batch 1 "
                        "and 8, and peak memory (in a fresh process per model)")
    e.add_argument("--baseline", help="dense model to measure in the same run for pruned/dense ratios "
                                      "(implies --efficiency)")
    from ghosted.config import EfficiencySettings as F
    from ghosted.config import default

    e.add_argument("--prompt-len", type=int, help=f"prompt tokens for the timings (default {default(F, 'prompt_len')})")
    e.add_argument("--new-tokens", type=int, help=f"generated tokens for decode speed (default {default(F, 'new_tokens')})")
    e.add_argument("--repeats", type=int, help=f"timed runs per measurement, median kept (default {default(F, 'repeats')})")
    e.add_argument("--efficiency-batch-sizes", help=argparse.SUPPRESS)  # default 1,8; smaller in tests
    e.add_argument("--efficiency-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help="write the results JSON here (atomically); without it, print it")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("compare", help="grid of layers removed x recovery method vs the dense model, with a report",
                       description="One shared calibration pass, then for each number of removed layers and each "
                                   "recovery method: solve, evaluate the pruned model in memory, and write "
                                   "compare.json, compare.md and plots to --out-dir.")
    _model_args(p)
    _calib_args(p)  # --seq-len here sets both the calibration and the perplexity windows
    g = p.add_argument_group("grid")
    g.add_argument("--remove", required=True, help="numbers of layers to remove, e.g. 6,9")
    g.add_argument("--recovery", default="none,linearpatch,replaceme,ghost",
                   help="recovery methods, comma-separated (default none,linearpatch,replaceme,ghost)")
    g.add_argument("--select", help="selection metric: angular (default), bi, cosine, ppl, ghost")
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
