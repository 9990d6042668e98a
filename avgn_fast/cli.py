"""``avgn-fast`` command line: one sub-command per module in ``avgn_fast.commands``.

Each command module defines ``add_arguments(parser)`` and an importable ``main(**kwargs)``; the
parsed flags are passed to ``main`` by name, so every command is callable from Python as well.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "flops": "GFLOPs per component and per video for a configuration",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="avgn-fast", description="Audio-Visual Glance Network toolkit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        module = importlib.import_module(f"avgn_fast.commands.{name}")
        p = sub.add_parser(name, help=help_text, description=(module.__doc__ or help_text).strip())
        module.add_arguments(p)
        p.set_defaults(_main=module.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    args.pop("command")
    run = args.pop("_main")
    try:
        code = run(**args)
    except (ValueError, FileNotFoundError) as e:
        print(f"avgn-fast: error: {e}", file=sys.stderr)
        return 2
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
