"""prune, calibrate, score, solve, fuse."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ..errors import GhostedError

# CLI flag -> PruneConfig field (None-defaulted in argparse so YAML values can fill in; CLI wins).
PRUNE_FLAGS = ("remove", "layers", "select", "recovery", "ridge", "ridge_grid", "affine", "rank", "variant", "fold",
               "token_policy", "holdout", "guard", "shortlist", "batch_size")
CALIB_FLAGS = {"calib_source": "source", "n_seqs": "n", "seq_len": "seq_len", "seed": "seed"}
CALIB_DEFAULTS = {"source": "passages", "n": 32, "seq_len": 512, "seed": 0}


def _model_args(p: argparse.ArgumentParser, layerwise: bool = True) -> None:
    p.add_argument("model", help="shipped name (smollm2-135m, gemma3-270m), local HF folder, .gguf file, or hub id")
    p.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or float16")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, ...")
    p.add_argument("--device-map", help="accelerate device map for models larger than one device, e.g. auto")
    if layerwise:
        p.add_argument("--layerwise", action="store_true",
                       help="keep the model in host memory; calibration passes move one decoder layer at a time to "
                            "--device and carry the calibration states forward (models larger than the device)")
    p.add_argument("--config", type=Path, help="YAML file (e.g. params.yaml) whose sections set this command's defaults (calibration:, prune:, eval:)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def _calib_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("calibration")
    g.add_argument("--calib", type=Path, help="use this calibration folder (from `ghosted calibrate`)")
    g.add_argument("--calib-source", help="passages (default), wiki, ptb, ptb-train, a .txt/.jsonl file, or hf:NAME:SPLIT:FIELD")
    g.add_argument("--n-seqs", type=int, help="number of calibration sequences (default 32)")
    g.add_argument("--seq-len", type=int, help="tokens per sequence (default 512)")
    g.add_argument("--seed", type=int, help="seed for the document shuffle (default 0)")


def _prune_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("what to remove")
    x = g.add_mutually_exclusive_group()
    x.add_argument("--remove", type=int, help="number of layers to remove (chosen by --select)")
    x.add_argument("--layers", help="explicit dense layer indices, e.g. 13-18 or 13,15,20")
    g.add_argument("--select", help="angular (default, contiguous), bi, cosine, ppl, ghost")
    r = p.add_argument_group("recovery")
    r.add_argument("--recovery", help="ghost (default), linearpatch, replaceme, scalar, foldable, none")
    r.add_argument("--fold", help="foldable: auto (default: the guard picks), cq, replaceme or cq+replaceme")
    r.add_argument("--ridge", type=float, help="relative ridge (lambda = ridge * tr(X^T X)/d); default: chosen on held-out data")
    r.add_argument("--ridge-grid", type=lambda s: tuple(float(x) for x in s.split(",")),
                   help="ridge values the guard tries (default 1e-6,1e-3,1e-2,1e-1)")
    r.add_argument("--affine", action="store_true", default=None, help="ghost with a bias term")
    r.add_argument("--rank", type=int, help="low-rank ghost I + U V^T of this rank")
    r.add_argument("--variant", help="LinearPatch variant: rotate (default) or diag")
    r.add_argument("--token-policy", help="tokens in the fit: auto (default: the guard picks sink, anchor or all on held-out "
                        "data), sink (drop position 0 and BOS), anchor (sinks pinned to identity), all, sink+outliers")
    r.add_argument("--holdout", type=float, help="fraction of calibration windows held out (default 0.25)")
    r.add_argument("--guard", help="held-out check: loss (default), boundary, off")
    r.add_argument("--shortlist", type=int, help="blocks the ghost selection compares by held-out loss (default 4)")
    r.add_argument("--batch-size", type=int, help="sequences per forward pass (default 4)")


def _yaml_sections(path: Path | None) -> tuple[dict, dict]:
    if path is None:
        return {}, {}
    import yaml

    if not path.is_file():
        raise GhostedError(f"config file not found: {path}")
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise GhostedError(f"{path}: not valid YAML ({exc})") from exc
    calib, prune = doc.get("calibration", {}) or {}, doc.get("prune", {}) or {}
    bad = set(calib) - set(CALIB_DEFAULTS)
    if bad:
        raise GhostedError(f"{path}: unknown calibration key(s) {sorted(bad)}; known: {sorted(CALIB_DEFAULTS)}")
    return calib, prune


def prune_config(args: argparse.Namespace):
    from ..prune import PruneConfig

    _, yaml_prune = _yaml_sections(getattr(args, "config", None))
    merged = dict(yaml_prune)
    for flag in PRUNE_FLAGS:
        v = getattr(args, flag, None)
        if v is not None:
            merged[flag] = v
    if args.layers is not None:
        merged.pop("remove", None)
    elif args.remove is not None:
        merged.pop("layers", None)
    return PruneConfig.from_dict(merged)


def calib_settings(args: argparse.Namespace) -> dict:
    yaml_calib, _ = _yaml_sections(getattr(args, "config", None))
    out = {**CALIB_DEFAULTS, **yaml_calib}
    for flag, key in CALIB_FLAGS.items():
        v = getattr(args, flag, None)
        if v is not None:
            out[key] = v
    return out


def _load(args: argparse.Namespace):
    from ..models import load_model

    t0 = time.perf_counter()
    layerwise = getattr(args, "layerwise", False)
    if layerwise and getattr(args, "device_map", None):
        raise GhostedError("--layerwise and --device-map are two ways to fit a large model: pick one")
    loaded = load_model(args.model, dtype=args.dtype, device="cpu" if layerwise else args.device,
                        device_map=getattr(args, "device_map", None))
    if layerwise:
        loaded.layerwise, loaded.capture_device = True, args.device
    _log(args, f"loaded {args.model} ({type(loaded.model).__name__}) in {time.perf_counter() - t0:.1f}s")
    return loaded


def _log(args: argparse.Namespace, msg: str) -> None:
    if not getattr(args, "quiet", False):
        print(msg, file=sys.stderr, flush=True)


def _calibration(args: argparse.Namespace, loaded):
    from ..data import build_calibration, load_calibration

    if getattr(args, "calib", None):
        return load_calibration(args.calib)
    c = calib_settings(args)
    return build_calibration(loaded.tokenizer, c["source"], int(c["n"]), int(c["seq_len"]), int(c["seed"]))


def _write_json(path: Path, obj: dict) -> None:
    from ..io import write_json_atomic

    write_json_atomic(path, obj)


# --------------------------------------------------------------------------- commands


def cmd_prune(args: argparse.Namespace) -> int:
    from ..prune import build_checkpoint, solve

    t0 = time.perf_counter()
    cfg = prune_config(args)
    _check_out(args.out)
    loaded = _load(args)
    calib = _calibration(args, loaded)
    _log(args, f"calibration: {calib.n} x {calib.seq_len} tokens from {calib.source} (sha256 {calib.sha256[:12]})")
    sol = solve(loaded, calib, cfg, progress=not args.quiet, log=lambda m: _log(args, m))
    meta = build_checkpoint(loaded, sol, calib.sha256, args.out)
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


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise GhostedError(f"--out {out} exists and is not a folder")


def cmd_calibrate(args: argparse.Namespace) -> int:
    from ..data import build_calibration, save_calibration

    c = calib_settings(args)
    from transformers import AutoTokenizer

    from ..models import resolve

    ref = resolve(args.model)
    tok = AutoTokenizer.from_pretrained(ref.path, **({"gguf_file": ref.gguf_file} if ref.gguf_file else {}))
    calib = build_calibration(tok, c["source"], int(c["n"]), int(c["seq_len"]), int(c["seed"]))
    save_calibration(calib, args.out)
    print(json.dumps({"out": str(args.out), "n": calib.n, "seq_len": calib.seq_len, "sha256": calib.sha256}))
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from ..prune import score

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
    from ..prune import save_solution, solve

    cfg = prune_config(args)
    loaded = _load(args)
    calib = _calibration(args, loaded)
    sol = solve(loaded, calib, cfg, progress=not args.quiet, log=lambda m: _log(args, m))
    sol.meta["calibration_sha256"] = calib.sha256
    save_solution(sol, args.out)
    print(json.dumps({"out": str(args.out), "removed_layers": sol.removed, "ridge": sol.meta["ridge"],
                      "guard": sol.meta["guard"]}, default=float))
    return 0


def cmd_fuse(args: argparse.Namespace) -> int:
    from ..prune import build_checkpoint, load_solution

    sol = load_solution(args.ops)
    _check_out(args.out)
    loaded = _load(args)
    meta = build_checkpoint(loaded, sol, sol.meta.get("calibration_sha256", ""), args.out)
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
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("calibrate", help="build and save the calibration windows")
    p.add_argument("model", help="model whose tokenizer is used")
    p.add_argument("--config", type=Path, help="YAML file with a `calibration:` section")
    _calib_args(p)
    p.add_argument("--out", type=Path, required=True, help="output folder (tokens.safetensors + calibration.json)")
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
    p.set_defaults(func=cmd_solve)

    p = sub.add_parser("fuse", help="apply a solved plan to the model and save the checkpoint")
    _model_args(p)
    p.add_argument("--ops", type=Path, required=True, help="folder written by `ghosted solve`")
    p.add_argument("--out", type=Path, required=True, help="output checkpoint folder")
    p.set_defaults(func=cmd_fuse)
