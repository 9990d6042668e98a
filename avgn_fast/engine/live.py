"""Live sources: one row per hop as soon as its window is complete, for one source or many at once.

``stream(sources, checkpoint, window_s=W, hop_s=H)`` follows each source (anything FFmpeg opens live:
a FIFO, rtsp://, udp://, http://, /dev/video0, or a file still being written when FFmpeg's file protocol
is told to wait for it with the option ``follow=1``) in a thread of its own, front to back
(``data.sequential``), and classifies the windows of all sources together in batches
(``engine.stream.WindowRunner``: one model for many cameras). Video and audio are paired by their
timestamps, not by arrival. A failure of a source (a network source's stall past ``timeout``, a dropped connection,
a source that cannot be opened; for a network source, also its end: a server that closes the connection)
is one error row, after which the source is opened again, up to ``reconnects`` failures in a row (a
window read counts them afresh); its windows then continue on a clock shifted by the wall time since
it was first opened. A FIFO or a device that stalls past ``timeout`` (a read FFmpeg cannot interrupt)
gets one error row per stall and is read on. The iteration ends when every source has ended; stopping it
(Ctrl-C, ``close()``) stops the readers at their next packet.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import stat
import threading
import time
from collections.abc import Iterator

from avgn_fast.config import FROM_CHECKPOINT
from avgn_fast.data.common import DecodeError, DecodeParams, stalled
from avgn_fast.data.sequential import SequentialReader
from avgn_fast.engine.batch import BatchPredictor, error_line
from avgn_fast.engine.stream import WindowRunner, batches, put, source_windows
from avgn_fast.engine.windows import WindowPlan, WindowPrediction

__all__ = ["stream"]

log = logging.getLogger(__name__)


def stream(sources: str | list[str], model_or_checkpoint, *, window_s: float, hop_s: float | None = None,
           device: str = "auto", precision: str = "auto", batch_size: int = 8, topk: int = 5, k: int | None = None,
           exit_threshold: float | None | str = FROM_CHECKPOINT, backend: str = "eager",
           options: dict | None = None, timeout: float | None = 10.0, reconnects: int = 3, retry_s: float = 1.0,
           input_format: str | None = None) -> Iterator[WindowPrediction]:
    """Yield one ``WindowPrediction`` per window of each live source as soon as the window is complete.

    ``model_or_checkpoint``: a checkpoint path, an ``AVGN``, or a ``BatchPredictor`` (its settings then
    apply, the keyword ones here are ignored). ``options`` go to FFmpeg for every source (e.g.
    ``{"rtsp_transport": "tcp"}``), ``timeout`` is the longest wait for data in seconds: a network
    source that stalls longer is reopened, a FIFO or device that does gets an error row and is read on
    (its windows go on when data comes again), ``input_format`` forces the demuxer (e.g. ``"mpegts"``,
    ``"v4l2"``). Each row's ``latency_ms`` runs from the moment its window's last sample was decoded to the row.
    """
    sources = [sources] if isinstance(sources, str) else [str(s) for s in sources]
    if not sources:
        raise ValueError("stream needs at least one source")
    if reconnects < 0 or retry_s < 0:
        raise ValueError(f"reconnects and retry_s must be ≥ 0, got {reconnects=} {retry_s=}")
    batch = model_or_checkpoint if isinstance(model_or_checkpoint, BatchPredictor) else BatchPredictor(
        model_or_checkpoint, device=device, precision=precision, batch_size=batch_size, topk=topk, k=k,
        exit_threshold=exit_threshold, backend=backend)
    plan = WindowPlan(window_s, window_s if hop_s is None else hop_s, batch.config.num_frames)
    params = DecodeParams.from_config(batch.config, max_pixels=batch.decode_options["max_pixels"])
    reader_options = dict(options=options, timeout=timeout, input_format=input_format)
    runner = WindowRunner(batch)
    items: queue.Queue = queue.Queue(maxsize=2 * batch.batch_size * len(sources))
    stop = threading.Event()
    threads = [threading.Thread(target=_follow, args=(s, plan, params, reader_options, reconnects, retry_s, items,
                                                      stop), name=f"avgn-live-{i}", daemon=True)
               for i, s in enumerate(sources)]
    for t in threads:
        t.start()
    running = len(sources)
    try:
        for windows, others in batches(items, batch.batch_size):
            yield from runner(windows)
            for kind, source, *rest in others:
                if kind == "end":
                    running -= 1
                else:
                    error, at = rest
                    yield WindowPrediction(path=source, error=error_line(source, error), start_s=round(at, 6))
            if not running:
                return
    finally:
        stop.set()


def _follow(source: str, plan: WindowPlan, params: DecodeParams, reader_options: dict, reconnects: int,
            retry_s: float, items: queue.Queue, stop: threading.Event) -> None:
    """Put ``source``'s windows into ``items``, reopening it after a failure (after more than ``reconnects`` in a
    row, it is given up); ("end", source) last."""
    first = time.monotonic()
    offset, failures = 0.0, 0
    network = is_network(source)
    current = [None]  # the reader in use, for the stall watch
    with _stall_watch(source, current, reader_options.get("timeout"), first, items, stop):
        while not stop.is_set():
            try:
                reader = current[0] = SequentialReader(source, params, stop=stop, **reader_options)
                for window in source_windows(reader, plan, offset_s=offset):
                    if not put(items, window, stop):
                        break
                    failures = 0
                if not network or stop.is_set():
                    break  # the source ended (a FIFO's writer closed, a file's end) or the iteration was closed
                raise DecodeError(source, "the stream ended", transient=True)  # a server closed it: reconnect
            except Exception as e:
                at = time.monotonic() - first
                log.warning("%s (failure %d of %d allowed)", e, failures + 1, reconnects + 1)
                put(items, ("error", source, e, at), stop)
                failures += 1
                if failures > reconnects:
                    break
                stop.wait(retry_s)
                offset = time.monotonic() - first
    put(items, ("end", source), stop)


@contextlib.contextmanager
def _stall_watch(source: str, current: list, timeout: float | None, first: float, items: queue.Queue,
                 stop: threading.Event):
    """Inside the block, when ``source`` is a FIFO or a device: an error row, once per stall, whenever the reader
    in ``current[0]`` has had no data for ``timeout`` seconds.

    FFmpeg's timeout cannot interrupt a read that waits in the kernel (a FIFO whose writer went quiet,
    a camera device), so the reader waits on, and its windows go on when data comes again.
    """
    if timeout is None or not blocks_reads(source):
        yield
        return
    done = threading.Event()

    def watch():
        reported = None
        while not done.wait(min(timeout / 4, 1.0)) and not stop.is_set():
            last = current[0].last_data if current[0] is not None else first
            if time.monotonic() - last > timeout and reported != last:
                reported = last
                put(items, ("error", source, stalled(source, timeout), time.monotonic() - first), stop)

    threading.Thread(target=watch, name=f"{threading.current_thread().name}-watch", daemon=True).start()
    try:
        yield
    finally:
        done.set()


def blocks_reads(source: str) -> bool:
    """Whether ``source`` is a local FIFO or character device, whose reads wait in the kernel for data."""
    try:
        mode = os.stat(source.removeprefix("file:")).st_mode
    except OSError:
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISCHR(mode)


def is_network(source: str) -> bool:
    """Whether ``source`` is a URL FFmpeg reads over the network (rtsp://, http://, udp://, ...), whose end means a
    dropped connection rather than the end of a recording."""
    scheme, sep, _ = source.partition("://")
    return bool(sep) and scheme.lower() not in ("file", "pipe")
