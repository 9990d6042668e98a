"""Choose a checkpoint's early-exit threshold τ on a labelled split and write it into a new checkpoint.

Every video of the split (default: val) runs all K steps once; for each candidate τ the exits,
top-1 and GFLOPs follow from the per-step probabilities. The chosen τ needs the fewest steps on
average while keeping top-1 within ``--max-drop`` points (default 0) of taking every step. The new checkpoint
(default: CKPT's name + ``_tau.pt``) is the same model with ``exit_threshold`` set, so ``predict``,
``eval`` and ``Predictor`` exit early with it by default; the choice is recorded in its metrics.
"""

from __future__ import annotations

from pathlib import Path

from avgn_fast.checkpoint import load_checkpoint, save_checkpoint
from avgn_fast.data.folder import decoded_split, default_cache_dir
from avgn_fast.engine.predictor import resolve_device
from avgn_fast.pareto import choose_threshold, exit_engine, exit_outcome, model_variant, step_probs
from avgn_fast.training.trainer import FolderSource


def add_arguments(parser) -> None:
    parser.add_argument("--checkpoint", required=True, help="checkpoint file written by avgn-fast train")
    parser.add_argument("--data", required=True, help="dataset folder holding labels.csv")
    parser.add_argument("--split", default="val", help="split to choose τ on; default: val")
    parser.add_argument("--max-drop", type=float, default=0.0,
                        help="top-1 points τ may lose against taking every step on the split; default: 0")
    parser.add_argument("--out", default=None, help="new checkpoint; default: CHECKPOINT's name + _tau.pt")
    parser.add_argument("--batch-size", type=int, default=32, help="videos per batch; default: 32")
    parser.add_argument("--cache-dir", default=None,
                        help="decoded-clip cache; default: the checkpoint's folder/cache, or "
                        "$XDG_CACHE_HOME/avgn_fast/clips when that folder is not writable")
    parser.add_argument("--allow-outside", action="store_true",
                        help="accept labels.csv paths that are absolute or lead outside the dataset folder")
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:N")


def main(checkpoint, data, split: str = "val", max_drop: float = 0.0, out=None, batch_size: int = 32,
         cache_dir=None, device: str = "auto", allow_outside: bool = False, progress: bool = True) -> int:
    if not 0 <= max_drop <= 100:
        raise ValueError(f"--max-drop is in top-1 points, between 0 and 100; got {max_drop}")
    dev = resolve_device(device)
    ckpt = load_checkpoint(checkpoint)
    config = ckpt.model.config
    out = Path(checkpoint).with_name(Path(checkpoint).stem + "_tau.pt") if out is None else Path(out)
    log = lambda line: print(f"avgn-fast calibrate: {line}")
    cache_dir = default_cache_dir(Path(checkpoint).parent / "cache", log=log) if cache_dir is None else Path(cache_dir)
    dataset = decoded_split(data, config, split, cache_dir=cache_dir, class_names=ckpt.class_names,
                            progress=progress, log=log, allow_outside=allow_outside)
    source = FolderSource(dataset)
    model = model_variant(ckpt.model.to(dev).eval(), config.patch_size, config.glance_size)  # never exits on its own
    engine = exit_engine(model, model.steps, backend="eager", precision="auto", batch_size=batch_size)
    probs, labels = step_probs(engine, source, batch_size=batch_size, device=dev, progress=progress)
    cost = model.cost()
    choice = choose_threshold(probs, labels, per_video=cost.per_video, per_step=cost.per_step,
                              max_drop=max_drop / 100)

    print(f"{checkpoint} on {data} [{split}], {len(source)} videos, K={model.steps}:")
    print(f"{'threshold':>10} {'top-1 %':>8} {'steps':>6} {'GFLOPs/video':>13}")
    print(f"{'none':>10} {100 * choice.full_top1:8.2f} {model.steps:6.2f} {choice.full_gflops:13.4f}")
    for tau in (0.5, 0.9, 0.99):  # a few fixed points for scale
        top1, steps = exit_outcome(probs, labels, tau)
        print(f"{tau:>10.4g} {100 * top1:8.2f} {steps:6.2f} {cost.per_video + steps * cost.per_step:13.4f}")
    if choice.threshold is None:
        print(f"no threshold saves a step within {max_drop} top-1 points; no checkpoint written")
        return 0
    print(f"{choice.threshold:>10.4g} {100 * choice.top1:8.2f} {choice.steps:6.2f} {choice.gflops:13.4f}  <- chosen: "
          f"{100 * (1 - choice.gflops / choice.full_gflops):.0f} % fewer GFLOPs")
    ckpt.model.config = config.replace(exit_threshold=choice.threshold)
    calibration = {"threshold": choice.threshold, "split": split, "videos": len(source), "max_drop": max_drop,
                   "top1": choice.top1, "steps": choice.steps, "gflops": choice.gflops,
                   "full_top1": choice.full_top1, "full_gflops": choice.full_gflops}
    save_checkpoint(out, ckpt.model.cpu(), class_names=ckpt.class_names,
                    metrics={**ckpt.metrics, "calibration": calibration})
    print(f"written {out} (exit_threshold={choice.threshold:.6g})")
    return 0

