"""``avgn-fast`` command line: one sub-command per module in ``avgn_fast.commands``.

Each command module defines ``add_arguments(parser)`` and an importable ``main(**kwargs)``; the
parsed flags are passed to ``main`` by name, so every command is callable from Python as well.

Help is instant: a command module imports only the standard library at its top and in
``add_arguments``; torch, the engine, the training stack, tqdm and matplotlib are imported inside
``main``. The console script enters through ``avgn_fast_cli`` (outside the package), which defers the
package's ``__init__`` (it imports torch to register the ops) to ``before_run``, so ``--help`` and usage
errors never import torch (``benchmarks/bench_cli.py`` times it).

Errors print one line, ``avgn-fast: error: ...``, and no traceback (``AVGN_DEBUG=1`` shows it). Exit
status: 0 done, 1 a runtime failure (or the command's own failure, e.g. every input failed), 2 a usage
problem (bad arguments; ValueError or FileNotFoundError from a command's checks), 130 Ctrl-C.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable

COMMANDS = {
    "flops": "GFLOPs per component and per video for a configuration",
    "synth": "write the AVSynth audio-visual benchmark (encoded videos + labels.csv)",
    "predict": "classify video files with a trained checkpoint (whole, or in windows with --window)",
    "stream": "classify live sources (FIFO, rtsp://, udp://, http://, /dev/video0) window by window as they play",
    "train": "train an AVGN (or a baseline) on a folder dataset",
    "eval": "top-1, mAP and GFLOPs per video of a checkpoint on a folder dataset",
    "calibrate": "choose a checkpoint's early-exit threshold on a labelled split and save it with the model",
    "pareto": "accuracy-vs-GFLOPs sweep of a checkpoint and its baselines: csv, json, md table and plot",
    "demo": "synthesize AVSynth, train AVGN and its baselines, and plot their accuracy-vs-GFLOPs curve",
    "profile": "throughput per backend, precision and batch size: videos/s, latency, ms per stage, TFLOP/s",
    "export": "export a checkpoint's inference stages: torch.export programs, ONNX graphs or TensorRT engines",
}


class UsageError(Exception):
    """Bad command-line arguments."""


class _Parser(argparse.ArgumentParser):
    """Raises ``UsageError`` instead of printing usage and exiting, so ``main`` reports it in one line."""

    def error(self, message: str):
        raise UsageError(f"{message} (see '{self.prog} --help')")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """One help style for every command: the description keeps the command module's docstring as written
    (its paragraphs), and an option whose help does not state its default gets ``(default: X)``."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        uninformative = action.default in (None, False, [], argparse.SUPPRESS)
        if not action.option_strings or uninformative or "default" in text:
            return text
        return f"{text} (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    """The ``avgn-fast`` parser: one sub-parser per ``COMMANDS`` entry, its options from the command module."""
    parser = _Parser(prog="avgn-fast", description="Audio-Visual Glance Network toolkit",
                     formatter_class=_HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        module = importlib.import_module(f"avgn_fast.commands.{name}")
        p = sub.add_parser(name, help=help_text, description=(module.__doc__ or help_text).strip(),
                           formatter_class=_HelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_main=module.main)
    return parser


def main(argv: list[str] | None = None, *, before_run: Callable[[], object] | None = None) -> int:
    """Run one command from ``argv`` (default ``sys.argv[1:]``) and return its exit status (module docstring).

    ``before_run`` is called once the arguments parse, just before the command; its errors are reported
    like the command's.
    """
    try:
        args = vars(build_parser().parse_args(argv))
    except UsageError as e:
        return _error(str(e), 2)
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0
    args.pop("command")
    run = args.pop("_main")
    try:
        if before_run is not None:
            before_run()
        code = run(**args)
    except KeyboardInterrupt:
        print("avgn-fast: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if os.environ.get("AVGN_DEBUG") == "1":
            raise
        if isinstance(e, (ValueError, FileNotFoundError)):
            return _error(str(e), 2)
        return _error(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__, 1)
    return int(code or 0)


def _error(message: str, code: int) -> int:
    print(f"avgn-fast: error: {' '.join(message.split())}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
