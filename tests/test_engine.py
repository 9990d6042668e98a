"""Backends, buckets and padding, the inductor engine on CPU, and Predictor backend= / devices= sharding."""

import importlib.util

import pytest
import torch
from media import write_garbage, write_video
from tolerances import tol

from avgn_fast.config import AVGNConfig
from avgn_fast.engine.backends import (
    StageRunner,
    bucket_sizes,
    pad_batch,
    resolve_backend,
    resolve_precision,
    state_hash,
)
from avgn_fast.engine.early_exit import GlanceEngine
from avgn_fast.engine.predictor import Predictor
from avgn_fast.engine.stages import build_stages, random_inputs
from avgn_fast.models.avgn import AVGN

TINY = AVGNConfig.from_name("tiny")
CPU = torch.device("cpu")
HAS_TENSORRT = importlib.util.find_spec("torch_tensorrt") is not None


pytestmark = pytest.mark.usefixtures("one_thread")  # small shapes: see conftest



def test_auto_backend_on_cpu_is_eager_with_a_reason():
    backend, reason = resolve_backend("auto", CPU)
    assert backend == "eager" and "no CUDA" in reason
    assert resolve_backend("inductor", CPU) == ("inductor", "requested")


@pytest.mark.skipif(HAS_TENSORRT, reason="torch_tensorrt is installed here")
def test_unavailable_or_unknown_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="'tensorrt' was requested but cannot run: torch_tensorrt is not installed"):
        resolve_backend("tensorrt", CPU)
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("onnxruntime", CPU)
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        resolve_precision("fp16", CPU)


def test_buckets_and_padding():
    assert bucket_sizes(8) == (2, 4, 8)
    assert bucket_sizes(5) == (2, 3, 5)
    assert bucket_sizes(1) == (1,)
    x = torch.randn(3, 4, 5, 6).contiguous(memory_format=torch.channels_last)
    padded = pad_batch(x, 5)
    assert padded.shape == (5, 4, 5, 6) and padded.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(padded[:3], x) and not padded[3:].any()
    assert pad_batch(x, 3) is x


def test_stage_runner_pads_to_the_bucket_and_slices_back():
    torch.manual_seed(0)
    model = AVGN(TINY).eval()
    stages = build_stages(model, torch.float32, TINY.k)
    patches = torch.randn(3, 3, TINY.patch_size, TINY.patch_size).contiguous(memory_format=torch.channels_last)
    seen = []
    stages["local"].register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
    runner = StageRunner(stages["local"], "eager", buckets=(2, 4, 8))
    with torch.inference_mode():
        (out,) = runner(patches)
        (want,) = stages["local"](patches)
    assert seen == [4, 3] and runner.bucket(3) == 4 and runner.bucket(9) == 9
    torch.testing.assert_close(out, want, **tol(torch.float32))
    audio, visual = (torch.randn(3, TINY.num_frames, net.out_channels) for net in (model.audio, model.visual))
    kept = torch.tensor([[3], [0], [15]])
    local = torch.randn(3, 1, model.local.out_channels)
    running = torch.full((3, TINY.fusion_dim), -torch.inf)
    step = torch.tensor(1)
    args = (audio, visual, kept, local, running, step)
    assert stages["step_head"].inputs == ("audio", "visual", "kept", "local", "running", "step")
    with torch.inference_mode():
        got = StageRunner(stages["step_head"], "eager", buckets=(8,))(*args)
        want = stages["step_head"](*args)
    for g, w in zip(got, want):
        assert g.shape[0] == 3
        torch.testing.assert_close(g, w, **tol(torch.float32))


def test_every_stage_padded_to_a_bucket_gives_the_unpadded_result():
    torch.manual_seed(0)
    model = AVGN(TINY).eval()
    frames, mel, present = random_inputs(TINY, 3, seed=2)
    present[1] = False
    engine = GlanceEngine(model, device="cpu")
    want = {t: engine(frames, mel, present, exit_threshold=t) for t in (None, 0.2)}
    engine.runners = {name: StageRunner(stage, "eager", buckets=(4, 16)) for name, stage in engine.stages.items()
                      if name != "crop"}  # the crop runs as it is, never padded
    for threshold, ref in want.items():
        got = engine(frames, mel, present, exit_threshold=threshold)
        assert got.exit_step.tolist() == ref.exit_step.tolist() and torch.equal(got.kept, ref.kept)
        for field in ("logits", "final_logits", "saliency", "boxes"):
            torch.testing.assert_close(getattr(got, field), getattr(ref, field), equal_nan=True,
                                       **tol(torch.float32))


def test_state_hash_follows_the_weights():
    torch.manual_seed(0)
    a, b = AVGN(TINY).eval(), AVGN(TINY).eval()
    assert state_hash(a) != state_hash(b)
    b.load_state_dict(a.state_dict())
    assert state_hash(a) == state_hash(b)


def test_inductor_engine_on_cpu_matches_eager_with_padding_and_early_exit():
    # dense visual-only and every video out after step 0 keep the compile short: local encoder and step head
    config = TINY.replace(dense=True, audio=False)
    torch.manual_seed(0)
    model = AVGN(config).eval()
    frames, mel, present = random_inputs(config, 3, seed=1)
    want = GlanceEngine(model, backend="eager", device="cpu")(frames, mel, present, exit_threshold=0.0)
    compiled = GlanceEngine(model, backend="inductor", device="cpu", max_batch=4)
    assert compiled.runners["local"].buckets == (1, 2, 4, 16, 32, 64)  # batches, and batches times K=16
    assert all(type(r.fn).__name__ == "OptimizedModule" for r in compiled.runners.values())
    shapes = []
    compiled.stages["local"].register_forward_pre_hook(lambda m, args: shapes.append(args[0].shape[0]))
    got = compiled(frames, mel, present, exit_threshold=0.0)
    assert shapes == [4]  # 3 patches padded to the bucket of 4, traced once by the compiler
    assert got.exit_step.tolist() == want.exit_step.tolist() == [0, 0, 0]
    torch.testing.assert_close(got.final_logits, want.final_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got.logits, want.logits, atol=1e-4, rtol=1e-4, equal_nan=True)


def test_inductor_on_cpu_compiles_attention_through_its_reference():
    torch.manual_seed(0)
    model = AVGN(TINY).eval()
    stage = build_stages(model, torch.float32, TINY.k)["avtest"]
    visual, audio = torch.randn(2, TINY.num_frames, 2, model.visual.out_channels).unbind(2)
    present = torch.tensor([True, False])  # a masked audio half exercises the key-padding mask
    with torch.inference_mode():
        saliency, kept = StageRunner(stage, "inductor")(visual, audio, present)
        want_saliency, want_kept = stage(visual, audio, present)
    torch.testing.assert_close(saliency, want_saliency, atol=1e-4, rtol=1e-4)
    assert torch.equal(kept, want_kept)


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    good = [write_video(root / f"v{i}.mp4", size=(96, 128), fps=8, seconds=1.0, seed=i) for i in range(3)]
    bad = write_garbage(root / "bad.mp4")
    return [good[0], bad, good[1], good[2]]


def test_predictor_on_two_cpu_workers_equals_one_process(videos):
    torch.manual_seed(0)
    model = AVGN(TINY).eval()
    settings = dict(batch_size=2, num_workers=0, topk=3, decode_backend="pyav", exit_threshold=0.13)
    one = Predictor(model, device="cpu", **settings).predict(videos)
    sharded = Predictor(model, devices=["cpu", "cpu"], **settings)
    assert sharded.pool is not None and sharded.engine is None
    two = sharded.predict(videos)
    assert [p.path for p in two] == [str(v) for v in videos]
    assert [p.ok for p in two] == [True, False, True, True]
    for a, b in zip(one, two):
        assert (a.label, a.exit_step, a.kept_frames, a.error is None) == (b.label, b.exit_step, b.kept_frames,
                                                                          b.error is None)
        if a.ok:
            torch.testing.assert_close(torch.tensor(b.patch_boxes), torch.tensor(a.patch_boxes), atol=0.01, rtol=0)
            assert b.score == pytest.approx(a.score, abs=1e-5) and b.gflops == pytest.approx(a.gflops)


def test_predictor_backend_argument():
    torch.manual_seed(0)
    model = AVGN(TINY).eval()
    assert Predictor(model, device="cpu", backend="auto").engine.backend == "eager"
    with pytest.raises(ValueError, match="backend must be one of"):
        Predictor(model, device="cpu", backend="fast")
    with pytest.raises(ValueError, match="CUDA devices are visible"):
        Predictor(model, devices=[0, 1])
