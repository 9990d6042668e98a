"""Inference backends (eager, inductor, TensorRT), precisions, and the runner that calls one stage on one.

``resolve_backend("auto", device)`` picks TensorRT when torch-tensorrt and CUDA are present, else
inductor on CUDA, else eager, and says why; a backend asked for by name that cannot run is a
``ValueError``, never a silent fallback. A ``StageRunner`` pads the batch of a stage's inputs to
the next bucket (static shapes: one compiled graph or engine per bucket), calls the backend's form
of the stage, and returns the outputs for the real rows.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import inspect
import json
import logging
import os
import shutil
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

BACKENDS = ("eager", "inductor", "tensorrt")
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# attention and crop have Triton kernels; TensorRT gets the attention as the reference's plain ops
# (converted natively) and the crop runs in torch between engines
TENSORRT_NOTE = "TensorRT: attention as reference ops inside the engines; patch crop in torch between engines"


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """'auto' is fp16 on CUDA and fp32 on CPU; an explicit choice the device can't run is an error."""
    if precision == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of auto, {', '.join(PRECISIONS)}; got {precision!r}")
    if precision == "fp16" and device.type == "cpu":
        raise ValueError("precision fp16 needs a CUDA device; use fp32 or bf16 on CPU")
    return PRECISIONS[precision]


def precision_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in PRECISIONS.items()}[dtype]


def tensorrt_missing(device: torch.device) -> str | None:
    """Why the TensorRT backend cannot run on ``device``, or None when it can."""
    if importlib.util.find_spec("torch_tensorrt") is None:
        return "torch_tensorrt is not installed"
    if device.type != "cuda" or not torch.cuda.is_available():
        return f"TensorRT needs a CUDA device, got {device}"
    return None


def inductor_missing(device: torch.device) -> str | None:
    """Why inductor cannot compile for ``device``, or None when it can."""
    if device.type == "cpu" and not any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "clang++")):
        return "inductor on CPU needs a C++ compiler (g++ or clang++, or $CXX)"
    if device.type == "cuda" and importlib.util.find_spec("triton") is None:
        return "inductor on CUDA needs triton"
    return None


def resolve_backend(backend: str, device: torch.device) -> tuple[str, str]:
    """(backend, reason): ``auto`` resolved for ``device``; an unavailable explicit backend raises ValueError."""
    if backend not in ("auto", *BACKENDS):
        raise ValueError(f"backend must be one of auto, {', '.join(BACKENDS)}; got {backend!r}")
    if backend == "auto":
        trt = tensorrt_missing(device)
        if trt is None:
            choice = "tensorrt", "auto: torch_tensorrt and CUDA are present"
        elif device.type == "cuda" and inductor_missing(device) is None:
            choice = "inductor", f"auto: CUDA without TensorRT ({trt})"
        else:
            choice = "eager", f"auto: no CUDA device ({device}), where compiling rarely repays its warm-up"
    else:
        missing = {"tensorrt": tensorrt_missing, "inductor": inductor_missing}.get(backend, lambda d: None)(device)
        if missing:
            raise ValueError(f"backend {backend!r} was requested but cannot run: {missing}")
        choice = backend, "requested"
    log.info("backend %s (%s)", *choice)
    return choice


def bucket_sizes(top: int, levels: int = 3) -> tuple[int, ...]:
    """Static batch sizes up to ``top``: top, top/2, top/4, … (``levels`` of them, rounded up, at least 1)."""
    if top < 1:
        raise ValueError(f"top must be ≥ 1, got {top}")
    return tuple(sorted({max(1, -(-top // 2**i)) for i in range(levels)}))


def pad_batch(t: torch.Tensor, size: int) -> torch.Tensor:
    """``t`` with zero rows appended up to ``size`` rows, in ``t``'s memory format."""
    n = t.shape[0]
    if n == size:
        return t
    channels_last = t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)
    out = torch.zeros((size, *t.shape[1:]), dtype=t.dtype, device=t.device)
    if channels_last:
        out = out.contiguous(memory_format=torch.channels_last)
    out[:n] = t
    return out


@contextlib.contextmanager
def reference_ops():
    """Route the model's custom ops to their plain-PyTorch references (``AVGN_TRITON=0``) while tracing."""
    old = os.environ.get("AVGN_TRITON")
    os.environ["AVGN_TRITON"] = "0"
    try:
        yield
    finally:
        if old is None:
            del os.environ["AVGN_TRITON"]
        else:
            os.environ["AVGN_TRITON"] = old


def state_hash(module: nn.Module) -> str:
    """sha256 of a module's state (names, dtypes, shapes and bytes), for cache keys."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class StageRunner:
    """Calls one stage (``engine.stages``) on a backend; batch-first inputs, int64 scalars passed as they are.

    eager: the stage itself, no padding. inductor: ``torch.compile(dynamic=False)``, CUDA graphs
    (``mode="reduce-overhead"``) on CUDA when ``cuda_graphs``; tensorrt: ``torch.export`` then
    torch-tensorrt, one engine per bucket, cached on disk under ``cache_dir``. With buckets the
    batch is zero-padded to the next bucket and the outputs sliced back; outputs of CUDA-graph
    replays are copied out, since the next replay overwrites them.
    """

    def __init__(self, stage: nn.Module, backend: str, *, buckets: tuple[int, ...] = (), cuda_graphs: bool = False,
                 cache_dir: str | os.PathLike | None = None, model_hash: str = ""):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.stage, self.backend, self.buckets = stage, backend, tuple(sorted(buckets))
        self.cuda_graphs = cuda_graphs and backend == "inductor"
        self.cache_dir, self.model_hash = cache_dir, model_hash
        self.engines: dict[int, nn.Module] = {}
        if backend == "inductor":
            self.fn = torch.compile(stage, dynamic=False, mode="reduce-overhead" if self.cuda_graphs else None)
        else:
            self.fn = stage

    def bucket(self, n: int) -> int:
        return next((b for b in self.buckets if b >= n), n)

    def __call__(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        n = args[0].shape[0]
        size = self.bucket(n)
        if size != n:
            args = tuple(pad_batch(a, size) if a.dim() else a for a in args)
        fn = self.fn if self.backend != "tensorrt" else self._tensorrt(size, args)
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        out = fn(*args)
        if self.cuda_graphs:
            out = tuple(o.clone() for o in out)
        return tuple(o[:n] for o in out) if size != n else tuple(out)

    def _tensorrt(self, size: int, args: tuple[torch.Tensor, ...]) -> nn.Module:
        if size not in self.engines:
            self.engines[size] = tensorrt_engine(self.stage, args, cache_dir=self.cache_dir,
                                                 model_hash=self.model_hash)[0]
        return self.engines[size]


def default_cache_dir() -> Path:
    return Path(os.environ.get("AVGN_CACHE", Path.home() / ".cache" / "avgn_fast")) / "tensorrt"


def tensorrt_key(stage: nn.Module, args: tuple[torch.Tensor, ...], model_hash: str) -> str:
    """Cache key of one engine: model, stage, GPU, precision, input shapes and dtypes, versions."""
    import tensorrt
    import torch_tensorrt

    parts = {"model": model_hash, "stage": stage.name, "gpu": torch.cuda.get_device_name(args[0].device),
             "precision": str(stage.dtype), "inputs": [(tuple(a.shape), str(a.dtype)) for a in args],
             "torch": torch.__version__, "torch_tensorrt": torch_tensorrt.__version__,
             "tensorrt": tensorrt.__version__}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def tensorrt_engine(stage: nn.Module, args: tuple[torch.Tensor, ...], *, cache_dir=None,
                    model_hash: str = "") -> tuple[nn.Module, Path]:
    """(module, file): ``stage`` compiled by TensorRT at the shapes of ``args``, from the disk cache when built before.

    The stage is exported with the reference ops (see ``TENSORRT_NOTE``); its autocast becomes
    explicit casts in the exported graph, which TensorRT follows (explicit typing where the
    installed torch-tensorrt has it, else the precision is enabled for the builder).
    """
    import torch_tensorrt

    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = cache / f"{stage.name}-{tensorrt_key(stage, args, model_hash)}.ep"
    if path.is_file():
        log.info("TensorRT %s: engine from %s", stage.name, path)
        return torch.export.load(str(path)).module(), path
    with torch.inference_mode(False):  # export traces ordinary tensors, not the engine's inference tensors
        args = tuple(a.clone() for a in args)
        with reference_ops(), torch.no_grad():
            program = torch.export.export(stage, args)
    options = {"arg_inputs": list(args), "min_block_size": 1}
    if "use_explicit_typing" in inspect.signature(torch_tensorrt.dynamo.compile).parameters:
        options["use_explicit_typing"] = True
    else:
        options["enabled_precisions"] = {stage.dtype}
    module = torch_tensorrt.dynamo.compile(program, **options)
    cache.mkdir(parents=True, exist_ok=True)
    torch_tensorrt.save(module, str(path), arg_inputs=list(args))
    log.info("TensorRT %s: engine built for %s, cached at %s", stage.name, [tuple(a.shape) for a in args], path)
    return module, path
