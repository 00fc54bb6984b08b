"""ghosted export: a plain checkpoint as a GGUF file for llama.cpp."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def cmd_export(args: argparse.Namespace) -> int:
    from ghosted.checkpoint.gguf import export_gguf

    res = export_gguf(args.checkpoint, args.gguf, args.outtype)
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

    p = sub.add_parser("export", help="write a plain checkpoint (recovery none, scalar, replaceme, foldable) as GGUF "
                                      "for llama.cpp")
    p.add_argument("checkpoint", help="checkpoint folder (or a shipped model name for the dense model)")
    p.add_argument("--gguf", type=Path, required=True, help="output file, e.g. out/model.gguf (written atomically)")
    p.add_argument("--outtype", default="f16",
                   help=f"weight type of the 2-D tensors: {', '.join(OUTTYPES)} (default f16; norms stay f32)")
    p.set_defaults(func=cmd_export)
