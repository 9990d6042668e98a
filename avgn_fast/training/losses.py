"""AVGN's training losses (DESIGN.md, "Training").

- ordered AV logits: cross entropy on every exit head, frames taken in saliency order;
- auxiliary heads: global-only features per frame; audio-only features per frame and local-only
  features per kept patch as multiple instances (``instance_cross_entropy``: only some frames hear
  the class sound, only some patches show it);
- saliency: a listwise ranking loss pulling AV-TeST's frame order towards a detached per-frame
  teacher's confidence in the true class: the first exit head applied to each frame alone (times
  the audio head's per-frame prediction). Top-K selection is not differentiable, so this is the
  only signal AV-TeST gets;
- AdaFocusV2's random-patch branch: the local-only head also classifies patches at random centres
  (off by default, see ``LossWeights``);
- patch search: the local-only head scores a grid of candidate patches on the frames the teacher
  is most confident on (AV-TeST's own choice lags behind early in training). It learns from them
  as multiple instances ("some candidate shows the class"), and the
  best candidate for the true class is a detached target for the policy, weighted by how much it
  stands out. The classification gradient can also reach the policy through the differentiable
  crop, as in AdaFocusV2 (``crop_gradient``; off by default, see ``LossWeights``).

Labels are class indices (B,) or soft targets (B, C) whose rows sum to 1 (mixup / CutMix,
``avgn_fast.training.batches``): every cross entropy takes either, and the teacher's "confidence in the
true class" becomes its probability mass on the target, ``sum_c target_c · softmax_c`` (``true_class_prob``),
so the saliency ranking, the frames searched and the best candidate patch all follow the mixed label.

AV-TeST and AESPA read the audio features detached (``avgn_fast.models.avgn.audio_detached``): the
audio encoder learns from its own head and the classifier. The joint stage runs the model's own
forward (``AVGN.forward``, the one inference runs) with those training hooks. The trainer runs
these in stages (``TrainSettings``): ``audio_warmup_losses``, then ``look_losses``, then ``avgn_losses``.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from avgn_fast.models.avgn import AVGN, GlanceFeatures, audio_detached


@dataclass(frozen=True)
class LossWeights:
    """Weight of each loss term; a zero weight skips the term's computation."""

    ordered: float = 1.0
    aux_audio: float = 0.5
    aux_global: float = 0.5
    aux_local: float = 0.5
    # AdaFocusV2's random patches (0.5 there): on AVSynth a random patch rarely shows the class, so they are mostly
    # label noise for the local head; patch search gives it its patches instead, and the default recipe runs without
    random_patch: float = 0.0
    saliency: float = 1.0
    patch_search: float = 10.0
    search_mil: float = 1.0
    search_grid: int | None = None  # candidates per side; None: spaced at most half a patch apart
    search_frames: int = 1  # frames searched per video (0: no search)
    warmup_search_frames: int = 0  # the same during the audio warm-up (its teacher is still poor there: off)
    # multiple-instance weighting of the audio frames and the searched candidates (see instance_cross_entropy)
    instance_mix: float = 0.5
    instance_temperature: float = 1.0
    # scale of the classification gradient reaching the policy through the differentiable crop (AdaFocusV2: 1).
    # On AVSynth it drowns the patch-search target and the policy learns far slower (measured), so it is off.
    crop_gradient: float = 0.0
    saliency_temperature: float = 0.3


def ordered_logits_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross entropy over the K exit heads: logits (B, K, C), labels (B,) or soft targets (B, C)."""
    return frame_cross_entropy(logits, labels)


def frame_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None = None):
    """Cross entropy of per-frame (or per-step) logits (B, T, C) against the video label (B,) or soft target (B, C).

    Averaged over frames, then over videos weighted by ``weight`` (B,) when given.
    """
    b, t, c = logits.shape
    ce = F.cross_entropy(logits.reshape(b * t, c), labels.repeat_interleave(t, dim=0), reduction="none").view(b, t)
    if weight is None:
        return ce.mean()
    return (ce.mean(1) * weight).sum() / weight.sum().clamp_min(1)


def instance_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, *, mix: float = 0.5,
                           temperature: float = 1.0, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Multiple-instance cross entropy of instance logits (B, N, C) against the bag's label (B,) or soft target
    (B, C).

    Only some instances of a bag show its class (the frames that hear the class sound, the
    candidate patches that hold the card). Each instance's cross entropy is weighted by
    ``mix / N + (1 − mix) · softmax_n(−CE / temperature)`` (detached): uniform at first, then
    concentrated on the instances the model already finds telling, as in an EM step. Averaged over
    bags, weighted by ``weight`` (B,) when given. On AVSynth this learned markedly faster than plain
    per-instance cross entropy or log-sum-exp pooling (after 4 epochs: the class sound on 82 % of
    event frames against 40-53 %; glyphs in 77 % of card patches against 25 %).
    """
    b, n, c = logits.shape
    ce = F.cross_entropy(logits.reshape(b * n, c), labels.repeat_interleave(n, dim=0), reduction="none").view(b, n)
    focus = (-ce.detach() / temperature).softmax(1)
    per_bag = ((mix / n + (1 - mix) * focus) * ce).sum(1)
    if weight is None:
        return per_bag.mean()
    return (per_bag * weight).sum() / weight.sum().clamp_min(1)


def saliency_ranking_loss(saliency: torch.Tensor, teacher: torch.Tensor, temperature: float = 0.3) -> torch.Tensor:
    """Listwise ranking loss (ListNet) of saliency (B, T) against a teacher's confidences (B, T) in (0, 1].

    Cross entropy between the target distribution softmax(log(teacher) / temperature) over the T
    frames and softmax(saliency): small when the saliency puts the teacher's most confident frames
    first. A low temperature concentrates the target on the top frames, which top-K selection needs.
    """
    target = (teacher.clamp_min(1e-6).log() / temperature).softmax(-1)
    return -(target * saliency.log_softmax(-1)).sum(-1).mean()


def true_class_prob(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """softmax(logits)[..., label] for logits (B, ..., C) and labels (B,); for soft targets (B, C) the mass on the
    target, ``sum_c target_c · softmax(logits)_c`` (the same for a one-hot target)."""
    if labels.dim() == 2:
        shape = (labels.shape[0], *([1] * (logits.dim() - 2)), labels.shape[1])
        return (logits.softmax(-1) * labels.to(logits.dtype).view(shape)).sum(-1)
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


def patch_search(model: AVGN, frames, kept, labels, n: int, weights: LossWeights, *, freeze_bn: bool = True):
    """Score an n × n grid of candidate patches on each of the ``kept`` frames (B, F) with the local-only head.

    Returns the multiple-instance loss over all a video's candidates ("some candidate shows the
    class", ``instance_cross_entropy``), the centre (B, F, 2) of the candidate most
    confident in the true class (detached), and its weight (B, F): that candidate's true-class
    probability minus the candidates' mean, near 0 where no candidate stands out. Batch statistics
    are used but BatchNorm running statistics are left alone, since candidates are mostly background.
    """
    b, f = kept.shape
    patches, grid = candidate_patches(model, frames, kept, n)
    with frozen_bn_stats(model.local) if freeze_bn else contextlib.nullcontext():
        logits = model.aux_heads["local"](model.local(patches)[1]).view(b, f, n * n, -1)
    mil = instance_cross_entropy(logits.flatten(1, 2), labels, mix=weights.instance_mix,
                                 temperature=weights.instance_temperature)
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
    terms = {"aux_audio": audio_loss(audio_logits, labels, audio_present, weights)}
    if model.local is not None and not model.config.dense and weights.warmup_search_frames:
        searched = true_class_prob(audio_logits.detach(), labels).topk(weights.warmup_search_frames, dim=1).indices
        terms.update(search_terms(model, frames, None, searched, labels, weights))
    total = sum(getattr(weights, name) * value for name, value in terms.items())
    return {**terms, "total": total, "logits": audio_logits.detach().mean(1, keepdim=True)}


def look_losses(model: AVGN, frames, mel, labels, audio_present, weights: LossWeights):
    """Stage-2 losses: learn where to look from the audio, before the joint stage.

    The audio head (trained in stage 1) names, per video, the frames most confident in the true
    class: AV-TeST learns to rank frames by that confidence, and on the best ``search_frames`` frames
    the local-only head learns from the candidate patches while the policy learns to point at the
    candidate that shows the class best (``patch_search``). The classifier and the K kept patches
    do not run yet. ``logits`` (B, 1, C) are the frame-averaged audio logits.
    """
    heads = model.aux_heads
    feats = model.encode(frames, mel, audio_present)
    guide = guide_features(feats)
    audio_logits = heads["audio"](feats.audio)
    terms = {"aux_audio": audio_loss(audio_logits, labels, audio_present, weights)}
    teacher = true_class_prob(audio_logits.detach(), labels)
    if model.avtest is not None and weights.saliency:
        terms["saliency"] = saliency_ranking_loss(model.saliency(guide), teacher, weights.saliency_temperature)
    if not model.config.dense and weights.search_frames:
        searched = teacher.topk(weights.search_frames, dim=1).indices
        # the candidates are the only patches the local encoder sees in this stage: they keep its BN statistics
        terms.update(search_terms(model, frames, guide, searched, labels, weights, freeze_bn=False))
    total = sum(getattr(weights, name) * value for name, value in terms.items())
    return {**terms, "total": total, "logits": audio_logits.detach().mean(1, keepdim=True)}


def search_terms(model: AVGN, frames, guide: GlanceFeatures | None, searched, labels, weights: LossWeights, *,
                 freeze_bn: bool = True) -> dict[str, torch.Tensor]:
    """Patch search on the ``searched`` frames (B, F): ``search_mil``, and with a policy and glance
    features ``guide`` also ``patch_search``: the policy's distance to the best candidate, weighted by
    how much that candidate stands out."""
    mil, target, weight = patch_search(model, frames, searched, labels, search_grid_size(model, weights), weights,
                                       freeze_bn=freeze_bn)
    terms = {"search_mil": mil}
    if guide is not None and model.aespa is not None:
        error = F.smooth_l1_loss(model.locate(guide, searched), target, reduction="none", beta=0.1).sum(-1)
        terms["patch_search"] = (weight * error).mean()
    return terms


def audio_loss(audio_logits, labels, audio_present, weights: LossWeights) -> torch.Tensor:
    """The audio head's per-frame logits (B, T, C) as instances of the video's class; videos without audio skipped."""
    return instance_cross_entropy(audio_logits, labels, mix=weights.instance_mix,
                                  temperature=weights.instance_temperature, weight=audio_present.float())


def guide_features(feats: GlanceFeatures) -> GlanceFeatures:
    """``feats`` as AV-TeST and AESPA read them while they learn: the audio detached (``audio_detached``)."""
    return GlanceFeatures.of(audio_detached(vars(feats)))


def search_grid_size(model: AVGN, weights: LossWeights) -> int:
    """Candidates per side: ``weights.search_grid``, or spaced at most half a patch apart."""
    s, p = model.config.frame_size, model.patch_size()
    return weights.search_grid or math.ceil(2 * (s - p) / p) + 1


def avgn_losses(model: AVGN, frames, mel, labels, audio_present, weights: LossWeights) -> dict[str, torch.Tensor]:
    """Every enabled loss term for one batch, plus ``total`` (their weighted sum) and ``logits`` (detached).

    The model's forward runs on all K steps (the glance on all T frames; the policy, crop and local
    encoder on the K selected frames), AV-TeST and AESPA reading the audio detached and the crop
    passing ``crop_gradient`` of the gradient to the policy. With AV-TeST, the teacher also needs
    every other frame's patch: those run without gradients.
    """
    b = frames.shape[0]
    heads = model.aux_heads
    out = model(frames, mel, audio_present, detach_audio=True, crop_gradient=weights.crop_gradient)
    feats, saliency, kept, a, local, logits = out.features, out.saliency, out.kept, out.locations, out.local, out.logits
    guide = guide_features(feats)

    terms = {"ordered": ordered_logits_loss(logits, labels)}
    audio_logits = None
    if feats.audio is not None:
        audio_logits = heads["audio"](feats.audio)
        if weights.aux_audio:
            terms["aux_audio"] = audio_loss(audio_logits, labels, audio_present, weights)
    if feats.visual is not None and weights.aux_global:
        terms["aux_global"] = frame_cross_entropy(heads["global"](feats.visual), labels)
    patches = model.local is not None  # the audio-only baseline has none
    if patches and weights.aux_local:  # the kept patches as instances: only some of them need to show the class
        terms["aux_local"] = instance_cross_entropy(heads["local"](local), labels, mix=weights.instance_mix,
                                                    temperature=weights.instance_temperature)
    searched = kept[:, :weights.search_frames]
    if model.avtest is not None:
        teacher = frame_teacher(model, frames, feats, labels, audio_logits)
        if weights.saliency:
            terms["saliency"] = saliency_ranking_loss(saliency, teacher, weights.saliency_temperature)
        searched = teacher.topk(searched.shape[1], dim=1).indices  # the teacher's best frames, not yet AV-TeST's
    if patches and not model.config.dense and weights.random_patch:
        random_local = model.local_features(model.crop(frames, kept, torch.rand_like(a)), b)
        terms["random_patch"] = frame_cross_entropy(heads["local"](random_local), labels)
    if patches and not model.config.dense and weights.search_frames:
        terms.update(search_terms(model, frames, guide, searched, labels, weights))

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
        logits = model.classifier.alone(model.step_features(feats, every, local))
    if audio_logits is not None:
        logits = logits + audio_logits
    return true_class_prob(logits, labels)
