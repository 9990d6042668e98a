"""Export a checkpoint as a deployment folder: its inference stages as torch.export programs, ONNX graphs or
TensorRT engines.

One file per stage (glance, avtest, aespa, crop, local, head, step_head; those the configuration has)
and a manifest.json with everything else the folder needs to run with no checkpoint: config, class
names, cost, each stage's inputs and outputs, precision, k and versions. `avgn-fast predict --checkpoint
DIR`, ``avgn_fast.load(DIR)`` and ``Predictor(DIR)`` run it. ``tensorrt`` needs torch-tensorrt and a CUDA
device.
"""

from __future__ import annotations

import sys

# avgn_fast.engine.export.FORMATS (from engine.runtime), spelled here so that --help does not import torch
# (tests/test_api.py checks that they agree)
FORMATS = ("exported-program", "onnx", "tensorrt")


def add_arguments(parser) -> None:
    parser.add_argument("--checkpoint", required=True, help="checkpoint file written by `avgn-fast train`")
    parser.add_argument("--format", required=True, choices=FORMATS, help="what to write")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="folder for the stage files and manifest.json; run it with `predict --checkpoint DIR`")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="batch the graphs are traced at (TensorRT engines, and an ONNX glance that resizes, keep "
                             "it; the runtime pads to it; default 8)")
    parser.add_argument("--precision", default="fp32", help="fp32, fp16 (CUDA), bf16 or auto (default fp32)")
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:N")
    parser.add_argument("--k", type=int, default=None, help="frames looked at closely (default: the checkpoint's)")


def main(checkpoint, format: str, out, batch_size: int = 8, precision: str = "fp32", device: str = "auto",
         k: int | None = None) -> int:
    from avgn_fast.checkpoint import load_checkpoint
    from avgn_fast.engine.export import export
    from avgn_fast.engine.predictor import resolve_device

    if batch_size < 1:
        raise ValueError(f"batch size must be ≥ 1, got {batch_size}")
    ckpt = load_checkpoint(checkpoint)  # a file: an exported folder cannot be exported again
    manifest = export(ckpt.model, format, out, batch_size=batch_size, precision=precision,
                      device=resolve_device(device), k=k, class_names=ckpt.class_names)
    for name, entry in manifest["stages"].items():
        print(f"{name:<10} {entry['file']}")
    for note in manifest["notes"]:
        print(f"note: {note}", file=sys.stderr)
    print(f"{len(manifest['stages'])} stages ({format}) and manifest.json written to {out}; run it with "
          f"`avgn-fast predict --checkpoint {out} VIDEO…`", file=sys.stderr)
    return 0
