"""AV-TeST: a small transformer over per-frame audio and visual tokens that scores frame saliency."""

from __future__ import annotations

import torch
from torch import nn

from avgn_fast.models import ops


class Attention(nn.Module):
    """Multi-head attention of ``x`` (B, Lq, dim) over ``context`` (B, Lk, context_dim) via ``ops.av_attention``."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim={dim} must be divisible by heads={heads}")
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(context_dim or dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x, context, key_padding_mask=None, return_weights: bool = False):
        """Returns (B, Lq, dim), and with ``return_weights`` also the head-averaged weights (B, Lq, Lk)."""
        b, lq, dim = x.shape
        lk = context.shape[1]
        q = self.q(x).view(b, lq, self.heads, dim // self.heads).transpose(1, 2)
        k, v = self.kv(context).view(b, lk, 2, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        result = ops.av_attention(q, k, v, key_padding_mask=key_padding_mask, return_weights=return_weights)
        out, weights = result if return_weights else (result, None)
        out = self.out(out.transpose(1, 2).reshape(b, lq, dim))
        return (out, weights.mean(1)) if return_weights else out


class Block(nn.Module):
    """Pre-norm transformer block: self-attention then an MLP, each residual."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 2):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x, key_padding_mask=None):
        h = self.norm1(x)
        x = x + self.attn(h, h, key_padding_mask)
        return x + self.mlp(self.norm2(x))


class AVTeST(nn.Module):
    """Audio-Visual Temporal Saliency Transformer: saliency (B, T) from per-frame pooled features.

    Each frame is one token: its layer-normalized visual and audio vectors, each projected to
    ``dim`` and summed, plus a learned temporal position embedding (the audio part is zero for
    videos without audio). The transformer lets every frame see the whole video; a linear head
    scores each frame.
    """

    def __init__(self, visual_dim: int, audio_dim: int | None, num_frames: int, dim: int, layers: int, heads: int):
        super().__init__()
        self.num_frames = num_frames
        self.visual_in = nn.Sequential(nn.LayerNorm(visual_dim), nn.Linear(visual_dim, dim))
        self.audio_in = nn.Sequential(nn.LayerNorm(audio_dim), nn.Linear(audio_dim, dim)) if audio_dim else None
        self.time_embed = nn.Parameter(torch.randn(num_frames, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 1)

    def forward(self, visual, audio=None, audio_present=None):
        """visual (B, T, visual_dim), audio (B, T, audio_dim), audio_present (B,) bool → saliency (B, T)."""
        x = self.visual_in(visual) + self.time_embed
        if self.audio_in is not None:
            a = self.audio_in(audio)
            x = x + (a if audio_present is None else a * audio_present.to(a.dtype)[:, None, None])
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)).squeeze(-1)


def top_k_frames(saliency: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (B, k) int64 of the k most salient frames, in descending saliency."""
    return torch.topk(saliency, k, dim=1, largest=True, sorted=True).indices


def uniform_frames(num_frames: int, k: int, batch: int, device=None) -> torch.Tensor:
    """(batch, k) int64: k frames spread uniformly over T (midpoints of k equal segments), in time order."""
    idx = ((torch.arange(k, device=device) * 2 + 1) * num_frames) // (2 * k)
    return idx.expand(batch, k).contiguous()
