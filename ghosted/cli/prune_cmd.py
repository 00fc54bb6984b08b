"""prune, calibrate, score, solve, fuse."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ghosted.errors import GhostedError
from ghosted.method.policies import help_text as policy_help

# CLI flag -> PruneConfig field (None-defaulted in argparse so YAML values can fill in; CLI wins).
PRUNE_FLAGS = ("remove", "layers", "select", "recovery", "ridge", "ridge_grid", "norm_features", "token_shift", "rank",
               "variant", "fold", "token_policy", "holdout", "guard", "shortlist", "batch_size", "distill", "distill_lr")
CALIB_FLAGS = {"calib_source": "source", "n_seqs": "n", "seq_len": "seq_len", "seed": "seed"}


def _model_args(p: argparse.ArgumentParser, layerwise: bool = True) -> None:
    p.add_argument("model", help="shipped name (smollm2-135m, gemma3-270m), local HF folder, .gguf file, or hub id")
    p.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or float16")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, ...")
    p.add_argument("--device-map", help="accelerate device map for models larger than one device, e.g. auto")
    if layerwise:
        p.add_argument("--layerwise", action="store_true",
                       help="keep the model in host memory; calibration passes move one decoder layer at a time to "
                            "--device and carry the calibration states forward (models larger than the device)")
        p.add_argument("--offload-budget", type=int, metavar="MiB",
                       help="with --layerwise: MiB of carried calibration states kept in host memory; the rest go "
                            "to files in a temporary folder, removed afterwards (default 4096)")
    p.add_argument("--config", type=Path, help="YAML file (e.g. params.yaml) whose sections set this command's defaults (calibration:, prune:, eval:)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def _calib_args(p: argparse.ArgumentParser) -> None:
    from ghosted.config import CalibrationConfig as C
    from ghosted.config import default

    g = p.add_argument_group("calibration")
    g.add_argument("--calib", type=Path, help="use this calibration folder (from `ghosted calibrate`)")
    g.add_argument("--calib-source", help=f"passages, wiki, ptb, ptb-train, a .txt/.jsonl file, hf:NAME:SPLIT:FIELD, or a "
                                          f"mixture A+B with an equal share of windows from each "
                                          f"(default {default(C, 'source')})")
    g.add_argument("--n-seqs", type=int, help=f"number of calibration sequences (default {default(C, 'n')})")
    g.add_argument("--seq-len", type=int, help=f"tokens per sequence (default {default(C, 'seq_len')})")
    g.add_argument("--seed", type=int, help=f"seed for the document shuffle (default {default(C, 'seed')})")


def _ridge_grid(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 1e-6,1e-2, got '{text}'") from None


def _prune_args(p: argparse.ArgumentParser) -> None:
    from ghosted.config import GUARDS, VARIANTS, default
    from ghosted.config import PruneConfig as P
    from ghosted.method.fold import FOLDS
    from ghosted.method.recovery import RECOVERY
    from ghosted.method.selection import SELECTION

    g = p.add_argument_group("what to remove")
    x = g.add_mutually_exclusive_group()
    x.add_argument("--remove", type=int, help="number of layers to remove (chosen by --select)")
    x.add_argument("--layers", help="explicit dense layer indices, e.g. 13-18 or 13,15,20")
    g.add_argument("--select", help=f"{', '.join(SELECTION.names())} (default {default(P, 'select')})")
    r = p.add_argument_group("recovery")
    r.add_argument("--recovery", help=f"{', '.join(RECOVERY.names())} (default {default(P, 'recovery')})")
    r.add_argument("--fold", help=f"foldable: auto (the guard picks), {', '.join(FOLDS)} "
                                  f"(default {default(P, 'fold')})")
    r.add_argument("--ridge", type=float, help="relative ridge (lambda = ridge * tr(X^T X)/d); default: chosen on "
                                               "held-out data from --ridge-grid")
    r.add_argument("--ridge-grid", type=_ridge_grid,
                   help=f"ridge values the guard tries (default {default(P, 'ridge_grid')})")
    r.add_argument("--norm-features", action="store_true", default=None,
                   help="ghost that also maps the scale-free state h/rms(h) (one more d x d matrix per cut)")
    r.add_argument("--token-shift", action="store_true", default=None,
                   help="with --norm-features: also map the previous token's scale-free state (one more d x d "
                        "matrix per cut; generation keeps one d-vector per token and cut on its cache)")
    r.add_argument("--rank", type=int, help="low-rank ghost I + U V^T of this rank")
    r.add_argument("--variant", help=f"LinearPatch variant: {', '.join(VARIANTS)} (default {default(P, 'variant')})")
    r.add_argument("--token-policy", help=policy_help())
    r.add_argument("--holdout", type=float, help=f"fraction of calibration windows held out "
                                                 f"(default {default(P, 'holdout')})")
    r.add_argument("--guard", help=f"held-out check: {', '.join(GUARDS)} (default {default(P, 'guard')})")
    r.add_argument("--shortlist", type=int, help=f"blocks the ghost selection compares by held-out loss "
                                                 f"(default {default(P, 'shortlist')})")
    r.add_argument("--batch-size", type=int, help=f"sequences per forward pass (default {default(P, 'batch_size')})")
    r.add_argument("--distill", type=int, metavar="STEPS",
                   help="after the training-free solve, train only the ghosts this many steps against the dense "
                        "model (kept only if the held-out loss drops; default 0: training-free)")
    r.add_argument("--distill-lr", type=float, help=f"distillation learning rate (default {default(P, 'distill_lr')})")


def params_file(args: argparse.Namespace):
    """The --config file as typed sections (all defaults without one): the one place the CLI reads YAML."""
    from ghosted.config import load_params

    return load_params(getattr(args, "config", None))


def prune_config(args: argparse.Namespace):
    """PruneConfig from defaults < the `prune:` section of --config < command-line flags."""
    from ghosted.config import PruneConfig, build

    given = {flag: getattr(args, flag, None) for flag in PRUNE_FLAGS}
    merged = dict(params_file(args).raw.get("prune", {}))
    merged.update({k: v for k, v in given.items() if v is not None})
    if given.get("layers") is not None:
        merged.pop("remove", None)
    elif given.get("remove") is not None:
        merged.pop("layers", None)
    return build(PruneConfig, merged, "prune")


def calib_settings(args: argparse.Namespace):
    """CalibrationConfig from defaults < the `calibration:` section of --config < command-line flags."""
    from ghosted.config import merged

    cfg = params_file(args).calibration
    return merged(cfg, {key: getattr(args, flag, None) for flag, key in CALIB_FLAGS.items()}, "calibration")


def _load(args: argparse.Namespace):
    from ghosted.models import load_model

    t0 = time.perf_counter()
    layerwise = getattr(args, "layerwise", False)
    if layerwise and getattr(args, "device_map", None):
        raise GhostedError("--layerwise and --device-map are two ways to fit a large model: pick one")
    loaded = load_model(args.model, dtype=args.dtype, device="cpu" if layerwise else args.device,
                        device_map=getattr(args, "device_map", None))
    if layerwise:
        loaded.layerwise, loaded.capture_device = True, args.device
        budget = getattr(args, "offload_budget", None)
        if budget is not None:
            if budget < 0:
                raise GhostedError(f"--offload-budget must be >= 0 MiB, got {budget}")
            loaded.offload_budget = budget * 2**20
    elif getattr(args, "offload_budget", None) is not None:
        raise GhostedError("--offload-budget applies to --layerwise only")
    _log(args, f"loaded {args.model} ({type(loaded.model).__name__}) in {time.perf_counter() - t0:.1f}s")
    return loaded


def _log(args: argparse.Namespace, msg: str) -> None:
    if not getattr(args, "quiet", False):
        print(msg, file=sys.stderr, flush=True)


def _calibration(args: argparse.Namespace, loaded):
    from ghosted.checks import check_seq_len
    from ghosted.corpora import build_calibration, load_calibration

    if getattr(args, "calib", None):
        calib = load_calibration(args.calib)
        check_seq_len(loaded.model.config, calib.seq_len, f"--calib {args.calib}: window length",
                      "make a calibration folder with shorter windows (`ghosted calibrate --seq-len`)")
        return calib
    c = calib_settings(args)
    check_seq_len(loaded.model.config, c.seq_len)
    return build_calibration(loaded.tokenizer, c.source, c.n, c.seq_len, c.seed)


def _write_json(path: Path, obj: dict) -> None:
    from ghosted.io import write_json_atomic

    write_json_atomic(path, obj)


# --------------------------------------------------------------------------- commands


def cmd_prune(args: argparse.Namespace) -> int:
    from ghosted.io import check_out_file
    from ghosted.solve.solver import build_checkpoint, solve

    t0 = time.perf_counter()
    cfg = prune_config(args)
    _check_out(args.out, args.force)
    check_out_file(args.summary, "--summary")
    _refuse_ghost_model(args.model)
    loaded = _load(args)
    calib = _calibration(args, loaded)
    _log(args, f"calibration: {calib.n} x {calib.seq_len} tokens from {calib.source} (sha256 {calib.sha256[:12]})")
    sol = solve(loaded, calib, cfg, progress=not args.quiet, log=lambda m: _log(args, m))
    meta = build_checkpoint(loaded, sol, calib.sha256, args.out, force=args.force)
    summary = {"out": str(args.out), "removed_layers": sol.removed, "num_layers": meta["num_layers"],
               "recovery": cfg.recovery, "ridge": sol.meta["ridge"], "guard": sol.meta["guard"],
               "calibration_relative_residual": sol.meta["calibration_relative_residual"],
               "seconds": round(time.perf_counter() - t0, 1)}
    if args.summary:
        _write_json(args.summary, {**summary, "solve": sol.meta})
    _log(args, f"wrote {args.out}: {meta['num_layers']} layers, recovery {cfg.recovery}, "
               f"{len(meta['ghosts'])} ghost(s), {summary['seconds']}s")
    print(json.dumps(summary, default=float))
    return 0


def _check_out(out: Path, force: bool = False) -> None:
    """Before any work: --out must be writable, and an existing one a ghosted output replaced only with --force."""
    from ghosted.io import check_out_dir

    check_out_dir(out, force)


def _refuse_ghost_model(model: str) -> None:
    """Pruning a ghost checkpoint would drop its ghosts: refuse before loading anything."""
    cfg = Path(model) / "config.json"
    try:
        ghosts = json.loads(cfg.read_text()).get("ghosted", {}).get("ghosts") if cfg.is_file() else None
    except (OSError, ValueError, AttributeError):
        return  # not a readable ghosted checkpoint: the loader reports what is wrong with it
    if ghosts:
        raise GhostedError(f"{model} is a ghost checkpoint: prune its dense base model instead")


def cmd_calibrate(args: argparse.Namespace) -> int:
    from ghosted.checks import check_seq_len
    from ghosted.corpora import build_calibration, save_calibration
    from ghosted.models import load_tokenizer

    c = calib_settings(args)
    _check_out(args.out, args.force)
    tok, config = load_tokenizer(args.model)
    check_seq_len(config, c.seq_len)
    calib = build_calibration(tok, c.source, c.n, c.seq_len, c.seed)
    save_calibration(calib, args.out, force=args.force)
    print(json.dumps({"out": str(args.out), "n": calib.n, "seq_len": calib.seq_len, "sha256": calib.sha256}))
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from ghosted.io import check_out_file
    from ghosted.solve.solver import score

    check_out_file(args.out, "--out")
    loaded = _load(args)
    calib = _calibration(args, loaded)
    table = score(loaded, calib, args.remove, progress=not args.quiet)
    print(format_scores(table))
    if args.out:
        _write_json(args.out, table)
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
    from ghosted.solve.solver import save_solution, solve

    searching = params_file(args).search.enabled and args.remove is None and args.layers is None
    if searching:
        from ghosted.cli.search_cmd import search_settings

        settings = search_settings(args)  # every section checked before the model loads
    else:
        cfg = prune_config(args)
    _check_out(args.out, args.force)
    _refuse_ghost_model(args.model)
    loaded = _load(args)
    calib = _calibration(args, loaded)
    if searching:
        sol, also = _searched_solution(args, loaded, calib, settings)
    else:
        sol, also = solve(loaded, calib, cfg, progress=not args.quiet, log=lambda m: _log(args, m)), None
    sol.meta["calibration_sha256"] = calib.sha256
    save_solution(sol, args.out, force=args.force, also=also)
    print(json.dumps({"out": str(args.out), "removed_layers": sol.removed, "ridge": sol.meta["ridge"],
                      "guard": sol.meta["guard"]}, default=float))
    return 0


def _searched_solution(args: argparse.Namespace, loaded, calib, settings):
    """search.enabled in --config: the plan `ghosted search` chooses (the most layers that pass the gate), and a
    writer that puts its report (search.json, search.md, frontier.png) next to the operators."""
    from ghosted.solve.search import run_search, write_report_files

    prune, search, evaluation, gate = settings
    _log(args, "search.enabled: searching for the most layers that pass the gate (prune.remove is not used)")
    outcome = run_search(loaded, calib, prune, search, evaluation, gate, progress=not args.quiet,
                         log=lambda m: _log(args, m))
    doc = outcome.doc
    if outcome.chosen is None:
        raise GhostedError(f"search: {doc['message']}; nothing to fuse or register (widen search.min_remove/"
                           "max_remove or relax the gate)")
    _log(args, f"search: {doc['message']} ({doc['full_evaluations']} full evaluations)")

    outcome.chosen.meta["search"] = {"chosen_k": doc["chosen"]["k"], "full_evaluations": doc["full_evaluations"]}
    return outcome.chosen, lambda folder: write_report_files(doc, folder)


def cmd_fuse(args: argparse.Namespace) -> int:
    from ghosted.solve.solver import build_checkpoint, load_solution

    sol = load_solution(args.ops)
    _check_out(args.out, args.force)
    _refuse_ghost_model(args.model)
    loaded = _load(args)
    from ghosted.checks import check_solution

    check_solution(sol, loaded.model, args.ops)
    meta = build_checkpoint(loaded, sol, sol.meta.get("calibration_sha256", ""), args.out, force=args.force)
    print(json.dumps({"out": str(args.out), "num_layers": meta["num_layers"], "ghosts": len(meta["ghosts"])}))
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("prune", help="remove layers, fit the recovery, save a checkpoint",
                       description="Remove layers from MODEL, fit one recovery operator per cut on calibration "
                                   "data, and save a Hugging Face checkpoint to --out.")
    _model_args(p)
    _calib_args(p)
    _prune_args(p)
    p.add_argument("--out", type=Path, required=True, help="output checkpoint folder (written atomically)")
    p.add_argument("--summary", type=Path, help="also write the run summary JSON here")
    p.add_argument("--force", action="store_true", help="replace --out if it is an earlier ghosted output "
                   "(a folder ghosted did not write is never replaced)")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("calibrate", help="build and save the calibration windows")
    p.add_argument("model", help="model whose tokenizer is used")
    p.add_argument("--config", type=Path, help="YAML file with a `calibration:` section")
    _calib_args(p)
    p.add_argument("--out", type=Path, required=True, help="output folder (tokens.safetensors + calibration.json)")
    p.add_argument("--force", action="store_true", help="replace --out if it is an earlier ghosted output "
                   "(a folder ghosted did not write is never replaced)")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("score", help="per-layer and per-block selection scores")
    _model_args(p)
    _calib_args(p)
    p.add_argument("--remove", type=int, help="also score every contiguous block of this many layers")
    p.add_argument("--out", type=Path, help="write the table as JSON")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("solve", help="choose the layers and fit the operators (no checkpoint)")
    _model_args(p)
    _calib_args(p)
    _prune_args(p)
    p.add_argument("--out", type=Path, required=True, help="output folder (operators.safetensors + plan.json)")
    p.add_argument("--force", action="store_true", help="replace --out if it is an earlier ghosted output "
                   "(a folder ghosted did not write is never replaced)")
    p.set_defaults(func=cmd_solve)

    p = sub.add_parser("fuse", help="apply a solved plan to the model and save the checkpoint")
    _model_args(p)
    p.add_argument("--ops", type=Path, required=True, help="folder written by `ghosted solve`")
    p.add_argument("--out", type=Path, required=True, help="output checkpoint folder")
    p.add_argument("--force", action="store_true", help="replace --out if it is an earlier ghosted output "
                   "(a folder ghosted did not write is never replaced)")
    p.set_defaults(func=cmd_fuse)
