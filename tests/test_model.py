"""AVGN model: shapes and dtypes through every module and baseline switch, top-K / exit logic, checkpoints."""

import math

import pytest
import torch
from avgn_fast.kernels.crop_patches import crop_patches_ref
from switches import SWITCHES, TINY
from tolerances import tol

import avgn_fast
from avgn_fast.checkpoint import FORMAT, load_checkpoint, save_checkpoint
from avgn_fast.data.audio import frame_params
from avgn_fast.flops import count_gmacs
from avgn_fast.models import ops
from avgn_fast.models.aespa import AESPA
from avgn_fast.models.avgn import AVGN, GlanceResult
from avgn_fast.models.avtest import AVTeST, top_k_frames, uniform_frames
from avgn_fast.models.backbones import make_divisible, mobilenet_v2, resnet18
from avgn_fast.models.classifier import StepClassifier, exit_steps

pytestmark = pytest.mark.usefixtures("one_thread")  # small shapes: see conftest


def make_inputs(config, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    t, s = config.num_frames, config.frame_size
    n_steps = frame_params(config.sample_rate, window_s=config.audio_window_s, win_ms=config.win_ms,
                           hop_ms=config.hop_ms).n_steps
    frames = torch.randint(0, 256, (b, t, 3, s, s), dtype=torch.uint8, generator=g)
    mel = torch.randn(b, t, config.n_mels, n_steps, generator=g) * 3 - 4
    return frames, mel


def build(config, seed=0):
    torch.manual_seed(seed)
    return AVGN(config).eval()


@pytest.mark.parametrize("name", list(SWITCHES))
def test_glance_shapes_and_dtypes_for_every_switch(name):
    config = TINY.replace(**SWITCHES[name])
    model = build(config)
    frames, mel = make_inputs(config, b=3)
    result = model.glance(frames, mel)
    b, t, s = 3, config.num_frames, config.frame_size
    k = t if config.dense else config.k
    c = config.num_classes
    assert result.logits.shape == result.probs.shape == (b, k, c)
    assert result.logits.dtype == torch.float32 and torch.isfinite(result.logits).all()
    torch.testing.assert_close(result.probs.sum(-1), torch.ones(b, k))
    assert result.saliency.shape == (b, t) and result.saliency.dtype == torch.float32
    assert result.kept.shape == (b, k) and result.kept.dtype == torch.int64
    assert ((result.kept >= 0) & (result.kept < t)).all()
    assert all(len(set(row.tolist())) == k for row in result.kept), "a frame was kept twice"
    assert result.boxes.shape == (b, k, 4)
    sizes = result.boxes[..., 2:] - result.boxes[..., :2]
    size = 0 if not config.visual else s if config.dense else config.patch_size  # audio-only: nothing cropped
    torch.testing.assert_close(sizes, torch.full_like(sizes, size))
    assert (result.boxes[..., :2] >= 0).all() and (result.boxes[..., 2:] <= s).all()
    assert result.exit_step.tolist() == [k - 1] * b  # no threshold: every video takes every step
    torch.testing.assert_close(result.final_logits, result.logits[:, -1])
    cost = model.cost()
    torch.testing.assert_close(result.gflops, torch.full((b,), cost.per_video + k * cost.per_step))
    if config.temporal == "uniform":
        assert result.kept.tolist() == [uniform_frames(t, k, 1)[0].tolist()] * b
    if config.spatial == "center" or config.dense:
        assert torch.equal(result.boxes[..., :2], torch.full_like(result.boxes[..., :2], (s - sizes[0, 0, 0]) / 2))
    assert "logits=(3, " in repr(result)


def test_modules_shapes():
    b, t, cv, ca = 2, 5, 24, 40
    avtest = AVTeST(cv, ca, t, dim=32, layers=2, heads=2)
    visual, audio = torch.randn(b, t, cv), torch.randn(b, t, ca)
    assert avtest(visual, audio).shape == (b, t)
    assert AVTeST(cv, None, t, dim=32, layers=1, heads=2)(visual).shape == (b, t)

    aespa = AESPA(8, (3, 4), ca, dim=32, heads=4, audio_channels=ca, audio_tokens=6)
    a, spatial = aespa(torch.randn(7, 12, 8), torch.randn(7, ca), torch.randn(7, 6, ca))
    assert a.shape == (7, 2) and spatial.shape == (7, 12)
    torch.testing.assert_close(a, torch.full((7, 2), 0.5))  # the policy starts at the frame centre
    torch.testing.assert_close(spatial.sum(-1), torch.ones(7))

    clf = StepClassifier(10, 16, 5, steps=4)
    assert clf(torch.randn(b, 3, 10)).shape == (b, 3, 5)
    with pytest.raises(ValueError, match="more than 4 steps"):
        clf(torch.randn(b, 5, 10))


def test_running_max_pool_makes_step_k_depend_on_first_k_frames_only():
    clf = StepClassifier(6, 8, 3, steps=4)
    x = torch.randn(2, 4, 6)
    y = x.clone()
    y[:, 2:] = torch.randn(2, 2, 6)
    out_x, out_y = clf(x), clf(y)
    torch.testing.assert_close(out_x[:, :2], out_y[:, :2])
    assert not torch.allclose(out_x[:, 2:], out_y[:, 2:])


def test_top_k_is_descending_saliency_order():
    saliency = torch.tensor([[0.1, 0.9, -2.0, 0.5, 0.7], [3.0, 2.0, 1.0, 0.0, -1.0]])
    assert top_k_frames(saliency, 3).tolist() == [[1, 4, 3], [0, 1, 2]]
    assert uniform_frames(16, 4, 2).tolist() == [[2, 6, 10, 14]] * 2
    assert uniform_frames(5, 5, 1).tolist() == [[0, 1, 2, 3, 4]]


def test_exit_steps_on_hand_made_probabilities():
    probs = torch.tensor([
        [[0.5, 0.5], [0.7, 0.3], [0.95, 0.05]],  # passes 0.9 at step 2
        [[0.92, 0.08], [0.6, 0.4], [0.99, 0.01]],  # passes at step 0
        [[0.5, 0.5], [0.6, 0.4], [0.8, 0.2]],  # never passes: last step
    ])
    assert exit_steps(probs, 0.9).tolist() == [2, 0, 2]
    assert exit_steps(probs, 0.65).tolist() == [1, 0, 2]
    assert exit_steps(probs, None).tolist() == [2, 2, 2]
    assert exit_steps(probs, 0.0).tolist() == [0, 0, 0]


def test_glance_early_exit_picks_logits_and_gflops_of_the_exit():
    model = build(TINY)
    frames, mel = make_inputs(TINY, b=4)
    full = model.glance(frames, mel)
    threshold = float(full.probs.amax(-1)[:, 0].max())  # at least one video exits at step 0
    early = model.glance(frames, mel, exit_threshold=threshold)
    expected = exit_steps(full.probs, threshold)
    assert torch.equal(early.exit_step, expected) and expected.min() == 0
    torch.testing.assert_close(early.final_logits, full.logits[torch.arange(4), expected])
    cost = model.cost()
    torch.testing.assert_close(early.gflops, cost.per_video + cost.per_step * (expected + 1).float())
    shorter = model.glance(frames, mel, k=2)
    torch.testing.assert_close(shorter.logits, full.logits[:, :2])
    with pytest.raises(ValueError, match="k must be in"):
        model.glance(frames, mel, k=TINY.k + 1)


def _avtest_macs(config, audio_dim, visual_dim):
    """Closed-form MACs of AV-TeST: input projections, per layer qkv/out/MLP linears and attention, head."""
    t, d = config.num_frames, config.avtest_dim
    per_layer = 8 * t * d * d + 2 * t * t * d  # one token per frame
    return t * d * (visual_dim + audio_dim) + config.avtest_layers * per_layer + t * d


def _aespa_macs(config, audio_dim, visual_dim, mel_steps):
    """Closed-form MACs of AESPA + policy for one frame (tokens of the stride-8 glance stage, 4-way reduce)."""
    d, r = config.aespa_dim, 4
    positions = math.ceil(config.glance_size / 8) ** 2
    channels = make_divisible(32 * config.glance_width)
    macs = positions * channels * d + (audio_dim or visual_dim) * d  # token and query projections
    if audio_dim:
        audio_tokens = math.ceil(config.n_mels / 32) * math.ceil(mel_steps / 32)
        macs += audio_tokens * audio_dim * d  # audio token projection
        macs += 2 * positions * d * d + audio_tokens * 2 * d * d + 2 * positions * audio_tokens * d  # enhance
    macs += 2 * d * d + positions * 2 * d * d + 2 * positions * d  # locate: one query over the positions
    return macs + positions * d * r + (positions * (r + 1) + d) * d + 2 * d  # reduce, policy MLP


@pytest.mark.parametrize("audio", [True, False])
def test_cost_is_the_backbones_plus_closed_form_parts(audio):
    # independent of the model's component list: backbones built here, the rest in closed form
    config = TINY.replace(audio=audio)
    assert config.glance_token_stride == 8 and config.local_arch == "resnet18"
    model = build(config)
    cost = model.cost()
    visual_dim = make_divisible(1280 * max(1.0, config.glance_width))
    audio_dim = make_divisible(1280 * max(1.0, config.audio_width)) if audio else 0
    t, g, p = config.num_frames, config.glance_size, config.patch_size
    glance = t * count_gmacs(mobilenet_v2(width_mult=config.glance_width), torch.randn(1, 3, g, g))
    if audio:
        audio_net = mobilenet_v2(width_mult=config.audio_width, in_channels=1)
        glance += t * count_gmacs(audio_net, torch.randn(1, 1, config.n_mels, model.mel_steps))
    assert cost.per_video == pytest.approx(glance + _avtest_macs(config, audio_dim, visual_dim) / 1e9, rel=1e-6)
    local = count_gmacs(resnet18(width=config.local_width), torch.randn(1, 3, p, p))
    fused, hidden = audio_dim + visual_dim + model.local.out_channels, config.fusion_dim
    step = (_aespa_macs(config, audio_dim, visual_dim, model.mel_steps) + fused * hidden + hidden * hidden
            + hidden * config.num_classes)
    assert cost.per_step == pytest.approx(local + step / 1e9, rel=1e-6)


def test_missing_audio_ignores_the_mel():
    model = build(TINY)
    frames, mel = make_inputs(TINY, b=2)
    present = torch.tensor([True, False])
    other = mel.clone()
    other[1] = torch.randn_like(other[1])
    out1 = model.glance(frames, mel, audio_present=present)
    out2 = model.glance(frames, other, audio_present=present)
    torch.testing.assert_close(out1.logits[1], out2.logits[1])
    assert torch.equal(out1.kept[1], out2.kept[1])


def test_patch_crop_follows_the_corner_convention():
    model = build(TINY.replace(spatial="center"))
    frames, _ = make_inputs(TINY, b=2)
    s, p = TINY.frame_size, TINY.patch_size
    a = torch.tensor([[[0.0, 0.0], [1.0, 1.0]], [[0.0, 1.0], [0.25, 0.5]]])
    kept = torch.tensor([[3, 0], [5, 7]])
    patches = model.crop(frames, kept, a)
    assert patches.is_contiguous(memory_format=torch.channels_last) and patches.dtype == torch.float32
    norm = (frames.float() - model.pixel_mean.view(3, 1, 1)) / model.pixel_std.view(3, 1, 1)
    corners = (a * (s - p)).long()
    for i, (b, j) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        y, x = corners[b, j].tolist()
        torch.testing.assert_close(patches[i], norm[b, kept[b, j], :, y:y + p, x:x + p], **tol(torch.float32))
    torch.testing.assert_close(model.boxes(a)[0, 1], torch.tensor([s - p, s - p, s, s], dtype=torch.float32))
    # the rows of a compacted batch: video 1 alone, as the early-exit engine crops it
    assert torch.equal(model.crop(frames, kept[1:], a[1:], rows=torch.tensor([1])), patches[2:])


def test_ops_use_the_references_on_cpu():
    images = torch.randint(0, 256, (3, 3, 20, 20), dtype=torch.uint8)
    centers = torch.tensor([[10.3, 9.6], [4.0, 15.5]])
    index = torch.tensor([2, 0])
    expected = crop_patches_ref(images, centers, 7, index=index)
    torch.testing.assert_close(ops.crop_patches(images, centers, 7, index=index), expected, **tol(torch.float32))
    q, k, v = torch.randn(2, 2, 5, 16), torch.randn(2, 2, 3, 16), torch.randn(2, 2, 3, 16)
    out, weights = ops.av_attention(q, k, v, return_weights=True)
    reference = torch.softmax(q.double() @ k.double().transpose(-1, -2) / 4, -1)
    torch.testing.assert_close(weights.double(), reference, **tol(torch.float32))
    torch.testing.assert_close(out.double(), reference @ v.double(), **tol(torch.float32))


def test_input_validation():
    model = build(TINY)
    frames, mel = make_inputs(TINY, b=1)
    with pytest.raises(ValueError, match="frames must be uint8"):
        model.glance(frames.float(), mel)
    with pytest.raises(ValueError, match="mel must be float"):
        model.glance(frames, mel[..., :-1])
    with pytest.raises(ValueError, match="audio_present must be bool"):
        model.glance(frames, mel, audio_present=torch.ones(1))
    with pytest.raises(ValueError, match="exit_step must lie"):
        GlanceResult(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), torch.tensor([2]), torch.zeros(1, 3),
                     torch.zeros(1, 4), torch.zeros(1, 2, dtype=torch.int64), torch.zeros(1, 2, 4), torch.zeros(1))
    with pytest.raises(ValueError, match="boxes must have shape"):
        GlanceResult(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), torch.tensor([1]), torch.zeros(1, 3),
                     torch.zeros(1, 4), torch.zeros(1, 2, dtype=torch.int64), torch.zeros(1, 2), torch.zeros(1))


def test_checkpoint_round_trip_gives_equal_outputs(tmp_path):
    config = TINY.replace(num_classes=3)
    model = build(config, seed=3)
    frames, mel = make_inputs(config, b=2, seed=1)
    path = tmp_path / "model.pt"
    save_checkpoint(path, model, class_names=["a", "b", "c"], metrics={"val_top1": 0.5})
    loaded = avgn_fast.load(path)
    assert loaded.config == config and loaded.class_names == ["a", "b", "c"]
    assert loaded.metrics == {"val_top1": 0.5}
    before, after = model.glance(frames, mel), loaded.glance(frames, mel)
    for name in ("logits", "saliency", "kept", "boxes", "gflops"):
        assert torch.equal(getattr(before, name), getattr(after, name)), name


def test_wrong_or_corrupt_checkpoints_raise_naming_the_file(tmp_path):
    model = build(TINY.replace(num_classes=2))
    good = tmp_path / "good.pt"
    save_checkpoint(good, model, class_names=["x", "y"])
    cases = {}
    cases["garbage.pt"] = b"definitely not a checkpoint" * 10
    cases["truncated.pt"] = good.read_bytes()[: good.stat().st_size // 2]
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    torch.save({"state_dict": model.state_dict()}, tmp_path / "untagged.pt")
    torch.save({"format": FORMAT, "version": 99}, tmp_path / "future.pt")
    payload = torch.load(good, weights_only=True)
    payload["state_dict"] = {k: v for k, v in list(payload["state_dict"].items())[:-3]}
    torch.save(payload, tmp_path / "partial.pt")
    expected = {"garbage.pt": "not a readable", "truncated.pt": "not a readable", "untagged.pt": "format tag",
                "future.pt": "version 99", "partial.pt": "not describe a valid AVGN"}
    for name, message in expected.items():
        with pytest.raises(ValueError, match=message) as info:
            avgn_fast.load(tmp_path / name)
        assert name in str(info.value)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="class names"):
        save_checkpoint(tmp_path / "bad.pt", model, class_names=["only one"])


@pytest.mark.parametrize("clip_mean", [True, False])
def test_audio_clip_mean_decides_whether_a_frames_audio_features_are_its_own(clip_mean):
    """With the clip's spectral mean (the default) a frame's audio features change when another frame's sound does;
    without it (``audio_clip_mean=False``) they do not."""
    model = build(TINY.replace(audio_clip_mean=clip_mean))
    _, mel = make_inputs(TINY, seed=5)
    g = torch.Generator().manual_seed(6)
    other = mel.clone()
    other[:, 1:] += torch.randn(other[:, 1:].shape, generator=g) * 2 + 1
    present = torch.ones(2, dtype=torch.bool)
    with torch.no_grad():
        for m in model.modules():  # BatchNorm statistics of these inputs, so the features do not vanish
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.momentum = 1.0
        model.train().encode_audio(mel, present)
        model.eval()
        _, pooled = model.encode_audio(mel, present)
        _, pooled_other = model.encode_audio(other, present)
    assert pooled[:, 0].abs().mean() > 1e-3
    if clip_mean:
        assert not torch.allclose(pooled[:, 0], pooled_other[:, 0], **tol(torch.float32))
    else:
        torch.testing.assert_close(pooled_other[:, 0], pooled[:, 0], **tol(torch.float32))
