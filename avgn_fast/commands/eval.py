"""Evaluate a checkpoint on a folder dataset: top-1, mAP and mean GFLOPs (GMACs) per video.

Only inference-time fields can be overridden: ``k`` (steps, at most the checkpoint's) and
``exit_threshold`` (early exit τ); everything else is fixed by the checkpoint.
"""

from __future__ import annotations

import json as jsonlib
from collections.abc import Sequence
from pathlib import Path

from avgn_fast.checkpoint import load_checkpoint
from avgn_fast.data.folder import decoded_split, default_cache_dir
from avgn_fast.engine.predictor import resolve_device
from avgn_fast.training.trainer import FolderSource, evaluate

INFERENCE_FIELDS = ("k", "exit_threshold")


def add_arguments(parser) -> None:
    parser.add_argument("--checkpoint", required=True, help="checkpoint file written by avgn-fast train")
    parser.add_argument("--data", required=True, help="dataset folder holding labels.csv")
    parser.add_argument("--split", default="test", help="split to evaluate ('all' for every row); default: test")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help=f"inference override, one of {', '.join(INFERENCE_FIELDS)} (e.g. --set k=4)")
    parser.add_argument("--batch-size", type=int, default=32, help="videos per batch; default: 32")
    parser.add_argument("--cache-dir", default=None,
                        help="decoded-clip cache; default: the checkpoint's folder/cache, or "
                        "$XDG_CACHE_HOME/avgn_fast/clips when that folder is not writable")
    parser.add_argument("--allow-outside", action="store_true",
                        help="accept labels.csv paths that are absolute or lead outside the dataset folder")
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:N")
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON")


def main(checkpoint, data, split: str = "test", set: Sequence[str] = (), batch_size: int = 32, cache_dir=None,
         device: str = "auto", json: bool = False, allow_outside: bool = False, progress: bool = True) -> int:
    device = resolve_device(device)  # a CUDA request without CUDA fails before anything is decoded
    ckpt = load_checkpoint(checkpoint)
    config = ckpt.model.config
    changed = config.with_overrides(list(set))
    fixed = [f"{name}={getattr(changed, name)!r}" for name in config.to_dict()
             if name not in INFERENCE_FIELDS and getattr(changed, name) != getattr(config, name)]
    if fixed:
        raise ValueError(f"cannot override {', '.join(fixed)} at evaluation: only {', '.join(INFERENCE_FIELDS)} "
                         "can change; the rest is fixed by the checkpoint")
    log = lambda line: print(f"avgn-fast eval: {line}")
    cache_dir = default_cache_dir(Path(checkpoint).parent / "cache", log=log) if cache_dir is None else Path(cache_dir)
    dataset = decoded_split(data, config, None if split == "all" else split, cache_dir=cache_dir,
                            class_names=ckpt.class_names, progress=progress, log=log, allow_outside=allow_outside)
    model = ckpt.model.to(device)
    requested = {item.partition("=")[0].strip().replace("-", "_") for item in set}
    result = evaluate(model, FolderSource(dataset), batch_size=batch_size, k=changed.k if "k" in requested else None,
                      exit_threshold=changed.exit_threshold, progress=progress)
    if json:
        print(jsonlib.dumps({"checkpoint": str(checkpoint), "split": split, "overrides": list(set),
                             **result.as_dict()}, indent=2))
    else:
        print(f"{checkpoint} on {data} [{split}], {result.videos} videos: top-1 {100 * result.top1:.2f} %  "
              f"mAP {100 * result.mean_ap:.2f} %  GFLOPs/video {result.gflops:.4f}")
    return 0
