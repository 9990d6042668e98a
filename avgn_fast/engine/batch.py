"""The one per-batch function: a batch of inputs → decode → engine → one ``Prediction`` per input, in order.

``BatchPredictor`` is a callable class that builds its model and engine once, in ``__init__`` (Ray
Data's pattern for a batch function). Everything that classifies files runs it: the ``Predictor``
(decoding ahead in threads with ``decode``, classifying with ``classify``), the one-host device pool
(one per worker process, called whole) and the Ray Data model actors (``engine.distributed``: decode
runs in separate CPU tasks, the actor calls ``classify``). So every route gives the same rows.

Every stage turns an exception of one file (Exception, MemoryError and RuntimeError included; never
KeyboardInterrupt) into that file's error, so the batch and later files go on.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field

import torch

from avgn_fast.config import FROM_CHECKPOINT
from avgn_fast.data.clip import Clip
from avgn_fast.data.common import MAX_PIXELS
from avgn_fast.engine.backends import resolve_precision

__all__ = ["BatchPredictor", "Prediction", "chunked", "error_line", "resolve_device"]


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


def chunked(items: Iterable, size: int) -> Iterator[tuple[int, list]]:
    """(index of the chunk's first item, chunk) for consecutive chunks of ``size`` items."""
    chunk, start = [], 0
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield start, chunk
            start, chunk = start + size, []
    if chunk:
        yield start, chunk


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} requested but CUDA is not available")
    return device


class BatchPredictor:
    """``BatchPredictor(checkpoint, device="cpu")(["a.mp4", clip, "b.webm"])`` → one Prediction per input.

    Built once from a checkpoint path or an ``AVGN`` (``class_names`` read from it when present):
    the model goes to ``device`` (auto: CUDA if present) and into a ``GlanceEngine`` with ``backend``,
    ``precision``, ``k`` and ``batch_size`` as its largest batch. ``exit_threshold`` as in
    ``avgn_fast.config.InferenceSettings``: a τ, None (never exit early) or ``FROM_CHECKPOINT`` (the
    checkpoint's τ, the default). An input is a path (decoded with
    ``decode_backend``; ``max_pixels`` and ``keyframes_only`` as in ``avgn_fast.data.common.DecodeParams``)
    or an already decoded ``Clip``. Calls are independent; one instance serves one thread at a time.
    """

    def __init__(self, model_or_checkpoint, *, device: str | torch.device = "auto", precision: str = "auto",
                 decode_backend: str = "auto", batch_size: int = 16, topk: int = 5, k: int | None = None,
                 exit_threshold: float | None | str = FROM_CHECKPOINT, backend: str = "eager",
                 max_pixels: int | None = None,
                 keyframes_only: bool = False):
        from avgn_fast.checkpoint import load
        from avgn_fast.data.decode import resolve_backend
        from avgn_fast.engine.early_exit import GlanceEngine

        if batch_size < 1 or topk < 1:
            raise ValueError(f"need batch_size ≥ 1 and topk ≥ 1; got {batch_size=} {topk=}")
        self.device = resolve_device(device)
        resolve_precision(precision, self.device)  # a bad precision fails before the model loads
        if isinstance(model_or_checkpoint, (str, os.PathLike)):
            model = load(model_or_checkpoint)
        else:
            model = model_or_checkpoint
        self.config = model.config
        self.class_names = list(getattr(model, "class_names", None) or
                                [str(i) for i in range(self.config.num_classes)])
        self.decode_backend = resolve_backend(decode_backend, self.device)
        self.batch_size, self.topk, self.exit_threshold = batch_size, min(topk, len(self.class_names)), exit_threshold
        self.decode_options = dict(max_pixels=MAX_PIXELS if max_pixels is None else max_pixels,
                                   keyframes_only=keyframes_only)
        self.model = model.to(self.device).eval()
        self.engine = GlanceEngine(self.model, backend=backend, precision=precision, device=self.device,
                                   max_batch=batch_size, k=k)
        self.dtype = self.engine.dtype  # an exported folder runs at its own precision

    def __call__(self, items: list, *, start: int = 0, explain_dir=None) -> list[Prediction]:
        """Decode the paths among ``items`` and classify everything: one Prediction per item, same order.

        ``start`` is the index of ``items[0]`` in the whole run (it numbers the explanations).
        """
        names = [None if isinstance(x, Clip) else str(x) for x in items]
        decoded = iter(self.decode([n for n in names if n is not None]))
        clips = [x if isinstance(x, Clip) else next(decoded) for x in items]
        return self.classify(names, clips, start=start, explain_dir=explain_dir)

    def decode(self, paths: list[str]) -> list:
        """Each path decoded to a Clip, or the exception that stopped it; only the culprit of a failure fails.

        DALI decodes the batch per pipeline run; PyAV a file at a time. If a call raises, each file
        is decoded alone.
        """
        from avgn_fast.data import decode

        if not paths:
            return []
        try:
            return decode.decode_many(paths, self.config, backend=self.decode_backend, device=self.device,
                                      batch_size=len(paths), **self.decode_options)
        except Exception as e:
            if len(paths) == 1:
                return [e]
            return [r for path in paths for r in self.decode([path])]

    def classify(self, names: list[str | None], clips: list, *, start: int = 0, explain_dir=None,
                 glance: list[dict] | None = None, patches: tuple | None = None) -> list[Prediction]:
        """One Prediction per entry of ``clips``: a Clip is classified; an exception, or an error line
        (``str``) from a decode elsewhere, becomes that input's error. ``names`` are the inputs' paths
        (None for a Clip given as input: its own ``path`` is used). Explanations go to ``explain_dir``
        when given, numbered from ``start``. ``glance``, one entry per clip: its glance features computed
        before (the glance stage's outputs, each (T, ...)), which the engine then uses instead of the stage.
        ``patches``: an ``engine.early_exit.PatchTable`` and, per clip, its frames' rows of it (T,) int64, whose
        patches the clips share (``GlanceEngine``'s ``patches``)."""
        out = [None if isinstance(c, Clip) else Prediction(path=names[i], error=c if isinstance(c, str) else
                                                           error_line(names[i], c))
               for i, c in enumerate(clips)]
        good = [i for i, c in enumerate(clips) if isinstance(c, Clip)]
        predicted = self._predict_clips([clips[i] for i in good], [names[i] or clips[i].path for i in good],
                                        None if glance is None else [glance[i] for i in good],
                                        None if patches is None else (patches[0], [patches[1][i] for i in good]))
        for i, pred in zip(good, predicted):
            if explain_dir is not None and pred.ok:
                pred = self._explain(explain_dir, clips[i], pred, start + i)
            out[i] = pred
        return out

    def _predict_clips(self, clips: list[Clip], paths: list[str | None], glance: list[dict] | None = None,
                       patches: tuple | None = None) -> list[Prediction]:
        """Clips run as one batch; if that fails, each clip alone, so only the culprit gets the error."""
        if not clips:
            return []
        known = None if patches is None else set(patches[0].known)
        try:
            result = self._run(clips, glance, patches)
            return [self._prediction(path, clip, result, j) for j, (path, clip) in enumerate(zip(paths, clips))]
        except Exception as e:
            if patches is not None:  # the retries compute (and are charged for) what the failed attempt recorded
                patches[0].known.intersection_update(known)
            if len(clips) == 1:
                return [Prediction(path=paths[0], error=error_line(paths[0], e))]
            return [p for j, (clip, path) in enumerate(zip(clips, paths))
                    for p in self._predict_clips([clip], [path], None if glance is None else [glance[j]],
                                                 None if patches is None else (patches[0], [patches[1][j]]))]

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
    def _run(self, clips: list[Clip], glance: list[dict] | None = None, patches: tuple | None = None):
        frames = torch.stack([c.frames for c in clips]).to(self.device, non_blocking=True)
        mel = torch.stack([c.mel for c in clips]).to(self.device, torch.float32, non_blocking=True)
        present = torch.tensor([c.audio_present for c in clips], device=self.device)
        if glance is not None:
            glance = {name: torch.stack([g[name] for g in glance]).to(self.device) for name in glance[0]}
        if patches is not None:
            patches = (patches[0], torch.stack(patches[1]).to(self.device))
        return self.engine(frames, mel, present, exit_threshold=self.exit_threshold, glance=glance, patches=patches)

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
