"""Export the inference stages: ``torch.export`` programs, ONNX graphs, or TensorRT engines, one file per stage.

Every format is written to a folder with a ``manifest.json`` that makes the folder a complete
deployment artifact (``avgn_fast.load(folder)``, ``engine.runtime``): each stage's file, inputs
(name, shape, dtype, dynamic dimensions) and outputs, the precision and k the stages were traced at,
the config, the class names, the cost (GMACs per video and per step taken) and the versions. Stages
are traced with the reference ops (``AVGN_TRITON=0``), so the graphs hold plain PyTorch ops.
Exported programs and ONNX graphs have dynamic batch dimensions (the crop also a dynamic number of
rows and steps, since early exit runs it on the videos still in, one step at a time); TensorRT
engines are built for the batch size given (the local encoder for that batch times k) and the
runtime pads to it, while their crop is an exported program (``CROP_NOTE``).
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import json
import logging
import os
import warnings
from pathlib import Path

import torch
from torch.export import Dim

import avgn_fast
from avgn_fast.engine.backends import (
    TENSORRT_NOTE,
    precision_name,
    reference_ops,
    resolve_precision,
    state_hash,
    tensorrt_engine,
    tensorrt_missing,
)
from avgn_fast.engine.early_exit import GlanceEngine, Hook
from avgn_fast.engine.runtime import ARTIFACT, FORMATS, MANIFEST, VERSION
from avgn_fast.engine.stages import Stage, random_inputs
from avgn_fast.models.avgn import AVGN

log = logging.getLogger(__name__)

__all__ = ["FORMATS", "export", "export_onnx", "export_program", "stage_examples"]

SUFFIX = {"exported-program": ".pt2", "onnx": ".onnx"}  # TensorRT engines are named by their cache key
CROP_NOTE = "TensorRT: the crop stage is an exported program (crop.pt2), run as it is between the engines"
ONNX_OPSET = 17
# the crop reads all B videos' frames but only the rows (videos still in) and steps it is given
CROP_DIMS = {"frames": {0: "videos"}, "rows": {0: "rows"}, "kept": {0: "rows", 1: "steps"},
             "locations": {0: "rows", 1: "steps"}}


class _Recorder(Hook):
    """Keeps the arguments of the first call of every stage."""

    def __init__(self):
        self.args: dict[str, tuple] = {}

    def stage(self, name, args):
        self.args.setdefault(name, args)
        return contextlib.nullcontext()


def stage_examples(model: AVGN, *, batch_size: int, precision: str = "fp32", device="cpu",
                   k: int | None = None) -> tuple[dict[str, Stage], dict[str, tuple[torch.Tensor, ...]]]:
    """The eager stages of ``model`` and real inputs for each, recorded from runs on random clips.

    One run takes every step at once (the ``head`` stage), a second one step at a time (the
    ``step_head`` stage: a threshold no probability reaches keeps every video in).
    """
    engine = GlanceEngine(model, backend="eager", precision=precision, device=device, max_batch=batch_size, k=k)
    recorder = _Recorder()
    frames, mel, present = random_inputs(model.config, batch_size, engine.device)
    engine(frames, mel, present, hook=recorder)
    engine(frames, mel, present, exit_threshold=2.0, hook=recorder)
    with torch.inference_mode(False):  # tracers take ordinary tensors, not the engine's inference tensors
        examples = {name: tuple(a.clone() for a in recorder.args[name]) for name in engine.stages}
    return engine.stages, examples


def dynamic_dims(stage: Stage, args: tuple[torch.Tensor, ...]) -> list[dict[int, str]]:
    """Per input of ``stage``, its dynamic dimensions by name: the batch (dim 0) of every tensor that is not a
    scalar; for the crop, the videos, the rows and the steps (``CROP_DIMS``)."""
    if stage.name == "crop":
        return [CROP_DIMS[name] for name in stage.inputs]
    return [{0: "batch"} if a.dim() else {} for a in args]


def export_program(stage: Stage, args: tuple[torch.Tensor, ...], *, dynamic_batch: bool = True):
    """``torch.export`` of one stage with the reference ops; the dimensions of ``dynamic_dims`` dynamic when asked."""
    dims: dict[str, Dim] = {}
    shapes = None
    if dynamic_batch:
        shapes = (tuple({i: dims.setdefault(n, Dim(n, min=1, max=1 << 16)) for i, n in d.items()} or None
                        for d in dynamic_dims(stage, args)),)
    with reference_ops(), torch.no_grad():
        return torch.export.export(stage, args, dynamic_shapes=shapes)


def export_onnx(stage: Stage, args: tuple[torch.Tensor, ...], path: str | os.PathLike, *,
                dynamic: bool = True) -> Path:
    """ONNX graph of one stage (reference ops; TorchScript-based exporter), dynamic in ``dynamic_dims`` when
    asked, else at the shapes of ``args``."""
    axes = None
    if dynamic:
        axes = {name: d for name, d in zip(stage.inputs, dynamic_dims(stage, args)) if d}
        axes.update({name: {0: f"{name}_rows"} for name in stage.outputs})
    with reference_ops(), torch.no_grad(), warnings.catch_warnings():
        # the TorchScript exporter is deprecated in favour of the dynamo one, which needs onnxscript
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shape checks it sees as constants, as they are
        torch.onnx.export(stage, args, str(path), dynamo=False, input_names=list(stage.inputs),
                          output_names=list(stage.outputs), opset_version=ONNX_OPSET, dynamic_axes=axes)
    return Path(path)


def onnx_dynamic(stage: Stage) -> bool:
    """Whether the TorchScript ONNX exporter can trace ``stage`` with dynamic sizes: all but a glance that resizes
    the frames (its area resize needs static input sizes there); a static graph is padded to by the runtime."""
    config = stage.model.config
    return not (stage.name == "glance" and not config.dense and config.glance_size != config.frame_size)


def versions(fmt: str) -> dict[str, str]:
    """The versions that wrote a folder of format ``fmt``: avgn_fast, torch, and the format's own libraries."""
    out = {"avgn_fast": avgn_fast.__version__, "torch": torch.__version__}
    libraries = {"onnx": ("onnx",), "tensorrt": ("torch_tensorrt", "tensorrt")}.get(fmt, ())
    for name in libraries:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[name] = importlib.metadata.version(name)
    if fmt == "onnx":
        out["onnx_opset"] = str(ONNX_OPSET)
    return out


def export(model: AVGN, fmt: str, out: str | os.PathLike, *, batch_size: int = 8, precision: str = "fp32",
           device="cpu", k: int | None = None, class_names: list[str] | None = None) -> dict:
    """Write every stage of ``model`` in format ``fmt`` to the folder ``out``; returns the manifest (also written).

    ``class_names`` (default: the model's, else "0", "1", …) go into the manifest. ``tensorrt``
    needs torch-tensorrt and a CUDA device (ValueError otherwise); its engines go through the same
    on-disk cache as the TensorRT backend, with ``out`` as the cache folder.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}; got {fmt!r}")
    device = torch.device(device)
    if fmt == "tensorrt" and (missing := tensorrt_missing(device)):
        raise ValueError(f"format 'tensorrt' cannot be written: {missing}")
    dtype = resolve_precision(precision, device)
    class_names = [str(n) for n in class_names or getattr(model, "class_names", None) or
                   range(model.config.num_classes)]
    if len(class_names) != model.config.num_classes:
        raise ValueError(f"{len(class_names)} class names for a model with {model.config.num_classes} classes")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = model.to(device).eval()
    stages, examples = stage_examples(model, batch_size=batch_size, precision=precision_name(dtype), device=device,
                                      k=k)
    model_hash = state_hash(model)
    entries = {name: _write_stage(stage, examples[name], fmt, out, model_hash) for name, stage in stages.items()}
    cost = model.cost()
    manifest = {
        "artifact": ARTIFACT,
        "version": VERSION,
        "format": fmt,
        "dynamic_batch": all(any(i["dynamic"] for i in e["inputs"]) for e in entries.values()),
        "batch_size": batch_size,
        "precision": precision_name(dtype),
        "k": next(iter(stages.values())).k,
        "device": str(device),
        "model_hash": model_hash,
        "config": model.config.to_dict(),
        "class_names": class_names,
        "cost": {"per_video": cost.per_video, "per_step": cost.per_step},
        "stages": entries,
        "notes": [TENSORRT_NOTE, CROP_NOTE] if fmt == "tensorrt" else [],
        "versions": versions(fmt),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def _write_stage(stage: Stage, args: tuple[torch.Tensor, ...], fmt: str, out: Path, model_hash: str) -> dict:
    """Write one stage in format ``fmt`` under ``out``; returns its manifest entry."""
    dims = dynamic_dims(stage, args)
    if fmt == "exported-program" or (fmt == "tensorrt" and stage.name == "crop"):
        path = out / f"{stage.name}{SUFFIX['exported-program']}"
        torch.export.save(export_program(stage, args), str(path))
    elif fmt == "onnx":
        dynamic = onnx_dynamic(stage)
        path = export_onnx(stage, args, out / f"{stage.name}{SUFFIX[fmt]}", dynamic=dynamic)
        dims = dims if dynamic else [{} for _ in args]
    else:
        path = tensorrt_engine(stage, args, cache_dir=out, model_hash=model_hash)[1]
        dims = [{} for _ in args]  # engines are built for these shapes
    log.info("exported %s → %s", stage.name, path)
    return {
        "file": path.name,
        "inputs": [{"name": n, "shape": list(a.shape), "dtype": str(a.dtype).removeprefix("torch."),
                    "dynamic": {str(i): d for i, d in dim.items()}}
                   for n, a, dim in zip(stage.inputs, args, dims)],
        "outputs": list(stage.outputs),
    }
