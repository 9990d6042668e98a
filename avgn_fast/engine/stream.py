"""Windowed AVGN over long files and live sources: each frame decoded once, its glance features computed once.

``WindowRunner`` classifies complete windows (``engine.windows``) with the per-batch code every other
route runs (``BatchPredictor.classify``): the visual glance encoder runs once per sampled frame, the
first time a window holds it, and every later window that holds the frame reuses its features; so does
the audio encoder when the model encodes each frame's audio on its own (``audio_clip_mean=False``; by
default its spectral normalization spans the window). A frame's patch is then a function of the frame
(and whether its window has sound) alone, so the windows that take a step on the same frame share its
patch location and local features too (``early_exit.PatchTable``). The rest (AV-TeST over the window's T
frames, AESPA, the classifier) runs per window. ``predict_windows``
reads files one after another in a background thread (``data.sequential``: front to back, no seek)
while the model classifies the windows already complete, batched across windows; ``engine.live.stream``
does the same for live sources with the same pieces (``source_windows``, ``batches``, ``WindowRunner``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import queue
import threading
import time
from collections.abc import Iterable, Iterator

import torch

from avgn_fast.data.clip import Clip
from avgn_fast.data.common import DecodeParams, check_file
from avgn_fast.data.sequential import SequentialReader
from avgn_fast.engine.batch import BatchPredictor, Prediction, error_line
from avgn_fast.engine.windows import Window, WindowPlan, WindowPrediction, assemble

__all__ = ["WindowPrediction", "WindowRunner", "batches", "predict_windows", "put", "source_windows"]

_ENCODE_CHUNK = 64  # frames per visual-encoder call: bounds the activations
# a window may end this far past the source's last frame and still count as inside it (timestamp rounding)
_END_SLACK_S = 1e-3


class WindowRunner:
    """Classifies batches of complete windows with a ``BatchPredictor`` (its model, engine and settings).

    ``gmacs_saved`` counts the GMACs that shared features and patches spared, ``gmacs_spent`` what the windows
    cost; their sum is what classifying every window as its own clip would have cost.
    """

    def __init__(self, batch: BatchPredictor):
        from avgn_fast.models.avgn import AVGN

        self.batch = batch
        self.model = batch.model
        # an exported folder runs its stages as exported: its windows are classified whole, nothing shared
        self.shares = isinstance(self.model, AVGN) and self.model.visual is not None
        self.outputs = self.model.stage_io["glance"][1] if self.shares else ()
        # the glance encoders as the engine's glance stage runs them (norms folded), so a window's features are
        # the ones ``predict`` computes for the same frames
        self.encoders = batch.engine.stages["glance"].model if self.shares else None
        # without the clip's spectral mean a frame's audio features are its own too: shared like the visual ones
        self.shares_audio = self.shares and "audio" in self.outputs and not self.model.config.audio_clip_mean
        shared = ("visual glance encoder", "audio encoder") if self.shares_audio else ("visual glance encoder",)
        self.frame_gmacs = sum(row.gmacs for row in self.model.flops_table() if row.name in shared) if self.shares \
            else 0.0
        # a patch is the frame's own when AESPA reads nothing of the window: own audio (or none), no random draw
        self.shares_patches = (self.shares and self.model.local is not None and self.model.config.spatial != "random"
                               and (self.shares_audio or "audio" not in self.outputs))
        self.cost = self.model.cost() if self.shares else None
        self.gmacs_spent = self.gmacs_saved = 0.0

    def __call__(self, windows: list[Window]) -> list[WindowPrediction]:
        """One row per window, in order (a window that fails gets an error row; the others go on)."""
        if not windows:
            return []
        clips = []
        for w in windows:
            try:
                clips.append(window_clip(w, self.batch.config.resize_shorter))
            except Exception as e:  # this window's error row (``classify`` takes the exception)
                clips.append(e)
        glance, fresh = None, [len(w.samples) for w in windows]  # without shared features: each computes its own
        patches = None
        if self.shares:
            # one window's bad input must not end the run: without shared features ``classify`` isolates it per clip
            with contextlib.suppress(Exception):
                glance, fresh = self._glance(windows)
                patches = self._patch_table(windows) if self.shares_patches else None
        preds = self.batch.classify([w.source for w in windows], clips, glance=glance,
                                    patches=None if patches is None else patches[:2])
        if patches is not None:
            self._keep_patches(*patches)
        now = time.monotonic()
        rows = []
        for w, pred, new in zip(windows, preds, fresh):
            gflops = saved = None
            if pred.gflops is not None:  # the engine's count leaves out reused patches; the full cost has them
                frames_saved = self.frame_gmacs * (len(w.samples) - new)
                gflops = pred.gflops - frames_saved
                full = float(self.cost.gmacs(torch.tensor([pred.exit_step + 1]))) if self.cost else pred.gflops
                saved = frames_saved + full - pred.gflops
            self.gmacs_saved += saved or 0.0
            self.gmacs_spent += gflops or 0.0
            rows.append(window_row(pred, w, gflops=gflops, latency_ms=round((now - w.ready) * 1000, 2)))
        return rows

    @torch.inference_mode()
    def _glance(self, windows: list[Window]) -> tuple[list[dict], list[int]]:
        """Each window's glance features (visual ones from its samples, computed for the samples that have none
        yet) and how many of its samples had theirs computed for it."""
        fresh, new = [], []
        seen = set()
        for w in windows:
            count = 0
            for s in w.samples:
                if s.features is None and id(s) not in seen:
                    seen.add(id(s))
                    new.append(s)
                    count += 1
            fresh.append(count)
        device, dtype = self.batch.device, self.batch.dtype
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            for i in range(0, len(new), _ENCODE_CHUNK):
                chunk = new[i:i + _ENCODE_CHUNK]
                frames = torch.stack([s.frame for s in chunk])[None].to(device)
                tokens, visual = self.encoders.encode_visual(frames)
                if self.shares_audio:  # as heard (present): a window without audio multiplies them by 0 below
                    mel = torch.stack([s.mel for s in chunk])[None].to(device, torch.float32)
                    audio_tokens, audio = self.encoders.encode_audio(mel, torch.ones(1, dtype=torch.bool,
                                                                                     device=device))
                for j, s in enumerate(chunk):
                    s.features = {"visual": visual[0, j]} | ({"tokens": tokens[0, j]} if tokens is not None else {})
                    if self.shares_audio:
                        s.features |= {"audio_tokens": audio_tokens[0, j], "audio": audio[0, j]}
            audio = {}
            if self.shares_audio:
                # float32, as ``encode_audio`` multiplies: under autocast the product is float32 there too
                present = [torch.tensor(float(w.audio_present), device=device) for w in windows]
                audio = {name: [torch.stack([s.features[name] for s in w.samples]) * heard
                                for w, heard in zip(windows, present)] for name in ("audio_tokens", "audio")}
            elif "audio" in self.outputs:
                mel = torch.stack([torch.stack([s.mel for s in w.samples]) for w in windows]).to(device, torch.float32)
                present = torch.tensor([w.audio_present for w in windows], device=device)
                audio["audio_tokens"], audio["audio"] = self.encoders.encode_audio(mel, present)
        glance = []
        for b, w in enumerate(windows):
            features = {name: torch.stack([s.features[name] for s in w.samples]) for name in ("tokens", "visual")
                        if name in self.outputs}
            glance.append(features | {name: x[b] for name, x in audio.items()})
        return glance, fresh


    def _patch_table(self, windows: list[Window]) -> tuple:
        """A ``PatchTable`` with one row per (sample, window has sound) among ``windows``, filled where a sample kept
        its patch from an earlier batch; each window's rows (T,); the samples and flags of the rows."""
        from avgn_fast.engine.early_exit import PatchTable

        index, owners, slots = {}, [], []
        for w in windows:
            for s in w.samples:
                key = (id(s), w.audio_present)
                if key not in index:
                    index[key] = len(owners)
                    owners.append((s, w.audio_present))
            slots.append(torch.tensor([index[(id(s), w.audio_present)] for s in w.samples]))
        device = self.batch.device
        table = PatchTable(torch.zeros((len(owners), 2), device=device),
                           torch.zeros((len(owners), self.model.local.out_channels), device=device,
                                       dtype=self.batch.dtype))
        had = [(r, s.features[("patch", heard)]) for r, (s, heard) in enumerate(owners)
               if ("patch", heard) in s.features]
        if had:
            at = torch.tensor([r for r, _ in had], device=device)
            table.locations[at] = torch.stack([x[0] for _, x in had])
            table.local[at] = torch.stack([x[1] for _, x in had])
            table.known.update(r for r, _ in had)
        return table, slots, owners, set(table.known)

    @staticmethod
    def _keep_patches(table, slots, owners: list, had: set) -> None:
        """Each patch the batch computed, kept with its sample for the windows still to come."""
        for r in sorted(table.known - had):
            s, heard = owners[r]
            s.features[("patch", heard)] = (table.locations[r], table.local[r])


def window_clip(w: Window, resize_shorter: int) -> Clip:
    """The window as a Clip: the frames ``decode`` gives for its stretch of the source cut out as its own file; the
    audio windows of its edge frames hear the source beyond the window, where the cut file would be silent."""
    return Clip(frames=torch.stack([s.frame for s in w.samples]), mel=torch.stack([s.mel for s in w.samples]),
                audio_present=w.audio_present, duration=w.end_s - w.start_s, fps=w.fps,
                source_size=w.samples[0].source_size, resize_shorter=resize_shorter,
                frame_times=torch.tensor([w.offset_s + s.time for s in w.samples], dtype=torch.float64),
                path=w.source, notes=list(w.notes))


def window_row(pred: Prediction, w: Window | None, *, source: str | None = None, start_s: float | None = None,
               end_s: float | None = None, gflops: float | None = None, latency_ms: float | None = None
               ) -> WindowPrediction:
    """``pred`` as the row of window ``w`` (or of the span given, for an error or a whole short file)."""
    fields = {f.name: getattr(pred, f.name) for f in dataclasses.fields(Prediction)}
    if w is not None:
        fields.update(path=w.source, gflops=gflops)
        start_s, end_s = w.start_s, w.end_s
    elif source is not None:
        fields["path"] = source
    return WindowPrediction(**fields, start_s=None if start_s is None else round(start_s, 6),
                            end_s=None if end_s is None else round(end_s, 6), latency_ms=latency_ms)


# --- files ------------------------------------------------------------------------------------------------


END = object()  # the producer's last item in the queue


def source_windows(reader: SequentialReader, plan: WindowPlan, *, offset_s: float = 0.0) -> Iterator[Window]:
    """The complete windows ``reader`` gives that end within its source, in order, each with the decode notes
    added since the previous one. Raises the source's ``DecodeError``.

    A window whose end lies past the source's last frame (its samples are all before that frame's end)
    is dropped. The end is known when the window completes in the reader's final step, as it does when
    no frame starts between its last sample and the source's end; otherwise the source ends less than
    half a sample spacing (W/2T) before the window does, and the window is kept.
    """
    noted = 0
    for window in assemble(reader.samples(plan.all_times()), plan, str(reader.source), offset_s=offset_s,
                           fps=lambda: reader.info.fps):
        end = reader.info.end_s
        if end is not None and window.end_s - offset_s > end + _END_SLACK_S:
            return  # the windows after it end later still
        notes = reader.stats.notes
        window.notes, noted = notes[noted:], len(notes)
        yield window


def put(out: queue.Queue, item, stop: threading.Event) -> bool:
    """Put ``item`` into ``out``, waiting while it is full, unless ``stop`` is set first; whether it went in."""
    while not stop.is_set():
        try:
            out.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def predict_windows(batch: BatchPredictor, paths: Iterable, window_s: float, hop_s: float | None = None, *,
                    max_queue: int | None = None, on_window=None, runner: WindowRunner | None = None
                    ) -> Iterator[WindowPrediction]:
    """One row per window of each file, files in order, windows in time order (``hop_s`` default ``window_s``).

    A background thread reads the files front to back (``source_windows``); this thread classifies the
    windows complete so far, up to ``batch.batch_size`` at a time. A file shorter than one window gives
    one row over the whole file (``predict``'s clip); a file that fails gives an error row, and the
    next file goes on. ``on_window(window, row)`` sees each window with its row (the timeline uses it).
    """
    plan = WindowPlan(window_s, window_s if hop_s is None else hop_s, batch.config.num_frames)
    params = DecodeParams.from_config(batch.config, max_pixels=batch.decode_options["max_pixels"])
    runner = runner or WindowRunner(batch)
    items: queue.Queue = queue.Queue(maxsize=max_queue or 2 * batch.batch_size)
    stop = threading.Event()

    def produce():
        for path in paths:
            if stop.is_set():
                return
            try:
                check_file(path)  # a missing or empty file is named as decode names it
                reader, count = SequentialReader(str(path), params, stop=stop), 0
                for window in source_windows(reader, plan):
                    if not put(items, window, stop):
                        return
                    count += 1
                end = reader.info.end_s
                put(items, ("short", str(path), end) if count == 0 and end is not None else ("done", path), stop)
            except Exception as e:  # this file's error; the next goes on
                put(items, ("error", str(path), e), stop)
        put(items, END, stop)

    thread = threading.Thread(target=produce, name="avgn-windows", daemon=True)
    thread.start()
    try:
        for windows, others in batches(items, batch.batch_size):
            for w, row in zip(windows, runner(windows)):
                if on_window is not None:
                    on_window(w, row)
                yield row
            for x in others:
                if x is END:
                    return
                yield from _file_item(batch, x, on_window)
    finally:
        stop.set()


def batches(items: queue.Queue, size: int) -> Iterator[tuple[list[Window], list]]:
    """(windows, other items) taken from ``items``: waits for one item, then takes the windows already there, up
    to ``size``; a non-window item (an end, an error) ends the batch and comes after its windows."""
    while True:
        taken = [items.get()]
        while len(taken) < size and isinstance(taken[-1], Window):
            try:
                taken.append(items.get_nowait())
            except queue.Empty:
                break
        windows = [x for x in taken if isinstance(x, Window)]
        yield windows, taken[len(windows):]


def _file_item(batch: BatchPredictor, item: tuple, on_window) -> Iterator[WindowPrediction]:
    """The row a file's end gives: none, its error, or the whole file when it is shorter than one window."""
    kind, path = item[0], str(item[1])
    if kind == "error":
        yield WindowPrediction(path=path, error=error_line(path, item[2]))
    elif kind == "short":
        pred = batch([path])[0]
        row = window_row(pred, None, source=path, start_s=0.0, end_s=item[2])
        if on_window is not None:
            on_window(None, row)
        yield row
