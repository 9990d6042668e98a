"""Batched patch gather + crop (+ fused normalize).

Patch pixel (i, j) of patch n samples ``images[index[n]]`` at the index-space point
(cy - ph/2 + i, cx - pw/2 + j), bilinear between the four neighbouring pixels, zero outside the
image: what ``F.grid_sample(mode="bilinear", padding_mode="zeros", align_corners=False)`` does with
AdaFocusV2's affine theta. An integral corner gives an exact copy of the slice.

Three entry points: the Triton launcher ``crop_patches``, the plain-PyTorch ``crop_patches_ref``,
and the registered op ``torch.ops.avgn_fast.crop_patches(images, centers, ph, pw, index, mean, std,
out_dtype, channels_last)`` (the Triton kernel on CUDA, the reference on CPU, inference-only).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

_IMAGE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.uint8)
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.uint8)


def _check_crop_args(images, centers, size, index, mean, std, out_dtype, *, index_values=True):
    """Validate the public arguments; returns (ph, pw, n_patches, out_dtype).

    ``index_values=False`` skips the range check of the index values: it reads the data (a host
    sync), which the registered op cannot do while it is traced.
    """
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ValueError(f"images must be a 4-D (N_src, C, H, W) tensor, got {getattr(images, 'shape', images)=}")
    if images.dtype not in _IMAGE_DTYPES:
        raise ValueError(f"images has unsupported dtype {images.dtype}; expected float32/float16/bfloat16/uint8")
    if isinstance(size, int):
        ph = pw = size
    elif len(size) == 2:
        ph, pw = (int(s) for s in size)
    else:
        raise ValueError(f"size must be an int or a (ph, pw) pair, got {size=}")
    if ph < 1 or pw < 1:
        raise ValueError(f"size must be positive, got {size=}")
    if index is not None:
        if index.dim() != 1 or index.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"index must be a 1-D int64 tensor, got {index.shape=} {index.dtype=}")
        if index_values and index.numel():
            lo, hi = torch.stack(torch.aminmax(index)).tolist()  # one host sync for both bounds
            # raises ValueError eagerly and becomes a runtime assert when traced (torch.export)
            message = f"index values must lie in [0, {images.shape[0]})"
            torch._check_value(lo >= 0, lambda: f"{message}, got min {lo}")
            torch._check_value(hi < images.shape[0], lambda: f"{message}, got max {hi}")
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


def _check_kernel_args(images, centers, index, mean, std, out):
    """What the kernel needs beyond the contract: a dtype it samples and every tensor on images' device."""
    if images.dtype not in _KERNEL_DTYPES:
        raise ValueError(f"images dtype {images.dtype} is not supported by the kernel (float32/float16/bfloat16/"
                         f"uint8); use crop_patches_ref")
    for name, t in (("centers", centers), ("index", index), ("mean", mean), ("std", std), ("out", out)):
        if t is not None and t.device != images.device:
            raise ValueError(f"{name} must be on images' device {images.device}, got {t.device=}")


def _empty_out(images, n, ph, pw, out_dtype, channels_last):
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty((n, images.shape[1], ph, pw), dtype=out_dtype, device=images.device,
                       memory_format=memory_format)


def _crop_configs() -> list[triton.Config]:
    """Tiles to autotune over; the interpreter (CPU tests) gets one small tile so it never benchmarks."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return [triton.Config({"BLOCK_H": 4, "BLOCK_W": 16}, num_warps=1)]
    tiles = ((8, 128, 4), (16, 128, 4), (32, 128, 8), (16, 64, 4), (32, 32, 4))  # (BLOCK_H, BLOCK_W, warps)
    return [triton.Config({"BLOCK_H": bh, "BLOCK_W": bw}, num_warps=nw) for bh, bw, nw in tiles]


@triton.autotune(configs=_crop_configs(), key=["C", "ph", "pw"])
@triton.jit
def _crop_patches_kernel(
    # pointers
    images_ptr, centers_ptr, index_ptr, mean_ptr, std_ptr, out_ptr,
    # sizes
    n_src, C, H, W, ph, pw,
    # strides
    stride_in, stride_ic, stride_ih, stride_iw,
    stride_on, stride_oc, stride_oh, stride_ow,
    # meta-parameters
    HAS_INDEX: tl.constexpr, HAS_MEAN: tl.constexpr, HAS_STD: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):
    # one program per (patch, row block, column block) tile, all C channels; int64 patch and
    # image offsets, since batches of full frames pass 2**31 elements
    n = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    cols = tl.program_id(2) * BLOCK_W + tl.arange(0, BLOCK_W)
    if HAS_INDEX:
        src = tl.load(index_ptr + n).to(tl.int64)
    else:
        src = n
    # The corner in fp32 exactly as the reference computes it. Every pixel of a patch shares the
    # corner's fractional part, so the four bilinear weights are scalars of the program.
    top = tl.load(centers_ptr + 2 * n).to(tl.float32) - ph * 0.5
    left = tl.load(centers_ptr + 2 * n + 1).to(tl.float32) - pw * 0.5
    top_floor = tl.floor(top)
    left_floor = tl.floor(left)
    wy = top - top_floor
    wx = left - left_floor
    w00 = (1 - wy) * (1 - wx)
    w01 = (1 - wy) * wx
    w10 = wy * (1 - wx)
    w11 = wy * wx
    # clamped before the int conversion: a corner far outside stays outside instead of overflowing
    y0 = tl.minimum(tl.maximum(top_floor, -ph - 2.0), H * 1.0).to(tl.int32) + rows
    x0 = tl.minimum(tl.maximum(left_floor, -pw - 2.0), W * 1.0).to(tl.int32) + cols
    row_in = rows < ph
    col_in = cols < pw
    # A tap row/column gets the bound 0, so it is never read, when its weights are exactly 0 (no
    # memory traffic; an integral corner reads one tap and writes v * 1 + 0 + 0 + 0, the slice bit
    # for bit), or, for rows, when the index is out of range: the registered op skips the host-side
    # index check, so a bad index reads zeros, never out of bounds.
    src_ok = (src >= 0) & (src < n_src)
    h_y0 = tl.where(src_ok & (wy != 1), H, 0)
    h_y1 = tl.where(src_ok & (wy != 0), H, 0)
    w_x0 = tl.where(wx != 1, W, 0)
    w_x1 = tl.where(wx != 0, W, 0)
    my0 = row_in & (y0 >= 0) & (y0 < h_y0)
    my1 = row_in & (y0 + 1 >= 0) & (y0 + 1 < h_y1)
    mx0 = col_in & (x0 >= 0) & (x0 < w_x0)
    mx1 = col_in & (x0 + 1 >= 0) & (x0 + 1 < w_x1)
    m00 = my0[:, None] & mx0[None, :]
    m01 = my0[:, None] & mx1[None, :]
    m10 = my1[:, None] & mx0[None, :]
    m11 = my1[:, None] & mx1[None, :]
    off_y0 = y0.to(tl.int64)[:, None] * stride_ih
    off_x0 = x0.to(tl.int64)[None, :] * stride_iw
    p_in = images_ptr + src * stride_in + off_y0 + off_x0
    p_out = out_ptr + n * stride_on + rows.to(tl.int64)[:, None] * stride_oh + cols.to(tl.int64)[None, :] * stride_ow
    m_out = row_in[:, None] & col_in[None, :]
    for c in range(C):
        # fp32 accumulation in the reference's order: ((v00 w00 + v01 w01) + v10 w10) + v11 w11
        v = tl.load(p_in, mask=m00, other=0).to(tl.float32) * w00
        v += tl.load(p_in + stride_iw, mask=m01, other=0).to(tl.float32) * w01
        v += tl.load(p_in + stride_ih, mask=m10, other=0).to(tl.float32) * w10
        v += tl.load(p_in + stride_ih + stride_iw, mask=m11, other=0).to(tl.float32) * w11
        if HAS_MEAN:
            v -= tl.load(mean_ptr + c)
        if HAS_STD:
            v /= tl.load(std_ptr + c)
        tl.store(p_out, v.to(out_ptr.dtype.element_ty), mask=m_out)
        p_in += stride_ic
        p_out += stride_oc


def _crop_patches_launch(kernel, images, centers, ph, pw, index, mean, std, out_dtype, channels_last, out):
    """Launch on validated arguments: contiguous side inputs, allocate, grid, launch."""
    n_src, c, h, w = images.shape
    n = centers.shape[0]
    centers = centers.to(torch.float32).contiguous()
    index = None if index is None else index.contiguous()
    mean = None if mean is None else mean.to(torch.float32).contiguous()
    std = None if std is None else std.to(torch.float32).contiguous()
    if out is None:
        out = _empty_out(images, n, ph, pw, out_dtype, channels_last)

    def grid(meta):
        return n, triton.cdiv(ph, meta["BLOCK_H"]), triton.cdiv(pw, meta["BLOCK_W"])

    # absent optional inputs pass ``centers`` as a placeholder pointer; the HAS_* flags keep it unread
    kernel[grid](
        images, centers, centers if index is None else index, centers if mean is None else mean,
        centers if std is None else std, out,
        n_src, c, h, w, ph, pw,
        *images.stride(), *out.stride(),
        HAS_INDEX=index is not None, HAS_MEAN=mean is not None, HAS_STD=std is not None,
    )
    return out


def crop_patches(
    images: torch.Tensor,
    centers: torch.Tensor,
    size,
    *,
    index: torch.Tensor | None = None,
    mean: torch.Tensor | None = None,
    std: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cut one bilinear patch per row of ``centers`` with the Triton kernel.

    Args:
        images: (N_src, C, H, W) float32/float16/bfloat16/uint8, any strides (channels_last too).
        centers: (N, 2) float (cy, cx) in pixels; patch pixel (i, j) samples (cy - ph/2 + i, cx - pw/2 + j).
        size: int P or (ph, pw).
        index: optional (N,) int64/int32; patch n is cut from ``images[index[n]]``. Without it N = N_src.
        mean, std: optional (C,); the output is (sample - mean) / std, uint8 samples taken in [0, 255].
        out_dtype: float output dtype; defaults to the images' float dtype (float32 for uint8).
        channels_last: write NHWC memory (strides of ``memory_format=torch.channels_last``).
        out: optional preallocated (N, C, ph, pw) tensor of ``out_dtype`` in the layout ``channels_last`` names.

    Returns:
        (N, C, ph, pw) ``out_dtype``; sampling and normalizing in fp32, zero outside the image.

    Raises:
        ValueError naming the argument for bad shapes, dtypes, devices or out-of-range index values.
    """
    ph, pw, n, out_dtype = _check_crop_args(images, centers, size, index, mean, std, out_dtype)
    _check_kernel_args(images, centers, index, mean, std, out)
    if out is not None:
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if out.shape != (n, images.shape[1], ph, pw) or out.dtype != out_dtype:
            raise ValueError(f"out must be a {out_dtype} ({n}, {images.shape[1]}, {ph}, {pw}) tensor, got "
                             f"{out.shape=} {out.dtype=}")
        if not out.is_contiguous(memory_format=memory_format):
            raise ValueError(f"out must be contiguous in {memory_format} ({channels_last=}), got {out.stride()=}")
    return _crop_patches_launch(_crop_patches_kernel, images, centers, ph, pw, index, mean, std, out_dtype,
                                channels_last, out)


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

    Samples in float32 (float64 for float64 input) with explicit four-tap bilinear weights. The
    weights come from the corner (cy - ph/2, cx - pw/2) alone: pixel i sits at corner + i, so
    floor(corner) + i is its tap and frac(corner) its weight, exactly, for every pixel. An integral
    corner multiplies the slice by exactly 1 and its neighbours by exactly 0.
    """
    ph, pw, n, out_dtype = _check_crop_args(images, centers, size, index, mean, std, out_dtype)
    src = images if index is None else images.index_select(0, index.long())
    acc = torch.float64 if images.dtype == torch.float64 else torch.float32
    _, c, h, w = src.shape
    top = centers[:, 0].to(acc) - ph / 2  # (N,)
    left = centers[:, 1].to(acc) - pw / 2
    top_floor, left_floor = top.floor(), left.floor()
    wy, wx = (top - top_floor).view(n, 1, 1, 1), (left - left_floor).view(n, 1, 1, 1)
    # clamped before the int conversion: a corner far outside stays outside instead of overflowing
    rows = top_floor.clamp(-ph - 2, h).long()[:, None] + torch.arange(ph + 1, device=src.device)  # (N, ph + 1)
    cols = left_floor.clamp(-pw - 2, w).long()[:, None] + torch.arange(pw + 1, device=src.device)  # (N, pw + 1)
    # the (ph + 1) × (pw + 1) window under the patch, gathered once in the source dtype (exact in acc) and
    # zero outside the image; each of the four taps is a shifted slice of it
    inside = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
    taps = (ph + 1) * (pw + 1)
    offs = (rows.clamp(0, h - 1)[:, :, None] * w + cols.clamp(0, w - 1)[:, None, :]).reshape(n, 1, taps)
    window = src.reshape(n, c, h * w).gather(2, offs.expand(n, c, taps)).view(n, c, ph + 1, pw + 1)
    window = window.to(acc) * inside[:, None].to(acc)
    out = (
        window[:, :, :ph, :pw] * ((1 - wy) * (1 - wx))
        + window[:, :, :ph, 1:] * ((1 - wy) * wx)
        + window[:, :, 1:, :pw] * (wy * (1 - wx))
        + window[:, :, 1:, 1:] * (wy * wx)
    )
    if mean is not None:
        out = out - mean.to(acc).view(1, c, 1, 1)
    if std is not None:
        out = out / std.to(acc).view(1, c, 1, 1)
    out = out.to(out_dtype)
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out.contiguous()


@triton_op("avgn_fast::crop_patches", mutates_args=())
def _crop_patches_op(
    images: torch.Tensor,
    centers: torch.Tensor,
    ph: int,
    pw: int,
    index: torch.Tensor | None = None,
    mean: torch.Tensor | None = None,
    std: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> torch.Tensor:
    """``torch.ops.avgn_fast.crop_patches``: the kernel on CUDA, the reference elsewhere.

    torch.compile and torch.export trace this body; off CUDA it is the reference, so a traced
    CPU graph holds plain PyTorch ops instead of a kernel no CPU driver can launch.
    """
    if images.device.type != "cuda":
        return crop_patches_ref(images, centers, (ph, pw), index=index, mean=mean, std=std, out_dtype=out_dtype,
                                channels_last=channels_last)
    _, _, _, out_dtype = _check_crop_args(images, centers, (ph, pw), index, mean, std, out_dtype, index_values=False)
    _check_kernel_args(images, centers, index, mean, std, None)
    return _crop_patches_launch(wrap_triton(_crop_patches_kernel), images, centers, ph, pw, index, mean, std,
                                out_dtype, channels_last, None)


@_crop_patches_op.register_kernel("cpu")
def _crop_patches_cpu(images, centers, ph, pw, index=None, mean=None, std=None, out_dtype=None, channels_last=False):
    return crop_patches_ref(images, centers, (ph, pw), index=index, mean=mean, std=std, out_dtype=out_dtype,
                            channels_last=channels_last)


@_crop_patches_op.register_fake
def _crop_patches_fake(images, centers, ph, pw, index=None, mean=None, std=None, out_dtype=None, channels_last=False):
    _, _, n, out_dtype = _check_crop_args(images, centers, (ph, pw), index, mean, std, out_dtype, index_values=False)
    return _empty_out(images, n, ph, pw, out_dtype, channels_last)


def _crop_patches_backward(ctx, grad):
    raise RuntimeError("avgn_fast::crop_patches is inference-only; use crop_patches_ref for training "
                       "(it is differentiable in images and centers)")


_crop_patches_op.register_autograd(_crop_patches_backward)
