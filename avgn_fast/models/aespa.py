"""AESPA: audio-enhanced spatial patch attention and the policy that places the patch."""

from __future__ import annotations

import torch
from torch import nn

from avgn_fast.models.avtest import Attention


class AESPA(nn.Module):
    """Per kept frame: glance-map positions attend to audio tokens, a query attends back to the positions.

    The visual tokens are the positions of the glance feature map (``grid`` = (h, w)); with audio,
    they first attend to the frame's audio tokens (audio-enhanced visual tokens), and the query is
    the frame's pooled audio vector; without audio the query is the pooled visual vector. The
    query's attention over the positions is the spatial map. The policy head reads the enhanced
    tokens, the map and the attended vector and returns the patch centre a ∈ [0, 1]² as (ay, ax)
    (AdaFocusV2 convention: patch corner = a · (S − P)); it starts at the frame centre.
    """

    def __init__(self, visual_channels: int, grid: tuple[int, int], query_dim: int, dim: int, heads: int, *,
                 audio_channels: int | None = None, audio_tokens: int = 0, token_reduce: int = 4):
        super().__init__()
        positions = grid[0] * grid[1]
        self.grid = tuple(grid)
        self.visual_proj = nn.Linear(visual_channels, dim)
        self.visual_pos = nn.Parameter(torch.randn(positions, dim) * 0.02)
        if audio_channels:
            self.audio_proj = nn.Sequential(nn.LayerNorm(audio_channels), nn.Linear(audio_channels, dim))
            self.audio_pos = nn.Parameter(torch.randn(audio_tokens, dim) * 0.02)
            self.enhance_norm = nn.LayerNorm(dim)
            self.enhance = Attention(dim, heads)
        else:
            self.audio_proj = None
        self.query = nn.Sequential(nn.LayerNorm(query_dim), nn.Linear(query_dim, dim))
        self.token_norm = nn.LayerNorm(dim)
        self.locate = Attention(dim, heads)
        self.reduce = nn.Linear(dim, token_reduce)
        self.policy = nn.Sequential(nn.Linear(positions * (token_reduce + 1) + dim, dim), nn.ReLU(inplace=True),
                                    nn.Linear(dim, 2))
        nn.init.zeros_(self.policy[-1].weight)
        nn.init.zeros_(self.policy[-1].bias)

    def forward(self, visual_tokens, query, audio_tokens=None, audio_present=None):
        """visual_tokens (N, h·w, C), query (N, query_dim), audio_tokens (N, La, Ca), audio_present (N,) bool.

        Returns the patch centres a (N, 2) in [0, 1] and the spatial attention map (N, h·w).
        """
        n, positions, _ = visual_tokens.shape
        v = self.visual_proj(visual_tokens) + self.visual_pos
        if self.audio_proj is not None:
            a = self.audio_proj(audio_tokens) + self.audio_pos
            mask = None if audio_present is None else ~audio_present[:, None].expand(n, a.shape[1])
            v = v + self.enhance(self.enhance_norm(v), a, mask)
        v = self.token_norm(v)
        attended, spatial = self.locate(self.query(query)[:, None], v, return_weights=True)
        spatial = spatial[:, 0]  # (N, h·w)
        features = torch.cat([self.reduce(v).flatten(1), spatial, attended[:, 0]], dim=1)
        return torch.sigmoid(self.policy(features)), spatial
