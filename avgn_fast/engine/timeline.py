"""One PNG per long file classified in windows: each window's label, the top classes' scores over time, every
frame's saliency, thumbnails of the frames the model looked at closely.

The scores come from each window's top-k (a class outside a window's top-k is drawn at 0 there); the
saliency of a frame is drawn once per window that holds it, so a frame two windows rank differently
shows both; a thumbnail is each window's first kept frame (its most salient), at most
``MAX_THUMBNAILS`` of them, evenly spread over the file. Only these small thumbnails and the rows
are kept while the file is read, so a timeline costs memory proportional to its windows, not frames.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from avgn_fast.engine.batch import error_line
from avgn_fast.engine.explain import save_new_png
from avgn_fast.engine.windows import Window, WindowPrediction

MAX_THUMBNAILS = 16
THUMBNAIL_PX = 64
TOP_CLASSES = 5


@dataclasses.dataclass
class _Entry:
    row: WindowPrediction
    times: list[float]  # every sampled frame's time (s)
    thumbnail: torch.Tensor | None  # uint8 (3, px, px): the window's first kept frame


def timeline_path(explain_dir, input_path: str | os.PathLike, index: int) -> Path:
    """Where the timeline of file number ``index`` goes (``explain.explanation_path``'s naming)."""
    return Path(explain_dir) / f"{index:05d}_{Path(input_path).stem}_timeline.png"


class TimelineWriter:
    """Collects each file's windows (``add``) and writes the file's PNG once its last row has passed (``rows``)."""

    def __init__(self, explain_dir, class_names: list[str]):
        self.dir, self.class_names = Path(explain_dir), class_names
        self.entries: list[_Entry] = []
        self.index = 0

    def add(self, window: Window | None, row: WindowPrediction) -> None:
        """Keep what the timeline draws of one window (``window`` None: a whole file shorter than a window)."""
        thumb, times = None, list(row.frame_times)
        if window is not None:
            times = [window.offset_s + s.time for s in window.samples]
            if row.ok and row.kept_frames:
                frame = window.samples[row.kept_frames[0]].frame[None].float()
                thumb = F.interpolate(frame, size=(THUMBNAIL_PX, THUMBNAIL_PX), mode="area")[0].round().to(torch.uint8)
        self.entries.append(_Entry(row, times, thumb))

    def rows(self, rows: Iterator[WindowPrediction]) -> Iterator[WindowPrediction]:
        """``rows`` passed through; after each file's last row, its PNG is written (a failure: one error row)."""
        current = None
        for row in rows:
            if current is not None and row.path != current:
                yield from self._finish(current)
            current = row.path
            yield row
        if current is not None:
            yield from self._finish(current)

    def _finish(self, path: str) -> Iterator[WindowPrediction]:
        entries = [e for e in self.entries if e.row.path == path and e.row.ok]
        self.entries = [e for e in self.entries if e.row.path != path]
        index, self.index = self.index, self.index + 1
        if not entries:
            return
        try:
            write_timeline(timeline_path(self.dir, path, index), entries, self.class_names)
        except Exception as e:
            yield WindowPrediction(path=path, error=error_line(path, e, stage="timeline"))


def write_timeline(path: Path, entries: list[_Entry], class_names: list[str]) -> Path:
    """Draw ``entries`` (one file's windows in order) into ``path``; never replaces a file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [e.row for e in entries]
    centres = [(r.start_s + r.end_s) / 2 for r in rows]
    end = max(r.end_s for r in rows)
    scores: dict[str, list[float]] = {}
    for i, r in enumerate(rows):
        for name, value in r.topk:
            scores.setdefault(name, [0.0] * len(rows))[i] = value
    top = sorted(scores, key=lambda n: -sum(scores[n]))[:TOP_CLASSES]
    # one colour per class in every panel: the labels' first, then the scored classes never a label
    colours = {n: f"C{i % 10}" for i, n in enumerate(dict.fromkeys([*(r.label for r in rows), *top]))}
    fig = plt.figure(figsize=(12, 7.5), constrained_layout=True)
    try:
        grid = fig.add_gridspec(4, 1, height_ratios=[1.0, 0.35, 1.6, 1.0])
        ax = fig.add_subplot(grid[0])
        thumbs = [e for e in entries if e.thumbnail is not None]
        step = max(len(thumbs) / MAX_THUMBNAILS, 1)
        shown = [thumbs[int(i * step)] for i in range(min(len(thumbs), MAX_THUMBNAILS))]
        width = end / max(len(shown), 1)
        for e in shown:
            t = e.row.frame_times[0] if e.row.frame_times else (e.row.start_s + e.row.end_s) / 2
            left = min(max(t - width / 2, 0.0), max(end - width, 0.0))
            ax.imshow(e.thumbnail.permute(1, 2, 0).numpy(), extent=(left, left + width * 0.95, 0, 1), aspect="auto")
        ax.set_xlim(0, end)
        ax.set_yticks([])
        ax.set_title(f"{Path(rows[0].path).name}: most salient kept frame per window", fontsize=9)
        _label_strip(fig.add_subplot(grid[1]), rows, centres, end, colours)
        ax = fig.add_subplot(grid[2])
        for name in top:
            ax.plot(centres, scores[name], marker=".", lw=1.2, label=name, color=colours[name])
        ax.set_xlim(0, end)
        ax.set_ylim(0, 1)
        ax.set_ylabel("score")
        ax.legend(fontsize=7, loc="upper right", ncol=min(len(top), 5))
        ax.set_title("top classes over time (window centres)", fontsize=9)
        ax = fig.add_subplot(grid[3])
        for e in entries:
            if len(e.times) == len(e.row.saliency):
                ax.plot(e.times, e.row.saliency, marker=".", ms=3, lw=0.6, alpha=0.6)
        ax.set_xlim(0, end)
        ax.set_xlabel("time (s)")
        ax.set_ylabel("saliency")
        ax.set_title("saliency of every sampled frame (one line per window)", fontsize=9)
        save_new_png(fig, path)
    finally:
        plt.close(fig)
    return path


def _label_strip(ax, rows: list[WindowPrediction], centres: list[float], end: float, colours: dict) -> None:
    """Each window's label as a coloured band from midway to the previous window's centre to midway to the next."""
    names = list(dict.fromkeys(r.label for r in rows))
    edges = [0.0] + [(a + b) / 2 for a, b in zip(centres, centres[1:])] + [end]
    for r, lo, hi in zip(rows, edges, edges[1:]):
        ax.axvspan(lo, hi, color=colours[r.label], lw=0)
    ax.set_xlim(0, end)
    ax.set_yticks([])
    shown = names[:10]
    ax.legend(handles=[ax.axvspan(0, 0, color=colours[n], label=n) for n in shown], fontsize=7, ncol=len(shown),
              loc="upper center", bbox_to_anchor=(0.5, -0.25), frameon=False)
    ax.set_title("label of each window" + ("" if len(names) <= 10 else f" ({len(names)} labels, 10 in the legend)"),
                 fontsize=9)
