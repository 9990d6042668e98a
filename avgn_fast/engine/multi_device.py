"""One worker process per device: chunks of inputs go round the workers, predictions come back in input order.

``Predictor(..., devices=[0, 1])`` uses this. Each worker builds its own ``BatchPredictor`` on its
device (``engine.batch``, same settings) and decodes and classifies whole chunks of ``batch_size``
inputs with it; the parent
hands out chunks in turn, keeps at most two per worker in flight, and yields predictions in
input order. Workers start with ``spawn`` (CUDA cannot be forked) and stop when the iteration ends.
"""

from __future__ import annotations

import copy
import logging
import os
import queue
import traceback
from collections.abc import Iterable, Iterator

import torch
import torch.multiprocessing as mp

log = logging.getLogger(__name__)

IN_FLIGHT_PER_WORKER = 2
_POLL_S = 1.0


def parse_devices(devices) -> list[str]:
    """``[0, 1]``, ``["cuda:0", "cpu"]`` or ``"0,1"`` → device strings; ints name CUDA devices."""
    if isinstance(devices, str):
        devices = [d.strip() for d in devices.split(",") if d.strip()]
    out = [f"cuda:{d}" if isinstance(d, int) or str(d).isdigit() else str(d) for d in devices]
    if not out:
        raise ValueError("devices must name at least one device")
    for d in out:
        dev = torch.device(d)
        if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
            raise ValueError(f"device {d} requested but only {torch.cuda.device_count()} CUDA devices are visible")
    return out


def portable_model(model_or_checkpoint):
    """What a worker can rebuild the model from: a checkpoint path as is, a model as a CPU copy."""
    if isinstance(model_or_checkpoint, (str, os.PathLike)):
        return str(model_or_checkpoint)
    return copy.deepcopy(model_or_checkpoint).cpu()


def _worker(device: str, source, settings: dict, threads: int, inbox, outbox) -> None:
    """Worker body: build a BatchPredictor on ``device``, then answer (start, chunk, explain_dir) until None."""
    from avgn_fast.engine.batch import BatchPredictor

    if threads:
        torch.set_num_threads(threads)
    try:
        predict = BatchPredictor(source, device=device, **settings)
    except Exception as e:  # reported to the parent, which raises it
        outbox.put(("error", None, f"{device}: {type(e).__name__}: {e}"))
        return
    outbox.put(("ready", None, device))
    while (job := inbox.get()) is not None:
        start, chunk, explain_dir = job
        try:
            outbox.put(("done", start, predict(chunk, start=start, explain_dir=explain_dir)))
        except Exception:
            outbox.put(("error", start, f"{device}: {traceback.format_exc()}"))


class DevicePool:
    """Shards ``predict_iter`` across one process per device; see the module docstring."""

    def __init__(self, model_or_checkpoint, devices, settings: dict):
        self.devices = parse_devices(devices)
        self.source = portable_model(model_or_checkpoint)
        self.settings = dict(settings)
        self.batch_size = settings.get("batch_size", 16)
        cpus = sum(torch.device(d).type == "cpu" for d in self.devices)
        self.threads = max(1, (os.cpu_count() or 1) // cpus) if cpus else 0

    def predict_iter(self, items: Iterable, explain_dir=None) -> Iterator:
        from avgn_fast.engine.batch import chunked

        ctx = mp.get_context("spawn")
        outbox = ctx.Queue()
        inboxes = [ctx.Queue() for _ in self.devices]
        workers = [ctx.Process(target=_worker, args=(d, self.source, self.settings, self.threads, q, outbox),
                               daemon=True, name=f"avgn-{d}") for d, q in zip(self.devices, inboxes)]
        for w in workers:
            w.start()
        try:
            for _ in workers:
                self._receive(outbox, workers, expect="ready")
            log.info("DevicePool: %d workers on %s", len(workers), ", ".join(self.devices))
            chunks = chunked(items, self.batch_size)
            done: dict[int, list] = {}
            order: list[int] = []  # chunk starts in input order, handed out but not yet yielded
            for i, (start, chunk) in enumerate(chunks):
                inboxes[i % len(workers)].put((start, chunk, explain_dir))
                order.append(start)
                while len(order) > IN_FLIGHT_PER_WORKER * len(workers):
                    yield from self._next_in_order(order, done, outbox, workers)
            while order:
                yield from self._next_in_order(order, done, outbox, workers)
        finally:
            for q in inboxes:
                q.put(None)
            for w in workers:
                w.join(timeout=30)
                if w.is_alive():
                    w.terminate()

    def _next_in_order(self, order: list[int], done: dict, outbox, workers) -> list:
        while order[0] not in done:
            start, predictions = self._receive(outbox, workers, expect="done")
            done[start] = predictions
        return done.pop(order.pop(0))

    @staticmethod
    def _receive(outbox, workers, *, expect: str):
        while True:
            try:
                kind, start, payload = outbox.get(timeout=_POLL_S)
            except queue.Empty:
                dead = [w.name for w in workers if not w.is_alive()]
                if dead:
                    raise RuntimeError(f"device worker(s) {', '.join(dead)} exited") from None
                continue
            if kind == "error":
                raise RuntimeError(f"device worker failed: {payload}")
            if kind != expect:
                raise RuntimeError(f"device worker sent {kind!r}, expected {expect!r}")
            return (start, payload) if expect == "done" else payload
