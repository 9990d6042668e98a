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
