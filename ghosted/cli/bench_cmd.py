"""ghosted bench: prune+fit cost against one dense forward, memory against model size, speed-up against ideal."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ghosted.cli.common import offload_mib
from ghosted.config.typed import MAX_BATCH, MAX_LAYERS, MAX_SEQ_LEN, MAX_WINDOWS
from ghosted.errors import GhostedError, brief

MAX_SIZES = 16  # calibration sizes, one process each
# flag, argparse dest, smallest, largest (the model's layers and positions bound --remove, --seq-len and
# --prompt + --new-tokens further, checked from its config before any run)
RANGES = (("--seq-len", "seq_len", 2, MAX_SEQ_LEN), ("--remove", "remove", 1, MAX_LAYERS),
          ("--batch-size", "batch_size", 1, MAX_BATCH), ("--prompt", "prompt", 1, MAX_SEQ_LEN),
          ("--new-tokens", "new_tokens", 2, 65_536), ("--repeats", "repeats", 1, 1_000))


def bench_out(raw: str) -> Path:
    """--out as the report's JSON path: OUT.json (and OUT.md beside it); a folder (one that exists, or a path
    ending in /) gets DIR/bench.json and DIR/bench.md inside it. OUT.json or OUT.md given: the same two files."""
    path = Path(raw)
    if raw.endswith(("/", os.sep)) or path.is_dir():
        return path / "bench.json"
    if path.suffix in (".json", ".md"):
        path = path.with_suffix("")
    return path.parent / (path.name + ".json")


def sizes_of(text: str) -> list[int]:
    """--n-seqs '32,128': 1 to MAX_SIZES calibration sizes, each a whole number from 1 to MAX_WINDOWS."""
    try:
        sizes = [int(x) for x in text.split(",")]
    except ValueError:
        raise GhostedError(f"--n-seqs takes comma-separated integers, got {brief(text, 60)}") from None
    if any(not 1 <= n <= MAX_WINDOWS for n in sizes):
        raise GhostedError(f"--n-seqs values must be >= 1 and <= {MAX_WINDOWS}, got {brief(text, 60)}")
    if len(sizes) > MAX_SIZES:
        raise GhostedError(f"--n-seqs takes 1 to {MAX_SIZES} sizes (each runs in its own process), got {len(sizes)}")
    return sizes


def cmd_bench(args: argparse.Namespace) -> int:
    from ghosted.evaluation.bench import bench, to_markdown
    from ghosted.io import write_json_atomic, write_text_atomic

    sizes = sizes_of(args.n_seqs)
    from ghosted.checks import check_device

    for flag, dest, low, high in RANGES:
        value = getattr(args, dest)
        if not low <= value <= high:
            raise GhostedError(f"{flag} must be a whole number >= {low} and <= {high}, got {value}")
    check_device(args.device)
    from ghosted.models import parse_dtype

    parse_dtype(args.dtype)
    report = bench(args.model, sizes, args.seq_len, args.remove, args.device, args.dtype, args.batch_size,
                   args.prompt, args.new_tokens, args.repeats, args.layerwise,
                   None if args.offload_budget is None else args.offload_budget * 2**20)
    md = to_markdown(report)
    if args.out:
        write_json_atomic(args.out, report)
        write_text_atomic(args.out.with_suffix(".md"), md)
    print(md)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="benchmark prune+fit cost, memory and inference speed-up (not a test)")
    p.add_argument("model", help="shipped name, local folder, .gguf or hub id; or random:PRESET (llama-8b, llama-1b) "
                                 "or random:config.json for random weights of that architecture")
    p.add_argument("--n-seqs", default="32,128", help=f"calibration sizes, each in its own process (default 32,128; "
                                                      f"1 to {MAX_SIZES} sizes, each 1 to {MAX_WINDOWS})")
    ranges = {dest: f"allowed {low} to {high}" for _, dest, low, high in RANGES}
    p.add_argument("--seq-len", type=int, default=512, help=f"tokens per calibration window (default 512; "
                                                            f"{ranges['seq_len']}, within the model's positions)")
    p.add_argument("--remove", type=int, default=7, help=f"layers removed (default 7; {ranges['remove']}, below "
                                                         "the model's layer count)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--batch-size", type=int, default=4, help=f"sequences per forward pass (default 4; "
                                                             f"{ranges['batch_size']})")
    p.add_argument("--prompt", type=int, default=256, help=f"prefill length for the speed test (default 256; "
                                                           f"{ranges['prompt']}; with --new-tokens within the "
                                                           "model's positions)")
    p.add_argument("--new-tokens", type=int, default=32, help=f"generated tokens (default 32; {ranges['new_tokens']})")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (dense, pruned+ghost, pruned without ghost in "
                                                          f"turn); median kept (default 5; {ranges['repeats']})")
    p.add_argument("--layerwise", action="store_true", help="prune+fit with a layer-by-layer capture")
    p.add_argument("--offload-budget", type=offload_mib, metavar="MiB",
                   help="with --layerwise: MiB of carried states in memory")
    p.add_argument("--out", type=bench_out, help="write OUT.json and OUT.md (e.g. reports/bench/bench_cpu); a "
                                                 "folder (existing, or ending in /) gets bench.json and bench.md "
                                                 "inside it")
    p.set_defaults(func=cmd_bench)
