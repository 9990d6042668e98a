"""Training: loss signs, a few steps learn, determinism and resume, and the train/eval CLIs end to end."""

import json

import pytest
import torch
from avgn_fast.kernels.crop_patches import crop_patches_ref
from tolerances import tol

import avgn_fast
from avgn_fast.checkpoint import class_layers, init_from_checkpoint, save_checkpoint
from avgn_fast.cli import main as cli_main
from avgn_fast.config import AVGNConfig
from avgn_fast.data.synth import generate_tensors, write_dataset
from avgn_fast.models.avgn import AVGN
from avgn_fast.training import (
    LossWeights,
    TensorSource,
    TrainSettings,
    avgn_losses,
    fit,
    mean_average_precision,
    saliency_ranking_loss,
    train_model,
    trainer,
)
from avgn_fast.training.losses import (
    audio_warmup_losses,
    candidate_patches,
    instance_cross_entropy,
    look_losses,
)
from avgn_fast.training.runs import carve_validation, chance_floor, plateaued
from avgn_fast.training.trainer import _schedule

# AVSynth's smallest layout (8 frames) keeps the training tests fast
SMALL = AVGNConfig.from_name("tiny", num_frames=8, k=2)


pytestmark = pytest.mark.usefixtures("one_thread")  # small shapes: see conftest


@pytest.fixture(scope="module")
def synth():
    return generate_tensors(8, config=SMALL, seed=5)


def test_saliency_ranking_loss_sign():
    teacher = torch.tensor([[0.9, 0.1, 0.5, 0.3]])
    agree = torch.tensor([[3.0, -3.0, 1.0, -1.0]])
    assert saliency_ranking_loss(agree, teacher) < saliency_ranking_loss(-agree, teacher)
    saliency = torch.zeros(1, 4, requires_grad=True)
    saliency_ranking_loss(saliency, teacher).backward()
    # descending the loss raises the saliency of frames the teacher is confident on, in the teacher's order
    assert torch.argsort(saliency.grad[0]).tolist() == torch.argsort(teacher[0], descending=True).tolist()
    flat = torch.zeros(2, 4, requires_grad=True)
    saliency_ranking_loss(flat, torch.full((2, 4), 0.3)).backward()
    assert torch.equal(flat.grad, torch.zeros(2, 4))  # no preference: equal saliency is already optimal


def test_mean_average_precision_on_hand_made_scores():
    labels = torch.tensor([0, 0, 1, 1])
    perfect = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.1, 0.9]])
    assert mean_average_precision(perfect, labels) == pytest.approx(1.0)
    # class 0 by score: x0 (+), x2 (-), x1 (+), x3 (-); class 1: x3 (+), x1 (-), x2 (+), x0 (-)
    mixed = torch.tensor([[0.9, 0.1], [0.5, 0.5], [0.6, 0.4], [0.4, 0.6]])
    assert mean_average_precision(mixed, labels) == pytest.approx((1 + 2 / 3) / 2)
    # a class without positives is left out of the mean
    assert mean_average_precision(torch.cat([perfect, torch.rand(4, 1)], 1), labels) == pytest.approx(1.0)


def test_candidate_patches_are_exact_crops():
    model = AVGN(SMALL)
    frames = torch.randint(0, 256, (2, SMALL.num_frames, 3, SMALL.frame_size, SMALL.frame_size), dtype=torch.uint8)
    kept = torch.tensor([[4, 1], [0, 7]])
    patches, grid = candidate_patches(model, frames, kept, 3)
    n, p = grid.shape[0], SMALL.patch_size
    assert patches.shape == (2 * 2 * n, 3, p, p)
    a = grid.repeat(2, 2, 1)  # (B, K·n, 2), candidates cycling fastest
    index = (torch.arange(2)[:, None] * SMALL.num_frames + kept.repeat_interleave(n, dim=1)).flatten()
    expected = crop_patches_ref(frames.flatten(0, 1), model.centers(a).flatten(0, 1), p, index=index,
                                mean=model.pixel_mean, std=model.pixel_std)
    torch.testing.assert_close(patches, expected, **tol(torch.float32))


def test_a_few_steps_lower_the_loss(synth):
    torch.manual_seed(0)
    model = AVGN(SMALL)
    frames, mel, labels, present = synth.frames, synth.mel, synth.labels, synth.audio_present
    weights = LossWeights(random_patch=0.5)  # off by default; every term here
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)

    def loss():
        torch.manual_seed(1)  # the same random patches each time
        return avgn_losses(model, frames, mel, labels, present, weights)

    first = loss()
    assert set(first) >= {"ordered", "saliency", "aux_audio", "aux_global", "aux_local",
                          "random_patch", "patch_search", "search_mil", "total"}
    for _ in range(8):
        optimizer.zero_grad()
        loss()["total"].backward()
        optimizer.step()
    assert float(loss()["total"].detach()) < 0.8 * float(first["total"].detach())


@pytest.mark.parametrize("switch", [{"audio": False}, {"temporal": "uniform"}, {"spatial": "random"},
                                    {"dense": True}, {"visual": False}])
def test_every_baseline_trains(synth, switch):
    torch.manual_seed(0)
    model = AVGN(SMALL.replace(**switch))
    out = avgn_losses(model, synth.frames[:2], synth.mel[:2], synth.labels[:2], synth.audio_present[:2],
                      LossWeights())
    assert ("saliency" in out) == (model.avtest is not None)
    assert ("patch_search" in out) == (model.aespa is not None)
    assert ("aux_audio" in out) == (model.audio is not None)
    out["total"].backward()
    trained = {name.split(".")[0] for name, p in model.named_parameters() if p.grad is not None and p.grad.any()}
    assert trained >= {"classifier"} | {name for name in ("visual", "local") if getattr(model, name) is not None}


def test_audio_only_trains_a_step_with_its_audio_encoder_and_classifier(synth):
    """``visual=False``: only the audio encoder and the classifier exist, and one ``fit`` epoch moves them."""
    torch.manual_seed(0)
    model = AVGN(SMALL.replace(visual=False))
    assert {name for name, m in model.named_children() if m is not None} == {
        "audio_norm", "audio", "part_norms", "classifier", "aux_heads"}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    settings = TrainSettings(epochs=1, audio_warmup_epochs=0, look_epochs=0, batch_size=8, patience=None)
    result = fit(model, TensorSource.of(synth), TensorSource.of(synth), settings=settings,
                 class_names=list(synth.class_names))
    changed = {k.split(".")[0] for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed >= {"audio", "classifier"}
    assert set(result.history[0]) >= {"loss_ordered", "loss_aux_audio", "val_top1"}
    assert not {"loss_aux_local", "loss_search_mil"} & set(result.history[0])  # no patches to learn from


def test_instance_cross_entropy_against_plain_cross_entropy():
    torch.manual_seed(0)
    logits, labels = torch.randn(3, 5, 4) * 2, torch.tensor([2, 0, 3])
    per_instance = torch.stack([torch.stack([-logits[b, n].log_softmax(-1)[labels[b]] for n in range(5)])
                                for b in range(3)])  # (B, N), computed independently of F.cross_entropy
    # mix=1: every instance counts alike
    torch.testing.assert_close(instance_cross_entropy(logits, labels, mix=1.0), per_instance.mean(),
                               **tol(torch.float32))
    # mix=0: instances weighted by softmax(-CE), the telling ones first
    focus = (-per_instance).softmax(1)
    torch.testing.assert_close(instance_cross_entropy(logits, labels, mix=0.0), (focus * per_instance).sum(1).mean(),
                               **tol(torch.float32))
    # the weights are detached: the gradient on each instance's logits is its weight times d CE
    x = logits.clone().requires_grad_(True)
    instance_cross_entropy(x, labels, mix=0.5).backward()
    grad_true = x.grad[torch.arange(3)[:, None], torch.arange(5), labels[:, None]]  # (B, N): -(1 - p) · w / B
    p_true = logits.softmax(-1)[torch.arange(3)[:, None], torch.arange(5), labels[:, None]]
    torch.testing.assert_close(grad_true, -(1 - p_true) * (0.5 / 5 + 0.5 * focus) / 3, **tol(torch.float32))
    # a bag of weight 0 (a video without audio) does not count
    weight = torch.tensor([1.0, 0.0, 1.0])
    torch.testing.assert_close(instance_cross_entropy(logits, labels, weight=weight),
                               instance_cross_entropy(logits[[0, 2]], labels[[0, 2]]), **tol(torch.float32))


def test_look_losses_teach_where_to_look_and_leave_the_audio_alone(synth):
    torch.manual_seed(0)
    model = AVGN(SMALL)
    frames, mel, labels, present = synth.frames[:4], synth.mel[:4], synth.labels[:4], synth.audio_present[:4]
    out = look_losses(model, frames, mel, labels, present, LossWeights())
    assert set(out) == {"aux_audio", "saliency", "search_mil", "patch_search", "total", "logits"}
    assert out["logits"].shape == (4, 1, SMALL.num_classes)
    out["total"].backward()
    trained = {name.split(".")[0] for name, p in model.named_parameters() if p.grad is not None and p.grad.any()}
    assert trained >= {"audio", "avtest", "aespa", "local", "visual", "aux_heads"}
    assert "classifier" not in trained  # the classifier waits for the joint stage
    # AV-TeST's and the policy's losses read the audio detached: they leave the audio encoder alone
    model.zero_grad(set_to_none=True)
    out = look_losses(model, frames, mel, labels, present, LossWeights())
    (out["saliency"] + out["patch_search"]).backward()
    assert all(p.grad is None or not p.grad.any() for p in model.audio.parameters())
    assert any(p.grad is not None and p.grad.any() for p in model.avtest.parameters())
    # the audio warm-up searches only when asked to, and has no glance for the policy
    assert set(audio_warmup_losses(model, frames, mel, labels, present, LossWeights())) == {"aux_audio", "total",
                                                                                             "logits"}
    warm = audio_warmup_losses(model, frames, mel, labels, present, LossWeights(warmup_search_frames=1))
    assert set(warm) == {"aux_audio", "search_mil", "total", "logits"}


def test_stages_per_switch():
    settings = TrainSettings(epochs=2, audio_warmup_epochs=1, look_epochs=2)
    assert settings.stages(SMALL) == ["audio", "look", "look", "joint", "joint"]
    # no audio teacher: no warm-up, and the look epochs are joint epochs (about the same training time)
    assert settings.stages(SMALL.replace(audio=False)) == ["joint"] * 4
    assert settings.stages(SMALL.replace(dense=True)) == ["audio"] + ["joint"] * 4
    assert settings.stages(SMALL.replace(visual=False)) == ["audio"] + ["joint"] * 4  # no patches: no look stage


def test_learning_rate_ramps_at_each_stage_and_decays_in_the_joint_stage():
    settings = TrainSettings(epochs=2, audio_warmup_epochs=1, look_epochs=1, lr_warmup_epochs=0.5)
    factor = _schedule(settings, 10, settings.stages(SMALL))  # 10 steps per epoch, ramps of 5 steps
    assert [factor(s) for s in range(5)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert factor(9) == 1.0
    assert [factor(s) for s in range(10, 15)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])  # look stage
    assert factor(19) == 1.0
    assert [factor(s) for s in range(20, 25)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])  # joint stage
    joint = [factor(s) for s in range(25, 40)]
    assert all(a > b for a, b in zip(joint, joint[1:])) and joint[-1] < 0.02  # cosine towards 0


def test_gradient_norms_are_clipped_per_model_part(synth, monkeypatch):
    from avgn_fast.training import trainer

    clipped = []
    real = torch.nn.utils.clip_grad_norm_

    def record(parameters, max_norm, *args, **kwargs):
        parameters = list(parameters)
        clipped.append({id(p) for p in parameters})
        return real(parameters, max_norm, *args, **kwargs)

    monkeypatch.setattr(trainer.torch.nn.utils, "clip_grad_norm_", record)
    settings = TrainSettings(epochs=1, audio_warmup_epochs=0, look_epochs=0, batch_size=8, seed=0)
    model = AVGN(SMALL)
    fit(model, TensorSource.of(synth), None, settings=settings, class_names=list(synth.class_names))
    parts = [{id(p) for p in part.parameters()} for part in model.children() if any(True for _ in part.parameters())]
    assert len(parts) >= 6 and clipped == parts  # one step, one clip per part, each part on its own


def _same_weights(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_training_is_deterministic_and_resumes_exactly(synth, tmp_path):
    settings = TrainSettings(epochs=2, audio_warmup_epochs=1, look_epochs=1, batch_size=4, seed=3)
    first = train_model(SMALL, synth, synth, settings=settings, epochs=2)
    second = train_model(SMALL, synth, synth, settings=settings, epochs=2)
    assert _same_weights(first.model, second.model)
    assert first.history == second.history
    assert [h["stage"] for h in first.history] == ["audio", "look", "joint", "joint"]
    assert {"train_top1", "loss_total", "val_top1", "val_mean_ap", "val_gflops"} <= set(first.history[-1])
    assert "val_top1" not in first.history[0] and "val_top1" not in first.history[1]

    class Interrupted(Exception):
        """Stands for a kill in the middle of an epoch."""

    def crash_after_first_epoch(line):
        if "stage=joint" in line:
            raise Interrupted(line)

    torch.manual_seed(settings.seed)
    names = list(synth.class_names)
    with pytest.raises(Interrupted):
        fit(AVGN(SMALL), TensorSource.of(synth), TensorSource.of(synth), settings=settings, class_names=names,
            out_dir=tmp_path, log=crash_after_first_epoch)
    resumed = fit(AVGN(SMALL), TensorSource.of(synth), TensorSource.of(synth), settings=settings, class_names=names,
                  out_dir=tmp_path, resume=True)
    assert resumed.history == first.history
    assert _same_weights(resumed.model, first.model)  # both return the best validation epoch's weights
    assert (tmp_path / "best.pt").is_file() and (tmp_path / "last.pt").is_file()
    with pytest.raises(ValueError, match="differs"):
        fit(AVGN(SMALL.replace(k=1)), TensorSource.of(synth), None, settings=settings, class_names=names,
            out_dir=tmp_path, resume=True)


def test_init_from_checkpoint_copies_weights_and_the_rows_of_shared_classes(tmp_path):
    torch.manual_seed(0)
    trained = AVGN(SMALL.replace(num_classes=3))
    path = save_checkpoint(tmp_path / "a.pt", trained, class_names=["a", "b", "c"])
    torch.manual_seed(1)
    model = AVGN(SMALL.replace(num_classes=3, exit_threshold=0.9))
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    moved = init_from_checkpoint(model, ["c", "x", "a"], path)
    assert (moved.shared_classes, moved.new_classes, moved.dropped_classes) == (["c", "a"], ["x"], ["b"])

    want, got = trained.state_dict(), model.state_dict()
    names = {id(m): n for n, m in model.named_modules()}
    per_class = {f"{names[id(layer)]}.{p}" for layer in class_layers(model) for p in ("weight", "bias")}
    assert len(per_class) == 2 * (SMALL.k + 3)  # K exit heads; local, audio and global auxiliary heads
    assert moved.tensors == len(got) - len(per_class)
    for key in got.keys() - per_class:
        assert torch.equal(got[key], want[key]), key
    for key in per_class:
        assert torch.equal(got[key][0], want[key][2]) and torch.equal(got[key][2], want[key][0]), key
        assert torch.equal(got[key][1], fresh[key][1]) and not torch.equal(got[key][1], want[key][1]), key

    with pytest.raises(ValueError, match=r"a\.pt: .*architecture differs: k=2 there, 1 here"):
        init_from_checkpoint(AVGN(SMALL.replace(num_classes=3, k=1)), ["a", "b", "c"], path)
    with pytest.raises(ValueError, match="2 class names"):
        init_from_checkpoint(AVGN(SMALL.replace(num_classes=3)), ["a", "b"], path)


def test_train_and_eval_cli_end_to_end(tmp_path, capsys):
    data = write_dataset(tmp_path / "data", 8, seed=2, config=SMALL, splits=(0.5, 0.25, 0.25))
    run = tmp_path / "run"
    common = ["--data", str(data), "--config", "tiny", "--set", "num_frames=8", "--set", "k=2", "--out", str(run),
              "--batch-size", "2", "--seed", "1", "--audio-warmup-epochs", "1", "--look-epochs", "0"]
    assert cli_main(["train", *common, "--epochs", "1"]) == 0
    assert (run / "last.pt").is_file() and (run / "best.pt").is_file()
    run_record = json.loads((run / "history.json").read_text())
    history = run_record["history"]
    assert len(history) == 2 and 0 <= history[-1]["val_top1"] <= 1
    assert (run_record["epochs"], run_record["stopped"]) == (2, "epochs")
    assert run_record["val_top1"] == [history[-1]["val_top1"]]
    model = avgn_fast.load(run / "best.pt")
    assert model.config.num_frames == 8 and model.class_names == sorted(model.class_names)

    assert cli_main(["train", *common, "--epochs", "2", "--resume"]) == 0
    assert len(json.loads((run / "history.json").read_text())["history"]) == 3
    assert cli_main(["train", *common, "--epochs", "2", "--patience", "2"]) == 2
    assert "--epochs trains a fixed count" in capsys.readouterr().err
    capsys.readouterr()

    ckpt = str(run / "last.pt")
    assert cli_main(["eval", "--checkpoint", ckpt, "--data", str(data), "--json"]) == 0
    full = json.loads(capsys.readouterr().out)
    assert full["videos"] == 2 and 0 <= full["top1"] <= 1 and 0 <= full["mean_ap"] <= 1
    assert full["gflops"] == pytest.approx(model.cost().per_video + 2 * model.cost().per_step)
    assert cli_main(["eval", "--checkpoint", ckpt, "--data", str(data), "--k", "1"]) == 0
    line = capsys.readouterr().out
    assert "top-1" in line and "mAP" in line and f"{model.cost().per_video + model.cost().per_step:.4f}" in line
    assert cli_main(["eval", "--checkpoint", ckpt, "--data", str(data), "--k", "3"]) == 2
    assert "k must be in [1, 2]" in capsys.readouterr().err
    assert cli_main(["eval", "--checkpoint", ckpt, "--data", str(data), "--exit-threshold", "often"]) == 2
    assert "--exit-threshold must be a probability" in capsys.readouterr().err
    if not torch.cuda.is_available():  # asking for a GPU that is not there fails at once, naming the device
        for command in (["train", *common, "--epochs", "1"], ["eval", "--checkpoint", ckpt, "--data", str(data)]):
            assert cli_main([*command, "--device", "cuda"]) == 2
            assert "device cuda requested but CUDA is not available" in capsys.readouterr().err

    # fine-tuning from the run's checkpoint: same classes, every weight carried over
    capsys.readouterr()
    tuned = tmp_path / "tuned"
    assert cli_main(["train", "--data", str(data), "--out", str(tuned), "--init", ckpt, "--epochs", "1",
                     "--batch-size", "2", "--audio-warmup-epochs", "0", "--look-epochs", "0"]) == 0
    out = capsys.readouterr().out
    assert f"started from {ckpt}" in out and "new classes: -; dropped: -" in out
    assert avgn_fast.load(tuned / "last.pt").config.num_frames == 8
    assert cli_main(["train", "--data", str(data), "--out", str(tuned), "--init", ckpt, "--set", "k=1"]) == 2
    assert "--init takes the architecture" in capsys.readouterr().err


def _stop_epoch(curve: list[float], patience: int, cap: int) -> int:
    """Joint epochs a run with validation curve ``curve`` trains: the first prefix that has plateaued, else the cap."""
    return next((n for n in range(1, len(curve) + 1) if plateaued(curve[:n], patience)), cap)


def test_plateau_rule_on_hand_made_curves():
    assert not plateaued([], 1)
    assert not plateaued([0.4], 1)
    assert plateaued([0.4, 0.4], 1)  # a tie is no improvement
    assert not plateaued([0.1, 0.3, 0.5, 0.5], 2) and plateaued([0.1, 0.3, 0.5, 0.5, 0.4], 2)
    # best 0.6 at the 4th epoch; the 5th-7th do not beat it (0.6 again is a tie): stop after the 7th
    curve = [0.2, 0.4, 0.4, 0.6, 0.5, 0.55, 0.6, 0.7]
    assert _stop_epoch(curve, 3, cap=8) == 7
    assert _stop_epoch(curve, 4, cap=8) == 8  # never plateaus within the cap
    # a curve that has not risen above the floor (chance) has not started: no plateau, however flat
    assert not plateaued([0.15, 0.12, 0.14, 0.13, 0.15], 1, floor=0.19) and plateaued([0.2, 0.2], 1, floor=0.19)
    assert not plateaued([0.1, 0.19, 0.1, 0.1], 2, floor=0.19) and plateaued([0.1, 0.25, 0.1, 0.1], 2, floor=0.19)
    # 8 classes: chance 1/8, standard error sqrt(1/8 · 7/8 / n)
    assert chance_floor(8, 200) == pytest.approx(0.125 + 3 * 0.0233854, abs=1e-6)
    assert chance_floor(2, 100) == pytest.approx(0.65) and chance_floor(8, 0) == pytest.approx(0.125 + 3 * 0.3307189)


def test_carve_validation_is_a_deterministic_partition():
    train, val = carve_validation(20, 0.1, seed=3)
    assert len(val) == 2 and len(train) == 18
    assert sorted(train.tolist() + val.tolist()) == list(range(20))
    again = carve_validation(20, 0.1, seed=3)
    assert torch.equal(again[0], train) and torch.equal(again[1], val)
    assert len(carve_validation(3, 0.01, seed=0)[1]) == 1 and len(carve_validation(3, 0.99, seed=0)[0]) == 1
    with pytest.raises(ValueError, match="from 1 training video"):
        carve_validation(1, 0.1, seed=0)


def test_fit_stops_at_the_plateau_and_resumes_to_the_same_stop(synth, tmp_path, monkeypatch):
    # a learning rate too small to move the weights: the validation curve flattens at once; it stays at chance, so
    # the chance floor is taken away here (test_a_run_at_chance_trains_to_the_cap has it)
    monkeypatch.setattr(trainer, "chance_floor", lambda num_classes, videos: 0.0)
    settings = TrainSettings(epochs=6, audio_warmup_epochs=0, look_epochs=0, batch_size=4, seed=1, patience=1,
                             lr=1e-9)
    names = list(synth.class_names)
    torch.manual_seed(settings.seed)
    first = fit(AVGN(SMALL), TensorSource.of(synth), TensorSource.of(synth), settings=settings, class_names=names)
    curve = [h["val_top1"] for h in first.history]
    assert len(first.history) == _stop_epoch(curve, 1, cap=6) < 6
    summary = first.summary
    assert summary["plateaued"] and summary["stopped"] == "plateau" and summary["val_top1"] == curve
    assert summary["epochs"] == summary["joint_epochs"] == len(curve) and summary["wall_s"] > 0
    assert summary["best_epoch"] == 1 + max(range(len(curve)), key=lambda i: (curve[i], -i))

    class Interrupted(Exception):
        """Stands for a kill after the first epoch."""

    def crash(line):
        raise Interrupted(line)

    torch.manual_seed(settings.seed)
    with pytest.raises(Interrupted):
        fit(AVGN(SMALL), TensorSource.of(synth), TensorSource.of(synth), settings=settings, class_names=names,
            out_dir=tmp_path, log=crash)
    resumed = fit(AVGN(SMALL), TensorSource.of(synth), TensorSource.of(synth), settings=settings, class_names=names,
                  out_dir=tmp_path, resume=True)
    assert resumed.history == first.history and _same_weights(resumed.model, first.model)
    assert {k: v for k, v in resumed.summary.items() if k != "wall_s"} == {
        k: v for k, v in summary.items() if k != "wall_s"}
    # a run that has plateaued trains no further when resumed, even with a higher cap
    again = fit(AVGN(SMALL), TensorSource.of(synth), TensorSource.of(synth), class_names=names, out_dir=tmp_path,
                settings=TrainSettings(**{**vars(settings), "epochs": 9}), resume=True)
    assert again.history == first.history


def test_a_run_at_chance_trains_to_the_cap(synth):
    # the frozen model of the test above guesses: its flat curve is no plateau, it trains to the cap and says why
    settings = TrainSettings(epochs=4, audio_warmup_epochs=0, look_epochs=0, batch_size=4, seed=1, patience=1,
                             lr=1e-9)
    lines = []
    torch.manual_seed(settings.seed)
    source = TensorSource.of(synth)
    result = fit(AVGN(SMALL), source, source, settings=settings, class_names=list(synth.class_names),
                 log=lines.append)
    floor = chance_floor(SMALL.num_classes, len(source))
    assert max(result.summary["val_top1"]) <= floor  # a frozen random model
    assert len(result.history) == 4 and result.summary["stopped"] == "cap" and not result.summary["left_chance"]
    assert result.summary["chance_floor"] == floor and "never rose above chance" in lines[-1]


def test_fit_without_validation_holds_out_training_videos(synth):
    settings = TrainSettings(epochs=1, audio_warmup_epochs=0, look_epochs=0, batch_size=8, seed=2)
    lines = []
    torch.manual_seed(0)
    result = fit(AVGN(SMALL), TensorSource.of(synth), None, settings=settings, class_names=list(synth.class_names),
                 log=lines.append)
    assert lines[0] == "no validation split: held out 1 of 8 training videos (seed 2) to find the plateau"
    assert result.summary["validation"].startswith("held out 1 of 8") and result.history[0]["val_videos"] == 1
    assert result.summary["stopped"] == "cap" and not result.summary["plateaued"]
