"""ghosted bench: prune+fit cost against one dense forward, memory against model size, speed-up against ideal."""

from __future__ import annotations

import argparse
from pathlib import Path

from ghosted.errors import GhostedError


def cmd_bench(args: argparse.Namespace) -> int:
    from ghosted.evaluation.bench import bench, to_markdown
    from ghosted.io import write_json_atomic, write_text_atomic

    try:
        sizes = [int(x) for x in args.n_seqs.split(",")]
    except ValueError as exc:
        raise GhostedError(f"--n-seqs takes comma-separated integers, got {args.n_seqs!r}") from exc
    if any(n < 1 for n in sizes):
        raise GhostedError("--n-seqs values must be >= 1")
    from ghosted.checks import check_device, check_whole

    for flag, value, low in (("--seq-len", args.seq_len, 2), ("--remove", args.remove, 1),
                             ("--batch-size", args.batch_size, 1), ("--prompt", args.prompt, 1),
                             ("--new-tokens", args.new_tokens, 2), ("--repeats", args.repeats, 1)):
        check_whole(value, low, flag)
    check_device(args.device)
    from ghosted.models import parse_dtype

    parse_dtype(args.dtype)
    report = bench(args.model, sizes, args.seq_len, args.remove, args.device, args.dtype, args.batch_size,
                   args.prompt, args.new_tokens, args.repeats, args.layerwise,
                   None if args.offload_budget is None else args.offload_budget * 2**20)
    md = to_markdown(report)
    if args.out:
        write_json_atomic(args.out.with_suffix(".json"), report)
        write_text_atomic(args.out.with_suffix(".md"), md)
    print(md)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="benchmark prune+fit cost, memory and inference speed-up (not a test)")
    p.add_argument("model", help="shipped name, local folder, .gguf or hub id; or random:PRESET (llama-8b, llama-1b) "
                                 "or random:config.json for random weights of that architecture")
    p.add_argument("--n-seqs", default="32,128", help="calibration sizes, each in its own process (default 32,128)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--remove", type=int, default=7)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--prompt", type=int, default=256, help="prefill length for the speed test")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (dense, pruned+ghost, pruned without ghost in turn); median kept")
    p.add_argument("--layerwise", action="store_true", help="prune+fit with a layer-by-layer capture")
    p.add_argument("--offload-budget", type=int, metavar="MiB", help="with --layerwise: MiB of carried states in memory")
    p.add_argument("--out", type=Path, help="write OUT.json and OUT.md (e.g. reports/bench/bench_cpu)")
    p.set_defaults(func=cmd_bench)
