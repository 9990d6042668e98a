"""What every decode backend shares: the parameters of a decode, its errors, the sampling rule and geometry.

Sampling. Demuxing the video stream (no decoding) gives every frame's presentation time
``p_0 < ... < p_{n-1}`` and the end ``e`` (last time + its duration), so variable frame rate needs
nothing special. With ``D = e - p_0``, frame ``i`` of T is sampled at ``t_i = p_0 + (i + 1/2) D / T``
(midpoints of T equal segments) and is the frame on screen then: the last one with ``p_j <= t_i``.

Geometry. The display rotation stored in the file is applied, the shorter side is scaled to
``resize_shorter`` (the longer to ``round(long * scale)``, ``resized_shape``), and the centre
``size x size`` is cropped at offset ``(resized - size) // 2`` (``center_crop``).
"""

from __future__ import annotations

import bisect
import contextlib
import math
import os
from dataclasses import dataclass, field
from fractions import Fraction

import torch
import torch.nn.functional as F

from avgn_fast.config import AVGNConfig
from avgn_fast.data.audio import LOG_EPS, FrameParams, frame_params

MAX_PIXELS = 8192 * 8192  # default limit on a frame's pixel count, checked from the stream header


class DecodeError(ValueError):
    """A file that cannot be decoded; ``str(e)`` names the file and the problem.

    ``transient`` marks a failure that says nothing of the file's content (permission denied, out of
    memory, an I/O error): it may not recur, so caches must not keep it.
    """

    def __init__(self, path, problem: str, *, transient: bool = False):
        super().__init__(str(path), problem)
        self.path = str(path)
        self.problem = problem
        self.transient = transient

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}"


def stalled(source, timeout: float) -> DecodeError:
    """The error of a live source that gave no data for ``timeout`` seconds (a transient one: it may come back)."""
    return DecodeError(source, f"stalled: no data for {timeout} s", transient=True)


@dataclass
class DecodeStats:
    """Work done by the ``pyav`` backend, for checking that long files are not decoded whole."""

    video_frames_decoded: int = 0
    audio_frames_decoded: int = 0
    seeks: int = 0
    packets_dropped: int = 0  # packets the decoder rejected (corrupt data), skipped
    notes: list[str] = field(default_factory=list)  # what was repaired or dropped (also on the Clip)


@dataclass(frozen=True)
class DecodeParams:
    """What a decode produces; identical for every backend and part of the decoded-clip cache key.

    ``max_pixels`` bounds a frame's width x height, read from the stream header before anything is
    decoded: a larger video is refused with a ``DecodeError`` rather than decoded into memory.
    ``keyframes_only`` (fast mode for long files) shows, at each sampled time, the nearest keyframe
    instead of the frame on screen, and decodes keyframes alone.
    """

    num_frames: int
    size: int
    resize_shorter: int
    sample_rate: int = 16000
    audio_window_s: float = 1.0
    n_mels: int = 64
    win_ms: float = 25.0
    hop_ms: float = 10.0
    max_pixels: int = MAX_PIXELS
    keyframes_only: bool = False

    def __post_init__(self):
        if self.num_frames < 1 or self.size < 1:
            raise ValueError(f"num_frames and size must be positive, got {self.num_frames=} {self.size=}")
        if self.resize_shorter < self.size:
            raise ValueError(f"resize_shorter={self.resize_shorter} is smaller than the crop size={self.size}")
        if self.n_mels < 1:
            raise ValueError(f"n_mels must be positive, got {self.n_mels=}")
        if self.max_pixels < 1:
            raise ValueError(f"max_pixels must be positive, got {self.max_pixels=}")
        frame_params(self.sample_rate, window_s=self.audio_window_s, win_ms=self.win_ms, hop_ms=self.hop_ms)

    @classmethod
    def from_config(cls, config: AVGNConfig, **options) -> DecodeParams:
        """The decode ``config`` needs; ``options`` sets ``max_pixels`` / ``keyframes_only``."""
        return cls(num_frames=config.num_frames, size=config.frame_size, resize_shorter=config.resize_shorter,
                   sample_rate=config.sample_rate, audio_window_s=config.audio_window_s, n_mels=config.n_mels,
                   win_ms=config.win_ms, hop_ms=config.hop_ms, **options)

    @property
    def stft(self) -> FrameParams:
        return frame_params(self.sample_rate, window_s=self.audio_window_s, win_ms=self.win_ms, hop_ms=self.hop_ms)

    def silent_mel(self) -> torch.Tensor:
        return torch.full((self.num_frames, self.n_mels, self.stft.n_steps), math.log(LOG_EPS))


@dataclass
class VideoProbe:
    """What demuxing the video stream tells: every frame's timestamp, the keyframes, the codec."""

    codec: str
    pts: list[int]  # presentation timestamp of every frame, ascending, in time_base units
    keyframes: list[int]  # presentation timestamps of the keyframes, ascending
    key_dts: list[int]  # their decode timestamps (what MPEG-TS seeks on), same order
    time_base: Fraction
    end: int  # one frame duration past the last timestamp
    fps: float
    has_audio: bool

    @property
    def start_s(self) -> float:
        return float(self.pts[0] * self.time_base)

    @property
    def duration_s(self) -> float:
        return float((self.end - self.pts[0]) * self.time_base)

    def sample(self, num_frames: int, keyframes_only: bool = False) -> tuple[list[float], list[int]]:
        """The T sampling times (seconds, the file's clock) and the index of the frame shown at each
        (with ``keyframes_only``, of the keyframe nearest to each time)."""
        times = [self.start_s + (i + 0.5) * self.duration_s / num_frames for i in range(num_frames)]
        num, den = self.time_base.numerator, self.time_base.denominator
        seconds = [p * num / den for p in self.pts]  # int / int rounds exactly as float(Fraction) does, 20x faster
        if keyframes_only and self.keyframes:
            keys = [k * num / den for k in self.keyframes]
            nearest = [min(range(len(keys)), key=lambda k: (abs(keys[k] - t), k)) for t in times]
            return times, [bisect.bisect_left(self.pts, self.keyframes[k]) for k in nearest]
        return times, [max(bisect.bisect_right(seconds, t) - 1, 0) for t in times]


@contextlib.contextmanager
def decoding(path):
    """Every exception inside becomes ``path``'s ``DecodeError`` (out of memory and permission errors
    ``transient``): a failure inside FFmpeg, DALI or the conversion is that file's problem only."""
    try:
        yield
    except DecodeError:
        raise
    except MemoryError as e:
        raise DecodeError(path, "out of memory while decoding", transient=True) from e
    except PermissionError as e:
        raise DecodeError(path, f"permission denied ({e})", transient=True) from e
    except Exception as e:
        raise DecodeError(path, f"{type(e).__name__}: {e}") from e


def check_file(path) -> None:
    """Raise ``DecodeError`` for a missing path, a non-file, an empty or an unreadable file."""
    if not os.path.exists(path):
        raise DecodeError(path, "file not found")
    if not os.path.isfile(path):
        raise DecodeError(path, "not a regular file")
    if os.path.getsize(path) == 0:
        raise DecodeError(path, "empty file (0 bytes)")
    if not os.access(path, os.R_OK):
        raise DecodeError(path, "permission denied", transient=True)


def check_pixels(path, width: int, height: int, max_pixels: int) -> None:
    """Refuse a frame size above ``max_pixels`` before any frame is decoded (a header without a size
    passes here: the decoder itself is given the same limit)."""
    if width * height > max_pixels:
        raise DecodeError(path, f"frame size {width}x{height} = {width * height:,} pixels exceeds the limit of "
                                f"{max_pixels:,} pixels (max_pixels)")


def resized_shape(height: int, width: int, resize_shorter: int) -> tuple[int, int]:
    """Size after scaling the shorter side to ``resize_shorter`` (the one ``Clip.to_source`` inverts)."""
    scale = resize_shorter / min(height, width)
    return max(round(height * scale), resize_shorter), max(round(width * scale), resize_shorter)


def frame_geometry(rotation: float | None, height: int, width: int,
                   resize_shorter: int) -> tuple[int, tuple[int, int], tuple[int, int]]:
    """For a decoded frame of ``height x width`` with display ``rotation`` (degrees counter-clockwise):
    the quarter turns that display it, its displayed (H, W), and the (h, w) to scale it to in its stored
    orientation so that, turned, its shorter side is ``resize_shorter`` (``resized_shape``)."""
    turns = round((rotation or 0) / 90) % 4
    displayed = (width, height) if turns % 2 else (height, width)
    h, w = resized_shape(*displayed, resize_shorter)
    return turns, displayed, ((w, h) if turns % 2 else (h, w))


def center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """The centre ``size x size`` of (..., H, W) at offset ``(H - size) // 2, (W - size) // 2``."""
    h, w = images.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    return images[..., top:top + size, left:left + size]


def resize_crop(images: list[torch.Tensor], resize_shorter: int, size: int) -> torch.Tensor:
    """uint8 (3, H, W) images of any sizes -> uint8 (T, 3, size, size): shorter side, then centre crop.

    Antialiased bilinear ``F.interpolate`` on full-resolution RGB: the reference the decoders'
    one-pass scaling is checked against (``tests/test_decode.py`` states the tolerance).
    """
    out = torch.empty((len(images), 3, size, size), dtype=torch.uint8)
    by_shape: dict[tuple[int, int], list[int]] = {}
    for i, img in enumerate(images):
        by_shape.setdefault(tuple(img.shape[-2:]), []).append(i)
    for (h, w), idx in by_shape.items():
        batch = torch.stack([images[i] for i in idx]).float()
        resized = F.interpolate(batch, size=resized_shape(h, w, resize_shorter), mode="bilinear",
                                align_corners=False, antialias=True)
        out[idx] = center_crop(resized, size).round().clamp(0, 255).to(torch.uint8)
    return out
