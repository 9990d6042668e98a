"""What a training run keeps beyond one epoch: a validation split held out of the training videos, the rule
that ends a run at its plateau, the run's summary, and resuming it from its ``last.pt``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from avgn_fast.checkpoint import class_name_differences, config_differences, load_checkpoint

if TYPE_CHECKING:
    from avgn_fast.models.avgn import AVGN


class SubsetSource:
    """The videos of another source at ``index`` (a validation split held out of the training videos)."""

    def __init__(self, source, index: torch.Tensor):
        self.source, self.index = source, index

    def __len__(self) -> int:
        return len(self.index)

    def batch(self, index: torch.Tensor):
        return self.source.batch(self.index[index])


def carve_validation(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, val) sorted int64 indices splitting ``n`` videos: ``max(1, round(fraction · n))`` of them, drawn by a
    generator seeded with ``seed``, held out for validation. The same arguments always give the same split."""
    if n < 2:
        raise ValueError(f"cannot hold out a validation split from {n} training video(s)")
    held = min(n - 1, max(1, round(fraction * n)))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + 17))
    return order[held:].sort().values, order[:held].sort().values


def chance_floor(num_classes: int, videos: int) -> float:
    """The validation top-1 a model guessing among ``num_classes`` classes rarely exceeds on ``videos`` videos:
    chance (1/C) plus three standard errors of a chance-level classifier's top-1 there."""
    p = 1 / num_classes
    return p + 3 * math.sqrt(p * (1 - p) / max(videos, 1))


def plateaued(curve: list[float], patience: int, floor: float = 0.0) -> bool:
    """Whether a validation curve (top-1 after each validated epoch, in order) has stopped improving: its best
    value, first reached (a tie is no improvement), lies ``patience`` or more epochs before its last one, and is
    above ``floor``: a curve still at chance (``chance_floor``) has not started, so it has no plateau yet."""
    if not curve or max(curve) <= floor:
        return False
    best = max(range(len(curve)), key=lambda i: (curve[i], -i))
    return len(curve) - 1 - best >= patience


def run_summary(history: list[dict], seconds: list[float], settings, validation: str, floor: float = 0.0) -> dict:
    """What a run did: ``epochs`` (all stages), ``joint_epochs``, ``wall_s``, ``plateaued`` (stopped by the
    patience rule), ``stopped`` ("plateau", "cap": reached ``settings.epochs`` joint epochs with patience, or
    "epochs": a fixed count), ``best_epoch``, the validation curve ``val_top1`` (one value per joint epoch),
    ``chance_floor`` (``floor``: the patience rule's) and whether the curve rose above it (``left_chance``), and
    where the validation videos came from; ``settings`` is the run's ``TrainSettings``."""
    curve = [record["val_top1"] for record in history if "val_top1" in record]
    joint = sum(record["stage"] == "joint" for record in history)
    stop = settings.patience is not None and plateaued(curve, settings.patience, floor)
    validated = [record for record in history if "val_top1" in record]
    best = max(validated, key=lambda r: (r["val_top1"], -r["epoch"]))["epoch"] if validated else None
    return {"epochs": len(history), "joint_epochs": joint, "wall_s": round(sum(seconds), 3), "plateaued": stop,
            "stopped": "plateau" if stop else "cap" if settings.patience is not None else "epochs",
            "patience": settings.patience, "max_joint_epochs": settings.epochs, "best_epoch": best,
            "val_top1": curve, "chance_floor": floor, "left_chance": bool(curve) and max(curve) > floor,
            "validation": validation}


def resume_run(model: AVGN, optimizer, scheduler, out_dir: Path | None, settings, class_names):
    """Load ``out_dir/last.pt`` into the model, optimizer and schedule (and the RNG) → (history, seconds, best).

    ValueError when the saved run differs from this one in anything but the cap and the patience, which may
    grow to extend a run.
    """
    last = None if out_dir is None else out_dir / "last.pt"
    if last is None or not last.is_file():
        raise FileNotFoundError(f"cannot resume: no last.pt in {out_dir}")
    state = load_checkpoint(last)
    saved = state.train_state or {}
    missing = {"optimizer", "scheduler", "rng", "history", "best"} - saved.keys()
    if not isinstance(saved.get("settings"), dict):
        missing.add("settings")
    if missing:
        raise ValueError(f"{last}: no training state to resume from (lacks {', '.join(sorted(missing))})")
    differ = config_differences(state.model.config.to_dict(), model.config.to_dict())
    # a run saved before mixing existed trained without it
    before = {"mixup": 0.0, "cutmix": 0.0, **saved["settings"]}
    differ += [f"settings.{d}" for d in config_differences(before, settings.as_dict(), skip=("epochs", "patience"))]
    differ += class_name_differences(state.class_names, [str(name) for name in class_names])
    if differ:
        raise ValueError(f"{last}: cannot resume, the saved run differs from this one: {'; '.join(differ)}")
    model.load_state_dict(state.model.state_dict())
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["rng"])
    history = saved["history"]
    return history, list(saved.get("seconds", [0.0] * len(history))), saved["best"]
