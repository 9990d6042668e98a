"""Training-time augmentation of decoded batches: temporal jitter, random resized crop, flip, photometric
jitter on the frames; time/frequency masking and gain on the log-mel. Training only: eval and predict
never import this module.

Every augmentation is two pure functions: a *draw* that turns uniform numbers from a CPU
``torch.Generator`` into explicit parameters (indices, boxes, factors, spans), and an *apply* that
uses those parameters alone, so each is checked on a hand-computed case. One video gets one draw
shared by all its frames (the same crop, flip and colour on every frame: the clip stays one
coherent video); mel windows are masked each on its own. ``augment_batch`` runs them all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from avgn_fast.data.audio import LOG_EPS

_GREY = (0.299, 0.587, 0.114)  # ITU-R 601 luma weights, as torchvision's rgb_to_grayscale


@dataclass(frozen=True)
class Augmentation:
    """What ``augment_batch`` does to a training batch; every field has a value that turns it off.

    ``temporal_density``: the training decode keeps ``density * T`` frames (and their mel windows)
    and each epoch samples T of them, one at random in each of T equal segments (1: off).
    ``crop_min_scale``/``crop_max_ratio``: a box of area ``[min_scale, 1]`` of the frame and aspect
    (w/h) in ``[1/max_ratio, max_ratio]``, resized back to the frame size (min_scale 1: off).
    ``flip``: mirror left-right with probability 1/2 (off for labels a mirror changes).
    ``brightness``/``contrast``/``saturation``: factors uniform in ``[1 - x, 1 + x]`` (0: off).
    ``time_mask``/``freq_mask``: one span per mel window of up to this fraction of its steps/bins,
    set to the window's mean (0: off). ``gain_db``: every window of a video shifted by a gain uniform
    in ``[-gain_db, gain_db]`` dB (0: off). Audio augmentation skips videos without audio.
    """

    temporal_density: int = 1
    crop_min_scale: float = 0.8
    crop_max_ratio: float = 1.1
    flip: bool = True
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    time_mask: float = 0.2
    freq_mask: float = 0.15
    gain_db: float = 6.0

    def __post_init__(self):
        if (self.temporal_density < 1 or not 0 < self.crop_min_scale <= 1 or self.crop_max_ratio < 1
                or not 0 <= self.brightness <= 1 or not 0 <= self.contrast <= 1 or not 0 <= self.saturation <= 1
                or not 0 <= self.time_mask <= 1 or not 0 <= self.freq_mask <= 1 or self.gain_db < 0):
            raise ValueError(f"bad augmentation: {self}")

    @classmethod
    def off(cls) -> Augmentation:
        """Every augmentation turned off: training sees the clips as decoded."""
        return cls(temporal_density=1, crop_min_scale=1.0, crop_max_ratio=1.0, flip=False, brightness=0.0,
                   contrast=0.0, saturation=0.0, time_mask=0.0, freq_mask=0.0, gain_db=0.0)


# --- temporal jitter -------------------------------------------------------------------------------


def jitter_indices(n: int, t: int, u: torch.Tensor) -> torch.Tensor:
    """Int64 (..., t) indices into ``n`` decoded frames: segment ``i`` is ``[floor(i n / t), floor((i+1) n / t))``
    and ``u`` (..., t) in [0, 1) picks ``start + floor(u * length)`` in it. Always in ``[0, n)`` and increasing;
    ``n == t`` gives ``0..t-1`` whatever ``u``."""
    if n < t:
        raise ValueError(f"cannot sample {t} frames from {n}")
    bounds = torch.arange(t + 1, dtype=torch.int64) * n // t
    start, length = bounds[:-1], bounds[1:] - bounds[:-1]
    return start + (u * length).floor().long().clamp(max=length - 1)


def select_frames(frames: torch.Tensor, mel: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Frames (B, n, 3, S, S) and mel (B, n, M, L) at ``index`` (B, t): frame and mel window move together."""
    rows = torch.arange(frames.shape[0], device=frames.device)[:, None]
    index = index.to(frames.device)
    return frames[rows, index], mel[rows, index.to(mel.device)]


def centre_frames(frames: torch.Tensor, mel: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``t`` segment centres (``jitter_indices`` at u = 1/2) of frames (B, n, ...) and mel (B, n, ...):
    nothing random, and the input itself when ``n == t``."""
    if frames.shape[1] == t:
        return frames, mel
    return select_frames(frames, mel, jitter_indices(frames.shape[1], t, torch.full((frames.shape[0], t), 0.5)))


# --- spatial ---------------------------------------------------------------------------------------


def crop_boxes(u: torch.Tensor, size: int, min_scale: float, max_ratio: float) -> torch.Tensor:
    """Int64 (B, 4) boxes ``(top, left, h, w)`` inside a ``size x size`` frame from ``u`` (B, 4) in [0, 1).

    Area fraction ``s = min_scale + u0 (1 - min_scale)``, aspect ``r = max_ratio ** (2 u1 - 1)`` (log-uniform),
    ``w = round(size sqrt(s r))`` and ``h = round(size sqrt(s / r))`` clamped to ``[1, size]``, then
    ``top = floor(u2 (size - h + 1))`` and ``left = floor(u3 (size - w + 1))``.
    """
    scale = min_scale + u[:, 0].double() * (1 - min_scale)
    ratio = torch.tensor(max_ratio, dtype=torch.float64) ** (2 * u[:, 1].double() - 1)
    w = (size * (scale * ratio).sqrt()).round().long().clamp(1, size)
    h = (size * (scale / ratio).sqrt()).round().long().clamp(1, size)
    top = (u[:, 2].double() * (size - h + 1)).floor().long().clamp(max=size - h)
    left = (u[:, 3].double() * (size - w + 1)).floor().long().clamp(max=size - w)
    return torch.stack([top, left, h, w], dim=1)


def resized_crop(frames: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """uint8 (B, T, 3, S, S): each video's box ``(top, left, h, w)`` cut from every frame and resized to S x S
    (bilinear, ``align_corners=False``). A box never exceeds the frame, so this only enlarges; it runs in
    uint8 fixed point (7x faster than float on the CPU), within 1 of the rounded float result."""
    size = frames.shape[-1]
    out = torch.empty_like(frames)
    for b, (top, left, h, w) in enumerate(boxes.tolist()):
        out[b] = F.interpolate(frames[b, :, :, top:top + h, left:left + w], size=(size, size), mode="bilinear",
                               align_corners=False)
    return out


def flip(frames: torch.Tensor, mirrored: torch.Tensor) -> torch.Tensor:
    """Frames (B, T, 3, S, S) with the videos where ``mirrored`` (B,) bool is set mirrored left-right."""
    out = frames.clone()
    chosen = mirrored.to(frames.device).nonzero().flatten()
    out[chosen] = frames[chosen].flip(-1)
    return out


# --- photometric -----------------------------------------------------------------------------------


def photometric(frames: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """uint8 frames (B, T, 3, S, S) with ``factors`` (B, 3) = (brightness, contrast, saturation) per video.

    Brightness ``x b``, then contrast ``c x + (1 - c) mean(grey(x))`` (the mean over the frame), then
    saturation ``s x + (1 - s) grey(x)`` (per pixel), grey = 0.299 R + 0.587 G + 0.114 B. The three are
    affine and grey's weights sum to 1, so they compose to one pass,
    ``b c (s x + (1 - s) grey(x)) + b (1 - c) mean(grey(x))``, clamped to [0, 255] and rounded once (torchvision
    clamps after each step: the two differ only where an intermediate value leaves [0, 255]).
    """
    b, c, s = (factors.to(frames.device, torch.float32)[:, i].view(-1, 1, 1, 1, 1) for i in range(3))
    x = frames.float()
    grey = torch.mul(x[:, :, 0:1], _GREY[0]).add_(x[:, :, 1:2], alpha=_GREY[1]).add_(x[:, :, 2:3], alpha=_GREY[2])
    shift = grey.mul(b * c * (1 - s)).add_(grey.mean((-2, -1), keepdim=True) * (b * (1 - c)))
    return x.mul_(b * c * s).add_(shift).clamp_(0, 255).round_().to(torch.uint8)


def photometric_factors(u: torch.Tensor, strengths: tuple[float, float, float]) -> torch.Tensor:
    """(B, 3) factors ``1 + x (2 u - 1)`` from ``u`` (B, 3) in [0, 1) and strengths x = (brightness, contrast,
    saturation)."""
    return 1 + torch.tensor(strengths, dtype=u.dtype) * (2 * u - 1)


# --- audio -----------------------------------------------------------------------------------------


def mask_spans(u: torch.Tensor, length: int, max_width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(start, width) int64 of one span per ``u[..., 0:2]`` in [0, 1) along an axis of ``length``:
    ``width = floor(u0 (max_width + 1))`` (0 to ``max_width``), ``start = floor(u1 (length - width + 1))``."""
    max_width = min(max_width, length)
    width = (u[..., 0] * (max_width + 1)).floor().long().clamp(max=max_width)
    start = (u[..., 1] * (length - width + 1)).floor().long().clamp(max=length - width)
    return start, width


def mask_mel(mel: torch.Tensor, dim: int, start: torch.Tensor, width: torch.Tensor) -> torch.Tensor:
    """Mel (B, T, M, L) with positions ``[start, start + width)`` along ``dim`` (-2: mel bins, -1: time steps)
    of each window set to that window's mean (taken before masking); ``start``/``width`` are (B, T)."""
    positions = torch.arange(mel.shape[dim], device=mel.device)
    start, width = start.to(mel.device)[..., None], width.to(mel.device)[..., None]
    inside = (positions >= start) & (positions < start + width)  # (B, T, length)
    inside = inside[..., :, None] if dim in (-2, 2) else inside[..., None, :]
    return torch.where(inside, mel.mean((-2, -1), keepdim=True), mel)


def gain(mel: torch.Tensor, db: torch.Tensor) -> torch.Tensor:
    """Log-mel (B, T, M, L) of the audio scaled by ``db`` (B,) decibels of power: ``+ db ln(10) / 10``, floored
    at ``log(LOG_EPS)`` (the log-mel of silence, which the decoder's floor never goes below)."""
    shift = (db.to(mel.device, mel.dtype) * math.log(10) / 10).view(-1, 1, 1, 1)
    return (mel + shift).clamp(min=math.log(LOG_EPS))


# --- the whole batch -------------------------------------------------------------------------------


def augment_batch(frames: torch.Tensor, mel: torch.Tensor, audio_present: torch.Tensor, augmentation: Augmentation,
                  num_frames: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A training batch: frames uint8 (B, n, 3, S, S) and mel (B, n, M, L) of ``n >= num_frames`` decoded frames
    -> (frames (B, T, 3, S, S), mel (B, T, M, L)) with T = ``num_frames``, augmented as ``augmentation`` says.

    Random numbers come from ``generator`` (CPU) in a fixed order, so a batch is a pure function of its
    seed; the work runs on the tensors' device. With n > T and temporal jitter off, the T segment
    centres are taken.
    """
    a, (batch, n), size = augmentation, frames.shape[:2], frames.shape[-1]
    if a.temporal_density > 1:
        frames, mel = select_frames(frames, mel, jitter_indices(n, num_frames, torch.rand(batch, num_frames,
                                                                                          generator=generator)))
    else:
        frames, mel = centre_frames(frames, mel, num_frames)
    if a.crop_min_scale < 1:
        frames = resized_crop(frames, crop_boxes(torch.rand(batch, 4, generator=generator), size,
                                                 a.crop_min_scale, a.crop_max_ratio))
    if a.flip:
        frames = flip(frames, torch.rand(batch, generator=generator) < 0.5)
    strengths = (a.brightness, a.contrast, a.saturation)
    if any(strengths):
        frames = photometric(frames, photometric_factors(torch.rand(batch, 3, generator=generator), strengths))
    return frames, _augment_audio(mel, audio_present, a, generator)


def _augment_audio(mel: torch.Tensor, audio_present: torch.Tensor, a: Augmentation,
                   generator: torch.Generator) -> torch.Tensor:
    """Time mask, frequency mask and gain on the windows of videos with audio (silence stays silence)."""
    out = mel
    (batch, t), (bins, steps) = mel.shape[:2], mel.shape[-2:]
    if a.time_mask > 0:
        start, width = mask_spans(torch.rand(batch, t, 2, generator=generator), steps, int(a.time_mask * steps))
        out = mask_mel(out, -1, start, width)
    if a.freq_mask > 0:
        start, width = mask_spans(torch.rand(batch, t, 2, generator=generator), bins, int(a.freq_mask * bins))
        out = mask_mel(out, -2, start, width)
    if a.gain_db > 0:
        out = gain(out, a.gain_db * (2 * torch.rand(batch, generator=generator) - 1))
    present = audio_present.to(mel.device).view(-1, 1, 1, 1)
    return torch.where(present, out, mel)
