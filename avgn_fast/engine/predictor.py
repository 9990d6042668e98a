"""Batch inference on users' files: decode ahead in background workers, classify in batches, keep input order."""

from __future__ import annotations

import json
import logging
import os
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from avgn_fast.data.clip import Clip
from avgn_fast.engine.backends import precision_name, resolve_precision

__all__ = ["Prediction", "Predictor", "expand_inputs", "resolve_device", "resolve_precision"]

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = (".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v")


@dataclass
class Prediction:
    """What the model decided for one input, and what it looked at; ``error`` is set instead for a bad input.

    kept_frames are indices into the T sampled frames in step order, frame_times their times in
    seconds, patch_boxes (y0, x0, y1, x1) per kept frame in pixels of the original video; the
    saliency list has one score per sampled frame; gflops counts the steps actually taken.
    """

    path: str | None
    label: str | None = None
    score: float | None = None
    topk: list[tuple[str, float]] = field(default_factory=list)
    saliency: list[float] = field(default_factory=list)
    kept_frames: list[int] = field(default_factory=list)
    frame_times: list[float] = field(default_factory=list)
    patch_boxes: list[list[float]] = field(default_factory=list)
    exit_step: int | None = None
    gflops: float | None = None
    audio_present: bool | None = None
    error: str | None = None

    def __post_init__(self):
        if self.error is None and self.label is None:
            raise ValueError("a Prediction needs either a label or an error")
        if len(self.patch_boxes) != len(self.kept_frames):
            raise ValueError(f"one patch box per kept frame expected, got {len(self.patch_boxes)} boxes for "
                             f"{len(self.kept_frames)} frames")

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def expand_inputs(paths: Iterable[str | os.PathLike]) -> list[str]:
    """Files as given, directories expanded (recursively, sorted) to the video files inside them."""
    out = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            out.extend(str(f) for f in sorted(p.rglob("*")) if f.is_file() and f.suffix.lower() in VIDEO_SUFFIXES)
        else:
            out.append(str(p))
    return out


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} requested but CUDA is not available")
    return device


class Predictor:
    """Classify videos with a trained AVGN: ``Predictor("run/best.pt").predict(["a.mp4", "b.webm"])``.

    Constructible from a checkpoint path alone; ``predict`` is batch-in/batch-out (a list of paths
    or ``Clip``s in, a list of ``Prediction``s out, same length and order), ``predict_iter`` streams
    with memory bounded by ``batch_size · (num_workers + 1)`` decoded clips. A file that can't be
    decoded gives a Prediction with ``error`` set; the rest of the batch is unaffected.

    ``backend`` (eager | inductor | tensorrt | auto) and ``precision`` choose how the model runs
    (``engine.GlanceEngine``: compiled stages, batched early exit); ``devices=[0, 1, …]`` shards the
    inputs across one worker process per device (``engine.multi_device``), results in input order.
    """

    def __init__(self, model_or_checkpoint, *, device: str = "auto", precision: str = "auto",
                 decode_backend: str = "auto", batch_size: int = 16, num_workers: int = 2, topk: int = 5,
                 k: int | None = None, exit_threshold: float | None = None, backend: str = "eager",
                 devices: list[int | str] | None = None):
        from avgn_fast.checkpoint import load
        from avgn_fast.data.decode import resolve_backend
        from avgn_fast.engine.early_exit import GlanceEngine
        from avgn_fast.engine.multi_device import DevicePool, parse_devices

        if batch_size < 1 or num_workers < 0 or topk < 1:
            raise ValueError(f"need batch_size ≥ 1, num_workers ≥ 0, topk ≥ 1; got {batch_size=} {num_workers=} "
                             f"{topk=}")
        devices = parse_devices(devices) if devices is not None else None
        self.device = resolve_device(devices[0] if devices else device)
        self.dtype = resolve_precision(precision, self.device)
        if isinstance(model_or_checkpoint, (str, os.PathLike)):
            model = load(model_or_checkpoint)
        else:
            model = model_or_checkpoint
        self.config = model.config
        self.class_names = list(getattr(model, "class_names", None) or
                                [str(i) for i in range(self.config.num_classes)])
        self.decode_backend = resolve_backend(decode_backend, self.device)
        self.batch_size, self.num_workers, self.topk = batch_size, num_workers, min(topk, len(self.class_names))
        self.k, self.exit_threshold = k, exit_threshold
        self.pool = self.engine = None
        if devices is not None and len(devices) > 1:
            # every worker builds its own Predictor on its device; this process only hands out inputs
            settings = dict(precision=precision, decode_backend=decode_backend, batch_size=batch_size,
                            num_workers=num_workers, topk=topk, k=k, exit_threshold=exit_threshold, backend=backend)
            self.pool = DevicePool(model_or_checkpoint, devices, settings)
            self.model = model.eval()
            log.info("Predictor: devices=%s backend=%s batch_size=%d", ",".join(devices), backend, batch_size)
            return
        self.model = model.to(self.device).eval()
        self.engine = GlanceEngine(self.model, backend=backend, precision=precision_name(self.dtype),
                                   device=self.device, max_batch=batch_size, k=k)
        log.info("Predictor: device=%s backend=%s precision=%s decode=%s batch_size=%d workers=%d", self.device,
                 self.engine.backend, precision_name(self.dtype), self.decode_backend, batch_size, num_workers)

    # --- public API ---------------------------------------------------------------------------

    def predict(self, items: Iterable[str | os.PathLike | Clip], **kwargs) -> list[Prediction]:
        return list(self.predict_iter(items, **kwargs))

    def predict_iter(self, items: Iterable[str | os.PathLike | Clip], *,
                     explain_dir: str | os.PathLike | None = None) -> Iterator[Prediction]:
        """Yield one Prediction per input, in input order, while later inputs decode in the background."""
        if self.pool is not None:
            yield from self.pool.predict_iter(items, explain_dir)
            return
        with ThreadPoolExecutor(max(self.num_workers, 1), thread_name_prefix="avgn-decode") as pool:
            pending = deque()
            for start, chunk in _chunked(items, self.batch_size):
                pending.append(pool.submit(self._decode_chunk, start, chunk))
                if len(pending) > self.num_workers:
                    yield from self._classify(*pending.popleft().result(), explain_dir)
            while pending:
                yield from self._classify(*pending.popleft().result(), explain_dir)

    # --- stages -------------------------------------------------------------------------------

    def _decode_chunk(self, start: int, chunk: list) -> tuple[int, list[str | None], list]:
        from avgn_fast.data.decode import decode_many

        names = [None if isinstance(x, Clip) else str(x) for x in chunk]
        paths = [n for n in names if n is not None]
        decoded = iter(decode_many(paths, self.config, backend=self.decode_backend, device=self.device,
                                   batch_size=len(paths)) if paths else [])
        clips = [x if isinstance(x, Clip) else next(decoded) for x in chunk]
        return start, names, clips

    def _classify(self, start, names, clips, explain_dir) -> list[Prediction]:
        good = [i for i, c in enumerate(clips) if isinstance(c, Clip)]
        out: list[Prediction] = [
            Prediction(path=names[i], error=str(clips[i])) for i in range(len(clips))
        ]
        if good:
            result = self._run([clips[i] for i in good])
            for j, i in enumerate(good):
                out[i] = self._prediction(names[i] or clips[i].path, clips[i], result, j)
                if explain_dir is not None:
                    from avgn_fast.engine.explain import write_explanation

                    write_explanation(explain_dir, clips[i], out[i], index=start + i)
        return out

    @torch.inference_mode()
    def _run(self, clips: list[Clip]):
        frames = torch.stack([c.frames for c in clips]).to(self.device, non_blocking=True)
        mel = torch.stack([c.mel for c in clips]).to(self.device, torch.float32, non_blocking=True)
        present = torch.tensor([c.audio_present for c in clips], device=self.device)
        return self.engine(frames, mel, present, exit_threshold=self.exit_threshold)

    def _prediction(self, path, clip: Clip, result, j: int) -> Prediction:
        probs = result.final_logits[j].float().softmax(-1).cpu()
        top = probs.topk(self.topk)
        kept = result.kept[j].cpu()
        boxes = clip.to_source(result.boxes[j].float().cpu())
        times = clip.frame_times[kept].tolist() if clip.frame_times is not None else []
        return Prediction(
            path=path,
            label=self.class_names[int(top.indices[0])],
            score=float(top.values[0]),
            topk=[(self.class_names[int(i)], float(v)) for v, i in zip(top.values, top.indices)],
            saliency=[round(float(s), 6) for s in result.saliency[j].float().cpu()],
            kept_frames=kept.tolist(),
            frame_times=[round(t, 4) for t in times],
            patch_boxes=[[round(float(v), 2) for v in box] for box in boxes],
            exit_step=int(result.exit_step[j]),
            gflops=float(result.gflops[j]),
            audio_present=bool(clip.audio_present),
        )


def _chunked(items: Iterable, size: int) -> Iterator[tuple[int, list]]:
    """(index of the chunk's first item, chunk) for consecutive chunks of ``size`` items."""
    chunk, start = [], 0
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield start, chunk
            start, chunk = start + size, []
    if chunk:
        yield start, chunk
