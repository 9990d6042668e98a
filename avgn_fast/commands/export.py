"""Export a checkpoint's inference stages as torch.export programs, ONNX graphs or TensorRT engines.

One file per stage (glance, avtest, aespa, local, head, step_head; those the configuration has)
and a manifest.json with each stage's inputs and outputs. The patch crop runs in torch between
the stages. ``tensorrt`` needs torch-tensorrt and a CUDA device.
"""

from __future__ import annotations

import sys


def add_arguments(parser) -> None:
    from avgn_fast.engine.export import FORMATS

    parser.add_argument("--checkpoint", required=True, help="checkpoint file written by `avgn-fast train`")
    parser.add_argument("--format", required=True, choices=FORMATS, help="what to write")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for the stage files and manifest.json")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="batch the graphs are traced at (ONNX and TensorRT keep it; default 8)")
    parser.add_argument("--precision", default="fp32", help="fp32, fp16 (CUDA), bf16 or auto (default fp32)")
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:N")
    parser.add_argument("--k", type=int, default=None, help="frames looked at closely (default: the checkpoint's)")


def main(checkpoint, format: str, out, batch_size: int = 8, precision: str = "fp32", device: str = "auto",
         k: int | None = None) -> int:
    from avgn_fast.checkpoint import load
    from avgn_fast.engine.export import export
    from avgn_fast.engine.predictor import resolve_device

    if batch_size < 1:
        raise ValueError(f"batch size must be ≥ 1, got {batch_size}")
    model = load(checkpoint)
    manifest = export(model, format, out, batch_size=batch_size, precision=precision, device=resolve_device(device),
                      k=k)
    for name, entry in manifest["stages"].items():
        print(f"{name:<10} {entry['file']}")
    for note in manifest["notes"]:
        print(f"note: {note}", file=sys.stderr)
    print(f"{len(manifest['stages'])} stages ({format}) and manifest.json written to {out}", file=sys.stderr)
    return 0
