"""AVGN's training losses (DESIGN.md, "Training").

- ordered AV logits: cross entropy on every exit head, frames taken in saliency order;
- auxiliary heads: per frame on audio-only and global-only features, per kept frame on local-only
  features;
- saliency: a listwise ranking loss pulling AV-TeST's frame order towards a detached per-frame
  teacher's confidence in the true class: the first exit head applied to each frame alone (times
  the audio head's per-frame prediction). Top-K selection is not differentiable, so this is the
  only signal AV-TeST gets;
- AdaFocusV2's random-patch branch: the local-only head also classifies patches at random centres;
- patch search: the local-only head scores a grid of candidate patches on the frames the teacher
  is most confident on (AV-TeST's own choice lags behind early in training). It learns from them
  as multiple instances ("some candidate shows the class"), and the
  best candidate for the true class is a detached target for the policy, weighted by how much it
  stands out. The policy also receives the classification gradients through the differentiable
  crop, as in AdaFocusV2.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from avgn_fast.models.avgn import AVGN


@dataclass(frozen=True)
class LossWeights:
    """Weight of each loss term; a zero weight skips the term's computation."""

    ordered: float = 1.0
    aux_audio: float = 0.5
    aux_global: float = 0.5
    aux_local: float = 0.5
    random_patch: float = 0.5
    saliency: float = 1.0
    patch_search: float = 1.0
    search_mil: float = 1.0
    search_grid: int | None = None  # candidates per side; None: spaced at most half a patch apart
    search_frames: int = 2  # frames searched per video (0: no search)
    saliency_temperature: float = 0.3


def ordered_logits_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross entropy over the K exit heads: logits (B, K, C), labels (B,)."""
    return frame_cross_entropy(logits, labels)


def frame_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None = None):
    """Cross entropy of per-frame (or per-step) logits (B, T, C) against the video label.

    Averaged over frames, then over videos weighted by ``weight`` (B,) when given.
    """
    b, t, c = logits.shape
    ce = F.cross_entropy(logits.reshape(b * t, c), labels.repeat_interleave(t), reduction="none").view(b, t)
    if weight is None:
        return ce.mean()
    return (ce.mean(1) * weight).sum() / weight.sum().clamp_min(1)


def saliency_ranking_loss(saliency: torch.Tensor, teacher: torch.Tensor, temperature: float = 0.3) -> torch.Tensor:
    """Listwise ranking loss (ListNet) of saliency (B, T) against a teacher's confidences (B, T) in (0, 1].

    Cross entropy between the target distribution softmax(log(teacher) / temperature) over the T
    frames and softmax(saliency): small when the saliency puts the teacher's most confident frames
    first. A low temperature concentrates the target on the top frames, which top-K selection needs.
    """
    target = (teacher.clamp_min(1e-6).log() / temperature).softmax(-1)
    return -(target * saliency.log_softmax(-1)).sum(-1).mean()


def true_class_prob(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """softmax(logits)[..., label] for logits (B, ..., C) and labels (B,)."""
    index = labels.view(-1, *([1] * (logits.dim() - 1))).expand(*logits.shape[:-1], 1)
    return logits.softmax(-1).gather(-1, index).squeeze(-1)


@contextlib.contextmanager
def frozen_bn_stats(module: nn.Module):
    """Batch statistics as usual, but leave every BatchNorm's running statistics unchanged."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum in zip(norms, saved, strict=True):
            m.momentum = momentum


def candidate_patches(model: AVGN, frames: torch.Tensor, kept: torch.Tensor, n: int):
    """Normalized patches at an n × n grid of integral corners on each kept frame, and their centres a.

    Returns patches (B·K·n², 3, P, P) channels-last float32 (exact slices, as the crop op gives at
    integral corners) and a (n², 2) in [0, 1], row-major.
    """
    s, p = model.config.frame_size, model.patch_size()
    corners = torch.linspace(0, s - p, n, device=frames.device).round().long()
    x = frames[torch.arange(frames.shape[0], device=frames.device)[:, None], kept].flatten(0, 1)  # (N, 3, S, S)
    windows = x.unfold(2, p, 1).unfold(3, p, 1)[:, :, corners[:, None], corners]  # (N, 3, n, n, P, P)
    patches = windows.permute(0, 2, 3, 1, 4, 5).reshape(-1, 3, p, p).float()
    patches = (patches - model.pixel_mean.view(1, 3, 1, 1)) / model.pixel_std.view(1, 3, 1, 1)
    a = corners.float() / max(s - p, 1)
    grid = torch.stack(torch.meshgrid(a, a, indexing="ij"), dim=-1).reshape(-1, 2)
    return patches.contiguous(memory_format=torch.channels_last), grid


def patch_search(model: AVGN, frames, kept, labels, n: int):
    """Score an n × n grid of candidate patches on each of the ``kept`` frames (B, F) with the local-only head.

    Returns the multiple-instance loss (cross entropy of the logits of all a video's candidates,
    log-sum-exp pooled: "some candidate shows the class"), the best candidate centre (B, F, 2) for the
    true class (detached) and its weight (B, F): the best candidate's true-class probability minus
    the candidates' mean, near 0 where no candidate stands out. Batch statistics are used but
    BatchNorm running statistics are left alone, since candidates are mostly background.
    """
    b, f = kept.shape
    patches, grid = candidate_patches(model, frames, kept, n)
    with frozen_bn_stats(model.local):
        logits = model.aux_heads["local"](model.local(patches)[1]).view(b, f, n * n, -1)
    mil = F.cross_entropy(logits.flatten(1, 2).logsumexp(1), labels)
    prob = true_class_prob(logits.detach(), labels)
    return mil, grid[prob.argmax(-1)], prob.amax(-1) - prob.mean(-1)


def audio_warmup_losses(model: AVGN, frames, mel, labels, audio_present, weights: LossWeights):
    """Stage-1 losses: the audio encoder, and the local encoder on the frames the audio points to.

    The audio head learns per frame; the local-only head learns from the candidate patches of the
    frames where the audio head is most confident in the true class (multiple instances, as in the
    joint stage). Nothing else runs, so these epochs are cheap. ``logits`` (B, 1, C) are the
    frame-averaged audio logits, for a running accuracy.
    """
    audio_logits = model.aux_heads["audio"](model.encode_audio(mel, audio_present)[1])
    terms = {"aux_audio": frame_cross_entropy(audio_logits, labels, audio_present.float())}
    if not model.config.dense and weights.search_frames:
        searched = true_class_prob(audio_logits.detach(), labels).topk(weights.search_frames, dim=1).indices
        terms["search_mil"] = patch_search(model, frames, searched, labels, search_grid_size(model, weights))[0]
    total = sum(getattr(weights, name) * value for name, value in terms.items())
    return {**terms, "total": total, "logits": audio_logits.detach().mean(1, keepdim=True)}


def search_grid_size(model: AVGN, weights: LossWeights) -> int:
    """Candidates per side: ``weights.search_grid``, or spaced at most half a patch apart."""
    s, p = model.config.frame_size, model.patch_size()
    return weights.search_grid or math.ceil(2 * (s - p) / p) + 1


def avgn_losses(model: AVGN, frames, mel, labels, audio_present, weights: LossWeights) -> dict[str, torch.Tensor]:
    """Every enabled loss term for one batch, plus ``total`` (their weighted sum) and ``logits`` (detached).

    The glance runs on all T frames; the policy, crop and local encoder on the K selected frames.
    With AV-TeST, the teacher also needs every other frame's patch: those run without gradients.
    """
    b, t = frames.shape[:2]
    heads = model.aux_heads
    feats = model.encode(frames, mel, audio_present)
    saliency = model.saliency(feats)
    kept = model.select(saliency.detach(), model.steps)
    a = model.locate(feats, kept)
    local = model.local_features(model.crop(frames, kept, a), b)
    logits = model.classifier(model.step_features(feats, kept, local))

    terms = {"ordered": ordered_logits_loss(logits, labels)}
    audio_logits = None
    if feats.audio is not None:
        audio_logits = heads["audio"](feats.audio)
        if weights.aux_audio:
            terms["aux_audio"] = frame_cross_entropy(audio_logits, labels, audio_present.float())
    if feats.visual is not None and weights.aux_global:
        terms["aux_global"] = frame_cross_entropy(heads["global"](feats.visual), labels)
    if weights.aux_local:
        terms["aux_local"] = frame_cross_entropy(heads["local"](local), labels)
    searched = kept[:, :weights.search_frames]
    if model.avtest is not None:
        teacher = frame_teacher(model, frames, feats, labels, audio_logits)
        if weights.saliency:
            terms["saliency"] = saliency_ranking_loss(saliency, teacher, weights.saliency_temperature)
        searched = teacher.topk(searched.shape[1], dim=1).indices  # the teacher's best frames, not yet AV-TeST's
    if not model.config.dense and weights.random_patch:
        random_local = model.local_features(model.crop(frames, kept, torch.rand_like(a)), b)
        terms["random_patch"] = frame_cross_entropy(heads["local"](random_local), labels)
    if not model.config.dense and weights.search_frames:
        mil, target, weight = patch_search(model, frames, searched, labels, search_grid_size(model, weights))
        terms["search_mil"] = mil
        if model.aespa is not None:
            error = F.smooth_l1_loss(model.locate(feats, searched), target, reduction="none", beta=0.1).sum(-1)
            terms["patch_search"] = (weight * error).mean()

    total = sum(getattr(weights, name) * value for name, value in terms.items())
    return {**terms, "total": total, "logits": logits.detach()}


@torch.no_grad()
def frame_teacher(model: AVGN, frames, feats, labels, audio_logits=None) -> torch.Tensor:
    """(B, T) detached confidence in the true class of each frame on its own.

    Each frame goes through the policy, crop, local encoder and the first exit head alone (what the
    model would conclude from that frame as its first step); with audio, the audio head's per-frame
    logits are added (a product of experts), which makes the teacher useful from the first joint step.
    """
    b, t = frames.shape[:2]
    every = torch.arange(t, device=frames.device).expand(b, t)
    with frozen_bn_stats(model):
        local = model.local_features(model.crop(frames, every, model.locate(feats, every)), b)
        logits = model.classifier.heads[0](model.classifier.fuse(model.step_features(feats, every, local)))
    if audio_logits is not None:
        logits = logits + audio_logits
    return true_class_prob(logits, labels)
