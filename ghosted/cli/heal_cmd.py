"""ghosted heal: distil a pruned checkpoint from its dense base (the `heal:` recipe of --config)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ghosted.cli.common import log, logger, params_file, quiet_libraries
from ghosted.cli.options import add_options


def heal_config(args: argparse.Namespace):
    """HealConfig from defaults < the `heal:` section of --config < command-line flags."""
    from ghosted.config import resolve
    from ghosted.config.heal import HealConfig

    return resolve(HealConfig, "heal", params_file(args).raw.get("heal"), vars(args))


def cmd_heal(args: argparse.Namespace) -> int:
    from ghosted.api import heal

    cfg = heal_config(args)
    with quiet_libraries(args):
        res = heal(args.checkpoint, cfg, args.out, base=args.base, force=args.force, if_enabled=args.if_enabled,
                   progress=not args.quiet, log=logger(args))
    rec = res.record
    summary = {"out": str(res.out), "healed": res.healed, "heldout_nll_before": res.heldout_nll_before,
               "heldout_nll_after": res.heldout_nll_after, "steps": res.steps, "stopped": rec.get("stopped"),
               "tokens": rec.get("tokens"), "seconds": rec.get("seconds", {}).get("total")}
    if res.reason:
        summary["reason"] = res.reason
    if res.heldout_nll_before is None:
        log(args, f"wrote {res.out} unchanged: {res.reason}")
    else:
        state = "healed" if res.healed else "unhealed (kept as it was)"
        log(args, f"wrote {res.out}: {state}, held-out loss {res.heldout_nll_before:.4f} -> "
                  f"{res.heldout_nll_after:.4f}, {res.steps} steps, {rec['tokens']['train']:,} training tokens, "
                  f"{summary['seconds']}s")
    print(json.dumps(summary))
    return 0


def add_parser(sub) -> None:
    from ghosted.config.heal import HealConfig

    p = sub.add_parser("heal", help="distil a pruned checkpoint from its dense base (LoRA + the layers by each cut)",
                       description="Knowledge distillation of a pruned CHECKPOINT from its dense base model (found "
                                   "through the checkpoint's lineage and checked by its fingerprint) on training text "
                                   "only. Writes a checkpoint of the same kind to --out; when healing does not lower "
                                   "the held-out loss, the input unchanged with the reason. The recipe is the `heal:` "
                                   "section of --config (params.yaml holds the recommended one); flags override it.")
    p.add_argument("checkpoint", help="checkpoint folder written by `ghosted prune`")
    p.add_argument("--out", type=Path, required=True, help="output checkpoint folder (written atomically)")
    p.add_argument("--config", type=Path, help="YAML file (e.g. params.yaml) whose `heal:` section is the recipe")
    p.add_argument("--base", help="the dense base model, when the lineage's base_model is not found here (it must "
                                  "have the recorded fingerprint)")
    p.add_argument("--force", action="store_true", help="replace --out if it is an earlier ghosted output "
                   "(a folder ghosted did not write is never replaced)")
    p.add_argument("--if-enabled", action="store_true", help="for the pipeline: when the recipe says enabled: false "
                   "(heal.enabled), write the checkpoint unchanged (healed: false, with the reason) instead of healing")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    add_options(p, HealConfig, group="heal recipe")
    p.set_defaults(func=cmd_heal)
