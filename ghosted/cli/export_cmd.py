"""ghosted export: a checkpoint (a folder, or a registered version models:/NAME@ALIAS) as a GGUF file for
llama.cpp."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def cmd_export(args: argparse.Namespace) -> int:
    from ghosted.checkpoint.gguf import export_gguf
    from ghosted.mlops.registry.fetch import is_model_uri

    if is_model_uri(args.checkpoint):
        from ghosted.cli.registry_cmd import _config, _timeout
        from ghosted.mlops.registry.fetch import registered_checkpoint

        _, reg = _config(args)
        with registered_checkpoint(reg, args.checkpoint, **_timeout(args)) as folder:  # checked and verified
            res = export_gguf(folder, args.gguf, args.outtype)
    else:
        res = export_gguf(args.checkpoint, args.gguf, args.outtype)  # a checkpoint folder is verified first
    size = f"{res.params:,} parameters"
    if res.params_ratio is not None:
        size += f" ({res.params_ratio:.3f}x the dense base's {res.params_dense:,}"
        size += "; the fold untied the LM head from the embedding)" if res.untied_head else ")"
    print(f"wrote {res.path}: {res.arch}, {res.num_layers} layers, {res.tensors} tensors, {res.outtype}, "
          f"{res.bytes / 2**20:.1f} MiB ({res.bytes} bytes), {size}; tokenizer {res.tokenizer}")
    print(json.dumps({"path": str(res.path), "bytes": res.bytes, "params": res.params,
                      "params_dense": res.params_dense,
                      "ratio": None if res.params_ratio is None else round(res.params_ratio, 4),
                      "untied_head": res.untied_head, "num_layers": res.num_layers, "outtype": res.outtype}))
    return 0


def add_parser(sub) -> None:
    from ghosted.checkpoint.gguf import OUTTYPES

    p = sub.add_parser("export", help="write a checkpoint as GGUF for llama.cpp: a plain one (recovery none, scalar, "
                                      "replaceme, foldable) as its own architecture, an exportable ghost "
                                      "(--exportable) as deci")
    p.add_argument("checkpoint", help="checkpoint folder, a registered version (models:/NAME@ALIAS or "
                                      "models:/NAME/VERSION: its checkpoint is checked against the registered "
                                      "sha256), or a shipped model name for the dense model")
    p.add_argument("--gguf", type=Path, required=True, help="output file, e.g. out/model.gguf (written atomically)")
    p.add_argument("--outtype", default="f16",
                   help=f"weight type of the 2-D tensors: {', '.join(OUTTYPES)} (default f16; norms stay f32)")
    from ghosted.cli.registry_cmd import _tracking_args

    _tracking_args(p)  # where a models:/ URI is looked up
    p.set_defaults(func=cmd_export)
