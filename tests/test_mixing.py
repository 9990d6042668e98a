"""Mixup and CutMix: the draw and apply against hand-computed cases, soft-target losses against hard ones
(torch's own cross entropy as the reference), a training run with mixing, and validation never mixed."""

import math

import pytest
import torch
import torch.nn.functional as F

from avgn_fast.cli import build_parser
from avgn_fast.cli import main as cli_main
from avgn_fast.config import AVGNConfig
from avgn_fast.data.augment import Augmentation
from avgn_fast.data.synth import generate_tensors
from avgn_fast.models.avgn import AVGN
from avgn_fast.training import LossWeights, TensorSource, TrainSettings, avgn_losses, evaluate, fit
from avgn_fast.training.batches import (
    MixDraw,
    Mixing,
    TrainingSource,
    beta_from_uniforms,
    cutmix_boxes,
    draw_beta,
    draw_mixing,
    mel_spans,
    mix_batch,
)
from avgn_fast.training.losses import frame_cross_entropy, instance_cross_entropy, true_class_prob

SMALL = AVGNConfig.from_name("tiny", num_frames=8, k=2)

pytestmark = pytest.mark.usefixtures("one_thread")  # small shapes: see conftest


@pytest.fixture(scope="module")
def synth():
    return generate_tensors(8, config=SMALL, seed=11)


# --- the draw --------------------------------------------------------------------------------------


def test_beta_from_uniforms_hand_cases():
    # alpha 1/2: x = 0.25^2 = 0.0625, y = 0.16^2 = 0.0256, sum 0.0881 <= 1 -> 0.0625 / 0.0881
    # alpha 1: x = 0.3, y = 0.2 -> 0.6; alpha 1/2 on (0.9, 0.9): 0.81 + 0.81 > 1, rejected
    values, accepted = beta_from_uniforms(torch.tensor([[0.25, 0.16], [0.9, 0.9]]), 0.5)
    assert accepted.tolist() == [True, False]
    assert values[0].item() == pytest.approx(0.0625 / 0.0881, rel=1e-6)
    values, accepted = beta_from_uniforms(torch.tensor([[0.3, 0.2], [0.7, 0.6]]), 1.0)
    assert accepted.tolist() == [True, False] and values[0].item() == pytest.approx(0.6, rel=1e-6)
    # a tiny alpha: powers of 1/alpha = 50 underflow float64 directly, not in logs
    values, accepted = beta_from_uniforms(torch.tensor([[1e-8, 2e-8]]), 0.02)
    assert accepted.item() and values.item() == pytest.approx(1 / (1 + 2.0**50), rel=1e-6)


@pytest.mark.parametrize("alpha", [0.2, 1.0, 2.0])
def test_draw_beta_has_the_moments_of_beta(alpha):
    draws = draw_beta(40000, alpha, torch.Generator().manual_seed(int(alpha * 10)))
    assert draws.shape == (40000,) and draws.dtype == torch.float64 and ((draws >= 0) & (draws <= 1)).all()
    # Beta(a, a): mean 1/2, variance 1 / (4 (2a + 1)); standard errors about 0.002 and 0.001 here
    assert draws.mean().item() == pytest.approx(0.5, abs=0.01)
    assert draws.var().item() == pytest.approx(1 / (4 * (2 * alpha + 1)), abs=0.006)


def test_cutmix_boxes_and_mel_spans_hand_cases():
    # lam 0.75, size 16: side round(16 * 0.5) = 8; centre (8, 4) -> corner (4, 0)
    # lam 0.75, centre (0, 15): rows [-4, 4) -> [0, 4), columns [11, 19) -> [11, 16): clipped to 4 x 5
    # lam 0.1, size 16: side round(16 * sqrt(0.9)) = round(15.18) = 15; centre (15, 0): rows [8, 16), cols [0, 8)
    boxes = cutmix_boxes(torch.tensor([0.75, 0.75, 0.1], dtype=torch.float64),
                         torch.tensor([[0.5, 0.25], [0.0, 0.99], [0.99, 0.0]]), 16)
    assert boxes.tolist() == [[4, 0, 8, 8], [0, 11, 4, 5], [8, 0, 8, 8]]
    # share 0.25 of 20 steps: width 5, start floor(0.5 * 16) = 8; share 0: width 0; share 1: all 20 steps
    spans = mel_spans(torch.tensor([0.25, 0.0, 1.0], dtype=torch.float64), torch.tensor([0.5, 0.7, 0.99]), 20)
    assert spans.tolist() == [[8, 5], [14, 0], [0, 20]]


def _johnk(pairs: list[tuple[float, float]], alpha: float, n: int) -> list[float]:
    """Jöhnk's method in plain floats: the first ``n`` accepted pairs."""
    out = []
    for u, v in pairs:
        x, y = u ** (1 / alpha), v ** (1 / alpha)
        if x + y <= 1:
            out.append(x / (x + y))
    return out[:n]


def test_a_fixed_seeds_cutmix_draw_by_hand():
    batch, size, steps, seed = 4, 16, 20, 123
    draw = draw_mixing(batch, size, steps, Mixing(cutmix=1.0), torch.Generator().manual_seed(seed))
    # the same uniforms, in the draw's documented order: partners, Beta pairs, box centres, span starts
    g = torch.Generator().manual_seed(seed)
    partner = torch.randperm(batch, generator=g).tolist()
    lam = _johnk(torch.rand(16, 2, generator=g, dtype=torch.float64).tolist(), 1.0, batch)
    assert len(lam) == batch  # 16 pairs were enough for this seed
    centres, starts = torch.rand(batch, 2, generator=g).tolist(), torch.rand(batch, generator=g).tolist()
    assert draw.partner.tolist() == partner
    for i in range(batch):
        cut = round(size * math.sqrt(1 - lam[i]))
        cy, cx = math.floor(centres[i][0] * size), math.floor(centres[i][1] * size)
        top, bottom = min(max(cy - cut // 2, 0), size), min(max(cy - cut // 2 + cut, 0), size)
        left, right = min(max(cx - cut // 2, 0), size), min(max(cx - cut // 2 + cut, 0), size)
        assert draw.boxes[i].tolist() == [top, left, bottom - top, right - left]
        share = (bottom - top) * (right - left) / size**2
        assert draw.lam[i].item() == pytest.approx(1 - share, abs=1e-12)
        width = round(share * steps)
        assert draw.spans[i].tolist() == [math.floor(starts[i] * (steps - width + 1)), width]


def test_a_fixed_seeds_mixup_draw_by_hand_and_off_draws_nothing():
    g = torch.Generator().manual_seed(7)
    draw = draw_mixing(5, 16, 20, Mixing(mixup=0.4), g)
    h = torch.Generator().manual_seed(7)
    assert draw.partner.tolist() == torch.randperm(5, generator=h).tolist()
    expected = [round(v * 128) / 128 for v in _johnk(torch.rand(16, 2, generator=h, dtype=torch.float64).tolist(),
                                                      0.4, 5)]  # on the fixed-point grid of the frame blend
    assert draw.lam.tolist() == expected and draw.boxes is None
    state = g.get_state()
    assert draw_mixing(5, 16, 20, Mixing(), g) is None and torch.equal(g.get_state(), state)
    with pytest.raises(ValueError, match="Beta concentrations"):
        Mixing(mixup=-0.1)
    with pytest.raises(ValueError, match="Beta concentrations"):
        TrainSettings(cutmix=float("nan"))


# --- the apply -------------------------------------------------------------------------------------


def _batch(seed: int, b: int = 3, t: int = 2, size: int = 6, bins: int = 4, steps: int = 7, classes: int = 5):
    g = torch.Generator().manual_seed(seed)
    frames = torch.randint(0, 256, (b, t, 3, size, size), dtype=torch.uint8, generator=g)
    mel = torch.randn(b, t, bins, steps, generator=g) * 3 - 4
    targets = F.one_hot(torch.randint(classes, (b,), generator=g), classes).float()
    return frames, mel, targets


def test_mixup_apply_against_a_hand_loop():
    frames, mel, targets = _batch(1)
    present = torch.tensor([True, False, True])
    shares = [38, 64, 115]  # in 1/128
    draw = MixDraw(torch.tensor([2, 0, 1]), torch.tensor(shares, dtype=torch.float64) / 128)
    out_frames, out_mel, out_present, out_targets = mix_batch(frames, mel, present, targets, draw)
    for i, (j, q) in enumerate(zip([2, 0, 1], shares, strict=True)):
        lam = q / 128
        a, b = frames[i].long(), frames[j].long()
        # rounded half up, in integers: floor((a q + b (128 - q)) / 128 + 1/2)
        assert torch.equal(out_frames[i].long(), torch.div(a * q + b * (128 - q) + 64, 128, rounding_mode="floor"))
        assert ((out_frames[i].double() - (lam * a + (1 - lam) * b)).abs() <= 0.5).all()
        power = lam * mel[i].double().exp() + (1 - lam) * mel[j].double().exp()
        torch.testing.assert_close(out_mel[i].double(), power.log(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out_targets[i], lam * targets[i] + (1 - lam) * targets[j])
        assert out_present[i].item() == bool(present[i] or present[j])
    assert out_frames.dtype == torch.uint8 and torch.allclose(out_targets.sum(-1), torch.ones(3))
    with pytest.raises(ValueError, match="multiples of 1/128"):
        mix_batch(frames, mel, present, targets, MixDraw(torch.tensor([2, 0, 1]), torch.tensor([0.3, 0.5, 0.9])))


def test_mixup_of_silence_with_silence_stays_silence():
    silence = torch.full((2, 2, 4, 7), math.log(1e-6))
    draw = MixDraw(torch.tensor([1, 0]), torch.tensor([45 / 128, 0.8125], dtype=torch.float64))
    frames, _, targets = _batch(2, b=2)
    _, mel, _, _ = mix_batch(frames, silence, torch.zeros(2, dtype=torch.bool), targets, draw)
    torch.testing.assert_close(mel, silence)


def test_cutmix_apply_against_a_hand_loop():
    frames, mel, targets = _batch(3)
    present = torch.tensor([False, False, True])
    # a cycle of partners: a writer reading rows it had already written would show here
    boxes = torch.tensor([[1, 2, 3, 4], [0, 0, 6, 6], [5, 5, 1, 1]])
    spans = torch.tensor([[2, 3], [0, 7], [6, 1]])
    lam = 1 - (boxes[:, 2] * boxes[:, 3]).double() / 36
    draw = MixDraw(torch.tensor([1, 2, 0]), lam, boxes, spans)
    out_frames, out_mel, out_present, out_targets = mix_batch(frames, mel, present, targets, draw)
    for i, j in enumerate([1, 2, 0]):
        top, left, h, w = boxes[i].tolist()
        start, width = spans[i].tolist()
        for y in range(6):
            for x in range(6):
                inside = top <= y < top + h and left <= x < left + w
                assert torch.equal(out_frames[i, :, :, y, x], frames[j if inside else i, :, :, y, x])
        for s in range(7):
            assert torch.equal(out_mel[i, ..., s], mel[j if start <= s < start + width else i, ..., s])
        torch.testing.assert_close(out_targets[i], lam[i].float() * targets[i] + (1 - lam[i].float()) * targets[j])
    assert out_present.tolist() == [False, True, True]


# --- soft targets in the losses --------------------------------------------------------------------


def test_soft_target_cross_entropies_equal_hard_ones_for_one_hot_targets():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 5, 6, generator=g) * 2
    labels = torch.tensor([4, 0, 2])
    soft = F.one_hot(labels, 6).float()
    reference = F.cross_entropy(logits.reshape(15, 6), labels.repeat_interleave(5))  # torch's own, hard labels
    torch.testing.assert_close(frame_cross_entropy(logits, soft), reference)
    torch.testing.assert_close(frame_cross_entropy(logits, labels), reference)
    weight = torch.tensor([0.2, 1.0, 0.5])
    torch.testing.assert_close(frame_cross_entropy(logits, soft, weight), frame_cross_entropy(logits, labels, weight))
    torch.testing.assert_close(instance_cross_entropy(logits, soft, mix=0.3),
                               instance_cross_entropy(logits, labels, mix=0.3))
    torch.testing.assert_close(true_class_prob(logits, soft), true_class_prob(logits, labels))


def test_soft_target_cross_entropy_and_target_mass_by_hand():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    target = torch.tensor([[0.7, 0.0, 0.3, 0.0], [0.0, 0.25, 0.0, 0.75]], dtype=torch.float64)
    ce, mass = 0.0, torch.empty(2, 3, dtype=torch.float64)
    for b in range(2):
        for t in range(3):
            z = logits[b, t].tolist()
            log_norm = math.log(sum(math.exp(v) for v in z))
            ce -= sum(target[b, c].item() * (z[c] - log_norm) for c in range(4)) / 6
            mass[b, t] = sum(target[b, c].item() * math.exp(z[c] - log_norm) for c in range(4))
    assert frame_cross_entropy(logits, target).item() == pytest.approx(ce, rel=1e-12)
    torch.testing.assert_close(true_class_prob(logits, target), mass)


def test_every_loss_term_is_the_same_for_one_hot_soft_targets(synth):
    torch.manual_seed(0)
    model = AVGN(SMALL)
    weights = LossWeights(random_patch=0.5)  # off by default: every term here
    args = synth.frames, synth.mel
    torch.manual_seed(1)
    hard = avgn_losses(model, *args, synth.labels, synth.audio_present, weights)
    torch.manual_seed(1)
    soft = avgn_losses(model, *args, F.one_hot(synth.labels, SMALL.num_classes).float(), synth.audio_present, weights)
    assert set(hard) == set(soft)
    for name in hard:
        torch.testing.assert_close(soft[name], hard[name], atol=1e-6, rtol=1e-5, msg=name)


def test_mixed_batch_losses_are_finite_and_train(synth):
    torch.manual_seed(0)
    model = AVGN(SMALL)
    source = TrainingSource(TensorSource.of(synth), Augmentation(flip=False), SMALL.num_frames, torch.device("cpu"),
                            Mixing(mixup=0.4, cutmix=1.0), SMALL.num_classes)
    torch.manual_seed(2)
    frames, mel, targets, present = source.batch(torch.arange(8))
    assert targets.shape == (8, SMALL.num_classes) and torch.allclose(targets.sum(-1), torch.ones(8))
    assert (targets.max(-1).values < 1).any()  # some video took a share of another class
    out = avgn_losses(model, frames, mel, targets, present, LossWeights())
    assert all(torch.isfinite(v).all() for v in out.values())
    out["total"].backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_a_run_with_mixing_trains_and_validates_on_unmixed_clips(synth):
    val = TensorSource.of(generate_tensors(4, config=SMALL, seed=12))
    for mixing in ({"mixup": 0.4}, {"cutmix": 1.0}):
        settings = TrainSettings(epochs=1, audio_warmup_epochs=1, look_epochs=1, batch_size=4, patience=None,
                                 temporal_density=1, flip=False, **mixing)
        torch.manual_seed(settings.seed)
        result = fit(AVGN(SMALL), TensorSource.of(synth), val, settings=settings,
                     class_names=[str(i) for i in range(SMALL.num_classes)])
        assert [h["stage"] for h in result.history] == ["audio", "look", "joint"]
        assert all(math.isfinite(h["loss_total"]) and 0 <= h["train_top1"] <= 1 for h in result.history)
        # validation ran on the clips as decoded: what eval reports for the same weights, bit for bit
        again = evaluate(result.model, val)
        assert (result.history[-1]["val_top1"], result.history[-1]["val_mean_ap"]) == (again.top1, again.mean_ap)
    with pytest.raises(ValueError, match="mixing is for training batches"):
        TrainingSource(val, None, SMALL.num_frames, torch.device("cpu"), Mixing(mixup=0.2), SMALL.num_classes)


def test_flags_reach_the_settings(tmp_path, capsys):
    args = build_parser().parse_args(["train", "--data", "d", "--out", "o", "--mixup", "0.3", "--cutmix", "1"])
    assert (args.mixup, args.cutmix) == (0.3, 1.0)
    defaults = build_parser().parse_args(["train", "--data", "d", "--out", "o", "--no-augment"])
    assert (defaults.mixup, defaults.cutmix) == (0.0, 0.0) == (TrainSettings().mixup, TrainSettings().cutmix)
    assert TrainSettings(mixup=0.3, cutmix=1.0).mixing() == Mixing(0.3, 1.0)
    assert TrainSettings(mixup=0.3).without_augmentation().mixing() == Mixing()
    assert cli_main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--mixup", "-1"]) == 2
    assert "Beta concentrations" in capsys.readouterr().err


def test_a_mixing_run_resumes_exactly_and_a_run_saved_before_mixing_resumes(synth, tmp_path):
    settings = TrainSettings(epochs=2, audio_warmup_epochs=0, look_epochs=0, batch_size=4, seed=2, patience=None,
                             temporal_density=1, flip=False, cutmix=1.0)
    names = [str(i) for i in range(SMALL.num_classes)]
    torch.manual_seed(settings.seed)
    whole = fit(AVGN(SMALL), TensorSource.of(synth), None, settings=settings, class_names=names)

    def crash_after_first_epoch(line):
        raise KeyboardInterrupt(line)

    torch.manual_seed(settings.seed)
    with pytest.raises(KeyboardInterrupt):
        fit(AVGN(SMALL), TensorSource.of(synth), None, settings=settings, class_names=names, out_dir=tmp_path,
            log=crash_after_first_epoch)
    resumed = fit(AVGN(SMALL), TensorSource.of(synth), None, settings=settings, class_names=names, out_dir=tmp_path,
                  resume=True)
    assert resumed.history == whole.history
    assert all(torch.equal(a, b) for a, b in zip(resumed.model.state_dict().values(),
                                                 whole.model.state_dict().values(), strict=True))
    # the same last.pt as a run from before mixing existed wrote it (no mixing fields): read as a run without mixing
    unmixed = TrainSettings(**{**settings.as_dict(), "losses": settings.losses, "cutmix": 0.0})
    payload = torch.load(tmp_path / "last.pt", weights_only=False)
    del payload["train_state"]["settings"]["mixup"], payload["train_state"]["settings"]["cutmix"]
    torch.save(payload, tmp_path / "last.pt")
    with pytest.raises(ValueError, match=r"settings.cutmix=0.0 there, 1.0 here"):
        fit(AVGN(SMALL), TensorSource.of(synth), None, settings=settings, class_names=names, out_dir=tmp_path,
            resume=True)
    assert len(fit(AVGN(SMALL), TensorSource.of(synth), None, settings=unmixed, class_names=names,
                   out_dir=tmp_path, resume=True).history) == 2
