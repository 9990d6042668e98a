"""Source media of an AVSynth scene: frames and wave (``render_scene``), or the decoded-equivalent tensors of many
videos without any file (``generate_tensors``)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from avgn_fast.config import AVGNConfig
from avgn_fast.data.audio import frame_params, segments_log_mel, window_segments
from avgn_fast.data.synth.scene import (
    CARD_TILES,
    CLASS_NAMES,
    FRAMES_PER_SEGMENT,
    L_TILES,
    SOURCE_FPS,
    A,
    D,
    H,
    Scene,
    V,
    sample_scene,
    sample_times,
    tile_size,
)
from avgn_fast.data.synth.sound import render_wave

VERSION = 1  # bump when the rendering changes, so write_dataset refuses to mix versions in one folder

_DISC_TILES = (4.5, 5.5)  # disc radius range in tiles: a coloured ring around the card
_MEL_CHUNK = 64  # videos per batched log-mel in generate_tensors


@dataclass
class RenderedVideo:
    """Source media of one video: uint8 (F, H, W, 3) frames at ``fps``, float32 (samples,) mono audio."""

    frames: torch.Tensor
    wave: torch.Tensor
    fps: int
    sample_rate: int
    label: int
    scene: Scene

    def __post_init__(self):
        if self.frames.dim() != 4 or self.frames.shape[-1] != 3 or self.frames.dtype != torch.uint8:
            raise ValueError(f"frames must be uint8 (F, H, W, 3), got {self.frames.shape=} {self.frames.dtype=}")
        if self.wave.dim() != 1 or self.wave.dtype != torch.float32:
            raise ValueError(f"wave must be float32 (samples,), got {self.wave.shape=} {self.wave.dtype=}")

    @property
    def duration(self) -> float:
        return self.frames.shape[0] / self.fps

    def __repr__(self) -> str:
        return (f"RenderedVideo(frames={tuple(self.frames.shape)} uint8 @ {self.fps} fps, "
                f"wave={tuple(self.wave.shape)} @ {self.sample_rate} Hz, label={self.label} "
                f"({CLASS_NAMES[self.label]}))")


@dataclass
class SynthBatch:
    """Decoded-equivalent tensors of N videos: what ``decode_clip_for`` gives on their files, up to codec loss."""

    frames: torch.Tensor  # uint8 (N, T, 3, S, S)
    mel: torch.Tensor  # float32 (N, T, n_mels, n_steps)
    labels: torch.Tensor  # int64 (N,)
    class_names: tuple[str, ...]
    audio_present: torch.Tensor  # bool (N,)

    def __post_init__(self):
        n = self.labels.shape[0]
        if self.frames.dim() != 5 or self.frames.shape[:1] != (n,) or self.frames.dtype != torch.uint8:
            raise ValueError(f"frames must be uint8 (N, T, 3, S, S) with N={n}, got {self.frames.shape=}")
        if self.mel.dim() != 4 or self.mel.shape[:2] != self.frames.shape[:2] or self.mel.dtype != torch.float32:
            raise ValueError(f"mel must be float32 (N, T, n_mels, n_steps), got {self.mel.shape=} {self.mel.dtype=}")
        present = self.audio_present
        if self.labels.dtype != torch.int64 or present.dtype != torch.bool or present.shape != (n,):
            raise ValueError(f"labels must be int64 (N,), audio_present bool (N,): {self.labels.dtype=} "
                             f"{self.audio_present.shape=} {self.audio_present.dtype=}")

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __repr__(self) -> str:
        return (f"SynthBatch(frames={tuple(self.frames.shape)} uint8, mel={tuple(self.mel.shape)} float32, "
                f"labels={tuple(self.labels.shape)}, classes={len(self.class_names)})")


def render_scene(scene: Scene, config: AVGNConfig) -> RenderedVideo:
    """Source frames at ``SOURCE_FPS`` and the mono wave of ``scene``."""
    segments = _render_segments(scene, config)
    frames = torch.from_numpy(segments).repeat_interleave(FRAMES_PER_SEGMENT, dim=0)
    wave = torch.from_numpy(render_wave(scene, config))
    return RenderedVideo(frames, wave, SOURCE_FPS, config.sample_rate, scene.label, scene)


def render_video(index: int, *, seed: int, config: AVGNConfig) -> RenderedVideo:
    """Video ``index`` of the AVSynth dataset with ``seed``; deterministic per (seed, index)."""
    return render_scene(sample_scene(index, seed=seed, config=config), config)


def _tile_patterns(f: int) -> np.ndarray:
    """bool (8, f, f): the four lines, then the four L shapes; each has f ink pixels including the centre."""
    m = f // 2
    pats = np.zeros((8, f, f), dtype=bool)
    pats[H, m, :] = True
    pats[V, :, m] = True
    pats[D] = np.eye(f, dtype=bool)
    pats[A] = np.fliplr(np.eye(f, dtype=bool))
    a = (f - 1) // 2  # arm lengths a and f - 1 - a: f pixels with the centre
    b = f - 1 - a
    for k, (dy, dx) in zip(L_TILES, ((-1, -1), (-1, 1), (1, 1), (1, -1)), strict=True):
        pats[k, m, m] = True
        for i in range(1, a + 1):
            pats[k, m, m + dx * i] = True
        for i in range(1, b + 1):
            pats[k, m + dy * i, m] = True
    return pats


def glyph_mask(tiles: Sequence[int], f: int) -> np.ndarray:
    """bool (4f, 4f) ink mask of a glyph made of 16 tile kinds (row-major)."""
    pats = _tile_patterns(f)[np.asarray(tiles)].reshape(4, 4, f, f)
    return pats.transpose(0, 2, 1, 3).reshape(4 * f, 4 * f)


def _hsv_colour(rng: np.random.Generator, s: tuple[float, float], v: tuple[float, float]) -> np.ndarray:
    h = rng.uniform(0, 6)
    sat, val = rng.uniform(*s), rng.uniform(*v)
    rgb = np.clip(np.abs((h + np.array([0.0, 4.0, 2.0])) % 6 - 3) - 1, 0, 1)
    return (255 * val * (1 - sat + sat * rgb)).astype(np.float32)


def _render_segments(scene: Scene, config: AVGNConfig) -> np.ndarray:
    """uint8 (T, S, S, 3): one image per segment."""
    f, size, t = tile_size(config), config.frame_size, config.num_frames
    rng = np.random.default_rng([scene.appearance_seed, 0])
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    axis = np.arange(size, dtype=np.float32)
    seg = np.arange(t, dtype=np.float32)[:, None, None]

    # background: drifting soft blobs (separable Gaussians, sum_k gy[k] (x) gx[k] (x) amp[k] as one
    # batched matmul over segments) on a two-colour gradient at a random angle
    c0, c1 = _hsv_colour(rng, (0.1, 0.7), (0.15, 0.6)), _hsv_colour(rng, (0.1, 0.7), (0.15, 0.6))
    angle = rng.uniform(0, 2 * math.pi)
    ramp = (np.cos(angle) * xx + np.sin(angle) * yy) / size
    ramp = (ramp - ramp.min()) / (ramp.max() - ramp.min())
    centre, drift = rng.uniform(0, size, (2, 3, 1, 1)), rng.uniform(-2, 2, (2, 3, 1, 1))
    sigma = rng.uniform(0.1, 0.3, (3, 1, 1)) * size
    amp = rng.uniform(-60, 60, (3, 3)).astype(np.float32)  # (blob, channel)
    pos = (axis - centre - drift * np.arange(t)[:, None]) / sigma  # (2, blob, T, S)
    gy, gx = np.exp(-0.5 * pos.astype(np.float32) ** 2)
    spread = (gx[:, :, :, None] * amp[:, None, None, :]).transpose(1, 0, 2, 3).reshape(t, 3, size * 3)
    img = np.matmul(gy.transpose(1, 2, 0), spread).reshape(t, size, size, 3)
    img += c0 + (c1 - c0) * ramp[..., None]

    # plain discs, on screen throughout
    for _ in range(int(rng.integers(1, 3))):
        centre, drift = rng.uniform(0.15 * size, 0.85 * size, 2), rng.uniform(-3, 3, 2)
        radius = rng.uniform(2.5, 4.5) * f
        dy = (axis - centre[0] - drift[0] * seg[:, :, 0]) ** 2  # (T, S)
        dx = (axis - centre[1] - drift[1] * seg[:, :, 0]) ** 2
        img[dy[:, :, None] + dx[:, None, :] <= radius**2] = _hsv_colour(rng, (0.6, 1.0), (0.6, 1.0))

    # card runs: disc, light card, dark glyph; every run draws the same colours whatever its glyph
    card = CARD_TILES * f
    for run in (scene.event, *scene.distractors):
        disc = _hsv_colour(rng, (0.6, 1.0), (0.6, 1.0))
        paper, ink = _hsv_colour(rng, (0.0, 0.15), (0.85, 1.0)), _hsv_colour(rng, (0.0, 0.5), (0.0, 0.15))
        radius = rng.uniform(*_DISC_TILES) * f
        glyph = glyph_mask(run.tiles, f)
        for s, (y, x) in enumerate(run.boxes, run.start):
            cy, cx = y + card / 2, x + card / 2
            img[s][(yy + 0.5 - cy) ** 2 + (xx + 0.5 - cx) ** 2 <= radius**2] = disc
            img[s, y:y + card, x:x + card] = paper
            img[s, y + f:y + f + 4 * f, x + f:x + f + 4 * f][glyph] = ink

    # grey uniform noise of standard deviation sigma (cheaper than normals, and codecs keep luma best)
    sigma = rng.uniform(2.0, 6.0)
    img += (rng.random((t, size, size, 1), dtype=np.float32) - 0.5) * np.float32(sigma * math.sqrt(12))
    np.clip(img, 0, 255, out=img)
    return (img + 0.5).astype(np.uint8)


def generate_tensors(num_videos: int, *, config: AVGNConfig, seed: int = 0, start: int = 0) -> SynthBatch:
    """Videos ``start .. start + num_videos - 1`` as decoded tensors, without encoding any file.

    Frames are the source frames shown at the T ``sample_times`` (no resize: sources are S x S); the
    mel is ``log_mel_windows`` of the source wave at the same times with the config's settings
    (computed as ``window_segments`` + ``segments_log_mel``, batched over ``_MEL_CHUNK`` videos).
    Decoding the files of ``write_dataset`` gives these within ``CODEC_TOLERANCE``.
    """
    if num_videos < 0:
        raise ValueError(f"num_videos must be >= 0, got {num_videos}")
    tile_size(config)
    times = sample_times(config)
    picks = torch.floor(times * SOURCE_FPS).long() // FRAMES_PER_SEGMENT  # the segment of each sampled frame
    stft = {"window_s": config.audio_window_s, "win_ms": config.win_ms, "hop_ms": config.hop_ms}
    n_steps = frame_params(config.sample_rate, **stft).n_steps
    s, t = config.frame_size, config.num_frames
    frames = torch.empty((num_videos, t, 3, s, s), dtype=torch.uint8)
    mel = torch.empty((num_videos, t, config.n_mels, n_steps), dtype=torch.float32)
    labels = torch.empty(num_videos, dtype=torch.int64)
    for lo in range(0, num_videos, _MEL_CHUNK):
        hi = min(lo + _MEL_CHUNK, num_videos)
        segments = []
        for i in range(lo, hi):
            scene = sample_scene(start + i, seed=seed, config=config)
            frames[i] = torch.from_numpy(_render_segments(scene, config))[picks].permute(0, 3, 1, 2)
            wave = torch.from_numpy(render_wave(scene, config))
            segments.append(window_segments(wave, config.sample_rate, times, **stft))
            labels[i] = scene.label
        mel[lo:hi] = segments_log_mel(torch.cat(segments), config.sample_rate, n_mels=config.n_mels,
                                      **stft).reshape(hi - lo, t, config.n_mels, n_steps)
    return SynthBatch(frames=frames, mel=mel, labels=labels, class_names=CLASS_NAMES,
                      audio_present=torch.ones(num_videos, dtype=torch.bool))
