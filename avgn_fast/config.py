"""Model configuration and the one switch for fused (Triton) paths."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, fields
from typing import Literal, get_type_hints


def use_triton() -> bool:
    """True when fused Triton ops may be used (env ``AVGN_TRITON=0`` turns them off everywhere)."""
    return os.environ.get("AVGN_TRITON", "1") != "0"


@dataclass(frozen=True)
class AVGNConfig:
    """Every knob of an AVGN model; DESIGN.md's defaults are the ``paper`` configuration."""

    name: str = "paper"
    num_classes: int = 200
    # sampling and decode
    num_frames: int = 16  # T
    frame_size: int = 224  # S, full resolution of a kept frame
    resize_shorter: int = 256  # shorter side before the centre crop to S
    glance_size: int = 224  # G, resolution seen by the glance encoder
    sample_rate: int = 16000
    audio_window_s: float = 1.0
    n_mels: int = 64
    win_ms: float = 25.0
    hop_ms: float = 10.0
    # glance encoders (MobileNetV2)
    glance_width: float = 1.0
    audio_width: float = 1.0
    glance_token_stride: int = 32  # stride of the glance-map stage whose positions AESPA attends over
    # AV-TeST
    avtest_layers: int = 2
    avtest_dim: int = 256
    avtest_heads: int = 4
    k: int = 8  # frames kept
    # AESPA + policy
    aespa_dim: int = 256
    aespa_heads: int = 4
    patch_size: int = 128  # P
    # local encoder
    local_arch: Literal["resnet18", "resnet50"] = "resnet50"
    local_width: int = 64  # ResNet base width (64 = torchvision)
    # classifier
    fusion_dim: int = 1024
    exit_threshold: float | None = None  # tau; None = never exit early
    # baselines
    audio: bool = True  # False: visual-only glance (AdaFocusV2-like)
    temporal: Literal["avtest", "uniform"] = "avtest"
    spatial: Literal["policy", "center", "random"] = "policy"
    dense: bool = False  # local encoder on all T full frames, no glance

    def __post_init__(self):
        if not 1 <= self.k <= self.num_frames:
            raise ValueError(f"k must be in [1, num_frames={self.num_frames}], got {self.k}")
        if self.patch_size > self.frame_size:
            raise ValueError(f"patch_size={self.patch_size} exceeds frame_size={self.frame_size}")
        if self.temporal not in ("avtest", "uniform"):
            raise ValueError(f"temporal must be 'avtest' or 'uniform', got {self.temporal!r}")
        if self.spatial not in ("policy", "center", "random"):
            raise ValueError(f"spatial must be 'policy', 'center' or 'random', got {self.spatial!r}")
        if self.glance_token_stride not in (8, 16, 32):
            raise ValueError(f"glance_token_stride must be 8, 16 or 32, got {self.glance_token_stride}")
        if self.local_arch not in ("resnet18", "resnet50"):
            raise ValueError(f"local_arch must be 'resnet18' or 'resnet50', got {self.local_arch!r}")

    @classmethod
    def from_name(cls, name: str, **overrides) -> AVGNConfig:
        if name not in CONFIGS:
            raise ValueError(f"unknown config {name!r}; known: {', '.join(sorted(CONFIGS))}")
        return dataclasses.replace(CONFIGS[name], **overrides)

    def replace(self, **changes) -> AVGNConfig:
        return dataclasses.replace(self, **changes)

    def with_overrides(self, assignments: list[str]) -> AVGNConfig:
        """Apply ``["audio=false", "k=4"]``-style overrides, parsed by each field's type."""
        hints = get_type_hints(type(self))
        names = {f.name for f in fields(self)}
        changes = {}
        for item in assignments:
            key, sep, raw = item.partition("=")
            key = key.strip().replace("-", "_")
            if not sep or key not in names:
                raise ValueError(f"bad override {item!r}: expected FIELD=VALUE with FIELD one of {sorted(names)}")
            changes[key] = _parse_value(key, raw.strip(), hints[key])
        return self.replace(**changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> AVGNConfig:
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown config fields {sorted(unknown)}")
        return cls(**d)


def _parse_value(key: str, raw: str, hint):
    text = str(hint)
    low = raw.lower()
    if "None" in text and low in ("none", "null", ""):
        return None
    if hint is bool or text == "bool":
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{key} expects a boolean, got {raw!r}")
    try:
        if hint is int or text == "int":
            return int(raw)
        if "float" in text:
            return float(raw)
    except ValueError as e:
        raise ValueError(f"{key} expects a number, got {raw!r}") from e
    return raw


CONFIGS: dict[str, AVGNConfig] = {
    "paper": AVGNConfig(),
    # Small enough to train on 2 CPU cores in minutes; detail is unreadable at G and readable in P.
    "tiny": AVGNConfig(
        name="tiny",
        num_classes=8,
        frame_size=96,
        resize_shorter=96,
        glance_size=32,
        sample_rate=8000,
        audio_window_s=0.25,  # the 4 s clip's T=16 frames are 0.25 s apart: each window hears its own frame
        n_mels=16,
        glance_width=0.25,
        audio_width=0.5,
        glance_token_stride=8,
        avtest_layers=1,
        avtest_dim=64,
        avtest_heads=2,
        k=4,
        aespa_dim=64,
        aespa_heads=2,
        patch_size=48,
        local_arch="resnet18",
        local_width=16,
        fusion_dim=128,
    ),
}
