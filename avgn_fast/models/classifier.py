"""The step classifier: fused per-frame features, a running max over the steps, one exit head per step; exit rule."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class StepClassifier(nn.Module):
    """Logits after each of ``steps`` frames taken in order (saliency order for AVGN).

    Step k fuses frame k's concatenated features with an MLP, max-pools the fused vectors of
    frames 0..k (a running max, so step k depends only on the first k + 1 frames) and applies
    exit head k. ``forward`` takes every step at once, ``step`` one step for the videos still in.
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

    def step(self, features: torch.Tensor, running: torch.Tensor, step: torch.Tensor):
        """One step: features (N, in_dim) of the step's frame, running (N, hidden) the running max before it
        (−inf before step 0), step an int64 scalar → logits (N, num_classes) and the new running max (float32).

        The step is a tensor and the exit heads are stacked, so one compiled graph serves every step.
        """
        # the fused vector is ≥ 0 (ReLU) and the max is exact, so a float32 running max loses nothing
        running = torch.maximum(running, self.fuse(features).float())
        # index_select, not indexing: it keeps the picked weight 2-D for every exporter
        pick = step.reshape(1)
        weight = torch.stack([h.weight for h in self.heads]).index_select(0, pick)[0]
        bias = torch.stack([h.bias for h in self.heads]).index_select(0, pick)[0]
        return F.linear(running, weight, bias), running

    def alone(self, features: torch.Tensor) -> torch.Tensor:
        """Logits (..., num_classes) of each frame's features (..., in_dim) taken alone, as a first step."""
        return self.heads[0](self.fuse(features))


def confident(probs: torch.Tensor, threshold: float | None) -> torch.Tensor:
    """The exit rule on probabilities (..., C): True where the top probability reaches ``threshold``; never for None."""
    if threshold is None:
        return torch.zeros(probs.shape[:-1], dtype=torch.bool, device=probs.device)
    return probs.amax(-1) >= threshold


def exit_steps(probs: torch.Tensor, threshold: float | None) -> torch.Tensor:
    """First step whose top probability is ≥ ``threshold`` (B,) int64; the last step if none, or if None."""
    b, k, _ = probs.shape
    last = torch.full((b,), k - 1, dtype=torch.int64, device=probs.device)
    passed = confident(probs, threshold)  # (B, K)
    first = torch.where(passed, torch.arange(k, device=probs.device), k).amin(1)
    return torch.minimum(first, last)
