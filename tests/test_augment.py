"""Training-time augmentation: each draw and apply against a hand-computed case, temporal jitter inside the
clip with frames and mel windows together, eval/predict untouched, and a short augmented training run."""

import dataclasses
import json
import math
import subprocess
import sys

import pytest
import torch

from avgn_fast.cli import main as cli_main
from avgn_fast.config import AVGNConfig
from avgn_fast.data.audio import LOG_EPS
from avgn_fast.data.augment import (
    Augmentation,
    augment_batch,
    centre_frames,
    crop_boxes,
    flip,
    gain,
    jitter_indices,
    mask_mel,
    mask_spans,
    photometric,
    photometric_factors,
    resized_crop,
)
from avgn_fast.data.folder import FolderDataset
from avgn_fast.data.synth import write_dataset
from avgn_fast.training.batches import TrainingSource
from avgn_fast.training.trainer import FolderSource, TrainSettings, evaluate

SMALL = AVGNConfig.from_name("tiny", num_frames=8, k=2)

pytestmark = pytest.mark.usefixtures("one_thread")  # small shapes: see conftest


def _only(**on) -> Augmentation:
    """Every augmentation off but ``on``."""
    return dataclasses.replace(Augmentation.off(), **on)


# --- temporal jitter -------------------------------------------------------------------------------


def test_jitter_indices_hand_cases():
    # n=6, t=3: segments [0,2) [2,4) [4,6)
    assert jitter_indices(6, 3, torch.tensor([0.1, 0.6, 0.99])).tolist() == [0, 3, 5]
    # n=7, t=3: bounds 0, 2, 4, 7 -> segments [0,2) [2,4) [4,7)
    assert jitter_indices(7, 3, torch.tensor([0.99, 0.0, 0.99])).tolist() == [1, 2, 6]
    assert jitter_indices(7, 3, torch.tensor([0.5, 0.5, 0.5])).tolist() == [1, 3, 5]
    assert jitter_indices(4, 4, torch.tensor([0.9, 0.1, 0.7, 0.3])).tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="cannot sample 5 frames from 4"):
        jitter_indices(4, 5, torch.rand(5))


@pytest.mark.parametrize("n,t", [(16, 8), (17, 8), (8, 8), (9, 2), (24, 8)])
def test_temporal_jitter_stays_in_the_clip_and_keeps_frames_and_mel_together(n, t):
    g = torch.Generator().manual_seed(n * 31 + t)
    u = torch.rand(500, t, generator=g)
    u[0], u[1] = 0.0, 1 - 1e-7  # both ends of every segment
    index = jitter_indices(n, t, u)
    assert int(index.min()) >= 0 and int(index.max()) < n
    assert bool((index[:, 1:] > index[:, :-1]).all())  # in order, never the same frame twice
    segment = torch.arange(t)
    assert bool((index >= segment * n // t).all()) and bool((index < (segment + 1) * n // t).all())

    # frame j of video b carries 10 b + j in every pixel, its mel window the same number
    b = 3
    value = 10 * torch.arange(b)[:, None] + torch.arange(n)
    frames = value.view(b, n, 1, 1, 1).expand(b, n, 3, 4, 4).to(torch.uint8)
    mel = value.view(b, n, 1, 1).expand(b, n, 2, 5).float()
    present = torch.ones(b, dtype=torch.bool)
    picked = [augment_batch(frames, mel, present, _only(temporal_density=2), t, torch.Generator().manual_seed(s))
              for s in range(4)]
    for out_frames, out_mel in picked:
        assert out_frames.shape == (b, t, 3, 4, 4) and out_mel.shape == (b, t, 2, 5)
        assert torch.equal(out_frames[:, :, 0, 0, 0].float(), out_mel[:, :, 0, 0])
        got = out_frames[:, :, 0, 0, 0].long() - 10 * torch.arange(b)[:, None]
        assert bool((got >= segment * n // t).all()) and bool((got < (segment + 1) * n // t).all())
    if n > t:  # another seed (epoch), other frames
        assert any(not torch.equal(picked[0][0], other[0]) for other, _ in picked[1:])


def test_centre_frames_without_jitter():
    frames = torch.arange(2 * 6, dtype=torch.uint8).view(2, 6, 1, 1, 1).expand(2, 6, 3, 2, 2)
    mel = torch.arange(2 * 6, dtype=torch.float32).view(2, 6, 1, 1)
    out_frames, out_mel = centre_frames(frames, mel, 3)
    assert out_frames[:, :, 0, 0, 0].tolist() == [[1, 3, 5], [7, 9, 11]]
    assert out_mel[:, :, 0, 0].tolist() == [[1, 3, 5], [7, 9, 11]]
    assert centre_frames(frames, mel, 6)[0] is frames


# --- spatial ---------------------------------------------------------------------------------------


def test_crop_boxes_hand_cases():
    # s = 0.36 + 0.5 (1 - 0.36) = 0.68, r = 1: w = h = round(100 sqrt(0.68)) = 82; left = floor(0.999 * 19) = 18
    # s = 0.25, r = 4/3: w = round(100 sqrt(1/3)) = 58, h = round(100 sqrt(0.1875)) = 43; top = floor(0.5 * 58) = 29,
    # left = floor(0.5 * 43) = 21
    u = torch.tensor([[0.5, 0.5, 0.0, 0.999], [0.0, 1.0, 0.5, 0.5]])
    assert crop_boxes(u[:1], 100, 0.36, 4 / 3).tolist() == [[0, 18, 82, 82]]
    assert crop_boxes(u[1:], 100, 0.25, 4 / 3).tolist() == [[29, 21, 43, 58]]


def test_crop_boxes_stay_inside_the_frame():
    u = torch.rand(2000, 4, generator=torch.Generator().manual_seed(0))
    u[:4] = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1 - 1e-7] * 4, [0.0, 1 - 1e-7, 1 - 1e-7, 0.0], [1.0, 0.0, 0.5, 1.0]])
    for size, min_scale, ratio in [(96, 0.5, 4 / 3), (7, 0.08, 2.0), (224, 0.9, 1.0)]:
        top, left, h, w = crop_boxes(u, size, min_scale, ratio).unbind(1)
        assert bool((h >= 1).all() and (w >= 1).all() and (top >= 0).all() and (left >= 0).all())
        assert bool((top + h <= size).all() and (left + w <= size).all())


def test_resized_crop_cuts_the_box_and_resizes_it():
    frames = torch.randint(0, 7, (1, 2, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    frames[..., 0:4, 4:6] = 7  # rows 0-3, columns 4-5: a box of height 4, width 2
    out = resized_crop(frames, torch.tensor([[0, 4, 4, 2]]))
    assert out.shape == frames.shape and bool((out == 7).all())
    assert torch.equal(resized_crop(frames, torch.tensor([[0, 0, 8, 8]])), frames)

    # a ramp 20 x along the columns, left half (w=4) enlarged 2x: source column (j + 1/2) / 2 - 1/2, clamped to
    # [0, 3] -> 0, 0.25, 0.75, ..., 3.25 -> 0, 5, 15, 25, 35, 45, 55, 60
    ramp = (20 * torch.arange(8)).to(torch.uint8).expand(1, 1, 3, 8, 8).clone()
    out = resized_crop(ramp, torch.tensor([[0, 0, 8, 4]]))
    assert out[0, 0, 1, 3].tolist() == [0, 5, 15, 25, 35, 45, 55, 60]


def test_flip_mirrors_only_the_chosen_videos():
    frames = torch.arange(5, dtype=torch.uint8).expand(2, 3, 3, 4, 5).clone()
    out = flip(frames, torch.tensor([True, False]))
    assert out[0, :, :, :].flatten(0, 2)[0].tolist() == [4, 3, 2, 1, 0]
    assert bool((out[0] == frames[0].flip(-1)).all()) and torch.equal(out[1], frames[1])


# --- photometric -----------------------------------------------------------------------------------


def test_photometric_hand_cases():
    pixel = torch.tensor([100, 50, 200], dtype=torch.uint8).view(1, 1, 3, 1, 1)

    def run(image, b, c, s):
        return photometric(image, torch.tensor([[b, c, s]]))

    assert run(pixel, 1.2, 1.0, 1.0).flatten().tolist() == [120, 60, 240]
    # grey(120, 60, 240) = 35.88 + 35.22 + 27.36 = 98.46; half-way to it: 109.23, 79.23, 169.23
    assert run(pixel, 1.2, 1.0, 0.5).flatten().tolist() == [109, 79, 169]
    assert run(pixel, 1.4, 1.0, 1.0).flatten().tolist() == [140, 70, 255]  # clamped
    # contrast: black and grey-200 pixels, mean grey 100; half-way to it: 50 and 150
    two = torch.tensor([[0, 200]] * 3, dtype=torch.uint8).view(1, 1, 3, 1, 2)
    assert run(two, 1.0, 0.5, 1.0)[0, 0, :, 0].tolist() == [[50, 150]] * 3
    assert torch.equal(run(two, 1.0, 1.0, 1.0), two)
    # factors 1 + x (2u - 1)
    got = photometric_factors(torch.tensor([[0.75, 0.0, 0.5]]), (0.4, 0.2, 0.1))
    torch.testing.assert_close(got, torch.tensor([[1.2, 0.8, 1.0]]))


# --- audio -----------------------------------------------------------------------------------------


def test_mask_spans_hand_cases():
    # width = floor(0.5 * 5) = 2, start = floor(0.5 * 9) = 4; width = floor(0.99 * 5) = 4, start = floor(0.99 * 7) = 6
    start, width = mask_spans(torch.tensor([[0.5, 0.5], [0.99, 0.99], [0.0, 0.3]]), 10, 4)
    assert start.tolist() == [4, 6, 3] and width.tolist() == [2, 4, 0]
    start, width = mask_spans(torch.rand(1000, 2, generator=torch.Generator().manual_seed(1)), 10, 4)
    assert bool((width <= 4).all() and (start >= 0).all() and (start + width <= 10).all())


def test_mask_mel_hand_cases():
    mel = torch.arange(12, dtype=torch.float32).view(1, 1, 3, 4)  # mean 5.5
    one = torch.tensor([[1]])
    timed = mask_mel(mel, -1, one, torch.tensor([[2]]))
    assert timed[0, 0].tolist() == [[0, 5.5, 5.5, 3], [4, 5.5, 5.5, 7], [8, 5.5, 5.5, 11]]
    banded = mask_mel(mel, -2, torch.tensor([[2]]), one)
    assert banded[0, 0].tolist() == [[0, 1, 2, 3], [4, 5, 6, 7], [5.5] * 4]
    assert torch.equal(mask_mel(mel, -1, one, torch.tensor([[0]])), mel)


def test_gain_hand_cases():
    floor = math.log(LOG_EPS)
    mel = torch.tensor([0.0, floor + 0.1]).view(1, 1, 1, 2)
    torch.testing.assert_close(gain(mel, torch.tensor([10.0])).flatten(), torch.tensor([math.log(10), floor + 0.1
                                                                                        + math.log(10)]))
    torch.testing.assert_close(gain(mel, torch.tensor([-10.0])).flatten(), torch.tensor([-math.log(10), floor]))


def test_audio_augmentation_leaves_silent_videos_alone():
    g = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 255, (2, 4, 3, 8, 8), dtype=torch.uint8, generator=g)
    mel = torch.randn(2, 4, 6, 10, generator=g)
    a = _only(time_mask=0.5, freq_mask=0.5, gain_db=6.0)
    out_frames, out_mel = augment_batch(frames, mel, torch.tensor([True, False]), a, 4, g)
    assert torch.equal(out_frames, frames) and torch.equal(out_mel[1], mel[1]) and not torch.equal(out_mel[0], mel[0])


def test_augment_batch_is_a_pure_function_of_its_seed():
    g = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 255, (3, 8, 3, 16, 16), dtype=torch.uint8, generator=g)
    mel = torch.randn(3, 8, 6, 10, generator=g)
    present = torch.ones(3, dtype=torch.bool)

    def run(seed):
        return augment_batch(frames, mel, present, Augmentation(temporal_density=2), 4,
                             torch.Generator().manual_seed(seed))

    (f1, m1), (f2, m2), (f3, _) = run(5), run(5), run(6)
    assert f1.shape == (3, 4, 3, 16, 16) and f1.dtype == torch.uint8 and m1.shape == (3, 4, 6, 10)
    assert torch.equal(f1, f2) and torch.equal(m1, m2) and not torch.equal(f1, f3)
    off_frames, off_mel = augment_batch(frames, mel, present, Augmentation.off(), 8, torch.Generator())
    assert torch.equal(off_frames, frames) and torch.equal(off_mel, mel)


def test_settings_and_flags():
    assert TrainSettings().augmentation() == Augmentation()
    assert TrainSettings(flip=False, temporal_density=1).augmentation() == Augmentation(flip=False, temporal_density=1)
    for bad in ({"temporal_density": 0}, {"crop_min_scale": 0.0}, {"crop_max_ratio": 0.5}, {"brightness": 1.5},
                {"time_mask": -0.1}, {"gain_db": -1.0}):
        with pytest.raises(ValueError, match="bad augmentation"):
            TrainSettings(**bad)


def test_no_augment_refuses_augmentation_flags(tmp_path, capsys):
    args = ["train", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--no-augment"]
    assert cli_main([*args, "--no-flip", "--gain-db", "3"]) == 2
    assert "--no-augment turns every augmentation off: drop --no-flip, --gain-db" in capsys.readouterr().err


# --- the training loader, eval and predict ---------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """An AVSynth folder (train, val, test) and a short augmented training run on it (the CLI's defaults, with
    temporal jitter turned on)."""
    root = tmp_path_factory.mktemp("augment")
    data = write_dataset(root / "data", 8, seed=3, config=SMALL, splits=(0.5, 0.25, 0.25))
    run = root / "run"
    code = cli_main(["train", "--data", str(data), "--config", "tiny", "--set", "num_frames=8", "--set", "k=2",
                     "--out", str(run), "--batch-size", "2", "--seed", "1", "--audio-warmup-epochs", "1",
                     "--look-epochs", "1", "--epochs", "1", "--temporal-density", "2"])
    assert code == 0
    return data, run


def test_short_augmented_training_run_decodes_densely_and_validates_on_t_frames(trained):
    data, run = trained
    history = json.loads((run / "history.json").read_text())["history"]
    assert [h["stage"] for h in history] == ["audio", "look", "joint"]
    assert all(math.isfinite(h["loss_total"]) for h in history) and 0 <= history[-1]["val_top1"] <= 1
    # the cache holds the training split at 2T = 16 frames and the validation split at T = 8
    lengths = sorted(torch.load(f, weights_only=True)["clip"]["frames"].shape[0] for f in (run / "cache").rglob("*.pt"))
    assert lengths == [8] * 2 + [16] * 4


def test_eval_and_predict_ignore_the_training_decode_and_never_load_augmentation(trained, tmp_path):
    data, run = trained
    ckpt = str(run / "last.pt")
    script = f"""
import contextlib, io, sys
from avgn_fast.cli import main
outs = []
for cache in ({str(run / 'cache')!r}, {str(tmp_path / 'fresh')!r}):
    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert main(["eval", "--checkpoint", {ckpt!r}, "--data", {str(data)!r}, "--json", "--cache-dir", cache]) == 0
    outs.append(out.getvalue())
assert main(["predict", {str(data / 'videos' / '00000.mp4')!r}, "--checkpoint", {ckpt!r}, "--jsonl",
             {str(tmp_path / 'p.jsonl')!r}, "--decode", "pyav", "--workers", "0"]) == 0
print(outs[0] == outs[1], "avgn_fast.data.augment" in sys.modules)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-2:] == ["True", "False"]  # same numbers with the dense training cache; never loaded
    assert json.loads((tmp_path / "p.jsonl").read_text().splitlines()[0])["label"]


def test_validation_view_is_the_plain_source_bit_for_bit(trained):
    import avgn_fast

    data, run = trained
    model = avgn_fast.load(run / "last.pt")
    val = FolderDataset(data, SMALL, split="val")
    plain = FolderSource(val)
    view = TrainingSource(plain, None, SMALL.num_frames, torch.device("cpu"))
    index = torch.arange(len(val))
    assert all(torch.equal(a, b) for a, b in zip(plain.batch(index), view.batch(index)))
    assert evaluate(model, plain) == evaluate(model, view)


def test_validation_held_out_of_the_dense_training_decode_sees_t_frames(trained, tmp_path):
    data, _ = trained
    run = tmp_path / "run"
    assert cli_main(["train", "--data", str(data), "--config", "tiny", "--set", "num_frames=8", "--set", "k=2",
                     "--out", str(run), "--batch-size", "2", "--audio-warmup-epochs", "0", "--look-epochs", "0",
                     "--val-split", "none", "--max-epochs", "1", "--patience", "1"]) == 0
    summary = json.loads((run / "history.json").read_text())
    assert summary["validation"].startswith("held out 1 of 4 training videos")
    assert len(summary["val_top1"]) == 1 and 0 <= summary["val_top1"][0] <= 1
