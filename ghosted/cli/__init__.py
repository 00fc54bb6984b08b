"""The `ghosted` command: parse, validate, one library call, one-line errors."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Callable

from ..errors import GhostedError

# Sub-command modules, each with add_parser(subparsers) that sets `func`.
COMMAND_MODULES = ("ghosted.cli.core", "ghosted.cli.eval_cmd", "ghosted.cli.registry_cmd", "ghosted.cli.bench_cmd",
                   "ghosted.cli.verify_cmd", "ghosted.cli.search_cmd")


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    p = argparse.ArgumentParser(
        prog="ghosted",
        description="Remove decoder layers from a causal LM and recover quality with closed-form operators.",
    )
    p.add_argument("--version", action="version", version=f"ghosted {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # optional command module not present in this build
                continue
            raise
        mod.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int | None] = args.func
    try:
        return int(func(args) or 0)
    except GhostedError as exc:
        print(f"ghosted: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ghosted: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
