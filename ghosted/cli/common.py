"""What the sub-commands share: the model and calibration flags, the settings merge, logging, output."""

from __future__ import annotations

import argparse
import contextlib
import logging
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ghosted.cli.options import add_options
from ghosted.errors import GhostedError, brief


def model_args(p: argparse.ArgumentParser, layerwise: bool = True) -> None:
    p.add_argument("model", help="shipped name (smollm2-135m, gemma3-270m), local HF folder, .gguf file, or hub id")
    p.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or float16")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, ...")
    p.add_argument("--device-map", help="accelerate device map for models larger than one device, e.g. auto")
    if layerwise:
        p.add_argument("--layerwise", action="store_true",
                       help="keep the model in host memory; calibration passes move one decoder layer at a time to "
                            "--device and carry the calibration states forward (models larger than the device)")
        p.add_argument("--offload-budget", type=offload_mib, metavar="MiB",
                       help="with --layerwise: MiB of carried calibration states kept in host memory; the rest go "
                            f"to files in a temporary folder, removed afterwards (default 4096; allowed 0 to "
                            f"{MAX_OFFLOAD_MIB})")
    p.add_argument("--config", type=Path, help="YAML file (e.g. params.yaml) whose sections set this command's "
                                               "defaults (calibration:, prune:, eval:)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


MAX_OFFLOAD_MIB = 1 << 30  # 1 PiB: more than any host holds (0: every carried state goes to files)


def whole_in(low: int, high: int):
    """An argparse type: a whole number from low to high (anything else is argparse's one-line error)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {brief(text, 40)}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be a whole number >= {low} and <= {high}, got {brief(text, 40)}")
        return value
    return parse


offload_mib = whole_in(0, MAX_OFFLOAD_MIB)


def calib_args(p: argparse.ArgumentParser) -> None:
    from ghosted.config import CalibrationConfig

    g = p.add_argument_group("calibration")
    g.add_argument("--calib", type=Path, help="use this calibration folder (from `ghosted calibrate`)")
    add_options(p, CalibrationConfig, groups={"calibration": g}, group="calibration")


def out_args(p: argparse.ArgumentParser, help: str, required: bool = True) -> None:
    p.add_argument("--out", type=Path, required=required, help=help)
    p.add_argument("--force", action="store_true", help="replace --out if it is an earlier ghosted output "
                   "(a folder ghosted did not write is never replaced)")


def load_options(args: argparse.Namespace) -> dict[str, Any]:
    """The model-loading flags as keyword arguments of ghosted.api.open_model."""
    return {"dtype": args.dtype, "device": args.device, "device_map": getattr(args, "device_map", None),
            "layerwise": getattr(args, "layerwise", False), "offload_budget": getattr(args, "offload_budget", None)}


def log(args: argparse.Namespace, msg: str) -> None:
    if not getattr(args, "quiet", False):
        print(msg, file=sys.stderr, flush=True)


def logger(args: argparse.Namespace):
    return lambda m: log(args, m)


def write_json(path: Path, obj: dict) -> None:
    from ghosted.io import write_json_atomic

    write_json_atomic(path, obj)


# --------------------------------------------------------------------------- settings: defaults < file < flags


def params_file(args: argparse.Namespace):
    """The --config file as typed sections (all defaults without one): the one place the CLI reads YAML."""
    from ghosted.config import load_params

    _check_calib_flags(args)
    return load_params(getattr(args, "config", None))


def _check_calib_flags(args: argparse.Namespace) -> None:
    """--calib FOLDER brings its windows ready-made: a flag that says how to build them would be ignored. (A
    folder that is no calibration folder is reported by the command, with what is wrong with it.)"""
    if not getattr(args, "calib", None) or not (Path(args.calib) / "calibration.json").is_file():
        return
    builds = [("--calib-source", "calib_source"), ("--n-seqs", "n_seqs"), ("--seed", "seed")]
    if args.command != "compare":  # compare's --seq-len also sets the perplexity windows
        builds.append(("--seq-len", "seq_len"))
    given = [flag for flag, dest in builds if getattr(args, dest, None) is not None]
    if given:
        raise GhostedError(f"{given[0]} says how to build calibration windows, but --calib {args.calib} brings them "
                           f"ready-made: drop {given[0]} (or --calib)")


def prune_config(args: argparse.Namespace):
    """PruneConfig from defaults < the `prune:` section of --config < command-line flags."""
    from ghosted.config import PruneConfig, resolve

    return resolve(PruneConfig, "prune", params_file(args).raw.get("prune"), vars(args))


def calib_settings(args: argparse.Namespace):
    """CalibrationConfig from defaults < the `calibration:` section of --config < command-line flags."""
    from ghosted.config import CalibrationConfig, resolve

    return resolve(CalibrationConfig, "calibration", params_file(args).raw.get("calibration"), vars(args))


def eval_settings(args: argparse.Namespace, seq_len: int | None = None):
    """EvalSettings from defaults < (`seq_len`) < the `eval:` section of --config < CLI flags."""
    from ghosted.config import EvalSettings, resolve

    file_values = dict(params_file(args).raw.get("eval", {}))
    if seq_len is not None:
        file_values.setdefault("seq_len", seq_len)
    return resolve(EvalSettings, "eval", file_values, vars(args))


def search_params(args: argparse.Namespace):
    """The params for ghosted.api.search: the file's sections with search:, eval: and calibration: merged with
    the flags (the prune: options come from the file; each plan sets its own layers)."""
    from dataclasses import replace

    from ghosted.api import prune_template
    from ghosted.config import SearchConfig, resolve

    params = params_file(args)
    prune_template(params)  # every section checked before the model loads
    search = resolve(SearchConfig, "search", params.raw.get("search"), vars(args))
    calibration = params.calibration if getattr(args, "calib", None) else calib_settings(args)
    return replace(params, search=search, eval=eval_settings(args), calibration=calibration)


def command_line(args: argparse.Namespace, name: str, positional: str = "model") -> str:
    """The command as parsed (every flag given or defaulted, in parser order): enough to rerun it."""
    parts = ["ghosted", name, str(getattr(args, positional))]
    for key, value in vars(args).items():
        if key in (positional, "func", "command", "efficiency_worker") or value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        parts += [flag] if value is True else [flag, str(value)]
    return shlex.join(parts)


@contextlib.contextmanager
def quiet_libraries(args: argparse.Namespace) -> Iterator[None]:
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
