"""Batched patch gather + crop (+ fused normalize).

Patch pixel (i, j) of patch n samples ``images[index[n]]`` at the index-space point
(cy - ph/2 + i, cx - pw/2 + j), bilinear between the four neighbouring pixels, zero outside the
image: what ``F.grid_sample(mode="bilinear", padding_mode="zeros", align_corners=False)`` does with
AdaFocusV2's affine theta. An integral corner gives an exact copy of the slice.
"""

from __future__ import annotations

import torch

_IMAGE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.uint8)


def _check_crop_args(images, centers, size, index, mean, std, out_dtype):
    """Validate the public arguments; returns (ph, pw, n_patches, out_dtype)."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ValueError(f"images must be a 4-D (N_src, C, H, W) tensor, got {getattr(images, 'shape', images)=}")
    if images.dtype not in _IMAGE_DTYPES:
        raise ValueError(f"images has unsupported dtype {images.dtype}; expected float32/float16/bfloat16/uint8")
    if isinstance(size, int):
        ph = pw = size
    else:
        ph, pw = (int(s) for s in size)
    if ph < 1 or pw < 1:
        raise ValueError(f"size must be positive, got {size=}")
    if index is not None:
        if index.dim() != 1 or index.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"index must be a 1-D int64 tensor, got {index.shape=} {index.dtype=}")
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= images.shape[0]):
            raise ValueError(f"index values must lie in [0, {images.shape[0]}), got min {int(index.min())} "
                             f"max {int(index.max())}")
        n = index.shape[0]
    else:
        n = images.shape[0]
    if centers.dim() != 2 or centers.shape != (n, 2) or not centers.is_floating_point():
        raise ValueError(f"centers must be a float ({n}, 2) tensor of (cy, cx), got {centers.shape=} {centers.dtype=}")
    c = images.shape[1]
    for name, t in (("mean", mean), ("std", std)):
        if t is not None and (t.dim() != 1 or t.shape[0] != c):
            raise ValueError(f"{name} must have shape ({c},), got {t.shape=}")
    if out_dtype is None:
        out_dtype = images.dtype if images.is_floating_point() else torch.float32
    if not out_dtype.is_floating_point:
        raise ValueError(f"out_dtype must be a float dtype, got {out_dtype=}")
    return ph, pw, n, out_dtype


def crop_patches_ref(
    images: torch.Tensor,
    centers: torch.Tensor,
    size,
    *,
    index: torch.Tensor | None = None,
    mean: torch.Tensor | None = None,
    std: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> torch.Tensor:
    """Plain-PyTorch crop: same contract as ``crop_patches``; differentiable in images and centers.

    Samples in float32 (float64 for float64 input) with explicit four-tap bilinear weights, so an
    integral corner multiplies the slice by exactly 1 and its neighbours by exactly 0.
    """
    ph, pw, n, out_dtype = _check_crop_args(images, centers, size, index, mean, std, out_dtype)
    src = images if index is None else images.index_select(0, index.long())
    acc = torch.float64 if images.dtype == torch.float64 else torch.float32
    x = src.to(acc)
    _, c, h, w = x.shape
    ys = centers[:, 0:1].to(acc) - ph / 2 + torch.arange(ph, device=x.device, dtype=acc)  # (N, ph)
    xs = centers[:, 1:2].to(acc) - pw / 2 + torch.arange(pw, device=x.device, dtype=acc)  # (N, pw)
    y0f, x0f = ys.floor(), xs.floor()
    wy, wx = ys - y0f, xs - x0f
    y0, x0 = y0f.long(), x0f.long()
    flat = x.reshape(n, c, h * w)

    def tap(yi, xi):
        inside = ((yi >= 0) & (yi < h))[:, :, None] & ((xi >= 0) & (xi < w))[:, None, :]  # (N, ph, pw)
        offs = yi.clamp(0, h - 1)[:, :, None] * w + xi.clamp(0, w - 1)[:, None, :]
        vals = flat.gather(2, offs.reshape(n, 1, ph * pw).expand(n, c, ph * pw)).reshape(n, c, ph, pw)
        return vals * inside[:, None].to(acc)

    wy, wx = wy[:, None, :, None], wx[:, None, None, :]
    out = (
        tap(y0, x0) * ((1 - wy) * (1 - wx))
        + tap(y0, x0 + 1) * ((1 - wy) * wx)
        + tap(y0 + 1, x0) * (wy * (1 - wx))
        + tap(y0 + 1, x0 + 1) * (wy * wx)
    )
    if mean is not None:
        out = out - mean.to(acc).view(1, c, 1, 1)
    if std is not None:
        out = out / std.to(acc).view(1, c, 1, 1)
    out = out.to(out_dtype)
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out.contiguous()
