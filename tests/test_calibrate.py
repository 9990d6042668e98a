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


def brute_force(probs, labels, per_video, per_step, max_drop):
    """Every distinct confidence of the steps that can exit as a threshold, exits found by walking each video's
    steps: (threshold, top1, mean steps) of the rule choose_threshold documents."""
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
    best = (None, full_top1, float(k))
    for tau in sorted({float(c) for c in conf[:, :-1].flatten()}):
        top1, steps = outcome(tau)
        if top1 >= full_top1 - max_drop - 1e-12 and (steps, -top1, -tau) < (best[2], -best[1], -(best[0] or 1.0)):
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
