"""Fused audio-visual cross attention: softmax(q kᵀ · scale + mask) v with fp32 accumulation."""

from __future__ import annotations

import torch

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_attention_args(q, k, v, key_padding_mask):
    """Validate the public arguments; returns (B, H, Lq, Lk, D)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D (B, H, L, D) tensor, got {getattr(t, 'shape', t)=}")
        if t.dtype not in _DTYPES:
            raise ValueError(f"{name} has unsupported dtype {t.dtype}")
    b, h, lq, d = q.shape
    lk = k.shape[2]
    if k.shape != (b, h, lk, d) or v.shape != (b, h, lk, d):
        raise ValueError(f"k and v must be (B, H, Lk, D) matching q, got {q.shape=} {k.shape=} {v.shape=}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype=} {k.dtype=} {v.dtype=}")
    if key_padding_mask is not None and (key_padding_mask.shape != (b, lk) or key_padding_mask.dtype != torch.bool):
        raise ValueError(f"key_padding_mask must be a bool ({b}, {lk}) tensor, got {key_padding_mask.shape=} "
                         f"{key_padding_mask.dtype=}")
    return b, h, lq, lk, d


def av_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    return_weights: bool = False,
):
    """Plain-PyTorch attention, same contract as ``av_attention``; differentiable.

    Accumulates in float32 (float64 for float64 input). A query row whose keys are all masked
    returns zeros (and zero weights), never NaN.
    """
    _, _, _, _, d = _check_attention_args(q, k, v, key_padding_mask)
    acc = torch.promote_types(q.dtype, torch.float32)
    scale = d**-0.5 if scale is None else scale
    s = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)) * scale  # (B, H, Lq, Lk)
    if key_padding_mask is not None:
        # a finite fill keeps fully-masked rows NaN-free in forward and backward; they are zeroed below
        s = s.masked_fill(key_padding_mask[:, None, None, :], torch.finfo(acc).min)
    p = torch.softmax(s, dim=-1)
    if key_padding_mask is not None:
        p = p * (~key_padding_mask.all(dim=-1)).to(acc)[:, None, None, None]
    out = torch.matmul(p, v.to(acc)).to(q.dtype)
    return (out, p.to(q.dtype)) if return_weights else out
