"""Train an AVGN on a folder dataset (DIR/labels.csv with columns path,label[,split]).

Decoded clips are cached (default RUN_DIR/cache, or the user cache folder when RUN_DIR is not
writable) so only the first epoch decodes. Each epoch writes RUN_DIR/last.pt (resumable with
--resume) and RUN_DIR/best.pt (best validation top-1), plus RUN_DIR/history.json. ``--init CKPT``
fine-tunes a trained AVGN on the folder: its architecture and weights, with the class layers' rows
carried over for the classes both share (``init_from_checkpoint``).

By default training stops at the plateau: after each joint epoch the validation top-1 is measured, and
the run ends once ``--patience`` joint epochs bring no gain (at most ``--max-epochs``); while the validation
top-1 is still at chance (within three standard errors of 1/classes) the run has not started and goes on. Without a
validation split a share of the training videos is held out for it (said in the log). ``--epochs N``
trains exactly N joint epochs instead. RUN_DIR/history.json records the run: epochs, wall time,
whether it plateaued, the validation curve, and every epoch's metrics.

Training batches are augmented on the fly (a mild random resized crop, flip, colour jitter, SpecAugment
masks, gain; ``--no-augment`` turns all off; ``--no-flip`` for labels a mirror changes). Temporal jitter is
off unless asked: with ``--temporal-density D`` the training split is decoded and cached at D x T frames
and T of them sampled each epoch. Validation, eval and predict see the clips as decoded at T frames.
docs/augmentation.md has what each setting did on AVSynth. ``--mixup ALPHA`` / ``--cutmix ALPHA`` (off by
default, and not covered by ``--no-augment``) also mix the training batches in pairs, the labels becoming soft
targets.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Defaults:
    """``TrainSettings``' defaults for the flags, spelled here so that --help does not import torch
    (tests/test_api.py checks that they agree)."""

    epochs: int = 30  # --max-epochs
    audio_warmup_epochs: int = 3
    look_epochs: int = 3
    seed: int = 0
    batch_size: int = 16
    lr: float = 2e-3
    patience: int = 4
    mixup: float = 0.0
    cutmix: float = 0.0


@dataclass(frozen=True)
class AugmentDefaults:
    """``TrainSettings``' augmentation defaults (``avgn_fast.data.augment.Augmentation``), spelled here for the
    same reason as ``Defaults``; ``OFF`` turns each one off (``--no-augment``)."""

    temporal_density: int = 1
    crop_min_scale: float = 0.8
    crop_max_ratio: float = 1.1
    flip: bool = True
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    time_mask: float = 0.2
    freq_mask: float = 0.15
    gain_db: float = 6.0


AUGMENT_OFF = AugmentDefaults(temporal_density=1, crop_min_scale=1.0, crop_max_ratio=1.0, flip=False, brightness=0.0,
                              contrast=0.0, saturation=0.0, time_mask=0.0, freq_mask=0.0, gain_db=0.0)


def add_augment_arguments(parser) -> None:
    """Flags of the training-time augmentation (training batches only; eval and predict never augment)."""
    d = AugmentDefaults()
    group = parser.add_argument_group("augmentation (training batches only)")
    group.add_argument("--no-augment", action="store_true",
                       help="train on the clips as decoded: every augmentation below off (excludes their flags)")
    group.add_argument("--temporal-density", type=int, default=d.temporal_density,
                       help="decode (and cache) this many times T frames per training video and sample T of them "
                       f"at random each epoch; 1: the same T frames every epoch; default: {d.temporal_density}")
    group.add_argument("--crop-min-scale", type=float, default=d.crop_min_scale,
                       help="random resized crop: smallest box area as a fraction of the frame; 1: no crop; "
                       f"default: {d.crop_min_scale}")
    group.add_argument("--crop-max-ratio", type=float, default=d.crop_max_ratio,
                       help=f"random resized crop: box aspect within [1/R, R]; default: {d.crop_max_ratio:.4f}")
    group.add_argument("--no-flip", dest="flip", action="store_false",
                       help="no random left-right mirror (for labels a mirror changes: left/right, diagonals, text)")
    for name in ("brightness", "contrast", "saturation"):
        group.add_argument(f"--{name}", type=float, default=getattr(d, name),
                           help=f"{name} factor uniform in [1-x, 1+x]; 0: off; default: {getattr(d, name)}")
    group.add_argument("--time-mask", type=float, default=d.time_mask,
                       help="SpecAugment: mask up to this fraction of each mel window's time steps; 0: off; "
                       f"default: {d.time_mask}")
    group.add_argument("--freq-mask", type=float, default=d.freq_mask,
                       help="SpecAugment: mask up to this fraction of each mel window's bins; 0: off; "
                       f"default: {d.freq_mask}")
    group.add_argument("--gain-db", type=float, default=d.gain_db,
                       help=f"random audio gain within ±this many dB; 0: off; default: {d.gain_db}")
    mixing = parser.add_argument_group("mixing (training batches only; not covered by --no-augment)")
    mixing.add_argument("--mixup", type=float, default=Defaults.mixup, metavar="ALPHA",
                        help="mixup: blend each training video with another, share ~ Beta(ALPHA, ALPHA), labels "
                        "mixed alike (0.2-0.4 usual); 0: off; default: 0")
    mixing.add_argument("--cutmix", type=float, default=Defaults.cutmix, metavar="ALPHA",
                        help="CutMix: paste another training video's box into every frame (and its mel time span), "
                        "labels mixed by area (1 usual; with --mixup, one or the other per batch); 0: off; "
                        "default: 0")


def augment_settings(no_augment: bool, **flags) -> dict:
    """``TrainSettings``' augmentation fields from the flags; ``no_augment`` gives ``AUGMENT_OFF`` and refuses
    any augmentation flag set away from its default."""
    if not no_augment:
        return flags
    changed = [name for name, value in flags.items() if value != getattr(AugmentDefaults, name)]
    if changed:
        spelled = ["--no-flip" if name == "flip" else "--" + name.replace("_", "-") for name in changed]
        raise ValueError(f"--no-augment turns every augmentation off: drop {', '.join(spelled)}")
    return {name: getattr(AUGMENT_OFF, name) for name in flags}


def add_arguments(parser) -> None:
    defaults = Defaults()
    parser.add_argument("--data", required=True, help="dataset folder holding labels.csv")
    parser.add_argument("--out", required=True, help="run folder for checkpoints (last.pt, best.pt) and history")
    parser.add_argument("--config", default=None, help="configuration name (paper, tiny); default: tiny")
    # stopping: at the plateau (--patience, --max-epochs) or after a fixed count (--epochs)
    parser.add_argument("--patience", type=int, default=None,
                        help="stop once this many joint epochs in a row do not beat the best validation top-1; "
                        f"default: {defaults.patience}")
    parser.add_argument("--max-epochs", type=int, default=None,
                        help=f"cap on joint epochs when stopping at the plateau; default: {defaults.epochs}")
    parser.add_argument("--epochs", type=int, default=None,
                        help="train exactly this many joint epochs, no early stopping (excludes --patience and "
                        "--max-epochs)")
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
                        help="torchvision-format MobileNetV2 weights for the visual glance encoder, an AVGN "
                        "checkpoint (its visual glance encoder), or 'imagenet' for torchvision's (downloaded once; "
                        "full-width models only)")
    parser.add_argument("--init-local", default=None, metavar="PATH|imagenet",
                        help="torchvision-format ResNet weights for the local encoder, an AVGN checkpoint (its local "
                        "encoder: e.g. a dense baseline that starts from a trained AVGN's), or 'imagenet'")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    parser.add_argument("--train-split", default="train", help="split used for training; default: train")
    parser.add_argument("--val-split", default="val",
                        help="split validated after each joint epoch; when absent (or 'none') and stopping at the "
                        "plateau, part of the training videos is held out instead; default: val")
    parser.add_argument("--cache-dir", default=None,
                        help="decoded-clip cache; default: OUT/cache, or $XDG_CACHE_HOME/avgn_fast/clips when OUT "
                        "is not writable")
    parser.add_argument("--allow-outside", action="store_true",
                        help="accept labels.csv paths that are absolute or lead outside the dataset folder")
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:N")
    add_augment_arguments(parser)


def main(data, out, config: str | None = None, epochs: int | None = None, set: Sequence[str] = (),
         audio_warmup_epochs: int = Defaults.audio_warmup_epochs,
         look_epochs: int = Defaults.look_epochs, seed: int = Defaults.seed,
         batch_size: int = Defaults.batch_size, lr: float = Defaults.lr,
         patience: int | None = None, max_epochs: int | None = None,
         init=None, init_visual=None, init_local=None, resume: bool = False, train_split: str = "train",
         val_split: str | None = "val", cache_dir=None, device: str = "auto", allow_outside: bool = False,
         progress: bool = True, no_augment: bool = False,
         temporal_density: int = AugmentDefaults.temporal_density,
         crop_min_scale: float = AugmentDefaults.crop_min_scale, crop_max_ratio: float = AugmentDefaults.crop_max_ratio,
         flip: bool = AugmentDefaults.flip, brightness: float = AugmentDefaults.brightness,
         contrast: float = AugmentDefaults.contrast, saturation: float = AugmentDefaults.saturation,
         time_mask: float = AugmentDefaults.time_mask, freq_mask: float = AugmentDefaults.freq_mask,
         gain_db: float = AugmentDefaults.gain_db, mixup: float = Defaults.mixup,
         cutmix: float = Defaults.cutmix) -> int:
    import torch
    from tqdm import tqdm

    from avgn_fast.checkpoint import init_from_checkpoint, load_checkpoint
    from avgn_fast.config import AVGNConfig
    from avgn_fast.data.folder import decoded_split, default_cache_dir, read_labels
    from avgn_fast.engine.predictor import resolve_device
    from avgn_fast.models.avgn import AVGN
    from avgn_fast.models.backbones import load_pretrained
    from avgn_fast.training.batches import Mixing
    from avgn_fast.training.trainer import FolderSource, TrainSettings, fit

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
    augment = augment_settings(no_augment, temporal_density=temporal_density, crop_min_scale=crop_min_scale,
                               crop_max_ratio=crop_max_ratio, flip=flip, brightness=brightness, contrast=contrast,
                               saturation=saturation, time_mask=time_mask, freq_mask=freq_mask, gain_db=gain_db)
    Mixing(mixup, cutmix)  # a bad concentration is refused before anything is decoded
    cache_dir = default_cache_dir(out / "cache", log=log) if cache_dir is None else Path(cache_dir)
    # the training decode is denser (temporal jitter samples T of its frames); validation decodes T
    dense = probe.replace(num_frames=probe.num_frames * augment["temporal_density"])
    train_set = decoded_split(data, dense, train_split, cache_dir=cache_dir, progress=progress, log=log,
                              allow_outside=allow_outside)
    cfg = probe.replace(num_classes=len(train_set.classes))
    val_set = None
    if val_split not in (None, "none"):
        if any(entry.split == val_split for entry in read_labels(data, allow_outside=allow_outside)):
            val_set = decoded_split(data, cfg, val_split, cache_dir=cache_dir, progress=progress, log=log,
                                    allow_outside=allow_outside)
        else:
            log(f"no {val_split!r} split in {data}")

    settings = TrainSettings(**stopping(epochs, patience, max_epochs), audio_warmup_epochs=audio_warmup_epochs,
                             look_epochs=look_epochs, batch_size=batch_size, lr=lr, seed=seed, mixup=mixup,
                             cutmix=cutmix, **augment)
    torch.manual_seed(seed)
    model = AVGN(cfg)
    if init_visual is not None and not resume:
        if model.visual is None:
            raise ValueError("--init-visual given but this configuration has no visual glance encoder")
        load_pretrained(model.visual, init_visual, part="visual")
    if init_local is not None and not resume:
        if model.local is None:
            raise ValueError("--init-local given but this configuration has no local encoder (audio-only)")
        load_pretrained(model.local, init_local, part="local")
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
    (out / "history.json").write_text(json.dumps({**result.summary, "history": result.history}, indent=2))
    best, run = result.best or {}, result.summary
    summary = f"val top-1 {best['val_top1']:.4f} at epoch {best['epoch']}" if "val_top1" in best else "no validation"
    print(f"trained {cfg.name} ({len(result.history)} epochs, {run['wall_s']:.0f} s, stopped: {run['stopped']}): "
          f"{summary}; checkpoints in {out}")
    return 0


def stopping(epochs: int | None, patience: int | None, max_epochs: int | None) -> dict:
    """``TrainSettings``' stopping fields from the flags: ``epochs`` (a fixed count) or ``patience`` and
    ``max_epochs`` (the plateau, the default); ValueError when both kinds are given."""
    if epochs is not None:
        if patience is not None or max_epochs is not None:
            raise ValueError("--epochs trains a fixed count: drop --patience and --max-epochs, or drop --epochs")
        return {"epochs": epochs, "patience": None}
    return {"epochs": Defaults.epochs if max_epochs is None else max_epochs,
            "patience": Defaults.patience if patience is None else patience}
