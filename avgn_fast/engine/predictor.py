"""Batch inference on users' files: decode ahead in background workers, classify in batches, keep input order."""

from __future__ import annotations

import logging
import os
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from pathlib import Path

import torch

from avgn_fast.config import FROM_CHECKPOINT
from avgn_fast.data.clip import Clip
from avgn_fast.engine.backends import precision_name, resolve_precision
from avgn_fast.engine.batch import BatchPredictor, Prediction, chunked, error_line, resolve_device

__all__ = ["Prediction", "Predictor", "error_line", "expand_inputs", "model_threads", "resolve_device",
           "resolve_precision"]

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = (".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v", ".ts", ".mts", ".m2ts", ".mpg", ".mpeg", ".flv",
                  ".wmv", ".ogv", ".3gp")


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


def model_threads(threads: int, decoding: int) -> int:
    """Torch threads for the model's next batch on a CPU while ``decoding`` decode workers are busy: the caller's
    ``threads`` less one per busy worker, at least one."""
    return max(1, threads - decoding)


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
    Each batch is decoded and classified by ``engine.batch.BatchPredictor`` (``self.batch``), the
    per-batch code the device pool and the Ray Data actors run too.
    """

    def __init__(self, model_or_checkpoint, *, device: str = "auto", precision: str = "auto",
                 decode_backend: str = "auto", batch_size: int = 16, num_workers: int | None = None, topk: int = 5,
                 k: int | None = None, exit_threshold: float | None | str = FROM_CHECKPOINT, backend: str = "eager",
                 devices: list[int | str] | None = None, max_pixels: int | None = None,
                 keyframes_only: bool = False):
        from avgn_fast.checkpoint import load
        from avgn_fast.data.decode import resolve_backend
        from avgn_fast.engine.multi_device import DevicePool, parse_devices

        num_workers = default_workers() if num_workers is None else num_workers
        if batch_size < 1 or num_workers < 0 or topk < 1:
            raise ValueError(f"need batch_size ≥ 1, num_workers ≥ 0, topk ≥ 1; got {batch_size=} {num_workers=} "
                             f"{topk=}")
        devices = parse_devices(devices) if devices is not None else None
        self.batch_size, self.num_workers = batch_size, num_workers
        settings = dict(precision=precision, decode_backend=decode_backend, batch_size=batch_size, topk=topk, k=k,
                        exit_threshold=exit_threshold, backend=backend, max_pixels=max_pixels,
                        keyframes_only=keyframes_only)
        self.pool = self.batch = self.engine = None
        if devices is not None and len(devices) > 1:
            # every worker builds its own BatchPredictor on its device; this process only hands out inputs
            self.device = resolve_device(devices[0])
            # bad settings and checkpoints are refused here, not once per worker
            resolve_precision(precision, self.device)
            resolve_backend(decode_backend, self.device)
            if isinstance(model_or_checkpoint, (str, os.PathLike)):
                load(model_or_checkpoint)
            self.pool = DevicePool(model_or_checkpoint, devices, settings)
            log.info("Predictor: devices=%s backend=%s batch_size=%d", ",".join(devices), backend, batch_size)
            return
        self.batch = BatchPredictor(model_or_checkpoint, device=devices[0] if devices else device, **settings)
        self.device, self.engine = self.batch.device, self.batch.engine
        log.info("Predictor: device=%s backend=%s precision=%s decode=%s batch_size=%d workers=%d", self.device,
                 self.engine.backend, precision_name(self.batch.dtype), self.batch.decode_backend, batch_size,
                 num_workers)

    # --- public API ---------------------------------------------------------------------------

    def predict(self, items: Iterable[str | os.PathLike | Clip], **kwargs) -> list[Prediction]:
        return list(self.predict_iter(items, **kwargs))

    def predict_iter(self, items: Iterable[str | os.PathLike | Clip], *,
                     explain_dir: str | os.PathLike | None = None, window_s: float | None = None,
                     hop_s: float | None = None) -> Iterator[Prediction]:
        """Yield one Prediction per input, in input order, while later inputs decode in the background.

        Stopping early (Ctrl-C, or closing the iterator) cancels the files not yet started, and the ones
        being decoded finish alone, so nothing waits for the rest of the inputs.

        With ``window_s`` each file is classified in windows of ``window_s`` seconds every ``hop_s``
        (default ``window_s``): one ``WindowPrediction`` per window, files in order, each file read once
        front to back by one background reader (``num_workers`` does not apply), overlapping windows sharing
        their frames' glance features (``engine.stream``); ``explain_dir`` then gets one timeline PNG per
        file (``engine.timeline``).
        """
        if window_s is not None:
            yield from self._predict_windows(items, window_s, hop_s, explain_dir)
            return
        if hop_s is not None:
            raise ValueError("hop_s needs window_s")
        if self.pool is not None:
            yield from self.pool.predict_iter(items, explain_dir)
            return
        stop = threading.Event()
        pool = ThreadPoolExecutor(max(self.num_workers, 1), thread_name_prefix="avgn-decode")
        try:
            pending = deque()
            for start, chunk in chunked(items, self.batch_size):
                pending.append((start, chunk, self._submit_chunk(pool, chunk, stop)))
                if len(pending) > self.num_workers:
                    yield from self._classify_next(pending, explain_dir)
            while pending:
                yield from self._classify_next(pending, explain_dir)
        finally:
            stop.set()
            pool.shutdown(wait=False, cancel_futures=True)

    def _predict_windows(self, items, window_s: float, hop_s: float | None, explain_dir) -> Iterator[Prediction]:
        from avgn_fast.engine.stream import predict_windows
        from avgn_fast.engine.timeline import TimelineWriter

        if self.pool is not None:
            raise ValueError("windowed prediction runs on one device; leave devices out")
        items = list(items)
        if any(isinstance(x, Clip) for x in items):
            raise ValueError("windowed prediction reads files; got a decoded Clip")
        paths = [str(x) for x in items]
        timeline = TimelineWriter(explain_dir, self.batch.class_names) if explain_dir is not None else None
        rows = predict_windows(self.batch, paths, window_s, hop_s, on_window=timeline.add if timeline else None)
        yield from rows if timeline is None else timeline.rows(rows)

    # --- stages: decode in the background threads, classify in this one -----------------------

    def _submit_chunk(self, pool: ThreadPoolExecutor, chunk: list, stop: threading.Event) -> list[Future]:
        """The chunk's paths handed to the workers: a file per task (a batch per task for DALI, which decodes
        a batch per pipeline run), so every worker helps with the oldest chunk and all finish together."""
        paths = [str(x) for x in chunk if not isinstance(x, Clip)]
        step = self.batch_size if self.batch.decode_backend == "dali" else 1
        return [pool.submit(self._decode_paths, paths[i:i + step], stop) for i in range(0, len(paths), step)]

    def _decode_paths(self, paths: list[str], stop: threading.Event) -> list:
        if stop.is_set():
            raise CancelledError  # the iteration that asked for these files has ended
        return self.batch.decode(paths)

    def _classify_next(self, pending: deque, explain_dir) -> list[Prediction]:
        """The oldest chunk classified once its files are decoded.

        On a CPU the model and the decode workers share the cores: the model runs on the threads the
        workers busy with later chunks leave (at least one; more would take cores from the decoders and
        spin in their barriers), and on the caller's threads when none is busy (the end of a run, a model
        slower than its decoders, a single chunk). Compiled CPU code keeps the thread count it was compiled
        with, so inductor always runs on the caller's threads.
        """
        start, chunk, tasks = pending.popleft()
        clips = self._collect(chunk, tasks)
        names = [None if isinstance(x, Clip) else str(x) for x in chunk]
        threads = torch.get_num_threads()
        try:
            if self.device.type == "cpu" and self.engine.backend != "inductor":
                busy = sum(not task.done() for _, _, later in pending for task in later)
                torch.set_num_threads(model_threads(threads, min(busy, max(self.num_workers, 1))))
            return self.batch.classify(names, clips, start=start, explain_dir=explain_dir)
        finally:
            torch.set_num_threads(threads)

    @staticmethod
    def _collect(chunk: list, tasks: list[Future]) -> list:
        """Each input of the chunk a Clip, or the exception that stopped it, once its task is done."""
        decoded = iter([clip for task in tasks for clip in task.result()])
        return [x if isinstance(x, Clip) else next(decoded) for x in chunk]
