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
from typing import TYPE_CHECKING

import torch

from avgn_fast.config import AVGNConfig
from avgn_fast.models.avgn import AVGN
from avgn_fast.models.outputs import Cost

if TYPE_CHECKING:
    from avgn_fast.engine.runtime import ExportedModel

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
    """Read a checkpoint onto the CPU, checking it before any tensor of the model is allocated.

    Checked in order: the payload (a dict with the format tag and version), the class names (a
    list of distinct strings), the config (known fields, typed values in range, see
    ``AVGNConfig``), one class name per class, then every weight against a model built on the meta
    device (same keys, shapes and dtypes; finite values). So a small file cannot make the loader
    allocate a model far larger than itself. FileNotFoundError when there is no file; otherwise
    every failure is a ValueError whose message starts with the path.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    if not path.is_file():
        raise ValueError(f"{path}: not a checkpoint file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a damaged or foreign file
        first_line = next(iter(str(e).strip().splitlines()), "")  # the unpickler's messages run to many lines
        raise ValueError(f"{path}: not a readable avgn_fast checkpoint ({type(e).__name__}: {_short(first_line, 200)})"
                         ) from e
    try:
        return _from_payload(payload)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e


def _from_payload(payload) -> Checkpoint:
    """The checkpoint a loaded payload describes, checked in ``load_checkpoint``'s order (ValueError without
    the path)."""
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"not an avgn_fast checkpoint (no {FORMAT!r} format tag)")
    if payload.get("version") != VERSION:
        raise ValueError(f"checkpoint version {payload.get('version')!r}; this avgn_fast reads {VERSION}")
    missing = {"config", "class_names", "state_dict"} - payload.keys()
    if missing:
        raise ValueError(f"checkpoint lacks {sorted(missing)}")
    for key, kind in (("state_dict", dict), ("metrics", dict), ("train_state", dict), ("cost", dict)):
        if key in payload and not isinstance(payload[key], kind):
            raise ValueError(f"{key} must be a {kind.__name__}, got {type(payload[key]).__name__}")
    class_names = _checked_class_names(payload["class_names"])
    try:
        config = AVGNConfig.from_dict(payload["config"])
    except (ValueError, TypeError) as e:
        raise ValueError(f"checkpoint does not describe a valid AVGN: bad config ({e})") from e
    if len(class_names) != config.num_classes:
        raise ValueError(f"{len(class_names)} class names for a model with num_classes={config.num_classes}")
    state_dict = payload["state_dict"]
    _check_state_dict(config, state_dict)
    if payload.get("cost") is not None:  # a record of the cost when saved; a loaded model counts its own
        Cost.from_dict(payload["cost"])
    model = AVGN(config)  # the shapes matched: this allocates no more than the file holds
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as e:  # a tensor of the right shape and dtype that cannot be copied (e.g. sparse)
        raise ValueError(f"checkpoint does not describe a valid AVGN: {_short(str(e), 200)}") from e
    model.eval()
    return Checkpoint(model, class_names, dict(payload.get("metrics", {})), payload.get("train_state"))


def _checked_class_names(names) -> list[str]:
    """``names`` if it is a list of distinct strings, else ValueError naming the problem."""
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise ValueError(f"class_names must be a list of str, got {_short(names)}")
    seen, repeated = set(), []
    for name in names:
        if name in seen and name not in repeated:
            repeated.append(name)
        seen.add(name)
    if repeated:
        raise ValueError(f"class_names repeat {_listing(repeated)}")
    return names


def _check_state_dict(config: AVGNConfig, state_dict: dict) -> None:
    """ValueError unless ``state_dict`` holds exactly the tensors of an AVGN of ``config``: the same keys, each
    tensor with the same shape and dtype and only finite values. The model is built on the meta device,
    so nothing the size of the model is allocated; the first mismatches are named."""
    try:
        with torch.device("meta"):
            expected = AVGN(config).state_dict()
    except (ValueError, TypeError, RuntimeError) as e:
        raise ValueError(f"checkpoint does not describe a valid AVGN: {e}") from e
    foreign = [key for key, value in state_dict.items() if not isinstance(value, torch.Tensor)]
    if foreign:
        raise ValueError(f"state_dict entries that are not tensors: {_listing(foreign)}")
    missing = [key for key in expected if key not in state_dict]
    extra = [key for key in state_dict if key not in expected]
    if missing or extra:
        parts = [f"lacks {_listing(missing)}"] if missing else []
        parts += [f"has unexpected {_listing(extra)}"] if extra else []
        raise ValueError(f"checkpoint does not describe a valid AVGN of its config: state_dict {'; '.join(parts)}")
    wrong = [f"{key} is {tuple(state_dict[key].shape)} {state_dict[key].dtype}, the config needs "
             f"{tuple(want.shape)} {want.dtype}" for key, want in expected.items()
             if state_dict[key].shape != want.shape or state_dict[key].dtype != want.dtype]
    if wrong:
        more = f" (and {len(wrong) - 3} more)" if len(wrong) > 3 else ""
        raise ValueError(f"checkpoint does not describe a valid AVGN of its config: {'; '.join(wrong[:3])}{more}")
    # NaN or inf weights would only show later as NaN scores on every video
    broken = [key for key, t in state_dict.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if broken:
        raise ValueError(f"non-finite (NaN or inf) weights in {_listing(broken)}")


def _listing(items: Sequence, limit: int = 3) -> str:
    """The first ``limit`` of ``items``, and how many more."""
    shown = ", ".join(repr(item) for item in items[:limit])
    return shown + (f" (and {len(items) - limit} more)" if len(items) > limit else "")


def _short(value, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters, so a hostile payload cannot flood an error message."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


def config_differences(saved: dict, wanted: dict, skip: Sequence[str] = ()) -> list[str]:
    """``"field=saved there, wanted here"`` for each field whose values differ (nested dicts compared field by
    field, named ``a.b``), fields in ``skip`` aside; a field only one side has shows ``<absent>`` on the other."""
    out = []
    for key in [*saved, *(k for k in wanted if k not in saved)]:
        if key in skip:
            continue
        old, new = saved.get(key, _ABSENT), wanted.get(key, _ABSENT)
        if isinstance(old, dict) and isinstance(new, dict):
            out += [f"{key}.{line}" for line in config_differences(old, new)]
        elif old != new:
            out.append(f"{key}={'<absent>' if old is _ABSENT else repr(old)} there, "
                       f"{'<absent>' if new is _ABSENT else repr(new)} here")
    return out


_ABSENT = object()


def class_name_differences(saved: Sequence[str], wanted: Sequence[str]) -> list[str]:
    """How two class lists differ, as short phrases (none when equal): the names only one side has, or the
    first position where the same names come in another order."""
    saved, wanted = list(saved), list(wanted)
    if saved == wanted:
        return []
    saved_set, wanted_set = set(saved), set(wanted)
    only_saved = [name for name in saved if name not in wanted_set]
    only_wanted = [name for name in wanted if name not in saved_set]
    if only_saved or only_wanted:
        return [f"class_names: {len(saved)} there, {len(wanted)} here; only there: {_listing(only_saved) or '-'}; "
                f"only here: {_listing(only_wanted) or '-'}"]
    i = next((i for i, (a, b) in enumerate(zip(saved, wanted, strict=False)) if a != b), min(len(saved), len(wanted)))
    return [f"class_names in another order or repeated: from #{i}, {saved[i:i + 2]} there, {wanted[i:i + 2]} here"]


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
    differ = config_differences(ckpt.model.config.to_dict(), model.config.to_dict(), skip=_WEIGHTLESS_FIELDS)
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


def load(path) -> AVGN | ExportedModel:
    """What ``path`` holds, ready to classify: the model of a checkpoint file (CPU, eval mode), with
    ``class_names`` and ``metrics`` attributes; or, for a folder written by ``avgn-fast export``, its
    stages (``engine.runtime.ExportedModel``: the same attributes, used where the model is)."""
    from avgn_fast.engine.runtime import is_exported, load_exported

    if is_exported(path):
        return load_exported(path)
    ckpt = load_checkpoint(path)
    ckpt.model.class_names = ckpt.class_names
    ckpt.model.metrics = ckpt.metrics
    return ckpt.model
