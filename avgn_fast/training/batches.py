"""What ``fit`` reads: training batches augmented and, when asked, mixed (mixup / CutMix); validation batches as
decoded.

Mixing pairs each video ``i`` of a batch with a partner ``partner[i]`` (a random permutation of the batch) and
keeps a share ``lam[i]`` of video ``i``: its label becomes the soft target ``lam · onehot(y_i) + (1 - lam) ·
onehot(y_partner)``, which every loss term accepts (``avgn_fast.training.losses``). Like the augmentations, mixing
is a *draw* (``draw_mixing``: uniform numbers from a CPU ``torch.Generator`` turned into partners, shares, boxes
and spans) and an *apply* (``mix_batch``: those parameters alone), so each is checked on a hand-computed case.

- **Mixup** blends the whole clip: every frame ``lam · x_i + (1 - lam) · x_partner``, rounded half up to uint8 (in
  7-bit fixed point, 3x faster than float on the CPU: mixup's ``lam`` is drawn on a grid of 1/128), and
  each mel window mixed as power, ``log(lam · e^m_i + (1 - lam) · e^m_partner)``: what the log-mel of the two
  sounds played together at those power weights is (for sounds that do not cancel), where averaging the logs
  would give their geometric mean, a sound neither video has. Silence mixed with silence stays silence.
- **CutMix** pastes the partner's box into every frame of the video (the same box on every frame, so the pasted
  region is one coherent moving object, not a flicker), and the mel by time span: the same contiguous span of
  time steps in every window is taken from the partner, its length the box's share of the frame (rounded to
  whole steps). Both modalities then carry the same ``1 - lam`` of the partner, the share the target gives it.
  ``lam`` is the share left after the box is clipped to the frame, as in the CutMix paper.

``lam`` is drawn from Beta(alpha, alpha) (Jöhnk's method, ``beta_from_uniforms``), one per video. With both
mixup and CutMix on, each batch is one or the other with probability 1/2. A video mixed with itself (the
permutation may fix it) is unchanged. Audio is present in a mixed video when either video had it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Mixing:
    """Beta concentrations of mixup and CutMix (``alpha``: 0.2-0.4 usual for mixup, 1 for CutMix); 0: off."""

    mixup: float = 0.0
    cutmix: float = 0.0

    def __post_init__(self):
        if not (self.mixup >= 0 and self.cutmix >= 0 and math.isfinite(self.mixup) and math.isfinite(self.cutmix)):
            raise ValueError(f"mixup and cutmix are Beta concentrations ≥ 0 (0: off), got {self}")

    @property
    def on(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0


@dataclass(frozen=True)
class MixDraw:
    """One batch's mixing: video ``i`` keeps the share ``lam[i]`` (float64, (B,)) and takes the rest from video
    ``partner[i]`` (int64, (B,)); for CutMix also the partner's ``boxes`` (int64 (B, 4): top, left, h, w) and mel
    time ``spans`` (int64 (B, 2): start, width); None for mixup, whose ``lam`` are multiples of 1/128."""

    partner: torch.Tensor
    lam: torch.Tensor
    boxes: torch.Tensor | None = None
    spans: torch.Tensor | None = None

    def __post_init__(self):
        b = self.partner.shape[0]
        if (self.lam.shape != (b,) or (self.boxes is None) != (self.spans is None)
                or (self.boxes is not None and (self.boxes.shape != (b, 4) or self.spans.shape != (b, 2)))):
            raise ValueError(f"bad MixDraw: {self.partner.shape=} {self.lam.shape=} "
                             f"{None if self.boxes is None else self.boxes.shape=} "
                             f"{None if self.spans is None else self.spans.shape=}")


def beta_from_uniforms(u: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Jöhnk's Beta(alpha, alpha) sampler on pairs ``u`` (N, 2) in (0, 1): ``x = u0^(1/alpha)``, ``y =
    u1^(1/alpha)``; the pair is accepted when ``x + y <= 1`` and gives ``x / (x + y)``. Returns (values (N,)
    float64, accepted (N,) bool). Worked in logs, so small alphas (large powers) do not underflow."""
    log_x, log_y = (u.double().clamp_min(1e-300).log() / alpha).unbind(-1)
    accepted = torch.logaddexp(log_x, log_y) <= 0
    return torch.sigmoid(log_x - log_y), accepted


def draw_beta(n: int, alpha: float, generator: torch.Generator) -> torch.Tensor:
    """``n`` float64 draws of Beta(alpha, alpha): ``beta_from_uniforms`` on pairs from ``generator``, the first
    ``n`` accepted in order (each round draws ``max(n, 16)`` pairs; for alpha ≤ 1 at least half are accepted)."""
    kept = []
    while sum(len(k) for k in kept) < n:
        values, accepted = beta_from_uniforms(torch.rand(max(n, 16), 2, generator=generator, dtype=torch.float64),
                                              alpha)
        kept.append(values[accepted])
    return torch.cat(kept)[:n]


def cutmix_boxes(lam: torch.Tensor, u: torch.Tensor, size: int) -> torch.Tensor:
    """Int64 (B, 4) boxes ``(top, left, h, w)`` of a ``size x size`` frame, one per share ``lam`` (B,) and ``u``
    (B, 2) in [0, 1) (the CutMix paper's rule): side ``cut = round(size sqrt(1 - lam))``, centre ``(floor(u0 size),
    floor(u1 size))``, corner ``centre - cut // 2``; the box is clipped to the frame, so it may be smaller."""
    cut = (size * (1 - lam.double()).clamp_min(0).sqrt()).round().long()
    centre = (u.double() * size).floor().long().clamp(max=size - 1)
    first = (centre - (cut // 2)[:, None]).clamp(0, size)
    last = (centre - (cut // 2)[:, None] + cut[:, None]).clamp(0, size)
    (top, left), (h, w) = first.unbind(1), (last - first).unbind(1)
    return torch.stack([top, left, h, w], dim=1)


def mel_spans(share: torch.Tensor, u: torch.Tensor, steps: int) -> torch.Tensor:
    """Int64 (B, 2) ``(start, width)`` of a time span in windows of ``steps`` steps: ``width = round(share · steps)``
    for each share (B,) in [0, 1], ``start = floor(u (steps - width + 1))`` for ``u`` (B,) in [0, 1)."""
    width = (share.double() * steps).round().long().clamp(0, steps)
    start = (u.double() * (steps - width + 1)).floor().long().clamp(max=steps - width)
    return torch.stack([start, width], dim=1)


def draw_mixing(batch: int, size: int, steps: int, mixing: Mixing, generator: torch.Generator) -> MixDraw | None:
    """A batch's ``MixDraw`` for ``batch`` videos of ``size x size`` frames and mel windows of ``steps`` time steps;
    None when mixing is off (nothing is drawn then). Random numbers are taken in a fixed order: the choice of
    mixup or CutMix (only when both are on), the partners, the shares, then CutMix's box centres and span starts.
    """
    if not mixing.on:
        return None
    cut = mixing.cutmix > 0 and (mixing.mixup == 0 or float(torch.rand((), generator=generator)) < 0.5)
    partner = torch.randperm(batch, generator=generator)
    lam = draw_beta(batch, mixing.cutmix if cut else mixing.mixup, generator)
    if not cut:
        return MixDraw(partner, (lam * 128).round() / 128)  # the frames blend in 7-bit fixed point
    boxes = cutmix_boxes(lam, torch.rand(batch, 2, generator=generator), size)
    lam = 1 - (boxes[:, 2] * boxes[:, 3]).double() / size**2  # the share left once the box is clipped
    return MixDraw(partner, lam, boxes, mel_spans(1 - lam, torch.rand(batch, generator=generator), steps))


def mix_batch(frames: torch.Tensor, mel: torch.Tensor, audio_present: torch.Tensor, targets: torch.Tensor,
              draw: MixDraw) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Frames uint8 (B, T, 3, S, S), mel (B, T, M, L), audio_present (B,) bool and soft targets (B, C) mixed as
    ``draw`` says (mixup when it has no boxes, else CutMix; see the module's docstring) → the same four, new
    tensors on the inputs' devices."""
    partner, lam = draw.partner.to(frames.device), draw.lam.to(frames.device)
    if draw.boxes is None:
        if not torch.equal(lam * 128, (lam * 128).round()):
            raise ValueError(f"mixup shares must be multiples of 1/128, got {lam.tolist()}")
        w = (lam * 128).to(torch.int16).view(-1, 1, 1, 1, 1)  # (a w + b (128 - w) + 64) >> 7 fits in int16
        mixed = (frames.to(torch.int16) * w).add_(frames[partner].to(torch.int16) * (128 - w))
        frames = mixed.add_(64).bitwise_right_shift_(7).to(torch.uint8)
        m = lam.to(mel.device, mel.dtype).view(-1, 1, 1, 1)
        mel = torch.logaddexp(mel + m.log(), mel[partner.to(mel.device)] + (1 - m).log())
    else:
        out_frames, out_mel = frames.clone(), mel.clone()  # partners are read from the inputs, never from rows written
        spans = draw.spans.tolist()
        for i, ((top, left, h, w), j) in enumerate(zip(draw.boxes.tolist(), draw.partner.tolist(), strict=True)):
            out_frames[i, :, :, top:top + h, left:left + w] = frames[j, :, :, top:top + h, left:left + w]
            start, width = spans[i]
            out_mel[i, ..., start:start + width] = mel[j, ..., start:start + width]
        frames, mel = out_frames, out_mel
    present = audio_present | audio_present[partner.to(audio_present.device)]
    k = lam.to(targets.device, targets.dtype).view(-1, 1)
    return frames, mel, present, k * targets + (1 - k) * targets[partner.to(targets.device)]


class TrainingSource:
    """What ``fit`` reads: batches of another source with T frames per video, on ``device``.

    The source may hold more frames per video than the model's T (a denser training decode). With an
    ``augmentation``, every batch is augmented on the fly (``augment_batch``, T frames sampled at
    random) from a generator seeded by one draw of torch's global RNG, which training seeds and
    checkpoints, so a run stays a pure function of its seed and resumes exactly. With ``mixing`` on as well,
    the augmented batch is then mixed (``draw_mixing``, ``mix_batch``, the same generator) and its labels come
    as soft targets (B, ``num_classes``) instead of class indices (B,). Without an augmentation
    (validation), the T segment centres are taken, nothing is random and nothing is mixed.
    """

    def __init__(self, source, augmentation, num_frames: int, device, mixing: Mixing | None = None,
                 num_classes: int | None = None):
        if mixing is not None and mixing.on and (augmentation is None or num_classes is None):
            raise ValueError("mixing is for training batches: give an augmentation (Augmentation.off() for none) "
                             "and num_classes")
        self.source, self.augmentation, self.num_frames, self.device = source, augmentation, num_frames, device
        self.mixing, self.num_classes = mixing, num_classes

    def __len__(self) -> int:
        return len(self.source)

    def batch(self, index: torch.Tensor):
        """(frames, mel, labels, audio_present) of the videos at ``index``, on ``device``; labels (B,) int64, or
        (B, C) float32 soft targets when mixing."""
        from avgn_fast.data import augment  # here: eval and predict never load it

        frames, mel, labels, present = (t.to(self.device) for t in self.source.batch(index))
        if self.augmentation is None:
            return (*augment.centre_frames(frames, mel, self.num_frames), labels, present)
        generator = torch.Generator().manual_seed(int(torch.randint(2**62, ())))
        frames, mel = augment.augment_batch(frames, mel, present, self.augmentation, self.num_frames, generator)
        draw = None if self.mixing is None else draw_mixing(len(labels), frames.shape[-1], mel.shape[-1],
                                                            self.mixing, generator)
        if draw is not None:
            targets = F.one_hot(labels, self.num_classes).float()
            frames, mel, present, labels = mix_batch(frames, mel, present, targets, draw)
        return frames, mel, labels, present
