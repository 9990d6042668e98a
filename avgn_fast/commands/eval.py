"""Evaluate a checkpoint on a folder dataset: top-1, mAP and mean GFLOPs (GMACs) per video.

The videos run through the engine ``predict`` uses (``GlanceEngine``: the same backends, precisions,
batched early exit), so the numbers are what ``predict`` would report. Only inference settings can
change (``--k``, ``--exit-threshold``: ``InferenceSettings``); the architecture is the checkpoint's.
"""

from __future__ import annotations

import json as jsonlib
from pathlib import Path

from avgn_fast.commands.options import add_engine_arguments, add_inference_arguments


def add_arguments(parser) -> None:
    parser.add_argument("--checkpoint", required=True, help="checkpoint file written by avgn-fast train")
    parser.add_argument("--data", required=True, help="dataset folder holding labels.csv")
    parser.add_argument("--split", default="test", help="split to evaluate ('all' for every row); default: test")
    add_inference_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=32, help="videos per batch; default: 32")
    parser.add_argument("--cache-dir", default=None,
                        help="decoded-clip cache; default: the checkpoint's folder/cache, or "
                        "$XDG_CACHE_HOME/avgn_fast/clips when that folder is not writable")
    parser.add_argument("--allow-outside", action="store_true",
                        help="accept labels.csv paths that are absolute or lead outside the dataset folder")
    add_engine_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON")


def main(checkpoint, data, split: str = "test", k: int | None = None, exit_threshold: str = "checkpoint",
         batch_size: int = 32, cache_dir=None, device: str = "auto", backend: str = "eager", precision: str = "auto",
         json: bool = False, allow_outside: bool = False, progress: bool = True) -> int:
    from avgn_fast.checkpoint import load_checkpoint
    from avgn_fast.config import InferenceSettings, parse_exit_threshold
    from avgn_fast.data.folder import decoded_split, default_cache_dir
    from avgn_fast.engine.backends import resolve_backend, resolve_precision
    from avgn_fast.engine.batch import resolve_device
    from avgn_fast.training.trainer import FolderSource, evaluate

    # every setting is checked before anything is loaded or decoded
    dev = resolve_device(device)
    resolve_backend(backend, dev)
    resolve_precision(precision, dev)
    settings = InferenceSettings(k=k, exit_threshold=parse_exit_threshold(str(exit_threshold), "--exit-threshold"))
    ckpt = load_checkpoint(checkpoint)
    config = ckpt.model.config
    settings.steps(config)
    log = lambda line: print(f"avgn-fast eval: {line}")
    cache_dir = default_cache_dir(Path(checkpoint).parent / "cache", log=log) if cache_dir is None else Path(cache_dir)
    dataset = decoded_split(data, config, None if split == "all" else split, cache_dir=cache_dir,
                            class_names=ckpt.class_names, progress=progress, log=log, allow_outside=allow_outside)
    result = evaluate(ckpt.model.to(dev), FolderSource(dataset), batch_size=batch_size, k=settings.k,
                      exit_threshold=settings.exit_threshold, backend=backend, precision=precision, progress=progress)
    if json:
        print(jsonlib.dumps({"checkpoint": str(checkpoint), "split": split, "k": settings.steps(config),
                             "exit_threshold": settings.threshold(config), "backend": backend, "precision": precision,
                             **result.as_dict()}, indent=2))
    else:
        print(f"{checkpoint} on {data} [{split}], {result.videos} videos: top-1 {100 * result.top1:.2f} %  "
              f"mAP {100 * result.mean_ap:.2f} %  GFLOPs/video {result.gflops:.4f}")
    return 0
