"""The decoded form of one video, shared by every decode backend and the synthetic benchmark."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Clip:
    """T uniformly sampled frames and, per frame, the log-mel of an audio window centred on it.

    ``frames`` is uint8 (T, 3, S, S): the source resized so its shorter side is ``resize_shorter``,
    then centre-cropped to S. ``mel`` is float32 (T, n_mels, n_steps). ``source_size`` is the
    original (H, W), so boxes in frame pixels map back to the video's own pixels (``to_source``).
    ``notes`` are one-line remarks on what decoding repaired or dropped (non-finite audio samples
    zeroed, a broken audio stream left out); empty for a clean file.
    """

    frames: torch.Tensor
    mel: torch.Tensor
    audio_present: bool
    duration: float
    fps: float
    source_size: tuple[int, int]
    resize_shorter: int
    frame_times: torch.Tensor | None = None
    path: str | None = None
    notes: list[str] = field(default_factory=list)  # what the decoder repaired or dropped (e.g. a broken audio stream)

    def __post_init__(self):
        if self.frames.dim() != 4 or self.frames.shape[1] != 3 or self.frames.dtype != torch.uint8:
            raise ValueError(f"frames must be uint8 (T, 3, S, S), got {self.frames.shape=} {self.frames.dtype=}")
        if self.frames.shape[2] != self.frames.shape[3]:
            raise ValueError(f"frames must be square, got {self.frames.shape=}")
        if self.mel.dim() != 3 or self.mel.shape[0] != self.frames.shape[0] or not self.mel.is_floating_point():
            raise ValueError(f"mel must be float (T, n_mels, n_steps) with T={self.frames.shape[0]}, "
                             f"got {self.mel.shape=} {self.mel.dtype=}")

    @property
    def num_frames(self) -> int:
        return self.frames.shape[0]

    @property
    def size(self) -> int:
        return self.frames.shape[-1]

    def _source_transform(self) -> tuple[float, torch.Tensor]:
        """(scale, offset): frame pixel = source pixel · scale − offset, offset as (y, x, y, x)."""
        h, w = self.source_size
        scale = self.resize_shorter / min(h, w)
        off_y = (round(h * scale) - self.size) // 2
        off_x = (round(w * scale) - self.size) // 2
        return scale, torch.tensor([off_y, off_x, off_y, off_x], dtype=torch.float32)

    def to_source(self, boxes: torch.Tensor) -> torch.Tensor:
        """Map (..., 4) boxes (y0, x0, y1, x1) in frame pixels to pixels of the source video."""
        scale, offset = self._source_transform()
        return (boxes.float() + offset.to(boxes.device)) / scale

    def to_frame(self, boxes: torch.Tensor) -> torch.Tensor:
        """Inverse of ``to_source``: (..., 4) boxes in source pixels to frame pixels."""
        scale, offset = self._source_transform()
        return boxes.float() * scale - offset.to(boxes.device)

    def __repr__(self) -> str:
        return (f"Clip(frames={tuple(self.frames.shape)} uint8, mel={tuple(self.mel.shape)}, "
                f"audio_present={self.audio_present}, duration={self.duration:.2f}s, fps={self.fps:.2f}, "
                f"source_size={self.source_size}, path={self.path!r})")
