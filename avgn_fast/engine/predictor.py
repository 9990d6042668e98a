"""Batch inference on users' files: decode ahead in background workers, classify in batches, keep input order."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import CancelledError, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from avgn_fast.data.clip import Clip
from avgn_fast.data.common import MAX_PIXELS
from avgn_fast.engine.backends import precision_name, resolve_precision

__all__ = ["Prediction", "Predictor", "error_line", "expand_inputs", "resolve_device", "resolve_precision"]

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = (".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v", ".ts", ".mts", ".m2ts", ".mpg", ".mpeg", ".flv",
                  ".wmv", ".ogv", ".3gp")


@dataclass
class Prediction:
    """What the model decided for one input, and what it looked at; ``error`` is set instead for a bad input.

    ``error`` is one line, ``"PATH: problem"``. It is set together with the label (and ``ok`` is False)
    when the file was classified but its requested explanation could not be drawn or written.

    kept_frames are indices into the T sampled frames in step order, frame_times their times in
    seconds, patch_boxes (y0, x0, y1, x1) per kept frame in pixels of the original video; the
    saliency list has one score per sampled frame; gflops counts the steps actually taken; notes say
    what decoding repaired or dropped (non-finite audio samples zeroed, a broken audio stream left out).
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
    notes: list[str] = field(default_factory=list)  # what decoding repaired or dropped (e.g. broken audio)

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
        """One line of strict JSON: non-finite floats (NaN, ±inf anywhere) become null, the rest is kept."""
        return json.dumps(_finite(asdict(self)), allow_nan=False)


def _finite(value):
    """``value`` with every non-finite float inside lists, tuples and dicts replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    return value


def error_line(path, error: Exception, *, stage: str | None = None) -> str:
    """``"PATH: [stage: ]problem"`` on one line for ``error`` raised while handling ``path``.

    A DecodeError already names its file and problem, and is used as it is.
    """
    from avgn_fast.data.decode import DecodeError

    if isinstance(error, DecodeError):
        text = str(error)
    else:
        problem = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        text = f"{path or 'clip'}: " + (f"{stage}: " if stage else "") + problem
    return " ".join(text.split())


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


def default_workers() -> int:
    """Background decode workers by default: one per core this process may use (decode is the CPU-bound side)."""
    return max(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1, 1)


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
    with memory bounded by ``batch_size · (num_workers + 1)`` decoded clips (``num_workers``: one per
    core by default). A file that fails anywhere (decode, model, explanation) gives a Prediction with
    ``error`` set; the rest of the batch and later files are unaffected. ``max_pixels`` and
    ``keyframes_only`` are passed to the decoder (``avgn_fast.data.common.DecodeParams``).

    ``backend`` (eager | inductor | tensorrt | auto) and ``precision`` choose how the model runs
    (``engine.GlanceEngine``: compiled stages, batched early exit); ``devices=[0, 1, …]`` shards the
    inputs across one worker process per device (``engine.multi_device``), results in input order.
    """

    def __init__(self, model_or_checkpoint, *, device: str = "auto", precision: str = "auto",
                 decode_backend: str = "auto", batch_size: int = 16, num_workers: int | None = None, topk: int = 5,
                 k: int | None = None, exit_threshold: float | None = None, backend: str = "eager",
                 devices: list[int | str] | None = None, max_pixels: int | None = None,
                 keyframes_only: bool = False):
        from avgn_fast.checkpoint import load
        from avgn_fast.data.decode import resolve_backend
        from avgn_fast.engine.early_exit import GlanceEngine
        from avgn_fast.engine.multi_device import DevicePool, parse_devices

        num_workers = default_workers() if num_workers is None else num_workers
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
        self.decode_options = dict(max_pixels=MAX_PIXELS if max_pixels is None else max_pixels,
                                   keyframes_only=keyframes_only)
        self.pool = self.engine = None
        if devices is not None and len(devices) > 1:
            # every worker builds its own Predictor on its device; this process only hands out inputs
            settings = dict(precision=precision, decode_backend=decode_backend, batch_size=batch_size,
                            num_workers=num_workers, topk=topk, k=k, exit_threshold=exit_threshold, backend=backend,
                            **self.decode_options)
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
        """Yield one Prediction per input, in input order, while later inputs decode in the background.

        Stopping early (Ctrl-C, or closing the iterator) cancels the chunks not yet started, and the
        running ones stop at their next file, so nothing waits for the rest of the inputs.
        """
        if self.pool is not None:
            yield from self.pool.predict_iter(items, explain_dir)
            return
        stop = threading.Event()
        pool = ThreadPoolExecutor(max(self.num_workers, 1), thread_name_prefix="avgn-decode")
        try:
            pending = deque()
            for start, chunk in _chunked(items, self.batch_size):
                pending.append(pool.submit(self._decode_chunk, start, chunk, stop))
                if len(pending) > self.num_workers:
                    yield from self._classify(*pending.popleft().result(), explain_dir)
            while pending:
                yield from self._classify(*pending.popleft().result(), explain_dir)
        finally:
            stop.set()
            pool.shutdown(wait=False, cancel_futures=True)

    # --- stages -------------------------------------------------------------------------------
    # Every stage turns an exception of one file (Exception, MemoryError and RuntimeError included;
    # never KeyboardInterrupt) into that file's error, so the batch and later files go on.

    def _decode_chunk(self, start: int, chunk: list,
                      stop: threading.Event | None = None) -> tuple[int, list[str | None], list]:
        """(start, names, clips): each input decoded to a Clip, or the exception that stopped it."""
        names = [None if isinstance(x, Clip) else str(x) for x in chunk]
        paths = [n for n in names if n is not None]
        # DALI decodes a batch per pipeline run; PyAV a file at a time, so a stop is seen between files
        step = self.batch_size if self.decode_backend == "dali" else 1
        decoded = []
        for i in range(0, len(paths), step):
            if stop is not None and stop.is_set():
                raise CancelledError  # the iteration that asked for this chunk has ended
            decoded += self._decode_isolated(paths[i:i + step])
        results = iter(decoded)
        clips = [x if isinstance(x, Clip) else next(results) for x in chunk]
        return start, names, clips

    def _decode_isolated(self, paths: list[str]) -> list:
        """``decode_many(paths)``; if it raises, each file alone, so only the culprit gets the error."""
        from avgn_fast.data import decode

        try:
            return decode.decode_many(paths, self.config, backend=self.decode_backend, device=self.device,
                                      batch_size=len(paths), **self.decode_options)
        except Exception as e:
            if len(paths) == 1:
                return [e]
            return [r for path in paths for r in self._decode_isolated([path])]

    def _classify(self, start, names, clips, explain_dir) -> list[Prediction]:
        """One Prediction per decoded clip or decode failure, explanations drawn for the ones classified."""
        out = [None if isinstance(c, Clip) else Prediction(path=names[i], error=error_line(names[i], c))
               for i, c in enumerate(clips)]
        good = [i for i, c in enumerate(clips) if isinstance(c, Clip)]
        predicted = self._predict_clips([clips[i] for i in good], [names[i] or clips[i].path for i in good])
        for i, pred in zip(good, predicted):
            if explain_dir is not None and pred.ok:
                pred = self._explain(explain_dir, clips[i], pred, start + i)
            out[i] = pred
        return out

    def _predict_clips(self, clips: list[Clip], paths: list[str | None]) -> list[Prediction]:
        """Clips run as one batch; if that fails, each clip alone, so only the culprit gets the error."""
        if not clips:
            return []
        try:
            result = self._run(clips)
            return [self._prediction(path, clip, result, j) for j, (path, clip) in enumerate(zip(paths, clips))]
        except Exception as e:
            if len(clips) == 1:
                return [Prediction(path=paths[0], error=error_line(paths[0], e))]
            return [p for clip, path in zip(clips, paths) for p in self._predict_clips([clip], [path])]

    @staticmethod
    def _explain(explain_dir, clip: Clip, pred: Prediction, index: int) -> Prediction:
        """``pred`` after drawing its explanation; if that fails, ``pred`` keeps its label and gets the error."""
        from avgn_fast.engine.explain import write_explanation

        try:
            write_explanation(explain_dir, clip, pred, index=index)
            return pred
        except Exception as e:
            return dataclasses.replace(pred, error=error_line(pred.path, e, stage="explanation"))

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
            notes=list(clip.notes),
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
