"""Flags are generated from the typed config: an option is declared once, as a field with its help."""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys

import pytest

from ghosted.cli import build_parser
from ghosted.cli.options import add_options, flags_of
from ghosted.config import (
    CalibrationConfig,
    EvalSettings,
    PruneConfig,
    SearchConfig,
    load_params,
    option,
    resolve,
    to_json,
)
from ghosted.errors import GhostedError

PRUNE_HELP_FLAGS = {"--batch-size", "--calib", "--calib-source", "--config", "--device", "--device-map", "--distill",
                    "--distill-lr", "--dtype", "--exportable", "--fold", "--force", "--guard", "--help", "--holdout", "--layers",
                    "--layerwise", "--n-seqs", "--norm-features", "--offload-budget", "--out", "--quiet", "--rank",
                    "--recovery", "--remove", "--ridge", "--ridge-grid", "--seed", "--select", "--seq-len",
                    "--shortlist", "--summary", "--token-policy", "--token-shift", "--variant"}


def _subparser(name: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def _flags(parser: argparse.ArgumentParser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings if s.startswith("--")}


def test_every_prune_field_has_a_flag_on_prune_and_solve():
    for command in ("prune", "solve"):
        flags = _flags(_subparser(command))
        for flag in flags_of(PruneConfig):
            assert flag in flags, (command, flag)
        for flag in flags_of(CalibrationConfig):
            assert flag in flags, (command, flag)


def test_prune_flag_names_unchanged():
    assert _flags(_subparser("prune")) - {"--debug"} == PRUNE_HELP_FLAGS
    assert flags_of(CalibrationConfig) == {"--calib-source": "source", "--n-seqs": "n", "--seq-len": "seq_len",
                                           "--seed": "seed"}
    assert "--enabled" not in flags_of(SearchConfig)  # a params-file setting only


def test_a_new_field_gets_a_flag_with_its_help_without_touching_the_cli():
    Extended = dataclasses.make_dataclass(
        "Extended", [("sketch_width", int, option(16, "width of the sketch (default {default})")),
                     ("fancy", bool, option(False, "turn on the fancy path", method="ghost"))],
        bases=(PruneConfig,), frozen=True)
    p = argparse.ArgumentParser()
    add_options(p, Extended, group="recovery")
    helps = {s: a.help for a in p._actions for s in a.option_strings}
    assert helps["--sketch-width"] == "width of the sketch (default 16)"
    assert helps["--fancy"] == "turn on the fancy path"
    assert any(g.title == "ghost recovery options" for g in p._action_groups)
    for flag in flags_of(PruneConfig):
        assert flag in helps
    args = p.parse_args(["--remove", "2", "--sketch-width", "8", "--fancy"])
    cfg = resolve(Extended, "prune", {"sketch_width": 4, "select": "bi"}, vars(args))
    assert (cfg.sketch_width, cfg.fancy, cfg.select, cfg.remove) == (8, True, "bi", 2)


def test_resolve_precedence_defaults_file_flags(tmp_path):
    cfg_file = tmp_path / "params.yaml"
    cfg_file.write_text("prune:\n  remove: 3\n  guard: boundary\ncalibration:\n  n: 8\n")
    params = load_params(cfg_file)
    args = _subparser("prune").parse_args(["m", "--out", "o", "--layers", "1-2", "--seq-len", "64"])
    prune = resolve(PruneConfig, "prune", params.raw["prune"], vars(args))
    assert (prune.remove, prune.layers, prune.guard, prune.select) == (None, "1-2", "boundary", "angular")
    calib = resolve(CalibrationConfig, "calibration", params.raw["calibration"], vars(args))
    assert (calib.n, calib.seq_len, calib.source) == (8, 64, "passages")
    with pytest.raises(GhostedError, match="--n-seqs"):
        resolve(CalibrationConfig, "calibration", {}, {"n_seqs": 0})


def test_efficiency_settings_come_from_their_section_and_flags(tmp_path):
    from ghosted.cli.eval_cmd import _efficiency_settings

    cfg_file = tmp_path / "params.yaml"
    cfg_file.write_text("efficiency:\n  prompt_len: 16\n  repeats: 5\n")
    assert load_params(cfg_file).efficiency.prompt_len == 16
    args = _subparser("eval").parse_args(["m", "--config", str(cfg_file), "--efficiency", "--repeats", "2"])
    eff = _efficiency_settings(args)
    assert (eff.prompt_len, eff.repeats, eff.new_tokens) == (16, 2, 32)
    cfg_file.write_text("efficiency:\n  prompt_len: 0\n")
    with pytest.raises(GhostedError, match="prompt-len"):
        load_params(cfg_file)


def test_bad_list_flag_is_a_one_line_parser_error():
    with pytest.raises(SystemExit):
        _subparser("prune").parse_args(["m", "--out", "o", "--remove", "1", "--ridge-grid", "1e-6,x"])


def test_one_config_to_json():
    s = EvalSettings(tasks=(), ppl=("wiki",))
    assert to_json(s) == {"tasks": [], "ppl": ["wiki"], "limit": None,
                                                          "ppl_windows": 32, "seq_len": 512, "batch_size": 8}


def test_import_ghosted_does_not_import_torch():
    code = "import sys, ghosted; ghosted.load_params; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
