"""The `ghosted` command: parse, validate, one library call, one-line errors."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from ghosted.errors import GhostedError

# Sub-command modules, each with add_parser(subparsers) that sets `func`.
COMMAND_MODULES = ("ghosted.cli.prune_cmd", "ghosted.cli.eval_cmd", "ghosted.cli.registry_cmd", "ghosted.cli.bench_cmd",
                   "ghosted.cli.verify_cmd", "ghosted.cli.export_cmd",
                   "ghosted.cli.fingerprint_cmd", "ghosted.cli.search_cmd", "ghosted.cli.heal_cmd")


class _Parser(argparse.ArgumentParser):
    """argparse with the project's one-line errors: `ghosted: error: ...`, exit code 2, usage left to --help."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"ghosted: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    from ghosted.version import __version__

    p = _Parser(
        prog="ghosted",
        description="Remove decoder layers from a causal LM and recover quality with closed-form operators.",
    )
    p.add_argument("--version", action="version", version=f"ghosted {__version__}")
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error (also GHOSTED_DEBUG=1)")
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
    _add_debug(sub)
    return p


def _add_debug(sub: argparse._SubParsersAction) -> None:
    """--debug also after the command name (`ghosted prune ... --debug`), in every nested sub-command."""
    for parser in set(sub.choices.values()):
        parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                _add_debug(action)


def run_command(args: argparse.Namespace) -> int:
    """Check the parsed command's boundaries (outputs writable, device present), then run it."""
    from ghosted.checks import check_device, check_outputs

    check_outputs(args.command, args)
    if isinstance(getattr(args, "device", None), str):
        check_device(args.device)
    func: Callable[[argparse.Namespace], int | None] = args.func
    return int(func(args) or 0)


def _debug(args: argparse.Namespace | None) -> bool:
    flag = getattr(args, "debug", False) if args is not None else "--debug" in sys.argv[1:]
    return bool(flag) or os.environ.get("GHOSTED_DEBUG", "") not in ("", "0")


def _fail(message: str, args: argparse.Namespace | None, code: int = 2) -> int:
    """One line on stderr (the traceback too with --debug / GHOSTED_DEBUG=1)."""
    if _debug(args):
        traceback.print_exc()
    print(f"ghosted: error: {' '.join(message.split())}", file=sys.stderr, flush=True)
    return code


def main(argv: list[str] | None = None) -> int:
    """Parse, check, run; every failure is one `ghosted: error:` line (exit 2; 1 for a bug in ghosted)."""
    from ghosted.checks import describe_fault

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = None
    try:
        args = build_parser().parse_args(argv)
        return run_command(args)
    except SystemExit as exc:  # argparse: --help, --version, or a bad flag (already reported in one line)
        return exc.code if isinstance(exc.code, int) else 2
    except GhostedError as exc:
        return _fail(str(exc), args)
    except KeyboardInterrupt:
        print("ghosted: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the top level: environment faults and bugs get one line too
        fault = describe_fault(exc)
        if fault is not None:
            return _fail(fault, args)
        where = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
        at = f" at {Path(where.filename).name}:{where.lineno}" if where else ""
        text = str(exc).strip().splitlines()
        return _fail(f"unexpected {type(exc).__name__}{at}: {text[0][:300] if text else ''} -- this is a bug in "
                     "ghosted; rerun with --debug (or GHOSTED_DEBUG=1) for the traceback and report it", args, 1)


if __name__ == "__main__":
    sys.exit(main())
