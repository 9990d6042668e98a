"""``avgn-fast`` command line: one sub-command per module in ``avgn_fast.commands``.

Each command module defines ``add_arguments(parser)`` and an importable ``main(**kwargs)``; the
parsed flags are passed to ``main`` by name, so every command is callable from Python as well.

Errors print one line, ``avgn-fast: error: ...``, and no traceback (``AVGN_DEBUG=1`` shows it). Exit
status: 0 done, 1 a runtime failure (or the command's own failure, e.g. every input failed), 2 a usage
problem (bad arguments; ValueError or FileNotFoundError from a command's checks), 130 Ctrl-C.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

COMMANDS = {
    "flops": "GFLOPs per component and per video for a configuration",
    "synth": "write the AVSynth audio-visual benchmark (encoded videos + labels.csv)",
    "predict": "classify video files with a trained checkpoint",
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


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="avgn-fast", description="Audio-Visual Glance Network toolkit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        module = importlib.import_module(f"avgn_fast.commands.{name}")
        p = sub.add_parser(name, help=help_text, description=(module.__doc__ or help_text).strip())
        module.add_arguments(p)
        p.set_defaults(_main=module.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command from ``argv`` (default ``sys.argv[1:]``) and return its exit status (module docstring)."""
    try:
        args = vars(build_parser().parse_args(argv))
    except UsageError as e:
        return _error(str(e), 2)
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0
    args.pop("command")
    run = args.pop("_main")
    try:
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
