"""One PNG per video: the kept frames with their patch boxes, and the saliency timeline."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from avgn_fast.data.clip import Clip


def explanation_path(explain_dir, input_path: str | os.PathLike | None, index: int) -> Path:
    """Where the explanation of input number ``index`` (``input_path``, None for an in-memory clip) goes."""
    stem = Path(input_path).stem if input_path else "clip"
    return Path(explain_dir) / f"{index:05d}_{stem}.png"


def write_explanation(explain_dir: str | os.PathLike, clip: Clip, prediction, *, index: int) -> Path:
    """Render ``prediction`` for ``clip`` (frames at S pixels) into ``explain_dir``; returns the PNG path.

    Never replaces a file: an existing PNG of that name raises ``FileExistsError``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = explanation_path(explain_dir, prediction.path, index)
    kept = prediction.kept_frames
    fig = plt.figure(figsize=(max(2.0 * max(len(kept), 1), 6.0), 4.6), constrained_layout=True)
    try:
        _draw(fig, clip, prediction)
        save_new_png(fig, path)
    finally:
        plt.close(fig)
    return path


def save_new_png(fig, path: Path) -> Path:
    """Write ``fig`` as a PNG to ``path``, which must not exist yet (opened "xb": an existing file is never replaced,
    ``FileExistsError`` instead)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "xb") as f:
        fig.savefig(f, format="png", dpi=80)
    return path


def _draw(fig, clip: Clip, prediction) -> None:
    """Kept frames with their patch boxes on top, the saliency timeline below, the decision as title."""
    from matplotlib.patches import Rectangle

    kept = prediction.kept_frames
    cols = max(len(kept), 1)
    grid = fig.add_gridspec(2, cols, height_ratios=[2.2, 1.0])
    # patch boxes are stored in source pixels; draw them in the S-pixel frames the model saw
    boxes = clip.to_frame(torch.tensor(prediction.patch_boxes, dtype=torch.float32).view(-1, 4)).tolist()
    for step, (t, (y0, x0, y1, x1)) in enumerate(zip(kept, boxes)):
        ax = fig.add_subplot(grid[0, step])
        ax.imshow(clip.frames[t].permute(1, 2, 0).numpy())
        exited = prediction.exit_step is not None and step > prediction.exit_step
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, lw=2,
                               edgecolor="0.6" if exited else "red", ls="--" if exited else "-"))
        ax.set_title(f"step {step + 1}: frame {t}", fontsize=8)
        ax.axis("off")
    ax = fig.add_subplot(grid[1, :])
    saliency = prediction.saliency
    colors = ["tab:red" if i in kept else "tab:gray" for i in range(len(saliency))]
    ax.bar(range(len(saliency)), saliency, color=colors)
    ax.set_xlabel("sampled frame")
    ax.set_ylabel("saliency")
    ax.set_xticks(range(len(saliency)))
    name = Path(prediction.path).name if prediction.path else "clip"
    fig.suptitle(f"{name}: {prediction.label} ({prediction.score:.2f}), exit after step "
                 f"{prediction.exit_step + 1}, {prediction.gflops:.3f} GFLOPs", fontsize=9)
