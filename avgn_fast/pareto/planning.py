"""What a sweep measures: the knob settings of one checkpoint, the method it trains, and the default sizes."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from avgn_fast.config import AVGNConfig

KS = (1, 2, 4, 8, 16)
THRESHOLDS = 4  # calibrated early-exit thresholds per checkpoint
QUICK_THRESHOLDS = 2


@dataclass(frozen=True)
class Knobs:
    """One inference setting: ``k`` steps, exit threshold τ (None: never exit early), patch size P, glance size G."""

    k: int
    exit_threshold: float | None
    patch_size: int
    glance_size: int

    def label(self, base: AVGNConfig) -> str:
        """Short text naming the setting, e.g. ``K=4 τ=0.912`` or ``K=4 P=24`` (P and G only where not the base)."""
        parts = [f"K={self.k}"]
        if self.exit_threshold is not None:
            parts.append(threshold_text(self.exit_threshold))
        if self.patch_size != base.patch_size:
            parts.append(f"P={self.patch_size}")
        if self.glance_size != base.glance_size:
            parts.append(f"G={self.glance_size}")
        return " ".join(parts)


def threshold_text(tau: float) -> str:
    """``τ=…`` with four significant digits, and near 1 as many decimals as keep two significant digits of 1 − τ
    (calibrated thresholds crowd just below 1: 0.99995 and 0.99998 would both print as ``τ=1``)."""
    gap = 1.0 - tau
    if gap <= 0 or gap >= 1e-3:
        return f"τ={tau:.4g}"
    return f"τ={tau:.{min(math.ceil(-math.log10(gap)) + 1, 12)}f}"


def method_name(config: AVGNConfig) -> str:
    """The method a checkpoint trains, from its config switches (AVGN, visual-only glance, uniform+centre, dense,
    audio-only)."""
    if not config.visual:
        return "audio-only"
    if config.dense:
        name = "dense"
    elif config.temporal == "avtest" and config.spatial == "policy":
        return "AVGN" if config.audio else "visual-only glance"
    else:
        temporal = "AV-TeST" if config.temporal == "avtest" else "uniform"
        spatial = {"policy": "policy", "center": "centre", "random": "random patch"}[config.spatial]
        name = f"{temporal}+{spatial}"
    return f"{name} + audio" if config.audio else name


def default_patch_sizes(config: AVGNConfig) -> list[int]:
    """P·3/4 and P·5/4 (96 and 160 for the paper's 128), those that fit in the frame."""
    return [p for p in (round(config.patch_size * 3 / 4), round(config.patch_size * 5 / 4))
            if 8 <= p <= config.frame_size]


def default_glance_sizes(config: AVGNConfig) -> list[int]:
    """G/2 and G·3/4 (112 and 168 for the paper's 224): cheaper glances."""
    return [g for g in (config.glance_size // 2, round(config.glance_size * 3 / 4)) if g >= 8]


def plan(config: AVGNConfig, *, ks: Iterable[int] = KS, thresholds: Iterable[float] = (),
         patch_sizes: Iterable[int] = (), glance_sizes: Iterable[int] = ()) -> list[Knobs]:
    """Knob settings for a checkpoint: each K ≤ its steps without early exit, then at its full K each threshold,
    each other patch size and each other glance size (one knob changed at a time)."""
    steps = config.num_frames if config.dense else config.k
    p, g = config.patch_size, config.glance_size
    out = [Knobs(k, None, p, g) for k in sorted(set(ks)) if 1 <= k <= steps]
    out += [Knobs(steps, float(t), p, g) for t in thresholds]
    out += [Knobs(steps, None, size, g) for size in sorted(set(patch_sizes)) if size != p]
    out += [Knobs(steps, None, p, size) for size in sorted(set(glance_sizes)) if size != g]
    return out
