"""fingerprint: the first stage of dvc.yaml (the base model as a small versioned file)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def cmd_fingerprint(args: argparse.Namespace) -> int:
    from ghosted.mlops.dvc import base_model_record, write_base_model

    record = write_base_model(args.model, args.out) if args.out else base_model_record(args.model)
    if args.out:
        print(f"{args.model}: {record['fingerprint']} -> {args.out}", file=sys.stderr)
    print(json.dumps(record))
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("fingerprint", help="the base model's identity (hub commit or sha256)",
                       description="Print (and with --out write) {model, fingerprint}: hub:<commit> for a hub id "
                                   "(online or offline alike), the GGUF's sha256 for a shipped model or a .gguf "
                                   "file, a sha256 of a folder's files. The pipeline's first stage: every later "
                                   "stage depends on the file, so a changed base model reruns them.")
    p.add_argument("model", metavar="MODEL", help="shipped name, local folder, .gguf file or hub id")
    p.add_argument("--out", type=Path, help="write the JSON here (atomically), e.g. data/base_model.json")
    p.set_defaults(func=cmd_fingerprint)
