"""Fused audio-visual cross attention: softmax(q kᵀ · scale + mask) v with fp32 accumulation.

AESPA runs many tiny attentions (49 visual tokens against a handful of audio tokens and back), so
the kernel is built for a large batch of small problems: one program per (batch, head, query block)
holds every key of its head in registers (up to ``_MAX_BLOCK_K``) and takes an exact softmax in one
pass; longer key sequences are walked in blocks with an online softmax. Public names:
``av_attention`` (Triton launcher), ``av_attention_ref`` (plain PyTorch) and the op
``torch.ops.avgn_fast.av_attention`` (Triton on CUDA, the reference on CPU, inference-only).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_HEAD_DIMS = (16, 32, 64, 128)
# keys up to this many are held in registers at once; tl.dot needs every block dimension >= 16
_MAX_BLOCK_K = 128
_MIN_BLOCK = 16
_LOG2E = 1.4426950408889634


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
    if key_padding_mask is not None and (
        not isinstance(key_padding_mask, torch.Tensor)
        or key_padding_mask.shape != (b, lk)
        or key_padding_mask.dtype != torch.bool
    ):
        raise ValueError(f"key_padding_mask must be a bool ({b}, {lk}) tensor, got "
                         f"{getattr(key_padding_mask, 'shape', key_padding_mask)=} "
                         f"{getattr(key_padding_mask, 'dtype', None)=}")
    return b, h, lq, lk, d


def _attention_configs():
    """Query-block and warp-count candidates; the key block follows from Lk in the launcher."""
    return [
        triton.Config({"BLOCK_Q": block_q}, num_warps=num_warps, num_stages=2)
        for block_q, num_warps in ((16, 2), (16, 4), (32, 4), (64, 4), (64, 8), (128, 8))
    ]


def _prune_configs(configs, named_args, **kwargs):
    """Drop query blocks larger than Lq needs; the interpreter has no timer, so it gets one config."""
    cap = max(_MIN_BLOCK, triton.next_power_of_2(named_args["Lq"]))
    kept = [c for c in configs if c.kwargs["BLOCK_Q"] <= cap]
    # the smallest query block: Lq > 16 then spans several programs, so tests exercise the tiling
    return kept[:1] if triton.knobs.runtime.interpret else kept


@triton.jit
def _attention_scores(
    q, k_base, mask_base, offs_k, offs_d, Lk, stride_kn, stride_kd, stride_mn, scale_log2e,
    HAS_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Scores of one key block, scaled into the log2 domain; ignored and padded keys are -inf."""
    in_k = offs_k < Lk
    kt = tl.load(
        k_base + offs_k.to(tl.int64)[None, :] * stride_kn + offs_d.to(tl.int64)[:, None] * stride_kd,
        mask=in_k[None, :], other=0.0,
    )
    s = tl.dot(q, kt, input_precision=DOT_PRECISION) * scale_log2e
    keep = in_k
    if HAS_MASK:
        ignore = tl.load(mask_base + offs_k.to(tl.int64) * stride_mn, mask=in_k, other=1)
        keep = keep & (ignore == 0)
    return tl.where(keep[None, :], s, float("-inf"))


@triton.autotune(
    configs=_attention_configs(), key=["Lq", "Lk", "D"], prune_configs_by={"early_config_prune": _prune_configs}
)
@triton.jit
def _av_attention_kernel(
    # pointers
    q_ptr, k_ptr, v_ptr, mask_ptr, out_ptr, w_ptr,
    # sizes
    H, Lq, Lk,
    # strides
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mn,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_wb, stride_wh, stride_wm, stride_wn,
    # scalars
    scale_log2e,
    # meta-parameters
    D: tl.constexpr,
    HAS_MASK: tl.constexpr,
    RETURN_WEIGHTS: tl.constexpr,
    KEYS_FIT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_Q: tl.constexpr,
):
    # query blocks of one (batch, head) are neighbours in launch order, so they share its K/V in L2
    pid = tl.program_id(0)
    num_q_blocks = tl.cdiv(Lq, BLOCK_Q)
    bh = pid // num_q_blocks
    # int64 offsets: batch strides times B (or strided views) can pass 2**31 elements
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_q = (pid % num_q_blocks) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_k = tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, D)
    in_q = offs_q < Lq
    rows_q = offs_q.to(tl.int64)
    cols_d = offs_d.to(tl.int64)

    q = tl.load(
        q_ptr + b * stride_qb + h * stride_qh + rows_q[:, None] * stride_qm + cols_d[None, :] * stride_qd,
        mask=in_q[:, None], other=0.0,
    )
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh
    mask_base = mask_ptr + b * stride_mb
    w_rows = w_ptr + b * stride_wb + h * stride_wh + rows_q[:, None] * stride_wm

    if KEYS_FIT:
        # every key is in this block: exact softmax in one pass, no rescaling
        v = tl.load(
            v_base + offs_k.to(tl.int64)[:, None] * stride_vn + cols_d[None, :] * stride_vd,
            mask=(offs_k < Lk)[:, None], other=0.0,
        )
        s = _attention_scores(q, k_base, mask_base, offs_k, offs_d, Lk, stride_kn, stride_kd, stride_mn,
                              scale_log2e, HAS_MASK, DOT_PRECISION)
        m = tl.max(s, axis=1)
        # a fully masked row has max -inf: subtract 0 instead so exp2 gives exact zeros, not NaN
        m = tl.where(m == float("-inf"), 0.0, m)
        p = tl.exp2(s - m[:, None])
        row_sum = tl.sum(p, axis=1)
        # an empty row has row_sum == 0 and p == 0 already: dividing by 1 keeps it zero
        p = p * (1.0 / tl.where(row_sum > 0.0, row_sum, 1.0))[:, None]
        if RETURN_WEIGHTS:
            tl.store(w_rows + offs_k.to(tl.int64)[None, :] * stride_wn, p.to(w_ptr.dtype.element_ty),
                     mask=in_q[:, None] & (offs_k < Lk)[None, :])
        # p in the input dtype feeds the tensor cores; the products still accumulate in fp32
        acc = tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    else:
        m_i = tl.full((BLOCK_Q,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_Q,), tl.float32)
        acc = tl.zeros((BLOCK_Q, D), tl.float32)
        for start in range(0, Lk, BLOCK_K):
            keys = start + offs_k
            s = _attention_scores(q, k_base, mask_base, keys, offs_d, Lk, stride_kn, stride_kd, stride_mn,
                                  scale_log2e, HAS_MASK, DOT_PRECISION)
            v = tl.load(
                v_base + keys.to(tl.int64)[:, None] * stride_vn + cols_d[None, :] * stride_vd,
                mask=(keys < Lk)[:, None], other=0.0,
            )
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_sub)
            p = tl.exp2(s - m_sub[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            m_i = m_new
        inv_l = 1.0 / tl.where(l_i > 0.0, l_i, 1.0)
        acc = acc * inv_l[:, None]
        if RETURN_WEIGHTS:
            # the final max and sum are known only now: recompute the scores to write exact weights
            m_sub = tl.where(m_i == float("-inf"), 0.0, m_i)
            for start in range(0, Lk, BLOCK_K):
                keys = start + offs_k
                s = _attention_scores(q, k_base, mask_base, keys, offs_d, Lk, stride_kn, stride_kd, stride_mn,
                                      scale_log2e, HAS_MASK, DOT_PRECISION)
                p = tl.exp2(s - m_sub[:, None]) * inv_l[:, None]
                tl.store(w_rows + keys.to(tl.int64)[None, :] * stride_wn, p.to(w_ptr.dtype.element_ty),
                         mask=in_q[:, None] & (keys < Lk)[None, :])

    tl.store(
        out_ptr + b * stride_ob + h * stride_oh + rows_q[:, None] * stride_om + cols_d[None, :] * stride_od,
        acc.to(out_ptr.dtype.element_ty), mask=in_q[:, None],
    )


def _check_out(name, t, shape, like):
    if t is not None and (t.shape != shape or t.dtype != like.dtype or t.device != like.device):
        raise ValueError(f"{name} must be a {like.dtype} tensor of shape {tuple(shape)} on {like.device}, got "
                         f"{t.shape=} {t.dtype=} {t.device=}")


def _launch(kernel, q, k, v, key_padding_mask, scale, return_weights, out, out_weights):
    """Shared body of the launcher and the op; ``kernel`` is the raw kernel or its ``wrap_triton`` form."""
    b, h, lq, lk, d = _check_attention_args(q, k, v, key_padding_mask)
    if q.dtype not in _KERNEL_DTYPES:
        raise ValueError(f"the kernel takes float32/float16/bfloat16, got {q.dtype=}")
    if q.dtype == torch.bfloat16 and triton.knobs.runtime.interpret:
        raise ValueError("the Triton interpreter (TRITON_INTERPRET=1) has no bfloat16; use float16 or float32")
    if d not in _HEAD_DIMS:
        raise ValueError(f"head dim must be one of {_HEAD_DIMS}, got {q.shape=}")
    for name, t in (("k", k), ("v", v), ("key_padding_mask", key_padding_mask)):
        if t is not None and t.device != q.device:
            raise ValueError(f"{name} must be on {q.device} like q, got {t.device=}")
    if out_weights is not None and not return_weights:
        raise ValueError("out_weights is only written when return_weights=True")
    _check_out("out", out, (b, h, lq, d), q)
    _check_out("out_weights", out_weights, (b, h, lq, lk), q)
    scale = d**-0.5 if scale is None else float(scale)

    # any strides are taken as they are: no contiguous copies
    if out is None:
        out = torch.empty((b, h, lq, d), dtype=q.dtype, device=q.device)
    weights = out_weights
    if return_weights and weights is None:
        weights = torch.empty((b, h, lq, lk), dtype=q.dtype, device=q.device)
    # placeholders for absent tensors: never read or written, their flags are compile-time off
    mask = key_padding_mask if key_padding_mask is not None else q
    mask_strides = key_padding_mask.stride() if key_padding_mask is not None else (0, 0)
    w = weights if return_weights else out
    w_strides = weights.stride() if return_weights else (0, 0, 0, 0)
    block_k = min(max(_MIN_BLOCK, triton.next_power_of_2(lk)), _MAX_BLOCK_K)

    def grid(meta):
        return (b * h * triton.cdiv(lq, meta["BLOCK_Q"]),)

    if b * h * lq:
        kernel[grid](
            q, k, v, mask, out, w,
            h, lq, lk,
            *q.stride(), *k.stride(), *v.stride(), *mask_strides, *out.stride(), *w_strides,
            scale * _LOG2E,
            D=d,
            HAS_MASK=key_padding_mask is not None,
            RETURN_WEIGHTS=return_weights,
            KEYS_FIT=lk <= block_k,
            # fp32 inputs are multiplied in full fp32 (ieee), not tf32; 16-bit inputs use the tensor cores
            DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
            BLOCK_K=block_k,
        )
    return out, weights


def av_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    return_weights: bool = False,
    out: torch.Tensor | None = None,
    out_weights: torch.Tensor | None = None,
):
    """Fused cross attention (Triton): ``softmax(q kᵀ · scale + mask) v``.

    Args:
        q: (B, H, Lq, D) float32/float16/bfloat16, any strides; D in {16, 32, 64, 128}, any Lq.
        k, v: (B, H, Lk, D), same dtype and device as q, any strides; any Lk (one pass up to 128).
        key_padding_mask: optional (B, Lk) bool, True = ignore that key. A query row whose keys are
            all ignored gets zeros (and zero weights), never NaN.
        scale: multiplies q kᵀ before the softmax; defaults to D**-0.5.
        return_weights: also return the probabilities (B, H, Lq, Lk).
        out, out_weights: optional preallocated results (any strides) to write into.

    Returns:
        out (B, H, Lq, D) in q's dtype, or ``(out, weights)`` with weights (B, H, Lq, Lk) in q's dtype.
        Scores, softmax and both products accumulate in float32; for 16-bit inputs the
        probabilities are rounded to the input dtype before the product with v (as in flash attention).
    """
    out, weights = _launch(
        _av_attention_kernel, q, k, v, key_padding_mask, scale, return_weights, out, out_weights
    )
    return (out, weights) if return_weights else out


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
        # a finite fill keeps fully-masked rows NaN-free in forward and backward; they are zeroed below.
        # s.dtype, not acc: under autocast the matmul returns the autocast dtype.
        s = s.masked_fill(key_padding_mask[:, None, None, :], torch.finfo(s.dtype).min)
    p = torch.softmax(s, dim=-1)
    if key_padding_mask is not None:
        p = p * (~key_padding_mask.all(dim=-1)).to(p.dtype)[:, None, None, None]
    out = torch.matmul(p, v.to(acc)).to(q.dtype)
    return (out, p.to(q.dtype)) if return_weights else out


# ---- the op: torch.ops.avgn_fast.av_attention -> (out, weights); weights has shape (0,) unless asked for


def _reference_pair(q, k, v, key_padding_mask, scale, return_weights):
    if not return_weights:
        return av_attention_ref(q, k, v, key_padding_mask=key_padding_mask, scale=scale), q.new_empty((0,))
    return av_attention_ref(q, k, v, key_padding_mask=key_padding_mask, scale=scale, return_weights=True)


@triton_op("avgn_fast::av_attention", mutates_args=())
def _av_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    return_weights: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.ops.avgn_fast.av_attention``: the kernel on CUDA, the reference elsewhere.

    torch.compile traces this body; off CUDA it is the reference, so a traced CPU graph holds plain
    PyTorch ops instead of a kernel no CPU driver can launch.
    """
    if q.device.type != "cuda":
        return _reference_pair(q, k, v, key_padding_mask, scale, return_weights)
    out, weights = _launch(
        wrap_triton(_av_attention_kernel), q, k, v, key_padding_mask, scale, return_weights, None, None
    )
    return out, (weights if return_weights else q.new_empty((0,)))


@_av_attention_op.register_kernel("cpu")
def _av_attention_cpu(q, k, v, key_padding_mask=None, scale=None, return_weights=False):
    return _reference_pair(q, k, v, key_padding_mask, scale, return_weights)


@_av_attention_op.register_fake
def _av_attention_fake(q, k, v, key_padding_mask=None, scale=None, return_weights=False):
    b, h, lq, lk, d = _check_attention_args(q, k, v, key_padding_mask)
    weights_shape = (b, h, lq, lk) if return_weights else (0,)
    return q.new_empty((b, h, lq, d)), q.new_empty(weights_shape)


def _inference_only(ctx, grad_out, grad_weights):
    raise RuntimeError(
        "torch.ops.avgn_fast.av_attention is inference-only and has no backward; "
        "train with avgn_fast.kernels.av_attention.av_attention_ref, which autograd differentiates"
    )


_av_attention_op.register_autograd(_inference_only)
