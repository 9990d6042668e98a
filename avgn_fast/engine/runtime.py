"""Run an exported folder (``avgn_fast.engine.export``) with no checkpoint and no training code.

``load_exported(folder)`` reads the folder's ``manifest.json``, checks it, and loads each stage
file: exported programs with ``torch.export.load``, ONNX graphs with onnxruntime, TensorRT
engines with torch-tensorrt (where installed, on CUDA). The result, an ``ExportedModel``, stands
where an ``AVGN`` does: ``GlanceEngine(exported)`` and the Predictor run it through the model's own
staged forward (``AVGN.forward`` and ``AVGN.look``, on a weightless copy of the model built on the
meta device) and the engine's own early exit; only the stages come from the files. So an exported
folder computes what the checkpoint it came from computes, within the format's precision. Graphs
built for one batch size (TensorRT engines, an ONNX glance that resizes) are padded up to it, and
larger batches run in chunks of it (``FixedBatch``).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import torch

from avgn_fast.config import AVGNConfig, InferenceSettings
from avgn_fast.engine.backends import PRECISIONS, pad_batch, resolve_precision, tensorrt_missing
from avgn_fast.models.avgn import AVGN, RunStage
from avgn_fast.models.outputs import Cost, ForwardOutput

__all__ = ["ARTIFACT", "FORMATS", "MANIFEST", "VERSION", "ExportedModel", "ExportedStage", "is_exported",
           "load_exported", "read_manifest"]

ARTIFACT = "avgn_fast.exported"  # the manifest's tag
VERSION = 1
MANIFEST = "manifest.json"
FORMATS = ("exported-program", "onnx", "tensorrt")


def is_exported(path) -> bool:
    """Whether ``path`` is a folder (an exported one, or a broken one ``load_exported`` will name the problem of)."""
    return Path(path).is_dir()


class ExportedStage:
    """One stage file, called like ``engine.stages.Stage``: tensors in ``inputs`` order → a tuple in ``outputs`` order.

    ``fn`` runs the file's graph on the tensors; the stage checks the count and names itself in errors.
    """

    def __init__(self, name: str, inputs: tuple[str, ...], outputs: tuple[str, ...], dtype: torch.dtype, k: int, fn):
        self.name, self.inputs, self.outputs, self.dtype, self.k, self.fn = name, inputs, outputs, dtype, k, fn

    def __call__(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if len(args) != len(self.inputs):
            raise ValueError(f"stage {self.name} takes {self.inputs}, got {len(args)} tensors")
        return tuple(self.fn(*args))

    def __repr__(self) -> str:
        return f"ExportedStage({self.name}: {self.inputs} -> {self.outputs}, dtype={self.dtype})"


class OnnxGraph:
    """An ONNX graph in an onnxruntime session (CUDA provider where the device is CUDA and it has one).

    Tensors go to the host as numpy arrays, the outputs come back to ``device``; inputs the graph
    does not read (the exporter drops them) are not fed.
    """

    def __init__(self, path: Path, names: tuple[str, ...], device: torch.device):
        import onnxruntime as ort

        cuda = device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers()
        providers = ["CUDAExecutionProvider"] * cuda + ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(path), providers=providers)
        wanted = {i.name for i in self.session.get_inputs()}
        self.feed = [(i, name) for i, name in enumerate(names) if name in wanted]
        self.device = device

    def __call__(self, *args: torch.Tensor) -> list[torch.Tensor]:
        feed = {name: np.ascontiguousarray(args[i].detach().cpu().numpy()) for i, name in self.feed}
        return [torch.from_numpy(x).to(self.device) for x in self.session.run(None, feed)]


class FixedBatch:
    """A graph built for ``rows`` rows (a TensorRT engine): fewer rows are zero-padded up to it, more run in chunks.

    Every input but scalars is batch-first; the outputs are cut back to the rows given.
    """

    def __init__(self, fn, rows: int):
        self.fn, self.rows = fn, rows

    def __call__(self, *args: torch.Tensor) -> list[torch.Tensor]:
        n = args[0].shape[0]
        if n > self.rows:
            chunks = [self(*(a[i:i + self.rows] if a.dim() else a for a in args)) for i in range(0, n, self.rows)]
            return [torch.cat(parts) for parts in zip(*chunks)]
        out = self.fn(*(pad_batch(a, self.rows) if a.dim() else a for a in args))
        return [o[:n] for o in out]


class ExportedModel:
    """An exported folder, loaded: what ``avgn_fast.load(folder)`` returns; it stands where an ``AVGN`` does.

    ``config``, ``class_names``, ``metrics`` (empty) and ``cost()`` as on a loaded checkpoint;
    ``stages`` the folder's stages by name (``ExportedStage``), traced at ``k`` steps and precision
    ``dtype``; ``manifest`` the folder's manifest. Calling it runs ``AVGN.forward`` over the stages
    (``ForwardOutput``); ``GlanceEngine(exported)`` adds batched early exit, as for a model.
    """

    def __init__(self, folder: Path, manifest: dict, device: torch.device):
        self.folder, self.manifest, self.format = folder, manifest, manifest["format"]
        self.config = AVGNConfig.from_dict(manifest["config"])
        self.class_names = list(manifest["class_names"])
        self.metrics: dict = {}
        self.k, self.dtype = manifest["k"], PRECISIONS[manifest["precision"]]
        with torch.device("meta"):
            self.skeleton = AVGN(self.config)  # the forward between the stages; it holds no weights
        self.stage_io = self.skeleton.stage_io
        self.device = device
        self.stages = self._load_stages(device)

    def __repr__(self) -> str:
        return f"ExportedModel({str(self.folder)!r}, format={self.format}, stages={list(self.stages)}, k={self.k})"

    # --- what the engine and the Predictor use of a model -------------------------------------------------

    def __call__(self, frames, mel, audio_present=None, *, k: int | None = None,
                 run: RunStage | None = None) -> ForwardOutput:
        """``AVGN.forward`` over the stages: ``run`` calls them (the engine's runner; default: as they are)."""
        return self.skeleton(frames, mel, audio_present, k=self.steps(k), run=run or self.run_stage)

    def look(self, frames, mel, audio_present, *, run: RunStage) -> dict:
        """``AVGN.look``: the per-video stages (glance, AV-TeST, AESPA)."""
        return self.skeleton.look(frames, mel, audio_present, run=run)

    def check_inputs(self, frames, mel, audio_present=None):
        return self.skeleton.check_inputs(frames, mel, audio_present)

    def boxes(self, a: torch.Tensor) -> torch.Tensor:
        return self.skeleton.boxes(a)

    def cost(self) -> Cost:
        """GMACs per video and per step taken, as counted from the model when it was exported."""
        return Cost.from_dict(self.manifest["cost"])

    def run_stage(self, name: str, env: dict) -> dict:
        """Stage ``name`` on its inputs read by name from ``env`` → its named outputs (none where the folder has no
        such stage: the configuration has nothing to do there)."""
        if name not in self.stages:
            return {}
        stage = self.stages[name]
        return dict(zip(stage.outputs, stage(*(env[i] for i in stage.inputs))))

    def eval(self) -> ExportedModel:
        return self

    def to(self, device) -> ExportedModel:
        """The stages loaded again for ``device`` (a no-op when they are there); returns self, like ``Module.to``."""
        device = torch.device(device)
        if device != self.device:
            self.stages, self.device = self._load_stages(device), device
        return self

    def steps(self, k: int | None) -> int:
        """The k to run with: None or the k the stages were traced at (ValueError otherwise)."""
        k = self.k if k is None else InferenceSettings(k=k).steps(self.config)
        if k != self.k:
            raise ValueError(f"{self.folder}: exported with k={self.k}, cannot run with k={k} (export it again with "
                             f"--k {k})")
        return k

    def settle(self, backend: str, precision: str, device: torch.device, k: int | None
               ) -> tuple[str, str, torch.dtype, int]:
        """How an engine runs this folder → (backend, reason, dtype, k).

        The stages run as they were exported: ``backend`` must be eager or auto, ``precision`` auto
        or the folder's, ``k`` None or the folder's; ValueError naming the folder otherwise.
        """
        if backend not in ("auto", "eager"):
            raise ValueError(f"{self.folder}: an exported folder runs its own {self.format} graphs; backend must be "
                             f"eager or auto, got {backend!r}")
        if precision != "auto" and resolve_precision(precision, device) != self.dtype:
            raise ValueError(f"{self.folder}: exported at {self.manifest['precision']}, cannot run at {precision}")
        return "eager", f"exported folder ({self.format})", self.dtype, self.steps(k)

    # --- loading --------------------------------------------------------------------------------------------

    def _load_stages(self, device: torch.device) -> dict[str, ExportedStage]:
        stages = {}
        for name, entry in self.manifest["stages"].items():
            inputs, outputs = self.stage_io[name]
            fn = _load_graph(self.folder / entry["file"], self.format, inputs, device, entry)
            stages[name] = ExportedStage(name, inputs, outputs, self.dtype, self.k, fn)
        return stages


def _load_graph(path: Path, fmt: str, inputs: tuple[str, ...], device: torch.device, entry: dict):
    """The callable graph in ``path`` (format ``fmt``) on ``device``."""
    if path.suffix == ".onnx":
        fn = OnnxGraph(path, inputs, device)
    elif fmt == "tensorrt" and path.suffix != ".pt2":
        import torch_tensorrt  # noqa: F401  (registers the engine ops the saved program holds)

        fn = torch.export.load(str(path)).module()
    else:
        program = torch.export.load(str(path))
        if any(t.device != device for t in (*program.state_dict.values(), *program.constants.values())
               if isinstance(t, torch.Tensor)):
            from torch.export.passes import move_to_device_pass

            program = move_to_device_pass(program, device)
        fn = program.module()
    if not any(i["dynamic"] for i in entry["inputs"]):  # built for the shapes it was traced at
        fn = FixedBatch(fn, entry["inputs"][0]["shape"][0])
    return fn


def read_manifest(folder) -> dict:
    """The checked manifest of an exported folder; FileNotFoundError without one, else ValueError starting
    with the folder.

    Checked: the tag and version, the format, the config (``AVGNConfig``), one class name per class,
    the precision, k, the cost, and the stages: exactly those of the config, each with the inputs
    and outputs the model's stages have and a file that exists.
    """
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no {MANIFEST}, not a folder written by `avgn-fast export`")
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    try:
        _check_manifest(folder, manifest)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e
    return manifest


def _check_manifest(folder: Path, m) -> None:
    if not isinstance(m, dict) or m.get("artifact") != ARTIFACT:
        raise ValueError(f"not an avgn_fast export manifest (no {ARTIFACT!r} tag; folders exported by an older "
                         f"avgn_fast must be exported again)")
    if m.get("version") != VERSION:
        raise ValueError(f"manifest version {m.get('version')!r}; this avgn_fast reads {VERSION}")
    if m.get("format") not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {m.get('format')!r}")
    try:
        config = AVGNConfig.from_dict(m.get("config"))
    except (ValueError, TypeError, AttributeError) as e:
        raise ValueError(f"bad config ({e})") from e
    names = m.get("class_names")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or len(names) != config.num_classes:
        raise ValueError(f"class_names must be {config.num_classes} strings, got {str(names)[:80]}")
    if m.get("precision") not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {m.get('precision')!r}")
    k = m.get("k")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= config.steps:
        raise ValueError(f"k must be an int in [1, {config.steps}], got {k!r}")
    Cost.from_dict(m.get("cost"))
    _check_stages(folder, config, m.get("stages"))


def _check_stages(folder: Path, config: AVGNConfig, stages) -> None:
    with torch.device("meta"):
        stage_io = AVGN(config).stage_io
    wanted = [name for name, (_, outputs) in stage_io.items() if outputs]
    if not isinstance(stages, dict) or sorted(stages) != sorted(wanted):
        raise ValueError(f"stages must be {wanted}, got {list(stages) if isinstance(stages, dict) else stages!r}")
    for name, entry in stages.items():
        inputs, outputs = stage_io[name]
        if not isinstance(entry, dict) or not isinstance(entry.get("file"), str) or not isinstance(
                entry.get("inputs"), list):
            raise ValueError(f"stage {name}: needs a file and its inputs")
        if not all(isinstance(i, dict) and isinstance(i.get("shape"), list) and isinstance(i.get("dynamic"), dict)
                   for i in entry["inputs"]):
            raise ValueError(f"stage {name}: each input needs a name, a shape and its dynamic dimensions")
        got = [i.get("name") for i in entry["inputs"]]
        if got != list(inputs) or entry.get("outputs") != list(outputs):
            raise ValueError(f"stage {name}: inputs {got} → outputs {entry.get('outputs')}, the model's stage takes "
                             f"{list(inputs)} → {list(outputs)}")
        file = folder / entry["file"]
        if Path(entry["file"]).name != entry["file"] or not file.is_file():
            raise ValueError(f"stage {name}: file {entry['file']!r} is not in the folder")


def load_exported(folder, device=None) -> ExportedModel:
    """The exported ``folder``, its manifest checked (``read_manifest``) and its stages loaded on ``device``
    (default: CUDA for TensorRT engines, else the CPU)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    fmt = manifest["format"]
    device = torch.device(device if device is not None else "cuda" if fmt == "tensorrt" else "cpu")
    if fmt == "tensorrt" and (missing := tensorrt_missing(device)):
        raise ValueError(f"{folder}: TensorRT engines cannot run here: {missing}")
    if fmt == "onnx" and importlib.util.find_spec("onnxruntime") is None:
        raise ValueError(f"{folder}: ONNX graphs need onnxruntime (pip install onnxruntime)")
    return ExportedModel(folder, manifest, device)

