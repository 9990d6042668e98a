"""Early-exit threshold choice (``pareto.choose_threshold``) against a brute-force reference, and ``avgn-fast
calibrate`` end to end on real encoded videos."""

import json

import pytest
import torch

import avgn_fast
from avgn_fast.checkpoint import save_checkpoint
from avgn_fast.cli import main as cli_main
from avgn_fast.config import AVGNConfig
from avgn_fast.data.synth import CLASS_NAMES, write_dataset
from avgn_fast.models.avgn import AVGN
from avgn_fast.pareto import choose_threshold

pytestmark = pytest.mark.usefixtures("one_thread")  # small shapes: see conftest


def brute_force(probs, labels, per_video, per_step, max_drop, margin=0.0):
    """Every distinct confidence of the steps that can exit as a threshold, exits found by walking each video's
    steps: (threshold, top1, mean steps) of the rule choose_threshold documents. A threshold qualifies when the
    top-1 holds at every point of its band that can exit differently: each confidence, each midpoint between
    neighbouring confidences, and the band's ends."""
    n, k, _ = probs.shape
    conf = probs.amax(-1)

    def outcome(tau):
        correct = steps = 0
        for i in range(n):
            step = next((j for j in range(k) if tau is not None and conf[i, j] >= tau), k - 1)
            correct += int(probs[i, step].argmax() == labels[i])
            steps += step + 1
        return correct / n, steps / n

    full_top1, _ = outcome(None)
    values = sorted({float(c) for c in conf.flatten()})
    probes = values + [(a + b) / 2 for a, b in zip(values, values[1:])]
    best = (None, full_top1, float(k))
    for tau in sorted({float(c) for c in conf[:, :-1].flatten()}):
        top1, steps = outcome(tau)
        band = [t for t in probes + [tau - margin, tau + margin] if tau - margin <= t <= tau + margin]
        if any(outcome(t)[0] < full_top1 - max_drop - 1e-12 for t in band):
            continue
        if (steps, -top1, -tau) < (best[2], -best[1], -(best[0] or 1.0)):
            best = (tau, top1, steps)
    return best


@pytest.mark.parametrize("seed, max_drop", [(0, 0.0), (1, 0.02), (2, 0.1), (3, 1.0)])
def test_choice_matches_brute_force(seed, max_drop):
    g = torch.Generator().manual_seed(seed)
    n, k, c = 50, 4, 5
    labels = torch.randint(0, c, (n,), generator=g)
    logits = torch.randn(n, k, c, generator=g) * 2
    logits[torch.arange(n), :, labels] += torch.linspace(0, 3, k)  # later steps more often right, as trained
    probs = logits.softmax(-1)
    choice = choose_threshold(probs, labels, per_video=0.3, per_step=0.1, max_drop=max_drop)
    tau, top1, steps = brute_force(probs, labels, 0.3, 0.1, max_drop)
    assert choice.threshold == pytest.approx(tau) if tau is not None else choice.threshold is None
    assert (choice.top1, choice.steps) == pytest.approx((top1, steps))
    assert choice.gflops == pytest.approx(0.3 + 0.1 * steps) and choice.full_gflops == pytest.approx(0.3 + 0.1 * k)
    assert choice.top1 >= choice.full_top1 - max_drop - 1e-12
    if max_drop == 1.0:  # anything goes: every video leaves after its first step
        assert choice.steps == 1.0


@pytest.mark.parametrize("seed, max_drop, margin", [(4, 0.0, 0.05), (5, 0.02, 0.1), (6, 0.04, 0.2), (7, 0.0, 1.0)])
def test_choice_with_a_margin_matches_brute_force(seed, max_drop, margin):
    g = torch.Generator().manual_seed(seed)
    n, k, c = 30, 3, 4
    labels = torch.randint(0, c, (n,), generator=g)
    logits = torch.randn(n, k, c, generator=g) * 2
    logits[torch.arange(n), :, labels] += torch.linspace(0, 3, k)
    probs = logits.softmax(-1)
    choice = choose_threshold(probs, labels, per_video=0.3, per_step=0.1, max_drop=max_drop, margin=margin)
    tau, top1, steps = brute_force(probs, labels, 0.3, 0.1, max_drop, margin)
    assert choice.threshold == pytest.approx(tau) if tau is not None else choice.threshold is None
    assert (choice.top1, choice.steps) == pytest.approx((top1, steps))
    plain = choose_threshold(probs, labels, per_video=0.3, per_step=0.1, max_drop=max_drop)
    assert choice.steps >= plain.steps  # a margin can only cost steps


def test_margin_skips_a_threshold_at_the_edge_of_its_safe_range():
    # 4 videos, 2 steps, class 0 true. Step 1 confidences 0.95 (right), 0.9 (wrong), 0.85 (right), 0.5 (wrong);
    # step 2 is right for all but the third. Top-1 holds (3 of 4) for τ in (0.9, 0.95] and in (0.5, 0.85].
    labels = torch.zeros(4, dtype=torch.int64)
    probs = torch.zeros(4, 2, 2)
    probs[:, 0, 0] = torch.tensor([0.95, 0.1, 0.85, 0.5])  # video 4: a tie, which argmax gives to class 0 ...
    probs[3, 0] = torch.tensor([0.4, 0.5])  # ... so make it plainly wrong: class 1 at 0.5
    probs[:3, 0, 1] = 1 - probs[:3, 0, 0]
    probs[:, 1] = torch.tensor([[0.8, 0.2], [0.8, 0.2], [0.3, 0.7], [0.8, 0.2]])
    assert probs[:, 0].amax(-1).tolist() == pytest.approx([0.95, 0.9, 0.85, 0.5])

    def choose(margin):
        return choose_threshold(probs, labels, per_video=0.0, per_step=1.0, margin=margin).threshold

    assert choose(0.0) == pytest.approx(0.85)  # three exits, top-1 held, but 0.86 would lose a video
    assert choose(0.01) == pytest.approx(0.95)  # one exit, safe from 0.94 up
    assert choose(0.06) is None  # 0.95 - 0.06 reaches 0.9's loss


def test_no_threshold_when_every_early_exit_costs_accuracy():
    # step 1 is confidently wrong for every video, step 2 right: exiting early always loses
    labels = torch.tensor([0, 1, 2])
    probs = torch.full((3, 2, 3), 0.05)
    probs[torch.arange(3), 0, (labels + 1) % 3] = 0.9
    probs[torch.arange(3), 1, labels] = 0.6
    choice = choose_threshold(probs, labels, per_video=1.0, per_step=1.0, max_drop=0.0)
    assert choice.threshold is None and choice.steps == 2 and choice.top1 == choice.full_top1 == 1.0
    assert choose_threshold(probs[:, :1], labels, per_video=1.0, per_step=1.0).threshold is None  # K=1


def test_calibrate_cli_writes_a_checkpoint_that_exits_early(tmp_path, capsys):
    config = AVGNConfig.from_name("tiny", num_frames=8, k=3)
    data = write_dataset(tmp_path / "data", 8, seed=4, config=config, splits=(0.25, 0.5, 0.25))
    torch.manual_seed(0)
    model = AVGN(config.replace(num_classes=8))
    ckpt = save_checkpoint(tmp_path / "run" / "best.pt", model, class_names=list(CLASS_NAMES))

    # any accuracy allowed: the threshold that takes one step for every validation video
    assert cli_main(["calibrate", "--checkpoint", str(ckpt), "--data", str(data), "--max-drop", "100",
                     "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    tuned = tmp_path / "run" / "best_tau.pt"
    assert "<- chosen" in printed and f"written {tuned}" in printed
    calibrated = avgn_fast.load(tuned)
    record = calibrated.metrics["calibration"]
    assert calibrated.config.exit_threshold == record["threshold"] and record["steps"] == 1.0
    assert record["split"] == "val" and record["videos"] == 4
    assert all(torch.equal(a, b) for a, b in zip(calibrated.state_dict().values(), model.state_dict().values()))

    # eval of the new checkpoint on the same split exits where calibration said: one step per video
    assert cli_main(["eval", "--checkpoint", str(tuned), "--data", str(data), "--split", "val", "--json",
                     "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)
    cost = model.cost()
    assert result["gflops"] == pytest.approx(cost.per_video + cost.per_step)
    assert result["gflops"] == pytest.approx(record["gflops"]) and result["top1"] == pytest.approx(record["top1"])

    assert cli_main(["calibrate", "--checkpoint", str(ckpt), "--data", str(data), "--max-drop", "-1"]) == 2
    assert "--max-drop" in capsys.readouterr().err

    # --check-split: what τ does on the test videos, as eval measures it there with and without early exit
    assert cli_main(["calibrate", "--checkpoint", str(ckpt), "--data", str(data), "--max-drop", "100",
                     "--check-split", "test", "--device", "cpu"]) == 0
    check = avgn_fast.load(tuned).metrics["calibration"]["check"]
    assert f"on [test], {check['videos']} videos" in capsys.readouterr().out
    top1 = {}
    for tau in ("checkpoint", "never"):
        assert cli_main(["eval", "--checkpoint", str(tuned), "--data", str(data), "--split", "test", "--json",
                         "--exit-threshold", tau, "--device", "cpu"]) == 0
        top1[tau] = json.loads(capsys.readouterr().out)["top1"]
    assert (check["top1"], check["full_top1"]) == pytest.approx((top1["checkpoint"], top1["never"]))
    assert check["gained"] - check["lost"] == round((check["top1"] - check["full_top1"]) * check["videos"])
    assert cli_main(["calibrate", "--checkpoint", str(ckpt), "--data", str(data), "--margin", "2"]) == 2
    assert "--margin" in capsys.readouterr().err


def test_eval_cli_gives_the_engines_numbers(tmp_path, capsys):
    # eval runs the engine predict runs: its numbers are the engine's on the same decoded clips
    from avgn_fast.data.folder import FolderDataset
    from avgn_fast.engine.early_exit import GlanceEngine
    from avgn_fast.training.trainer import mean_average_precision

    config = AVGNConfig.from_name("tiny", num_frames=8, k=3)
    data = write_dataset(tmp_path / "data", 8, seed=5, config=config, splits=(0.0, 0.0, 1.0))
    torch.manual_seed(1)
    model = AVGN(config.replace(num_classes=8)).eval()
    with torch.no_grad():
        for head in model.classifier.heads:  # confident enough for some videos to exit early
            head.weight.normal_(0, 2.0)
    ckpt = save_checkpoint(tmp_path / "run" / "best.pt", model, class_names=list(CLASS_NAMES))
    cache = tmp_path / "run" / "cache"  # eval's default cache: the checkpoint's folder
    dataset = FolderDataset(data, config, split="test", cache_dir=cache)
    clips = [dataset[i] for i in range(len(dataset))]
    frames = torch.stack([clip.frames for clip, _ in clips])
    mel = torch.stack([clip.mel for clip, _ in clips])
    present = torch.tensor([clip.audio_present for clip, _ in clips])
    labels = torch.tensor([label for _, label in clips])
    engine = GlanceEngine(model, device="cpu", precision="fp32", k=2)
    first = engine(frames, mel, present, exit_threshold=None).probs[:, 0].amax(-1)
    tau = round(float(first.median()), 6)  # about half the videos leave after their first step

    args = ["eval", "--checkpoint", str(ckpt), "--data", str(data), "--json", "--device", "cpu", "--backend", "eager",
            "--precision", "fp32", "--k", "2", "--exit-threshold", str(tau), "--batch-size", "3"]
    assert cli_main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["k"], result["exit_threshold"], result["backend"], result["precision"]) == (2, tau, "eager", "fp32")

    outs = [engine(frames[i:i + 3], mel[i:i + 3], present[i:i + 3], exit_threshold=tau) for i in range(0, 8, 3)]
    probs = torch.cat([o.final_logits.softmax(-1) for o in outs])
    steps = torch.cat([o.exit_step for o in outs]) + 1
    assert set(steps.tolist()) == {1, 2}, "some videos should exit early and some not"
    assert result["videos"] == 8 and result["top1"] == float((probs.argmax(-1) == labels).float().mean())
    assert result["mean_ap"] == pytest.approx(mean_average_precision(probs, labels))
    cost = model.cost()
    assert result["gflops"] == pytest.approx(float((cost.per_video + cost.per_step * steps.double()).mean()))

    assert cli_main([*args[:-6], "--backend", "fastest"]) == 2
    assert "backend must be one of" in capsys.readouterr().err
