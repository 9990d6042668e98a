"""One-file AVGN checkpoints: format tag and version, config, class names, weights, metrics.

A checkpoint is a ``torch.save`` dict of plain Python values and tensors (loadable with
``weights_only=True``). Training checkpoints (``last.pt``) add a ``train_state`` entry so a run
can resume; every checkpoint loads with ``avgn_fast.load``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from avgn_fast.config import AVGNConfig
from avgn_fast.models.avgn import AVGN, Cost

FORMAT = "avgn_fast.checkpoint"
VERSION = 1


@dataclass
class Checkpoint:
    """A loaded checkpoint: the model (eval mode) and what was saved beside it."""

    model: AVGN
    class_names: list[str]
    metrics: dict = field(default_factory=dict)
    train_state: dict | None = None


def save_checkpoint(path, model: AVGN, *, class_names, metrics: dict | None = None,
                    train_state: dict | None = None) -> Path:
    """Write ``model`` to ``path`` atomically (a temporary file renamed into place)."""
    class_names = [str(name) for name in class_names]
    if len(class_names) != model.config.num_classes:
        raise ValueError(f"{len(class_names)} class names for a model with {model.config.num_classes} classes")
    cost = model.cost()
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "config": model.config.to_dict(),
        "class_names": class_names,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "metrics": dict(metrics or {}),
        "cost": {"per_video": cost.per_video, "per_step": cost.per_step},
    }
    if train_state is not None:
        payload["train_state"] = train_state
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path) -> Checkpoint:
    """Read a checkpoint onto the CPU; ValueError naming the file if it is not a readable avgn_fast checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a damaged or foreign file
        raise ValueError(f"{path}: not a readable avgn_fast checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path}: not an avgn_fast checkpoint (no {FORMAT!r} format tag)")
    if payload.get("version") != VERSION:
        raise ValueError(f"{path}: checkpoint version {payload.get('version')!r}; this avgn_fast reads {VERSION}")
    missing = {"config", "class_names", "state_dict"} - payload.keys()
    if missing:
        raise ValueError(f"{path}: checkpoint lacks {sorted(missing)}")
    try:
        config = AVGNConfig.from_dict(payload["config"])
        model = AVGN(config)
        model.load_state_dict(payload["state_dict"])
    except (ValueError, TypeError, RuntimeError) as e:
        raise ValueError(f"{path}: checkpoint does not describe a valid AVGN ({e})") from e
    if "cost" in payload:
        model._cost = Cost(**payload["cost"])
    model.eval()
    return Checkpoint(model, list(payload["class_names"]), dict(payload.get("metrics", {})),
                      payload.get("train_state"))


# config fields that change no weight: a model may differ from the checkpoint it starts from in these
_WEIGHTLESS_FIELDS = ("name", "num_classes", "exit_threshold")


@dataclass
class Transfer:
    """What ``init_from_checkpoint`` carried over."""

    tensors: int  # weight and buffer tensors copied whole
    shared_classes: list[str]  # classes whose rows of the class layers were copied
    new_classes: list[str]  # classes with freshly initialised rows
    dropped_classes: list[str]  # the checkpoint's classes not in this model


def class_layers(model: AVGN) -> list[torch.nn.Linear]:
    """The layers with one output row per class: the exit heads and the auxiliary heads."""
    return [*model.classifier.heads, *model.aux_heads.values()]


def init_from_checkpoint(model: AVGN, class_names: Sequence[str], path, *, loaded: Checkpoint | None = None
                         ) -> Transfer:
    """Start ``model`` (whose classes are ``class_names``) from the AVGN checkpoint at ``path``, to fine-tune
    (``loaded``: that checkpoint already read, so the file is not read twice).

    Every weight and buffer is copied; in the class layers (``class_layers``) the rows of the
    classes both share are copied by name, and new classes keep their fresh initialisation. The
    architecture must be the checkpoint's (any config field but ``_WEIGHTLESS_FIELDS``): otherwise
    ValueError naming the file and the fields that differ.
    """
    ckpt = load_checkpoint(path) if loaded is None else loaded
    class_names = [str(name) for name in class_names]
    if len(class_names) != model.config.num_classes:
        raise ValueError(f"{len(class_names)} class names for a model with {model.config.num_classes} classes")
    old, new = ckpt.model.config.to_dict(), model.config.to_dict()
    differ = [f"{k}={old[k]!r} there, {new[k]!r} here" for k in old if k not in _WEIGHTLESS_FIELDS and old[k] != new[k]]
    if differ:
        raise ValueError(f"{path}: cannot start from this checkpoint, its architecture differs: {'; '.join(differ)}")
    source = ckpt.model.state_dict()
    names = {id(m): name for name, m in model.named_modules()}
    per_class = {f"{names[id(layer)]}.{p}" for layer in class_layers(model) for p in ("weight", "bias")}
    old_row = {name: i for i, name in enumerate(ckpt.class_names)}
    rows = [(j, old_row[name]) for j, name in enumerate(class_names) if name in old_row]
    state, copied = model.state_dict(), 0
    with torch.no_grad():
        for key, target in state.items():
            if key in per_class:
                for j, i in rows:
                    target[j] = source[key][i]
            else:
                target.copy_(source[key])
                copied += 1
    return Transfer(copied, [class_names[j] for j, _ in rows], [n for n in class_names if n not in old_row],
                    [n for n in ckpt.class_names if n not in set(class_names)])


def load(path) -> AVGN:
    """The model of a checkpoint file (CPU, eval mode), with ``class_names`` and ``metrics`` attributes."""
    ckpt = load_checkpoint(path)
    ckpt.model.class_names = ckpt.class_names
    ckpt.model.metrics = ckpt.metrics
    return ckpt.model
