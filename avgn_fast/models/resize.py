"""The glance's downsampling: uint8 frames to float at the glance size, as ``F.interpolate(mode="area")`` does."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def area_resize(frames: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 frames (N, C, S, S) → float32 (N, C, size, size): each pixel the mean of the block it covers.

    When ``size`` divides S, each f × f block (f = S / size) is summed in integers (int16 while f² · 255
    fits, else int32), by f strided row slices added in place and then f column slices, and divided
    once in float32. The sums are exact and below 2^24, so each pixel is the block mean correctly
    rounded: ``F.interpolate(frames.float(), size, mode="area")`` within one unit in the last place, at
    a third of its CPU time or less (the adaptive pooling behind "area" and its full-size float copy are
    its slow parts; the integer sums also allocate a quarter of what float sums would). Any other size
    runs "area" itself.
    """
    n, c, h, w = frames.shape
    if h != w or h % size or (h // size) ** 2 > 1 << 16:
        return F.interpolate(frames.float(), size=(size, size), mode="area")
    f = h // size
    rows = frames.reshape(n * c * size, f, w)
    acc = rows[:, 0].to(torch.int16 if f * f * 255 <= torch.iinfo(torch.int16).max else torch.int32)
    for i in range(1, f):
        acc += rows[:, i]
    cols = acc.view(n * c * size, size, f)
    out = cols[..., 0].clone()
    for i in range(1, f):
        out += cols[..., i]
    return out.view(n, c, size, size).float() / (f * f)
