"""The step classifier: fuse per-frame features, max-pool over the steps so far, one exit head per step."""

from __future__ import annotations

import torch
from torch import nn


class StepClassifier(nn.Module):
    """Logits after each of ``steps`` frames taken in order (saliency order for AVGN).

    Step k fuses frame k's concatenated features with an MLP, max-pools the fused vectors of
    frames 0..k (a running max, so step k depends only on the first k + 1 frames) and applies
    exit head k.
    """

    def __init__(self, in_dim: int, hidden: int, num_classes: int, steps: int):
        super().__init__()
        self.fuse = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, hidden),
                                  nn.ReLU(inplace=True))
        self.heads = nn.ModuleList(nn.Linear(hidden, num_classes) for _ in range(steps))

    @property
    def steps(self) -> int:
        return len(self.heads)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features (B, K, in_dim) with K ≤ steps → logits (B, K, num_classes)."""
        if features.shape[1] > self.steps:
            raise ValueError(f"{features.shape=} has more than {self.steps} steps")
        fused = self.fuse(features)
        running = fused[:, 0]
        logits = [self.heads[0](running)]
        for step in range(1, features.shape[1]):
            running = torch.maximum(running, fused[:, step])
            logits.append(self.heads[step](running))
        return torch.stack(logits, dim=1)


def exit_steps(probs: torch.Tensor, threshold: float | None) -> torch.Tensor:
    """First step whose top probability is ≥ ``threshold`` (B,) int64; the last step if none, or if None."""
    b, k, _ = probs.shape
    last = torch.full((b,), k - 1, dtype=torch.int64, device=probs.device)
    if threshold is None:
        return last
    passed = probs.amax(-1) >= threshold  # (B, K)
    first = torch.where(passed, torch.arange(k, device=probs.device), k).amin(1)
    return torch.minimum(first, last)
