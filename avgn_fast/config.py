"""Model configuration and the one switch for fused (Triton) paths."""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from dataclasses import dataclass, fields
from types import UnionType
from typing import Literal, Union, get_args, get_origin, get_type_hints


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
    # spectral mean normalization of the audio over the clip's T windows (the stationary background removed). False:
    # each frame's audio is encoded on its own, so overlapping windows of a long video share it (``engine.stream``)
    audio_clip_mean: bool = True
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
    # the checkpoint's early-exit threshold τ, set by ``avgn-fast calibrate``; None = never exit early. What a run
    # uses is ``InferenceSettings.exit_threshold`` (by default this one)
    exit_threshold: float | None = None
    # baselines
    audio: bool = True  # False: visual-only glance (AdaFocusV2-like)
    temporal: Literal["avtest", "uniform"] = "avtest"
    spatial: Literal["policy", "center", "random"] = "policy"
    dense: bool = False  # local encoder on all T full frames, no glance
    # False: audio-only baseline, the audio encoder and the classifier on K uniformly spaced frames (no visual glance,
    # no AV-TeST, no AESPA, no patches, no local encoder; ``temporal`` and ``spatial`` then have nothing to choose)
    visual: bool = True

    def __post_init__(self):
        _check_types(self)
        _check_ranges(self)
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
        if not self.visual and (self.dense or not self.audio):
            raise ValueError("visual=False (audio-only) needs audio=True and dense=False")
        if self.resize_shorter < self.frame_size:
            raise ValueError(f"resize_shorter={self.resize_shorter} is smaller than frame_size={self.frame_size}")
        # the attention layers split their width evenly across heads
        for dim, heads in (("avtest_dim", "avtest_heads"), ("aespa_dim", "aespa_heads")):
            if getattr(self, dim) % getattr(self, heads):
                raise ValueError(f"{dim}={getattr(self, dim)} must be divisible by {heads}={getattr(self, heads)}")

    @classmethod
    def from_name(cls, name: str, **overrides) -> AVGNConfig:
        if name not in CONFIGS:
            raise ValueError(f"unknown config {name!r}; known: {', '.join(sorted(CONFIGS))}")
        return dataclasses.replace(CONFIGS[name], **overrides)

    @property
    def steps(self) -> int:
        """Steps of the step classifier (exit heads): K, or all T frames for the dense baseline."""
        return self.num_frames if self.dense else self.k

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
        """The config of ``to_dict``'s output; ValueError for a non-dict, an unknown field or a bad value
        (fields absent from ``d`` take their defaults)."""
        if not isinstance(d, dict):
            raise ValueError(f"config must be a dict of fields, got {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown config fields {sorted(unknown)}")
        return cls(**d)


FROM_CHECKPOINT = "checkpoint"  # ``InferenceSettings.exit_threshold``: the checkpoint's calibrated τ


@dataclass(frozen=True)
class InferenceSettings:
    """How a trained model runs, apart from its architecture (``AVGNConfig``).

    k: steps, the frames looked at closely, at most the model's (``AVGNConfig.steps``); None: all of them.
    exit_threshold: the early-exit confidence τ in [0, 1]: a video stops after the first step whose top
        probability reaches it. None: never exit early, every video takes k steps. ``FROM_CHECKPOINT``
        (the default): the checkpoint's τ (``AVGNConfig.exit_threshold``, None until ``avgn-fast calibrate``).
    """

    k: int | None = None
    exit_threshold: float | None | Literal["checkpoint"] = FROM_CHECKPOINT

    def __post_init__(self):
        if self.k is not None and (isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1):
            raise ValueError(f"k must be None or an int ≥ 1, got {self.k!r}")
        tau = self.exit_threshold
        if tau is not None and tau != FROM_CHECKPOINT and (
                isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0 <= tau <= 1):
            raise ValueError(f"exit_threshold must be None (never exit early), {FROM_CHECKPOINT!r} or a probability "
                             f"in [0, 1], got {tau!r}")

    def steps(self, config: AVGNConfig) -> int:
        """The k to run a model of ``config`` with; ValueError when it has fewer steps."""
        if self.k is None:
            return config.steps
        if self.k > config.steps:
            raise ValueError(f"k must be in [1, {config.steps}] for this model, got {self.k}")
        return self.k

    def threshold(self, config: AVGNConfig) -> float | None:
        """The τ to run a model of ``config`` with; None: never exit early."""
        return exit_threshold_of(config, self.exit_threshold)


def exit_threshold_of(config: AVGNConfig, exit_threshold: float | None | str) -> float | None:
    """``exit_threshold`` with ``FROM_CHECKPOINT`` replaced by ``config``'s τ (None: never exit early)."""
    return config.exit_threshold if exit_threshold == FROM_CHECKPOINT else exit_threshold


def parse_exit_threshold(text: str, name: str = "exit_threshold") -> float | None | str:
    """A command line's exit threshold: a probability in [0, 1], ``never`` (None) or ``checkpoint``
    (``FROM_CHECKPOINT``); ValueError naming the option ``name`` otherwise."""
    word = text.strip().lower()
    if word in ("never", "none"):
        return None
    if word == FROM_CHECKPOINT:
        return FROM_CHECKPOINT
    try:
        value = float(word)
    except ValueError:
        value = math.nan
    if not 0 <= value <= 1:
        raise ValueError(f"{name} must be a probability in [0, 1], 'never' or 'checkpoint', got {text!r}")
    return value


# sizes, counts and widths that must be at least 1 (``avtest_layers`` may be 0: frames scored without attention)
_POSITIVE_INTS = ("num_classes", "num_frames", "frame_size", "resize_shorter", "glance_size", "sample_rate", "n_mels",
                  "avtest_dim", "avtest_heads", "aespa_dim", "aespa_heads", "patch_size", "local_width", "fusion_dim")
_POSITIVE_FLOATS = ("audio_window_s", "win_ms", "hop_ms", "glance_width", "audio_width")


def _fits(value, hint) -> bool:
    """Whether ``value`` has the type ``hint`` names: bools only for bool, ints (not bools) for int, ints or
    floats for float, a member of the type of a Literal's values, any member of a union."""
    if get_origin(hint) is Literal:
        return isinstance(value, tuple({type(arg) for arg in get_args(hint)}))
    if get_origin(hint) in (Union, UnionType):
        return any(_fits(value, arg) for arg in get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, hint)


def _type_name(hint) -> str:
    """``hint`` in words: "an int", "a number or None", "'avtest' or 'uniform'"."""
    if get_origin(hint) is Literal:
        return " or ".join(repr(arg) for arg in get_args(hint))
    if get_origin(hint) in (Union, UnionType):
        return " or ".join(_type_name(arg) for arg in get_args(hint))
    return {bool: "a bool", int: "an int", float: "a number", str: "a str", type(None): "None"}.get(hint, str(hint))


@functools.cache
def _hints(cls) -> dict:
    return get_type_hints(cls)


def _check_types(config: AVGNConfig) -> None:
    """ValueError naming the first field whose value is not of its declared type."""
    hints = _hints(type(config))
    for f in fields(config):
        value = getattr(config, f.name)
        if not _fits(value, hints[f.name]):
            raise ValueError(f"{f.name} must be {_type_name(hints[f.name])}, got {value!r} ({type(value).__name__})")


def _check_ranges(config: AVGNConfig) -> None:
    """ValueError naming the first size, duration or width out of range (non-positive or not finite)."""
    for name in _POSITIVE_INTS:
        if getattr(config, name) < 1:
            raise ValueError(f"{name} must be at least 1, got {getattr(config, name)}")
    if config.avtest_layers < 0:
        raise ValueError(f"avtest_layers must be at least 0, got {config.avtest_layers}")
    for name in _POSITIVE_FLOATS:
        value = getattr(config, name)
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a finite number above 0, got {value}")
    if config.exit_threshold is not None and not 0 <= config.exit_threshold <= 1:
        raise ValueError(f"exit_threshold must be None or a probability in [0, 1], got {config.exit_threshold}")


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
