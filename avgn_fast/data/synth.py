"""AVSynth: a synthetic audio-visual benchmark on which each half of AVGN is needed.

A video is ``T`` segments of ``SEGMENT_S`` seconds (T = ``config.num_frames``), each held for
``FRAMES_PER_SEGMENT`` frames at ``SOURCE_FPS``, so the T uniformly sampled frame times (midpoints of
T equal segments of the duration) fall one per segment, between two identical frames, whatever
rounding a decoder uses. Source frames are S x S (S = ``config.frame_size``), audio is mono at
``config.sample_rate``.

The event of class ``c`` = (glyph, sound): for 1-2 segments a coloured disc carrying a light card
shows the class glyph while the class sound plays. Glyphs are 4 x 4 tiles of ``f = S // G`` pixels,
every tile holding ``f`` ink pixels through its centre (a line in one of four orientations), and
cards sit on the f-pixel grid, so area downsampling to G (or, for odd f, bilinear without
antialiasing) turns every glyph into the same grey square: unreadable at glance resolution,
readable in a P x P patch. Distractors: 4-6 runs of the same disc and card carrying a neutral
glyph (L-shaped tiles) and no sound; one other class's sound with no card on screen; plain discs.
Backgrounds, noise, motion, colours, pitch and loudness vary per video. Everything is a pure
function of ``(seed, index)``.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from avgn_fast.config import AVGNConfig
from avgn_fast.data.audio import frame_params, segments_log_mel, window_segments

SEGMENT_S = 0.25
FRAMES_PER_SEGMENT = 3
SOURCE_FPS = round(FRAMES_PER_SEGMENT / SEGMENT_S)  # 12
VERSION = 1  # bump when the rendering changes, so write_dataset refuses to mix versions in one folder

# Tile kinds, each f x f with f ink pixels through the centre. Lines make class glyphs, L shapes neutral ones.
H, V, D, A = 0, 1, 2, 3  # horizontal, vertical, diagonal, anti-diagonal line
L_TILES = (4, 5, 6, 7)  # L shapes opening to the four corners
GLYPHS = {
    "hstripes": (H,) * 16,
    "vstripes": (V,) * 16,
    "diagonal": (D,) * 16,
    "antidiag": (A,) * 16,
    "checker": tuple(H if (r + c) % 2 == 0 else V for r in range(4) for c in range(4)),
    "zigzag": tuple(D if r % 2 == 0 else A for r in range(4) for c in range(4)),
    "diamonds": tuple(D if (r + c) % 2 == 0 else A for r in range(4) for c in range(4)),
}
SOUNDS = ("chirp-up", "chirp-down", "two-tone", "clicks", "buzz", "hiss", "warble")
# (glyph, sound) per class, named "glyph+sound" and listed in sorted order so that a loader that sorts
# the names of labels.csv gets the same indices. checker+buzz / checker+hiss differ only in sound,
# diamonds+warble / zigzag+warble only in appearance.
_CLASSES = sorted([
    ("hstripes", "chirp-up"), ("vstripes", "chirp-down"), ("diagonal", "two-tone"), ("antidiag", "clicks"),
    ("checker", "buzz"), ("checker", "hiss"), ("zigzag", "warble"), ("diamonds", "warble"),
], key=lambda gs: f"{gs[0]}+{gs[1]}")
CLASS_NAMES = tuple(f"{g}+{s}" for g, s in _CLASSES)

DEFAULT_VIDEOS = 1800
DEFAULT_SPLITS = (1100 / 1800, 200 / 1800, 500 / 1800)  # 1,100 train / 200 val / 500 test at the default size
SPLIT_NAMES = ("train", "val", "test")

_CARD_TILES = 6  # card side in tiles: the 4 x 4 glyph plus a one-tile margin
_DISC_TILES = (4.5, 5.5)  # disc radius range in tiles: a coloured ring around the card
_EVENT_SEGMENTS = (1, 2)  # run lengths of the class event, the card distractors and the sound distractor
_DISTRACTOR_RUNS = (4, 6)  # inclusive range of neutral card runs
_SOUND_GAP = 2  # segments between the event and the sound distractor, so no frame's window hears both
_EVENT_DB = (-20.0, -8.0)  # RMS level of class and distractor sounds, dBFS
_NOISE_DB = (-42.0, -28.0)  # RMS level of the background noise, dBFS
_MEL_CHUNK = 64  # videos per batched log-mel in generate_tensors

# How far decoding a written file (PyAV path) may land from ``generate_tensors``, per video: mean
# absolute difference of the uint8 frames, of the luma inside the event's glyph, and of the log-mel
# (nats). Measured on 16 videos per format: at most 3.1, 3.3 and 0.21; a one-frame shift gives >= 9.7
# and >= 1.39, so the bounds still tell the right frames and windows from their neighbours.
CODEC_TOLERANCE = {"frame_mae": 4.0, "glyph_mae": 5.0, "mel_mae": 0.35}


@dataclass(frozen=True)
class CardRun:
    """A disc with a glyph card shown on consecutive segments ``[start, start + len(boxes))``.

    ``tiles`` are the 16 tile kinds of the 4 x 4 glyph, row-major; ``boxes`` the card's top-left
    (y, x) in frame pixels per segment, multiples of the tile size so the glyph sits on the G grid.
    """

    start: int
    tiles: tuple[int, ...]
    boxes: tuple[tuple[int, int], ...]

    @property
    def stop(self) -> int:
        return self.start + len(self.boxes)


@dataclass(frozen=True)
class Scene:
    """Ground truth of one AVSynth video: what is where and when; appearance comes from ``appearance_seed``.

    ``event`` carries the class glyph while the class sound plays; ``distractors`` carry neutral
    glyphs and no sound; ``sound_distractor`` is (sound index, start, stop) in segments, with no card.
    """

    label: int
    event: CardRun
    distractors: tuple[CardRun, ...]
    sound_distractor: tuple[int, int, int] | None
    appearance_seed: int

    @property
    def glyph(self) -> str:
        return _CLASSES[self.label][0]

    @property
    def sound(self) -> str:
        return _CLASSES[self.label][1]

    def card_boxes(self, tile: int) -> torch.Tensor:
        """int64 (n, 5) rows (segment, y0, x0, y1, x1) of every card shown, by segment; ``tile`` = ``tile_size``."""
        rows = [(s, y, x, y + _CARD_TILES * tile, x + _CARD_TILES * tile)
                for run in (self.event, *self.distractors) for s, (y, x) in enumerate(run.boxes, run.start)]
        return torch.tensor(sorted(rows), dtype=torch.int64).reshape(-1, 5)


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


def tile_size(config: AVGNConfig) -> int:
    """Glyph tile side in frame pixels (S // G); raises ValueError for configs AVSynth cannot serve."""
    f = config.frame_size // config.glance_size
    if f < 3 or config.frame_size % config.glance_size:
        raise ValueError(f"AVSynth needs frame_size = f x glance_size with a whole f >= 3, so the glyph is unreadable "
                         f"at glance resolution; got {config.frame_size=} {config.glance_size=}")
    if config.resize_shorter != config.frame_size:
        raise ValueError(f"AVSynth renders square S x S sources and needs resize_shorter == frame_size, got "
                         f"{config.resize_shorter=} {config.frame_size=}")
    if _CARD_TILES * f > config.patch_size:
        raise ValueError(f"the {_CARD_TILES * f}-pixel glyph card does not fit the {config.patch_size}-pixel patch")
    if config.num_frames < 8:
        raise ValueError(f"AVSynth needs num_frames >= 8 to place its event and distractors, got {config.num_frames}")
    return f


def sample_times(config: AVGNConfig) -> torch.Tensor:
    """The T frame times in seconds, float64: midpoints of T equal segments of the duration."""
    return (torch.arange(config.num_frames, dtype=torch.float64) + 0.5) * SEGMENT_S


def label_of(index: int, seed: int) -> int:
    """Class of video ``index``: each block of ``len(CLASS_NAMES)`` consecutive indices is a permutation."""
    c = len(CLASS_NAMES)
    return int(np.random.default_rng([seed, index // c, 1]).permutation(c)[index % c])


def sample_scene(index: int, *, seed: int, config: AVGNConfig) -> Scene:
    """Lay out video ``index``: event, distractor runs and sound distractor, on T segments."""
    f = tile_size(config)
    t = config.num_frames
    rng = np.random.default_rng([seed, index])
    label = label_of(index, seed)

    def run_length() -> int:
        return int(rng.integers(_EVENT_SEGMENTS[0], _EVENT_SEGMENTS[1] + 1))

    busy = np.zeros(t, dtype=bool)
    length = run_length()
    start = int(rng.integers(0, t - length + 1))
    busy[start:start + length] = True
    event = _card_run(rng, start, length, GLYPHS[_CLASSES[label][0]], f, config.frame_size)

    sound_distractor = None
    length = run_length()
    starts = [s for s in range(t - length + 1)
              if s + length + _SOUND_GAP <= event.start or s >= event.stop + _SOUND_GAP]
    if starts:
        s = int(rng.choice(starts))
        others = [i for i, name in enumerate(SOUNDS) if name != _CLASSES[label][1]]
        sound_distractor = (int(rng.choice(others)), s, s + length)
        busy[s:s + length] = True

    distractors = []
    for _ in range(int(rng.integers(_DISTRACTOR_RUNS[0], _DISTRACTOR_RUNS[1] + 1))):
        length = run_length()
        starts = [s for s in range(t - length + 1) if not busy[s:s + length].any()]
        if not starts:
            continue
        s = int(rng.choice(starts))
        busy[s:s + length] = True
        tiles = tuple(int(k) for k in rng.choice(L_TILES, 16))
        distractors.append(_card_run(rng, s, length, tiles, f, config.frame_size))
    distractors.sort(key=lambda run: run.start)
    return Scene(label, event, tuple(distractors), sound_distractor, int(rng.integers(2**62)))


def _card_run(rng: np.random.Generator, start: int, length: int, tiles: tuple[int, ...], f: int,
              size: int) -> CardRun:
    """Card positions on the tile grid, a tile inside the frame, moving up to one tile per segment (bouncing)."""
    lo, hi = 1, size // f - _CARD_TILES - 1  # card top-left in tiles: the card stays a tile inside the frame
    pos = rng.integers(lo, hi + 1, 2)
    vel = rng.integers(-1, 2, 2)
    boxes = []
    for _ in range(length):
        boxes.append((int(pos[0] * f), int(pos[1] * f)))
        nxt = pos + vel
        vel = np.where((nxt < lo) | (nxt > hi), -vel, vel)
        pos = np.clip(pos + vel, lo, hi)
    return CardRun(start, tiles, tuple(boxes))


def render_scene(scene: Scene, config: AVGNConfig) -> RenderedVideo:
    """Source frames at ``SOURCE_FPS`` and the mono wave of ``scene``."""
    segments = _render_segments(scene, config)
    frames = torch.from_numpy(segments).repeat_interleave(FRAMES_PER_SEGMENT, dim=0)
    wave = torch.from_numpy(_render_wave(scene, config))
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
    card = _CARD_TILES * f
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


def _sound(kind: str, n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    """Unit-RMS float64 (n,) waveform of one sound kind, pitch jittered by +-10 %, 10 ms fades."""
    t = np.arange(n) / sr
    dur = n / sr
    p = rng.uniform(0.9, 1.1)
    nyq = 0.45 * sr
    if kind in ("chirp-up", "chirp-down"):
        f0, f1 = (300 * p, min(2000 * p, nyq)) if kind == "chirp-up" else (min(2000 * p, nyq), 300 * p)
        k = math.log(f1 / f0)
        x = np.sin(2 * math.pi * f0 * dur / k * (np.exp(k * t / dur) - 1))
    elif kind == "two-tone":
        freq = np.where(np.floor(t * 16) % 2 == 0, 500 * p, 1000 * p)
        x = np.sin(2 * math.pi * np.cumsum(freq) / sr)
    elif kind == "clicks":
        period = 1 / (25 * p)
        x = np.exp(-(t % period) / 0.004) * rng.normal(size=n)
    elif kind == "buzz":
        f0 = 140 * p
        harmonics = np.arange(1, int(nyq // f0) + 1)
        x = (np.sin(2 * math.pi * f0 * harmonics[:, None] * t) / harmonics[:, None]).sum(0)
    elif kind == "hiss":
        x = _band_noise(rng, n, sr, 2000 * p, min(3500 * p, nyq))
    elif kind == "warble":
        x = np.sin(2 * math.pi * 900 * p * t - (250 / 10) * np.cos(2 * math.pi * 10 * t))
    else:
        raise ValueError(f"unknown sound {kind!r}; known: {', '.join(SOUNDS)}")
    fade = min(n // 2, round(0.01 * sr))
    ramp = 0.5 - 0.5 * np.cos(np.pi * np.arange(fade) / fade)
    x[:fade] *= ramp
    x[n - fade:] *= ramp[::-1]
    return x / max(np.sqrt(np.mean(x**2)), 1e-12)


def _band_noise(rng: np.random.Generator, n: int, sr: int, lo: float, hi: float) -> np.ndarray:
    spec = np.fft.rfft(rng.normal(size=n))
    freqs = np.fft.rfftfreq(n, 1 / sr)
    return np.fft.irfft(spec * ((freqs >= lo) & (freqs <= hi)), n)


def _render_wave(scene: Scene, config: AVGNConfig) -> np.ndarray:
    """float32 (T * SEGMENT_S * sample_rate,): coloured background noise, maybe hum, event and distractor sounds."""
    sr = config.sample_rate
    n = round(config.num_frames * SEGMENT_S * sr)
    rng = np.random.default_rng([scene.appearance_seed, 1])

    def db(lo_hi: tuple[float, float]) -> float:
        return 10 ** (rng.uniform(*lo_hi) / 20)

    slope = rng.uniform(0.0, 2.0)  # noise power ~ 1 / f^slope: white to brown
    spec = np.fft.rfft(rng.normal(size=n))
    freqs = np.fft.rfftfreq(n, 1 / sr)
    spec[1:] *= freqs[1:] ** (-slope / 2)
    spec[0] = 0
    noise = np.fft.irfft(spec, n)
    wave = noise / np.sqrt(np.mean(noise**2)) * db(_NOISE_DB)
    if rng.uniform() < 0.5:
        hum, t = rng.uniform(50, 150), np.arange(n) / sr
        wave += db((-40.0, -30.0)) * sum(np.sin(2 * math.pi * k * hum * t + rng.uniform(0, 6.3)) / k for k in (1, 2, 3))

    placed = [(_CLASSES[scene.label][1], scene.event.start, scene.event.stop)]
    if scene.sound_distractor is not None:
        kind, start, stop = scene.sound_distractor
        placed.append((SOUNDS[kind], start, stop))
    for kind, start, stop in placed:
        a, b = round(start * SEGMENT_S * sr), round(stop * SEGMENT_S * sr)
        wave[a:b] += db(_EVENT_DB) * _sound(kind, b - a, sr, rng)
    return np.clip(wave, -1.0, 1.0).astype(np.float32)


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
            wave = torch.from_numpy(_render_wave(scene, config))
            segments.append(window_segments(wave, config.sample_rate, times, **stft))
            labels[i] = scene.label
        mel[lo:hi] = segments_log_mel(torch.cat(segments), config.sample_rate, n_mels=config.n_mels,
                                      **stft).reshape(hi - lo, t, config.n_mels, n_steps)
    return SynthBatch(frames=frames, mel=mel, labels=labels, class_names=CLASS_NAMES,
                      audio_present=torch.ones(num_videos, dtype=torch.bool))


def split_counts(num_videos: int, splits: Sequence[float] = DEFAULT_SPLITS) -> tuple[int, int, int]:
    """Videos per (train, val, test): train and val rounded from their fractions, test the rest."""
    if len(splits) != 3 or min(splits) < 0 or abs(sum(splits) - 1) > 1e-6:
        raise ValueError(f"splits must be three non-negative fractions (train, val, test) summing to 1, got {splits}")
    n_train = round(num_videos * splits[0])
    n_val = min(round(num_videos * splits[1]), num_videos - n_train)
    return n_train, n_val, num_videos - n_train - n_val


def split_of(index: int, counts: Sequence[int]) -> str:
    """Split of video ``index``: the first ``counts[0]`` indices train, the next ``counts[1]`` val, then test."""
    return SPLIT_NAMES[0] if index < counts[0] else SPLIT_NAMES[1] if index < counts[0] + counts[1] else SPLIT_NAMES[2]


_CODECS = {
    # container suffix: (video encoder, its options, audio encoder, audio bit rate)
    "mp4": ("libx264", {"crf": "12", "preset": "medium"}, "aac", 48_000),
    "webm": ("libvpx-vp9", {"crf": "12", "b": "0", "deadline": "good", "cpu-used": "4"}, "libopus", 48_000),
}


def write_video(video: RenderedVideo, path) -> None:
    """Encode ``video`` with PyAV, H.264 + AAC for ``.mp4`` and VP9 + Opus for ``.webm``; written atomically."""
    import av

    path = Path(path)
    fmt = path.suffix.lstrip(".")
    if fmt not in _CODECS:
        raise ValueError(f"unsupported container {path.suffix!r}; AVSynth writes {', '.join(_CODECS)}")
    vcodec, options, acodec, abitrate = _CODECS[fmt]
    tmp = path.with_name(f".{path.name}.tmp")
    frames = video.frames.numpy()
    with av.open(str(tmp), "w", format=fmt) as container:
        vstream = container.add_stream(vcodec, rate=video.fps, options=options)
        vstream.width, vstream.height = frames.shape[2], frames.shape[1]
        vstream.pix_fmt = "yuv420p"
        astream = container.add_stream(acodec, rate=video.sample_rate, layout="mono")
        astream.bit_rate = abitrate
        for i, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = i
            container.mux(vstream.encode(frame))
        container.mux(vstream.encode())
        wave = video.wave.numpy()[None]
        chunk = astream.codec_context.frame_size or 1024
        for start in range(0, wave.shape[1], chunk):
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(wave[:, start:start + chunk]), format="fltp",
                                               layout="mono")
            frame.sample_rate, frame.pts, frame.time_base = video.sample_rate, start, Fraction(1, video.sample_rate)
            container.mux(astream.encode(frame))
        container.mux(astream.encode())
    os.replace(tmp, path)


def write_dataset(out_dir, num_videos: int = DEFAULT_VIDEOS, *, seed: int = 0, fmt: str = "mp4",
                  config: AVGNConfig | None = None, splits: Sequence[float] = DEFAULT_SPLITS) -> Path:
    """Write AVSynth to ``out_dir``: ``videos/NNNNN.<fmt>``, ``labels.csv`` (path,label,split) and ``README.md``.

    ``config`` (default ``tiny``) sets T, S, G, P and the sample rate. Files already written with the
    same seed, format and rendering are kept, so re-running only adds what is missing; a folder
    written with other settings raises ValueError. Returns ``out_dir`` as a Path.
    """
    from tqdm import tqdm

    config = AVGNConfig.from_name("tiny") if config is None else config
    if fmt not in _CODECS:
        raise ValueError(f"fmt must be one of {', '.join(_CODECS)}, got {fmt!r}")
    if num_videos < 1:
        raise ValueError(f"num_videos must be >= 1, got {num_videos}")
    tile_size(config)
    counts = split_counts(num_videos, splits)
    out = Path(out_dir)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    _check_manifest(out, {"version": VERSION, "seed": seed, "format": fmt, "num_frames": config.num_frames,
                          "frame_size": config.frame_size, "glance_size": config.glance_size,
                          "patch_size": config.patch_size, "sample_rate": config.sample_rate})
    rows, scenes = [], []
    for index in tqdm(range(num_videos), desc="AVSynth", unit="video"):
        rel = f"videos/{index:05d}.{fmt}"
        scene = sample_scene(index, seed=seed, config=config)
        if not (out / rel).is_file():
            write_video(render_scene(scene, config), out / rel)
        rows.append((rel, CLASS_NAMES[scene.label], split_of(index, counts)))
        scenes.append(scene)
    with open(out / "labels.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(("path", "label", "split"))
        writer.writerows(rows)
    (out / "README.md").write_text(_readme(scenes, counts, seed=seed, fmt=fmt, config=config))
    return out


def _check_manifest(out: Path, manifest: dict) -> None:
    path = out / "avsynth.json"
    if path.is_file():
        found = json.loads(path.read_text())
        if found != manifest:
            raise ValueError(f"{out} holds AVSynth written with {found}; these arguments give {manifest}. "
                             f"Use another output folder.")
    else:
        path.write_text(json.dumps(manifest, indent=1) + "\n")


def _readme(scenes: list[Scene], counts: Sequence[int], *, seed: int, fmt: str, config: AVGNConfig) -> str:
    """The dataset folder's README: the task, the classes, what each modality carries, the generation settings."""
    f, t = tile_size(config), config.num_frames
    codecs = "H.264 (yuv420p) + AAC" if fmt == "mp4" else "VP9 (yuv420p) + Opus"
    card_frames = np.mean([sum(len(r.boxes) for r in (s.event, *s.distractors)) / t for s in scenes])
    event_frames = np.mean([len(s.event.boxes) for s in scenes])
    runs = np.mean([len(s.distractors) for s in scenes])
    with_sound = np.mean([s.sound_distractor is not None for s in scenes])
    # a visual-only glance that finds every card run and keeps one frame of each of K runs reaches the event
    reach = np.mean([min(1.0, config.k / (1 + len(s.distractors))) for s in scenes])
    ceiling = reach * 15 / 16 + (1 - reach) / len(CLASS_NAMES)
    table = "\n".join(f"| {i} | `{name}` | {g} | {s} |" for i, (name, (g, s)) in enumerate(zip(CLASS_NAMES, _CLASSES,
                                                                                          strict=True)))
    return f"""# AVSynth

A synthetic audio-visual video classification benchmark on which each half of the Audio-Visual
Glance Network is needed: the class shows in one or two of the {t} sampled frames, its visual
detail is readable only at full resolution, and finding it needs the sound.

Written by `avgn-fast synth --videos {len(scenes)} --seed {seed} --format {fmt}` with the `{config.name}`
configuration (T={t}, S={config.frame_size}, G={config.glance_size}, P={config.patch_size}, K={config.k}; generator
version {VERSION}); re-running the same command in this folder keeps the files already here.

## Files

- `videos/NNNNN.{fmt}`: {codecs}. {t * SEGMENT_S:g} s, {SOURCE_FPS} fps, {config.frame_size}x{config.frame_size}
  pixels, mono audio at {config.sample_rate} Hz. The video is {t} segments of {SEGMENT_S} s, each held for
  {FRAMES_PER_SEGMENT} identical frames, so the {t} uniformly sampled frames (midpoints of {t} equal segments of
  the duration) are one per segment whatever rounding a decoder uses.
- `labels.csv`: `path,label,split`; {counts[0]} train, {counts[1]} val, {counts[2]} test videos, every split
  balanced over the classes (labels come in shuffled blocks of {len(CLASS_NAMES)}).
- `avsynth.json`: the generation settings this folder was written with.

The same videos are available as decoded tensors without any file:
`avgn_fast.data.synth.generate_tensors(N, config=config, seed={seed})` gives what decoding these files
gives, up to codec loss (bounds in `avgn_fast.data.synth.CODEC_TOLERANCE`).

## Task

Class = (glyph, sound), {len(CLASS_NAMES)} classes; label index = row of this table (the names sort in this order):

| index | name | glyph | sound |
|---|---|---|---|
{table}

`checker+buzz` and `checker+hiss` differ only in sound; `diamonds+warble` and `zigzag+warble` only in
appearance.

**Video.** Coloured discs move over varying backgrounds (colour gradients, drifting soft blobs, noise).
Some discs carry a light card with a {4 * f}x{4 * f}-pixel glyph: 4x4 tiles of {f}x{f} pixels, every tile
with {f} dark pixels through its centre (a line in one of four orientations for the class glyphs, an L
shape for the neutral glyph). The class glyph is on screen only during the event: {event_frames:.2f} of
the {t} sampled frames on average. Neutral cards (distractors, {runs:.1f} runs of 1-2 segments per video)
look the same at glance resolution: cards are on screen in {100 * card_frames:.0f} % of the sampled frames.

**Audio.** The class sound plays exactly while the event card is on screen. Another class's sound
plays at a time with no card on screen ({100 * with_sound:.0f} % of videos), at least {_SOUND_GAP} segments away
from the event so that no frame's {config.audio_window_s:g} s window holds both. Background noise (white to
brown) and sometimes a hum; sound levels {_EVENT_DB[0]:g} to {_EVENT_DB[1]:g} dBFS, noise {_NOISE_DB[0]:g} to
{_NOISE_DB[1]:g} dBFS, pitch +-10 %.

## Why each half of AVGN is needed

- **Spatial glance.** Downsampling {config.frame_size} -> {config.glance_size} averages each {f}x{f} tile to
  the same grey, so every glyph, class or neutral, is the same grey square at glance resolution
  (exactly for area / box downsampling and for bilinear without antialiasing; antialiased bilinear or
  bicubic filters leave faint edge artefacts, so use `mode="area"`). In a {config.patch_size}x{config.patch_size}
  full-resolution patch around the card the glyph is plain to read.
- **Temporal glance with audio.** The frames worth a patch are those with a card *and* the sound. Without
  audio the event cannot be told from the neutral cards at glance resolution, so a visual-only glance
  keeping K of {t} frames spends patches on distractors: even one that finds every card run and keeps
  one frame from each of K = {config.k} runs reaches the event in {100 * reach:.0f} % of these videos, a
  top-1 ceiling of about {100 * ceiling:.0f} % (guessing the rest). With the sound, all K frames can go to
  the event and its neighbours.
- **Audio for the class.** Even with the event found, the glyph cannot separate `checker+buzz` from
  `checker+hiss`: a visual-only model tops out at 15/16 = 93.75 % however it chooses frames.
- **Video for the class.** The sound cannot separate `diamonds+warble` from `zigzag+warble`, and the second
  class sound ({100 * with_sound:.0f} % of videos) means audio alone cannot tell which sound is the event.
"""
