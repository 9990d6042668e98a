"""Batched early exit with compaction (GlanceEngine, eager) against per-video ``model.glance``, every switch."""

import contextlib

import pytest
import torch
from random_models import folded, random_model
from switches import SWITCHES, TINY
from tolerances import tol

from avgn_fast.engine.early_exit import GlanceEngine, Hook, PatchTable
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
    ref = folded(model).glance(frames, mel, audio_present=present, exit_threshold=threshold)
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


def test_the_engine_matches_the_unfolded_model_within_float_rounding():
    """The engine's stages fold the backbones' batch norms: on a model whose norms hold real statistics (a trained
    model's are not 0 and 1) the engine still gives ``model.glance``'s frames and logits, to float32 rounding."""
    model = random_model(TINY, exits=True)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    frames, mel, present = inputs(TINY, seed=2)
    ref = model.glance(frames, mel, audio_present=present, exit_threshold=None)
    got = GlanceEngine(model, device="cpu")(frames, mel, present, exit_threshold=None)
    assert torch.equal(got.kept, ref.kept)
    torch.testing.assert_close(got.boxes, ref.boxes, **tol(torch.float32))
    torch.testing.assert_close(got.logits, ref.logits, **tol(torch.float32))
    assert not torch.equal(got.logits, ref.logits), "the engine should run the folded convs, not the norms"


def test_bf16_engine_matches_glance_under_autocast():
    # visual-only: the attention reference's masked fill overflows bf16 under CPU autocast
    config = TINY.replace(audio=False)
    model = random_model(config, exits=True)
    frames, mel, present = inputs(config, seed=4)
    engine = GlanceEngine(model, device="cpu", precision="bf16")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = folded(model).glance(frames, mel, audio_present=present)
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


def fresh_table(rows: int, channels: int) -> PatchTable:
    """A table whose every row is NaN until the engine fills it (what it does not fill stays NaN)."""
    return PatchTable(torch.full((rows, 2), float("nan")), torch.full((rows, channels), float("nan")))


@pytest.mark.parametrize("threshold", ["spread", None], ids=["early-exit", "every-step"])
def test_shared_patches_are_computed_once_read_back_and_charged_to_the_video_that_computed_them(threshold):
    """Each video twice in one batch, both copies on the same rows of a ``PatchTable`` (a frame's patch is its
    own: own audio): the results are ``model.glance``'s for both; the first copy computes and records each patch,
    the second reads them and its GMACs leave out the local encoder of every step. A later call reads the filled
    rows without running the local encoder, and a row altered after it was filled changes that video's result."""
    config = TINY.replace(audio_clip_mean=False)
    model = random_model(config, exits=True, live_audio=True)
    frames, mel, present = inputs(config, seed=7)
    reference = folded(model)
    if threshold == "spread":
        threshold = spread_threshold(reference.glance(frames, mel, audio_present=present).probs)
    ref = reference.glance(frames, mel, audio_present=present, exit_threshold=threshold)
    t, channels = config.num_frames, model.local.out_channels
    patch = next(r.gmacs for r in model.flops_table() if r.name == "local encoder")
    steps = ref.exit_step + 1
    slot = torch.arange(BATCH * t).view(BATCH, t)  # video i's frames on rows i·T + frame
    table = fresh_table(BATCH * t, channels)
    engine = GlanceEngine(model, device="cpu")
    counter = LocalRows()
    got = engine(torch.cat([frames, frames]), torch.cat([mel, mel]), torch.cat([present, present]),
                 exit_threshold=threshold, patches=(table, torch.cat([slot, slot])), hook=counter)
    assert sum(counter.rows) == int(steps.sum())  # every patch once
    for half in (slice(0, BATCH), slice(BATCH, 2 * BATCH)):
        assert got.exit_step[half].tolist() == ref.exit_step.tolist()
        assert torch.equal(got.kept[half], ref.kept)
        torch.testing.assert_close(got.final_logits[half], ref.final_logits, **tol(torch.float32))
        torch.testing.assert_close(got.boxes[half], ref.boxes, **tol(torch.float32))
    torch.testing.assert_close(got.gflops[:BATCH], ref.gflops)
    torch.testing.assert_close(got.gflops[BATCH:], ref.gflops - patch * steps.float())
    looked = {i * t + int(ref.kept[i, s]) for i in range(BATCH) for s in range(int(steps[i]))}
    assert table.known == looked
    filled = torch.zeros(BATCH * t, dtype=torch.bool)
    filled[list(looked)] = True
    assert not table.local[filled].isnan().any() and table.local[~filled].isnan().all()
    i, s = 2, 0  # a recorded row holds the patch the model crops at its location, and its local features
    row = i * t + int(ref.kept[i, s])
    torch.testing.assert_close(model.boxes(table.locations[row]), ref.boxes[i, s], **tol(torch.float32))
    patches = model.crop(frames[i:i + 1], ref.kept[i:i + 1, s:s + 1], table.locations[row].view(1, 1, 2))
    torch.testing.assert_close(table.local[row], reference.local(patches)[1][0], **tol(torch.float32))

    counter = LocalRows()
    again = engine(frames, mel, present, exit_threshold=threshold, patches=(table, slot), hook=counter)
    assert counter.rows == []  # every step read its patch
    torch.testing.assert_close(again.final_logits, ref.final_logits, **tol(torch.float32))
    torch.testing.assert_close(again.gflops, ref.gflops - patch * steps.float())
    table.local[row] = table.local[row].flip(0)  # (a constant shift would vanish in the layer norm)
    altered = engine(frames, mel, present, exit_threshold=None, patches=(table, slot))
    assert not torch.allclose(altered.logits[i, s], ref.logits[i, s], atol=1e-3)
    others = [j for j in range(BATCH) if j != i]
    whole = reference.glance(frames, mel, audio_present=present, exit_threshold=None)
    torch.testing.assert_close(altered.logits[others], whole.logits[others], **tol(torch.float32))

    own = fresh_table(BATCH * t, channels)  # −1: no row, each video its own patch
    alone = engine(frames, mel, present, exit_threshold=threshold, patches=(own, torch.full((BATCH, t), -1)))
    torch.testing.assert_close(alone.final_logits, ref.final_logits, **tol(torch.float32))
    torch.testing.assert_close(alone.gflops, ref.gflops)
    assert not own.known and own.local.isnan().all()
