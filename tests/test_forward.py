"""The one staged forward: training, evaluation and the engine run it; its stages hold every inference weight."""

import contextlib

import pytest
import torch
from random_models import folded, random_model
from switches import SWITCHES, TINY
from tolerances import tol

from avgn_fast.engine.early_exit import GlanceEngine, Hook
from avgn_fast.engine.stages import FOLDED, build_stages, random_inputs
from avgn_fast.models.avgn import STAGES
from avgn_fast.training.losses import LossWeights, avgn_losses

BATCH = 3

pytestmark = pytest.mark.usefixtures("one_thread")  # small shapes: see conftest


def inputs(config, seed=1):
    frames, mel, present = random_inputs(config, BATCH, seed=seed)
    present[1] = False
    return frames, mel, present


class Calls(Hook):
    """The stage names the engine calls, in order."""

    def __init__(self):
        self.names = []

    def stage(self, name, args):
        self.names.append(name)
        return contextlib.nullcontext()


@pytest.mark.parametrize("name", list(SWITCHES))
def test_training_forward_equals_eval_forward_and_the_engine(name):
    config = TINY.replace(**SWITCHES[name])
    model = random_model(config)
    frames, mel, present = inputs(config)
    labels = torch.arange(BATCH) % config.num_classes

    torch.manual_seed(3)  # spatial="random" draws its centres first thing after the glance, in each run
    train = model(frames, mel, present, detach_audio=True, crop_gradient=0.0)  # as the joint losses run it
    assert train.logits.requires_grad
    torch.manual_seed(3)
    losses = avgn_losses(model, frames, mel, labels, present, LossWeights())
    torch.manual_seed(3)
    calls = Calls()
    engine = GlanceEngine(model, device="cpu", precision="fp32")(frames, mel, present, exit_threshold=None, hook=calls)

    assert calls.names == [s for s in STAGES if s != "step_head" and s in engine_stages(model)]
    assert torch.equal(losses["logits"], train.logits.detach())
    assert torch.equal(engine.kept, train.kept)
    torch.testing.assert_close(engine.logits, train.logits.detach(), **tol(torch.float32))
    torch.testing.assert_close(engine.boxes, train.boxes.detach(), **tol(torch.float32))
    torch.testing.assert_close(engine.saliency, train.saliency.detach(), **tol(torch.float32))
    b, k = train.kept.shape
    p = model.patch_size()
    width = model.local.out_channels if model.local is not None else 0  # audio-only: no local encoder
    assert train.patches.shape == (b * k, 3, p, p) and train.local.shape == (b, k, width)


def engine_stages(model):
    return build_stages(model, torch.float32, model.steps)


@pytest.mark.parametrize("name", ["avgn", "dense_visual"])
def test_early_exit_calls_the_per_video_stages_once_then_one_step_at_a_time(name):
    config = TINY.replace(**SWITCHES[name])
    model = random_model(config)
    frames, mel, present = inputs(config)
    calls = Calls()
    GlanceEngine(model, device="cpu")(frames, mel, present, exit_threshold=1.0, hook=calls)  # nobody leaves early
    per_video = [s for s in ("glance", "avtest", "aespa") if s in engine_stages(model)]
    assert calls.names == per_video + ["crop", "local", "step_head"] * model.steps


@pytest.mark.parametrize("name", list(SWITCHES))
def test_the_stages_hold_every_inference_weight_and_chain_by_name_into_the_forward(name):
    config = TINY.replace(**SWITCHES[name])
    model = random_model(config)
    stages = engine_stages(model)
    assert list(stages) == [s for s in STAGES if s != "glance" or model.visual is not None or model.audio is not None]

    # every weight and buffer of the model but the training-only auxiliary heads sits in a stage, once per use: the
    # conv backbones with their batch norms folded into the convs, every other tensor the model's own
    reference = folded(model)
    inference = {key: t for key, t in reference.state_dict().items() if not key.startswith("aux_heads.")}
    held = {key.removeprefix("model."): t for stage in stages.values() for key, t in stage.state_dict().items()}
    assert held.keys() == inference.keys()
    assert all(torch.equal(held[key], t) for key, t in inference.items())
    own = model.state_dict()
    assert all(held[key].data_ptr() == own[key].data_ptr() for key in held if key.split(".")[0] not in FOLDED)
    if model.part_norms:
        assert any(key.startswith("model.part_norms.") for key in stages["head"].state_dict())

    # the stages alone, chained by their declared names, give the forward's result
    frames, mel, present = inputs(config)
    torch.manual_seed(4)
    want = reference(frames, mel, present)
    env = {"frames": frames, "mel": mel, "audio_present": present, "rows": torch.arange(BATCH)}
    torch.manual_seed(4)
    with torch.no_grad():
        for stage_name in ("glance", "avtest", "aespa", "crop", "local", "head"):
            if stage_name in stages:
                stage = stages[stage_name]
                env.update(zip(stage.outputs, stage(*(env[i] for i in stage.inputs))))
            if stage_name == "local":  # patch rows → (video, step), as the forward views them
                env["local"] = env["local"].unflatten(0, env["kept"].shape)
    assert torch.equal(env["kept"], want.kept)
    torch.testing.assert_close(env["logits"], want.logits.detach(), **tol(torch.float32))


def test_forward_validates_inputs_and_k():
    model = random_model(TINY)
    frames, mel, present = inputs(TINY)
    with pytest.raises(ValueError, match="k must be in"):
        model(frames, mel, present, k=TINY.k + 1)
    with pytest.raises(ValueError, match="frames must be uint8"):
        model(frames.float(), mel, present)
    out = model(frames, mel, present, k=2)
    assert out.logits.shape == (BATCH, 2, TINY.num_classes) and "logits=(3, 2, 8)" in repr(out)
