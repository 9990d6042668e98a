"""Choose a checkpoint's early-exit threshold τ on a labelled split and write it into a new checkpoint.

Every video of the split (default: val) runs all K steps once through the engine ``predict`` uses
(``GlanceEngine``, never exiting early); for each candidate τ the exits, top-1 and GFLOPs follow
from the per-step probabilities. The chosen τ needs the fewest steps on average while keeping top-1
within ``--max-drop`` points (default 0) of taking every step, at τ and at every threshold within
``--margin`` of it (default 0.05), so that it does not sit on a narrow ridge of the split's curve
(``pareto.choose_threshold``). ``--check-split`` (e.g. test) then reports what τ loses on videos it was
not chosen on: top-1 at τ and after every step, and the videos an exit turns from right to wrong. The
new checkpoint (default: CKPT's name + ``_tau.pt``) is the same model with ``exit_threshold`` set, so
``predict``, ``eval`` and ``Predictor`` exit early with it by default; the choice is recorded in its metrics.
"""

from __future__ import annotations

from pathlib import Path

from avgn_fast.commands.options import add_engine_arguments


def add_arguments(parser) -> None:
    parser.add_argument("--checkpoint", required=True, help="checkpoint file written by avgn-fast train")
    parser.add_argument("--data", required=True, help="dataset folder holding labels.csv")
    parser.add_argument("--split", default="val", help="split to choose τ on; default: val")
    parser.add_argument("--max-drop", type=float, default=0.0,
                        help="top-1 points τ may lose against taking every step on the split; default: 0")
    parser.add_argument("--margin", type=float, default=0.05,
                        help="τ must hold top-1 at every threshold within this distance of it; default: 0.05")
    parser.add_argument("--check-split", default=None, metavar="SPLIT",
                        help="also report what the chosen τ loses on this split (e.g. test)")
    parser.add_argument("--out", default=None, help="new checkpoint; default: CHECKPOINT's name + _tau.pt")
    parser.add_argument("--batch-size", type=int, default=32, help="videos per batch; default: 32")
    parser.add_argument("--cache-dir", default=None,
                        help="decoded-clip cache; default: the checkpoint's folder/cache, or "
                        "$XDG_CACHE_HOME/avgn_fast/clips when that folder is not writable")
    parser.add_argument("--allow-outside", action="store_true",
                        help="accept labels.csv paths that are absolute or lead outside the dataset folder")
    add_engine_arguments(parser)


def main(checkpoint, data, split: str = "val", max_drop: float = 0.0, margin: float = 0.05,
         check_split: str | None = None, out=None, batch_size: int = 32,
         cache_dir=None, device: str = "auto", backend: str = "eager", precision: str = "auto",
         allow_outside: bool = False, progress: bool = True) -> int:
    from dataclasses import asdict

    import torch

    from avgn_fast.checkpoint import load_checkpoint, save_checkpoint
    from avgn_fast.data.folder import decoded_split, default_cache_dir
    from avgn_fast.engine.batch import resolve_device
    from avgn_fast.engine.early_exit import GlanceEngine
    from avgn_fast.pareto import choose_threshold, exit_check, exit_outcome
    from avgn_fast.training.trainer import FolderSource, engine_results

    if not 0 <= max_drop <= 100:
        raise ValueError(f"--max-drop is in top-1 points, between 0 and 100; got {max_drop}")
    if not 0 <= margin <= 1:
        raise ValueError(f"--margin is a distance between thresholds, between 0 and 1; got {margin}")
    dev = resolve_device(device)
    ckpt = load_checkpoint(checkpoint)
    config = ckpt.model.config
    engine = GlanceEngine(ckpt.model.to(dev), backend=backend, precision=precision, device=dev, max_batch=batch_size)
    out = Path(checkpoint).with_name(Path(checkpoint).stem + "_tau.pt") if out is None else Path(out)
    log = lambda line: print(f"avgn-fast calibrate: {line}")
    cache_dir = default_cache_dir(Path(checkpoint).parent / "cache", log=log) if cache_dir is None else Path(cache_dir)

    def every_step(name: str):  # (probs (N, K, C), labels) of a split, every video taking every step
        dataset = decoded_split(data, config, name, cache_dir=cache_dir, class_names=ckpt.class_names,
                                progress=progress, log=log, allow_outside=allow_outside)
        results = list(engine_results(engine, FolderSource(dataset), batch_size=batch_size, exit_threshold=None,
                                      progress=progress, desc=f"all steps [{name}]"))
        return torch.cat([result.probs.float().cpu() for result, _ in results]), torch.cat([y for _, y in results])

    probs, labels = every_step(split)
    cost, steps = ckpt.model.cost(), engine.k
    choice = choose_threshold(probs, labels, per_video=cost.per_video, per_step=cost.per_step,
                              max_drop=max_drop / 100, margin=margin)

    print(f"{checkpoint} on {data} [{split}], {len(labels)} videos, K={steps}:")
    print(f"{'threshold':>10} {'top-1 %':>8} {'steps':>6} {'GFLOPs/video':>13}")
    print(f"{'none':>10} {100 * choice.full_top1:8.2f} {steps:6.2f} {choice.full_gflops:13.4f}")
    for tau in (0.5, 0.9, 0.99):  # a few fixed points for scale
        top1, taken = exit_outcome(probs, labels, tau)
        print(f"{tau:>10.4g} {100 * top1:8.2f} {taken:6.2f} {cost.total(taken):13.4f}")
    if choice.threshold is None:
        print(f"no threshold saves a step within {max_drop} top-1 points and a margin of {margin}; "
              "no checkpoint written")
        return 0
    print(f"{choice.threshold:>10.4g} {100 * choice.top1:8.2f} {choice.steps:6.2f} {choice.gflops:13.4f}  <- chosen: "
          f"{100 * (1 - choice.gflops / choice.full_gflops):.0f} % fewer GFLOPs")
    ckpt.model.config = config.replace(exit_threshold=choice.threshold)
    calibration = {"threshold": choice.threshold, "split": split, "videos": len(labels), "max_drop": max_drop,
                   "margin": margin, "top1": choice.top1, "steps": choice.steps, "gflops": choice.gflops,
                   "full_top1": choice.full_top1, "full_gflops": choice.full_gflops}
    if check_split is not None:
        check = exit_check(*every_step(check_split), choice.threshold)
        calibration["check"] = {"split": check_split, **asdict(check)}
        print(f"on [{check_split}], {check.videos} videos: top-1 {100 * check.top1:.2f} % at τ against "
              f"{100 * check.full_top1:.2f} % after every step ({check.steps:.2f} steps); the exits lose "
              f"{check.lost} videos and win {check.gained}")
    save_checkpoint(out, ckpt.model.cpu(), class_names=ckpt.class_names,
                    metrics={**ckpt.metrics, "calibration": calibration})
    print(f"written {out} (exit_threshold={choice.threshold:.6g})")
    return 0
