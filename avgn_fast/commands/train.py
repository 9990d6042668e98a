"""Train an AVGN on a folder dataset (DIR/labels.csv with columns path,label[,split]).

Decoded clips are cached (default RUN_DIR/cache, or the user cache folder when RUN_DIR is not
writable) so only the first epoch decodes. Each epoch writes RUN_DIR/last.pt (resumable with
--resume) and RUN_DIR/best.pt (best validation top-1), plus RUN_DIR/history.json. ``--init CKPT``
fine-tunes a trained AVGN on the folder: its architecture and weights, with the class layers' rows
carried over for the classes both share (``init_from_checkpoint``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from avgn_fast.checkpoint import init_from_checkpoint, load_checkpoint
from avgn_fast.config import AVGNConfig
from avgn_fast.data.folder import decoded_split, default_cache_dir, read_labels
from avgn_fast.engine.predictor import resolve_device
from avgn_fast.models.avgn import AVGN
from avgn_fast.models.backbones import load_pretrained
from avgn_fast.training.trainer import FolderSource, TrainSettings, fit


def add_arguments(parser) -> None:
    defaults = TrainSettings()
    parser.add_argument("--data", required=True, help="dataset folder holding labels.csv")
    parser.add_argument("--out", required=True, help="run folder for checkpoints (last.pt, best.pt) and history")
    parser.add_argument("--config", default=None, help="configuration name (paper, tiny); default: tiny")
    parser.add_argument("--epochs", type=int, default=defaults.epochs, help=f"epochs; default: {defaults.epochs}")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a config field, e.g. --set audio=false --set k=4 (repeatable)")
    parser.add_argument("--audio-warmup-epochs", type=int, default=defaults.audio_warmup_epochs,
                        help="cheap first-stage epochs training only the audio encoder (skipped without audio); "
                        f"default: {defaults.audio_warmup_epochs}")
    parser.add_argument("--look-epochs", type=int, default=defaults.look_epochs,
                        help="second-stage epochs where AV-TeST, the policy and the local encoder learn from the "
                        f"audio (joint epochs without audio); default: {defaults.look_epochs}")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of initialisation, batch order and "
                        f"random patches; default: {defaults.seed}")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size,
                        help=f"videos per step; default: {defaults.batch_size}")
    parser.add_argument("--lr", type=float, default=defaults.lr,
                        help=f"peak AdamW learning rate; default: {defaults.lr}")
    parser.add_argument("--init", default=None, metavar="CKPT",
                        help="fine-tune: start from this AVGN checkpoint (its architecture; classes matched by name, "
                        "new classes start fresh)")
    parser.add_argument("--init-visual", default=None, metavar="PATH|imagenet",
                        help="torchvision-format MobileNetV2 weights for the visual glance encoder, or 'imagenet' "
                        "for torchvision's (downloaded once; full-width models only)")
    parser.add_argument("--init-local", default=None, metavar="PATH|imagenet",
                        help="torchvision-format ResNet weights for the local encoder, or 'imagenet'")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    parser.add_argument("--train-split", default="train", help="split used for training; default: train")
    parser.add_argument("--val-split", default="val",
                        help="split validated after each epoch ('none' to skip); default: val")
    parser.add_argument("--cache-dir", default=None,
                        help="decoded-clip cache; default: OUT/cache, or $XDG_CACHE_HOME/avgn_fast/clips when OUT "
                        "is not writable")
    parser.add_argument("--allow-outside", action="store_true",
                        help="accept labels.csv paths that are absolute or lead outside the dataset folder")
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:N")


def main(data, out, config: str | None = None, epochs: int = TrainSettings.epochs, set: Sequence[str] = (),
         audio_warmup_epochs: int = TrainSettings.audio_warmup_epochs,
         look_epochs: int = TrainSettings.look_epochs, seed: int = TrainSettings.seed,
         batch_size: int = TrainSettings.batch_size, lr: float = TrainSettings.lr,
         init=None, init_visual=None, init_local=None, resume: bool = False, train_split: str = "train",
         val_split: str | None = "val", cache_dir=None, device: str = "auto", allow_outside: bool = False,
         progress: bool = True) -> int:
    device = resolve_device(device)  # a CUDA request without CUDA fails before anything is decoded
    out = Path(out)
    if init is not None:
        if config is not None or set or init_visual is not None or init_local is not None:
            raise ValueError("--init takes the architecture and weights from the checkpoint: drop --config, --set, "
                             "--init-visual and --init-local")
        start = load_checkpoint(init)
        probe = start.model.config
    else:
        probe = AVGNConfig.from_name(config or "tiny").with_overrides(list(set))
    log = lambda line: print(f"avgn-fast train: {line}")
    cache_dir = default_cache_dir(out / "cache", log=log) if cache_dir is None else Path(cache_dir)
    train_set = decoded_split(data, probe, train_split, cache_dir=cache_dir, progress=progress, log=log,
                              allow_outside=allow_outside)
    cfg = probe.replace(num_classes=len(train_set.classes))
    val_set = None
    if val_split not in (None, "none"):
        if any(entry.split == val_split for entry in read_labels(data, allow_outside=allow_outside)):
            val_set = decoded_split(data, cfg, val_split, cache_dir=cache_dir, progress=progress, log=log,
                                    allow_outside=allow_outside)
        else:
            log(f"no {val_split!r} split in {data}; training without validation")

    settings = TrainSettings(epochs=epochs, audio_warmup_epochs=audio_warmup_epochs, look_epochs=look_epochs,
                             batch_size=batch_size, lr=lr, seed=seed)
    torch.manual_seed(seed)
    model = AVGN(cfg)
    if init_visual is not None and not resume:
        if model.visual is None:
            raise ValueError("--init-visual given but this configuration has no visual glance encoder")
        load_pretrained(model.visual, init_visual)
    if init_local is not None and not resume:
        load_pretrained(model.local, init_local)
    if init is not None and not resume:
        moved = init_from_checkpoint(model, train_set.classes, init, loaded=start)
        del start  # its weights are in the model now
        log(f"started from {init}: {moved.tensors} tensors, class rows of "
              f"{len(moved.shared_classes)} shared classes copied; new classes: {', '.join(moved.new_classes) or '-'}; "
              f"dropped: {', '.join(moved.dropped_classes) or '-'}")
    model.to(device)
    result = fit(model, FolderSource(train_set), None if val_set is None else FolderSource(val_set),
                 settings=settings, class_names=train_set.classes, out_dir=out, resume=resume, progress=progress,
                 log=lambda line: tqdm.write(line))
    (out / "history.json").write_text(json.dumps(result.history, indent=2))
    best = result.best or {}
    summary = f"val top-1 {best['val_top1']:.4f} at epoch {best['epoch']}" if "val_top1" in best else "no validation"
    print(f"trained {cfg.name} ({len(result.history)} epochs): {summary}; checkpoints in {out}")
    return 0
