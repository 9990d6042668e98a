"""What an AVGN computes: its glance features, its staged forward's intermediates, a classified batch, its cost."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class GlanceFeatures:
    """What the glance stage computes for all T frames (``None`` where the configuration has no such part).

    tokens (B, T, h·w, C_tok): glance-map positions for AESPA; visual (B, T, C_v): pooled glance vector;
    audio_tokens (B, T, La, C_a) and audio (B, T, C_a), zero for videos without audio; audio_present (B,)
    bool (None inside a stage that does not read it).
    """

    tokens: torch.Tensor | None
    visual: torch.Tensor | None
    audio_tokens: torch.Tensor | None
    audio: torch.Tensor | None
    audio_present: torch.Tensor | None

    @classmethod
    def of(cls, tensors: dict[str, torch.Tensor]) -> GlanceFeatures:
        """The features among named tensors (a stage's inputs, the forward's environment)."""
        return cls(*(tensors.get(name) for name in ("tokens", "visual", "audio_tokens", "audio", "audio_present")))


@dataclass
class ForwardOutput:
    """The intermediates of ``AVGN.forward`` for B videos, T frames, K steps, C classes.

    features: the glance features; saliency (B, T) (zeros without AV-TeST); kept (B, K) int64 frame
    indices in step order; locations (B, K, 2) patch centres a ∈ [0, 1]² as (ay, ax) (corner a·(S − P));
    boxes (B, K, 4) (y0, x0, y1, x1) in frame pixels; patches (B·K, 3, P, P) normalized, row b·K + k;
    local (B, K, C_local) local-encoder vectors; logits (B, K, C) after each step.
    """

    features: GlanceFeatures
    saliency: torch.Tensor
    kept: torch.Tensor
    locations: torch.Tensor
    boxes: torch.Tensor
    patches: torch.Tensor
    local: torch.Tensor
    logits: torch.Tensor

    def __post_init__(self):
        if self.kept.dim() != 2 or self.kept.dtype != torch.int64:
            raise ValueError(f"kept must be int64 (B, K), got {self.kept.shape=} {self.kept.dtype=}")
        b, k = self.kept.shape
        expected = {"saliency": (b, self.saliency.shape[-1]), "locations": (b, k, 2), "boxes": (b, k, 4),
                    "local": (b, k, self.local.shape[-1]), "logits": (b, k, self.logits.shape[-1])}
        for name, shape in expected.items():
            if tuple(getattr(self, name).shape) != shape:
                raise ValueError(f"{name} must have shape {shape}, got {tuple(getattr(self, name).shape)}")
        if self.patches.dim() != 4 or self.patches.shape[0] != b * k:
            raise ValueError(f"patches must be (B·K={b * k}, 3, P, P), got {tuple(self.patches.shape)}")

    def __repr__(self) -> str:
        shapes = ", ".join(f"{name}={tuple(getattr(self, name).shape)}" for name in
                           ("saliency", "kept", "locations", "boxes", "patches", "local", "logits"))
        return f"ForwardOutput({shapes})"


@dataclass
class GlanceResult:
    """Per-video outputs of ``AVGN.glance`` and ``GlanceEngine`` for a batch of B videos, K steps, C classes.

    logits/probs (B, K, C): after each step, frames in saliency order (NaN at the steps an early-exit
    engine did not take); exit_step (B,) int64: the first step whose top probability passed the
    threshold, else K − 1; final_logits (B, C): the logits at the exit; saliency (B, T) (zeros without
    AV-TeST); kept (B, K) int64 frame indices in step order; boxes (B, K, 4) float (y0, x0, y1, x1) in
    frame pixels; gflops (B,): GMACs spent (``AVGN.cost``).
    """

    logits: torch.Tensor
    probs: torch.Tensor
    exit_step: torch.Tensor
    final_logits: torch.Tensor
    saliency: torch.Tensor
    kept: torch.Tensor
    boxes: torch.Tensor
    gflops: torch.Tensor

    def __post_init__(self):
        if self.logits.dim() != 3 or self.probs.shape != self.logits.shape:
            raise ValueError(f"logits and probs must be equal (B, K, C), got {self.logits.shape=} {self.probs.shape=}")
        b, k, c = self.logits.shape
        expected = {"exit_step": (b,), "final_logits": (b, c), "kept": (b, k), "boxes": (b, k, 4), "gflops": (b,)}
        for name, shape in expected.items():
            if tuple(getattr(self, name).shape) != shape:
                raise ValueError(f"{name} must have shape {shape}, got {getattr(self, name).shape}")
        if self.saliency.dim() != 2 or self.saliency.shape[0] != b:
            raise ValueError(f"saliency must be (B={b}, T), got {self.saliency.shape=}")
        for name in ("exit_step", "kept"):
            if getattr(self, name).dtype != torch.int64:
                raise ValueError(f"{name} must be int64, got {getattr(self, name).dtype}")
        if b and (int(self.exit_step.min()) < 0 or int(self.exit_step.max()) >= k):
            raise ValueError(f"exit_step must lie in [0, {k}), got {self.exit_step.tolist()}")

    @property
    def prediction(self) -> torch.Tensor:
        """(B,) int64 class index at the exit."""
        return self.final_logits.argmax(-1)

    def __repr__(self) -> str:
        shapes = ", ".join(f"{name}={tuple(getattr(self, name).shape)}" for name in
                           ("logits", "exit_step", "final_logits", "saliency", "kept", "boxes", "gflops"))
        return f"GlanceResult({shapes})"


@dataclass(frozen=True)
class Component:
    """One part of a model that does multiply-accumulate work, as the cost counts it.

    ``module(*inputs)`` is one run on batch-1 example inputs; it runs ``count`` times per video, or
    ``count`` times per step taken when ``per_step``. ``per`` names the unit of one run (frame,
    video, patch, step).
    """

    name: str
    module: nn.Module
    inputs: tuple[torch.Tensor, ...]
    per: str
    count: int
    per_step: bool = False


@dataclass(frozen=True)
class Cost:
    """GMACs of one video: ``per_video`` once (glance, audio, AV-TeST), then ``per_step`` for each step taken."""

    per_video: float
    per_step: float

    @classmethod
    def from_dict(cls, saved) -> Cost:
        """The cost saved beside a model (``{"per_video": GMACs, "per_step": GMACs}``); ValueError unless it is
        exactly two finite GMAC counts ≥ 0."""
        values = list(saved.values()) if isinstance(saved, dict) else []
        if not isinstance(saved, dict) or set(saved) != {"per_video", "per_step"} or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
                for v in values):
            raise ValueError(f"cost must be {{'per_video': GMACs, 'per_step': GMACs}} (finite, ≥ 0), "
                             f"got {str(saved)[:80]}")
        return cls(**saved)

    def gmacs(self, steps_taken: torch.Tensor) -> torch.Tensor:
        """(B,) GMACs for ``steps_taken`` (B,) steps per video."""
        return self.per_video + self.per_step * steps_taken.to(torch.float32)

    def total(self, steps: int) -> float:
        """GMACs of a video that takes ``steps`` steps."""
        return self.per_video + self.per_step * steps
