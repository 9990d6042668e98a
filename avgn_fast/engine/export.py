"""Export the inference stages: ``torch.export`` programs, ONNX graphs, or TensorRT engines, one file per stage.

Every format is written to a folder with a ``manifest.json`` naming each stage's file, inputs
(name, shape, dtype) and outputs, the precision, the config and the versions. Stages are traced
with the reference ops (``AVGN_TRITON=0``), so the graphs hold plain PyTorch ops; the patch crop
is not a stage and runs in torch between them (``GlanceEngine._crop``), as the manifest says.
Exported programs have a dynamic batch dimension; ONNX graphs and TensorRT engines are built for
the batch size given (the local encoder for that batch times K, its all-steps shape).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import warnings
from pathlib import Path

import torch
from torch.export import Dim

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
from avgn_fast.engine.stages import Stage, random_inputs
from avgn_fast.models.avgn import AVGN

log = logging.getLogger(__name__)

FORMATS = ("exported-program", "onnx", "tensorrt")
SUFFIX = {"exported-program": ".pt2", "onnx": ".onnx", "tensorrt": ".ep"}
IN_TORCH_NOTE = "the patch crop (avgn_fast::crop_patches) runs in torch between the exported stages"
ONNX_OPSET = 17


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


def export_program(stage: Stage, args: tuple[torch.Tensor, ...], *, dynamic_batch: bool = True):
    """``torch.export`` of one stage with the reference ops; the batch dimension dynamic when asked."""
    batch = Dim("batch", min=1, max=1 << 16)
    shapes = (tuple({0: batch} if a.dim() else None for a in args),) if dynamic_batch else None
    with reference_ops(), torch.no_grad():
        return torch.export.export(stage, args, dynamic_shapes=shapes)


def export_onnx(stage: Stage, args: tuple[torch.Tensor, ...], path: str | os.PathLike) -> Path:
    """ONNX graph of one stage at the shapes of ``args`` (reference ops; TorchScript-based exporter)."""
    with reference_ops(), torch.no_grad(), warnings.catch_warnings():
        # the TorchScript exporter is deprecated in favour of the dynamo one, which needs onnxscript
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shape checks it sees as constants, as they are
        torch.onnx.export(stage, args, str(path), dynamo=False, input_names=list(stage.inputs),
                          output_names=list(stage.outputs), opset_version=ONNX_OPSET)
    return Path(path)


def export(model: AVGN, fmt: str, out: str | os.PathLike, *, batch_size: int = 8, precision: str = "fp32",
           device="cpu", k: int | None = None, class_names: list[str] | None = None) -> dict:
    """Write every stage of ``model`` in format ``fmt`` to the folder ``out``; returns the manifest (also written).

    ``tensorrt`` needs torch-tensorrt and a CUDA device (ValueError otherwise); its engines go
    through the same on-disk cache as the TensorRT backend, with ``out`` as the cache folder.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}; got {fmt!r}")
    device = torch.device(device)
    if fmt == "tensorrt" and (missing := tensorrt_missing(device)):
        raise ValueError(f"format 'tensorrt' cannot be written: {missing}")
    dtype = resolve_precision(precision, device)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = model.to(device).eval()
    stages, examples = stage_examples(model, batch_size=batch_size, precision=precision_name(dtype), device=device,
                                      k=k)
    model_hash = state_hash(model)
    entries = {}
    for name, stage in stages.items():
        args = examples[name]
        path = out / f"{name}{SUFFIX[fmt]}"
        if fmt == "exported-program":
            torch.export.save(export_program(stage, args), str(path))
        elif fmt == "onnx":
            export_onnx(stage, args, path)
        else:
            path = tensorrt_engine(stage, args, cache_dir=out, model_hash=model_hash)[1]
        entries[name] = {
            "file": path.name,
            "inputs": [{"name": n, "shape": list(a.shape), "dtype": str(a.dtype).removeprefix("torch.")}
                       for n, a in zip(stage.inputs, args)],
            "outputs": list(stage.outputs),
        }
        log.info("exported %s → %s", name, path)
    notes = [IN_TORCH_NOTE] + ([TENSORRT_NOTE] if fmt == "tensorrt" else [])
    manifest = {
        "format": fmt,
        "dynamic_batch": fmt == "exported-program",
        "batch_size": batch_size,
        "precision": precision_name(dtype),
        "device": str(device),
        "model_hash": model_hash,
        "config": model.config.to_dict(),
        "class_names": list(class_names or getattr(model, "class_names", None) or []),
        "stages": entries,
        "notes": notes,
        "versions": {"torch": torch.__version__},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest
