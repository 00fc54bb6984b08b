"""verify, upgrade: check a checkpoint folder before loading it; rewrite an old one in the current format."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def cmd_verify(args: argparse.Namespace) -> int:
    from ghosted.checkpoint.verify import verify
    from ghosted.errors import GhostedError

    try:
        summary = verify(args.checkpoint)
    except GhostedError as exc:
        raise GhostedError(f"REFUSED: {exc}") from exc
    print(json.dumps({"verdict": "ok", **summary}))
    return 0


def cmd_upgrade(args: argparse.Namespace) -> int:
    from ghosted.checkpoint.upgrade import upgrade

    print(json.dumps(upgrade(args.checkpoint)))
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser(
        "verify", help="check a checkpoint folder (hashes, code, tensors) before you load it",
        description="Check a ghosted checkpoint: every file against ghosted_manifest.json (sha256), the code files "
                    "against the code this ghosted writes, the layer count against the tensors, ghost sites and "
                    "shapes, finite values. Prints the verdict; exit 0 ok, 2 refused (with the reason). Run it "
                    "before `from_pretrained(..., trust_remote_code=True)`, which executes the folder's code.")
    p.add_argument("checkpoint", type=Path, metavar="CKPT_DIR")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser(
        "upgrade", help="rewrite a checkpoint of an older ghosted in the current format (in place)",
        description="Rewrite a checkpoint written by an older ghosted (ghost checkpoints that plain loaders read as "
                    "their base model, no manifest) in the current format, in place and atomically. The old folder "
                    "is read with this package's code only; its own code files never run.")
    p.add_argument("checkpoint", type=Path, metavar="CKPT_DIR")
    p.set_defaults(func=cmd_upgrade)
