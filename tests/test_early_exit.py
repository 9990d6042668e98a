"""Batched early exit with compaction (GlanceEngine, eager) against per-video ``model.glance``, every switch."""

import contextlib

import pytest
import torch
from random_models import random_model
from switches import SWITCHES, TINY
from tolerances import tol

from avgn_fast.engine.early_exit import GlanceEngine, Hook
from avgn_fast.engine.stages import random_inputs
from avgn_fast.models.classifier import exit_steps

BATCH = 7


pytestmark = pytest.mark.usefixtures("one_thread")  # small shapes: see conftest


def inputs(config, seed=1):
    """Random clips, each video at its own brightness (so even a random model tells them apart)."""
    frames, mel, _ = random_inputs(config, BATCH, seed=seed)
    frames = (frames * torch.linspace(0.1, 1.0, BATCH).view(-1, 1, 1, 1, 1)).to(torch.uint8)
    present = torch.tensor([True, False, True, True, False, True, True])
    return frames, mel, present


def spread_threshold(probs: torch.Tensor) -> float:
    """A threshold between two observed confidences that gives the most distinct exit steps, away from ties."""
    conf = probs.amax(-1).flatten().sort().values
    candidates = [(a + b) / 2 for a, b in zip(conf[:-1].tolist(), conf[1:].tolist()) if b - a > 1e-3]
    return max(candidates, key=lambda t: len(set(exit_steps(probs, t).tolist())))


class LocalRows(Hook):
    """Counts the patches each local-encoder call receives."""

    def __init__(self):
        self.rows = []

    def stage(self, name, args):
        if name == "local":
            self.rows.append(args[0].shape[0])
        return contextlib.nullcontext()


def run_both(model, frames, mel, present, threshold, engine=None, hook=None):
    engine = engine or GlanceEngine(model, device="cpu")
    torch.manual_seed(5)  # spatial="random" draws the same centres in both
    ref = model.glance(frames, mel, audio_present=present, exit_threshold=threshold)
    torch.manual_seed(5)
    got = engine(frames, mel, present, exit_threshold=threshold, hook=hook)
    return ref, got


@pytest.mark.parametrize("name", list(SWITCHES))
def test_early_exit_with_compaction_equals_per_video_glance(name):
    config = TINY.replace(**SWITCHES[name])
    model = random_model(config, exits=True)
    frames, mel, present = inputs(config)
    threshold = spread_threshold(model.glance(frames, mel, audio_present=present).probs)
    counter = LocalRows()
    ref, got = run_both(model, frames, mel, present, threshold, hook=counter)

    steps = ref.exit_step.tolist()
    assert len(set(steps)) > 1, f"threshold {threshold} should make videos exit at different steps, got {steps}"
    assert got.exit_step.tolist() == steps
    assert got.prediction.tolist() == ref.prediction.tolist()
    torch.testing.assert_close(got.final_logits, ref.final_logits, **tol(torch.float32))
    torch.testing.assert_close(got.gflops, ref.gflops)
    assert torch.equal(got.kept, ref.kept)
    torch.testing.assert_close(got.saliency, ref.saliency, **tol(torch.float32))
    torch.testing.assert_close(got.boxes, ref.boxes, **tol(torch.float32))  # every kept frame has its box
    k = ref.logits.shape[1]
    taken = torch.arange(k)[None] <= ref.exit_step[:, None]  # (B, K): the steps each video took
    torch.testing.assert_close(got.logits[taken], ref.logits[taken], **tol(torch.float32))
    torch.testing.assert_close(got.probs[taken], ref.probs[taken], **tol(torch.float32))
    assert got.logits[~taken].isnan().all() and got.probs[~taken].isnan().all()

    # compaction: step s ran the local encoder on exactly the videos that had not exited before it
    still_in = [int((ref.exit_step >= s).sum()) for s in range(k)]
    assert counter.rows == [n for n in still_in if n], (counter.rows, still_in)
    assert sum(counter.rows) == int((ref.exit_step + 1).sum())
    cost = model.cost()
    torch.testing.assert_close(got.gflops, cost.per_video + cost.per_step * (ref.exit_step + 1).float())


@pytest.mark.parametrize("name", ["avgn", "dense"])
def test_without_threshold_every_step_runs_at_once_and_matches_exactly(name):
    config = TINY.replace(**SWITCHES[name])
    model = random_model(config, exits=True)
    frames, mel, present = inputs(config, seed=2)
    counter = LocalRows()
    ref, got = run_both(model, frames, mel, present, None, hook=counter)
    k = ref.logits.shape[1]
    assert counter.rows == [BATCH * k]  # one local-encoder call on all B·K patches
    assert got.exit_step.tolist() == [k - 1] * BATCH
    for field in ("logits", "probs", "final_logits", "saliency", "boxes", "gflops"):
        torch.testing.assert_close(getattr(got, field), getattr(ref, field), **tol(torch.float32))
    assert torch.equal(got.kept, ref.kept)


def test_threshold_every_video_passes_at_the_first_step_and_k_override():
    model = random_model(TINY, exits=True)
    frames, mel, present = inputs(TINY, seed=3)
    engine = GlanceEngine(model, device="cpu", k=2)
    counter = LocalRows()
    ref, got = run_both(model, frames, mel, present, 0.0, engine=engine, hook=counter)
    assert got.exit_step.tolist() == [0] * BATCH and counter.rows == [BATCH]
    torch.testing.assert_close(got.final_logits, ref.final_logits, **tol(torch.float32))
    assert got.logits.shape == (BATCH, 2, TINY.num_classes) and got.logits[:, 1].isnan().all()
    with pytest.raises(ValueError, match="k must be in"):
        GlanceEngine(model, device="cpu", k=TINY.k + 1)


def test_bf16_engine_matches_glance_under_autocast():
    # visual-only: the attention reference's masked fill overflows bf16 under CPU autocast
    config = TINY.replace(audio=False)
    model = random_model(config, exits=True)
    frames, mel, present = inputs(config, seed=4)
    engine = GlanceEngine(model, device="cpu", precision="bf16")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = model.glance(frames, mel, audio_present=present)
    got = engine(frames, mel, present)
    assert torch.equal(got.kept, ref.kept)
    torch.testing.assert_close(got.final_logits, ref.final_logits.float(), **tol(torch.bfloat16))
    fp32 = GlanceEngine(model, device="cpu", precision="fp32")(frames, mel, present)
    assert not torch.equal(got.final_logits, fp32.final_logits), "bf16 must actually run in bf16"


@pytest.mark.parametrize("name", ["avgn", "dense"])
def test_never_exit_early_takes_every_step_even_with_a_calibrated_threshold(name):
    # a checkpoint calibrated to τ = 0 exits every video after its first step, unless told never to exit
    config = TINY.replace(**SWITCHES[name], exit_threshold=0.0)
    model = random_model(config, exits=True)
    frames, mel, present = inputs(config, seed=6)
    engine = GlanceEngine(model, device="cpu")
    k = model.steps
    never = engine(frames, mel, present, exit_threshold=None)
    assert never.exit_step.tolist() == [k - 1] * BATCH and not never.logits.isnan().any()
    assert engine(frames, mel, present).exit_step.tolist() == [0] * BATCH  # the checkpoint's τ
    assert model.glance(frames, mel, audio_present=present, exit_threshold=None).exit_step.tolist() == [k - 1] * BATCH
    with pytest.raises(ValueError, match="exit_threshold must be None"):
        model.glance(frames, mel, exit_threshold=1.5)
