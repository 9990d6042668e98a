"""Early-exit thresholds from per-step probabilities: the exit rule's outcome, thresholds spread over the steps
(for a sweep), the cheapest threshold within an accuracy budget and a margin (for ``avgn-fast calibrate``), and
what a threshold loses on other videos."""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch


def exit_steps_taken(probs: torch.Tensor, threshold: float | None) -> torch.Tensor:
    """(N,) steps taken (1..K) by ``model.glance``'s exit rule for probabilities (N, K, C)."""
    from avgn_fast.models.classifier import exit_steps

    return exit_steps(probs, threshold) + 1


def calibrate_thresholds(probs: torch.Tensor, count: int) -> list[float]:
    """Up to ``count`` exit thresholds whose mean steps on ``probs`` (N, K, C) spread evenly over (1, K).

    Candidates are quantiles of the per-step top probabilities; for each target mean (``count``
    evenly spaced values strictly between 1 and K) the candidate closest to it is chosen. Returned
    sorted and distinct (fewer than ``count`` when the confidences are too clumped to separate).
    """
    n, k, _ = probs.shape
    if k == 1 or count < 1 or n == 0:
        return []
    confidence = probs.float().amax(-1).flatten()
    candidates = torch.quantile(confidence, torch.linspace(0, 1, 201)).unique().tolist()
    means = torch.tensor([float(exit_steps_taken(probs, t).float().mean()) for t in candidates])
    targets = torch.linspace(1, k, count + 2)[1:-1]
    chosen = {candidates[int((means - target).abs().argmin())] for target in targets}
    return sorted(chosen)


@dataclass(frozen=True)
class ExitChoice:
    """An early-exit threshold and what it gives on the videos it was chosen on (top-1 in [0, 1], mean steps and
    GMACs per video), beside taking every step (``full_*``)."""

    threshold: float | None
    top1: float
    steps: float
    gflops: float
    full_top1: float
    full_gflops: float


def exit_outcome(probs: torch.Tensor, labels: torch.Tensor, threshold: float | None) -> tuple[float, float]:
    """(top-1, mean steps) of ``model.glance``'s exit rule at ``threshold`` on probabilities (N, K, C)."""
    steps = exit_steps_taken(probs, threshold)
    final = probs[torch.arange(len(probs)), steps - 1]
    n = max(len(probs), 1)  # exact fractions: a tolerance compares them
    return int((final.argmax(-1) == labels).sum()) / n, int(steps.sum()) / n


def choose_threshold(probs: torch.Tensor, labels: torch.Tensor, *, per_video: float, per_step: float,
                     max_drop: float = 0.0, margin: float = 0.0, candidates: int = 2000) -> ExitChoice:
    """The early-exit threshold with the fewest mean steps on (``probs`` (N, K, C), ``labels``) whose top-1 is at
    most ``max_drop`` below taking every step, at τ and at every threshold within ``margin`` of it.

    The margin rule: τ qualifies only if each threshold t in [τ − margin, τ + margin] also keeps top-1 within
    ``max_drop``, so a τ on a narrow ridge of the validation curve (that unseen videos would likely fall off) is
    not chosen. The exits at t are those at the smallest candidate ≥ t (no early exit above them all), so the
    candidates in the band and the first one above it decide. Ties go to the higher top-1, then the higher
    threshold. Candidates are the distinct top probabilities of the steps that can exit (quantiles of them
    beyond ``candidates``, where the rule then holds on those quantiles); ``threshold`` is None when none saves
    a step. GMACs per video = ``per_video + steps · per_step``."""
    n, k, _ = probs.shape
    full_top1, _ = exit_outcome(probs, labels, None)
    full_gflops = per_video + k * per_step
    best = ExitChoice(None, full_top1, float(k), full_gflops, full_top1, full_gflops)
    if n == 0 or k == 1:
        return best
    confidence = probs[:, :-1].float().amax(-1).flatten().unique()
    if len(confidence) > candidates:
        confidence = torch.quantile(confidence, torch.linspace(0, 1, candidates)).unique()
    taus = confidence.tolist()  # ascending
    outcomes = [exit_outcome(probs, labels, tau) for tau in taus]
    holds = [top1 >= full_top1 - max_drop - 1e-12 for top1, _ in outcomes]
    for i, tau in enumerate(taus):
        top1, steps = outcomes[i]
        if not all(holds[j] for j in band(taus, tau, margin)):
            continue
        if (steps, -top1, -tau) < (best.steps, -best.top1, -(best.threshold or 1.0)):
            best = ExitChoice(tau, top1, steps, per_video + steps * per_step, full_top1, full_gflops)
    return best


def band(taus: list[float], tau: float, margin: float) -> range:
    """Indices of the ascending candidates ``taus`` whose exits some threshold in [τ − margin, τ + margin] has:
    those inside the band, and the first one above it when the band reaches past the last candidate inside."""
    first = bisect.bisect_left(taus, tau - margin)
    end = bisect.bisect_right(taus, tau + margin)  # taus[end] is the first candidate above the band
    if end < len(taus) and taus[end - 1] < tau + margin:
        end += 1
    return range(first, end)


@dataclass(frozen=True)
class ExitCheck:
    """What an early-exit threshold does on videos it was not chosen on: top-1 at τ and after every step (in
    [0, 1]), mean steps at τ, and the videos an exit turns from right to wrong (``lost``) and back (``gained``)."""

    videos: int
    top1: float
    steps: float
    full_top1: float
    lost: int
    gained: int


def exit_check(probs: torch.Tensor, labels: torch.Tensor, threshold: float | None) -> ExitCheck:
    """``ExitCheck`` of ``threshold`` on (``probs`` (N, K, C), ``labels``)."""
    top1, steps = exit_outcome(probs, labels, threshold)
    full_top1, _ = exit_outcome(probs, labels, None)
    lost, gained = exit_changes(probs, labels, threshold)
    return ExitCheck(len(labels), top1, steps, full_top1, lost, gained)


def exit_changes(probs: torch.Tensor, labels: torch.Tensor, threshold: float | None) -> tuple[int, int]:
    """(lost, gained): videos of (``probs`` (N, K, C), ``labels``) right after every step but wrong at their exit
    under ``threshold``, and the reverse."""
    steps = exit_steps_taken(probs, threshold)
    rows = torch.arange(len(probs))
    at_exit = probs[rows, steps - 1].argmax(-1) == labels
    at_end = probs[:, -1].argmax(-1) == labels
    return int((at_end & ~at_exit).sum()), int((at_exit & ~at_end).sum())
