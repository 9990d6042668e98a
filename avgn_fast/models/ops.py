"""The model's two custom ops, each with one switch between the fused kernel and the PyTorch reference.

The registered ops (``torch.ops.avgn_fast.*``, Triton kernels on CUDA) run only when ``use_triton()``
allows it, the tensors are on CUDA and no gradient is needed (the kernels are inference-only); as
``triton_op``s they stay visible to torch.compile and torch.export. Everywhere else, training
included, the differentiable references run. Importing ``avgn_fast`` registers the ops (``avgn_fast.kernels``).
"""

from __future__ import annotations

import torch

from avgn_fast.config import use_triton
from avgn_fast.kernels import av_attention_ref, crop_patches_ref


def _fused(*tensors: torch.Tensor | None) -> bool:
    present = [t for t in tensors if t is not None]
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in present)
    return use_triton() and not needs_grad and all(t.is_cuda for t in present)


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
) -> torch.Tensor:
    """P×P patches of ``images[index]`` centred at ``centers`` (N, 2) (cy, cx) pixels; see ``kernels.crop_patches``."""
    if _fused(images, centers, mean, std):
        ph, pw = (size, size) if isinstance(size, int) else size
        return torch.ops.avgn_fast.crop_patches(images, centers, ph, pw, index, mean, std, out_dtype, channels_last)
    if index is not None and torch.jit.is_tracing():
        # the TorchScript tracer (ONNX export) cannot trace the reference's host-side check of the index
        # values; selecting the images first is the reference's own first step, so the values are the same
        images, index = images.index_select(0, index), None
    return crop_patches_ref(images, centers, size, index=index, mean=mean, std=std, out_dtype=out_dtype,
                            channels_last=channels_last)


def av_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    return_weights: bool = False,
):
    """softmax(q kᵀ · scale + mask) v on (B, H, L, D) tensors; see ``kernels.av_attention``."""
    if _fused(q, k, v):
        out, weights = torch.ops.avgn_fast.av_attention(q, k, v, key_padding_mask, scale, return_weights)
        return (out, weights) if return_weights else out
    return av_attention_ref(q, k, v, key_padding_mask=key_padding_mask, scale=scale, return_weights=return_weights)
