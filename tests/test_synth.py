"""AVSynth: determinism, balance, layout, glance-unreadable glyphs, one-modality class pairs, files, CLI."""

import csv
import dataclasses
import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tolerances import tol

from avgn_fast import cli
from avgn_fast.config import AVGNConfig
from avgn_fast.data import synth
from avgn_fast.data.audio import log_mel_windows
from avgn_fast.data.decode import decode_clip_for

TINY = AVGNConfig.from_name("tiny")
F_TILE = synth.tile_size(TINY)
CARD = 6 * F_TILE  # card side in pixels: 4 x 4 glyph tiles plus a one-tile margin


@pytest.fixture(scope="module")
def batch():
    return synth.generate_tensors(8, config=TINY, seed=3)


def _read_labels(folder):
    with open(folder / "labels.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        return reader.fieldnames, list(reader)


def _class(name: str) -> int:
    return synth.CLASS_NAMES.index(name)


def _event_frame(scene, **changes) -> torch.Tensor:
    """float (3, S, S) of the first event segment of ``scene`` with ``changes`` applied, and the scene's wave."""
    video = synth.render_scene(dataclasses.replace(scene, **changes), TINY)
    return video.frames[scene.event.start * synth.FRAMES_PER_SEGMENT + 1].permute(2, 0, 1).float(), video.wave


def test_generate_tensors_shapes_and_determinism(batch):
    t, s = TINY.num_frames, TINY.frame_size
    n_steps = round(TINY.audio_window_s * 1000 / TINY.hop_ms)
    assert batch.frames.shape == (8, t, 3, s, s) and batch.frames.dtype == torch.uint8
    assert batch.mel.shape == (8, t, TINY.n_mels, n_steps) and batch.mel.dtype == torch.float32
    assert batch.labels.dtype == torch.int64 and batch.audio_present.all()
    assert batch.class_names == synth.CLASS_NAMES and len(synth.CLASS_NAMES) == TINY.num_classes
    assert torch.isfinite(batch.mel).all() and batch.frames.float().std() > 20
    assert "(8, 16, 3, 96, 96)" in repr(batch)

    again = synth.generate_tensors(8, config=TINY, seed=3)
    assert torch.equal(again.frames, batch.frames) and torch.equal(again.mel, batch.mel)
    assert torch.equal(again.labels, batch.labels)
    other = synth.generate_tensors(8, config=TINY, seed=4)
    assert not torch.equal(other.frames, batch.frames) and not torch.equal(other.mel, batch.mel)
    tail = synth.generate_tensors(3, config=TINY, seed=3, start=5)
    assert torch.equal(tail.frames, batch.frames[5:]) and torch.equal(tail.mel, batch.mel[5:])
    assert torch.equal(tail.labels, batch.labels[5:])


def test_tensors_are_the_rendered_video_at_the_sample_times(batch):
    video = synth.render_video(2, seed=3, config=TINY)
    assert video.frames.shape == (TINY.num_frames * synth.FRAMES_PER_SEGMENT, 96, 96, 3)
    assert video.wave.shape == (round(video.duration * TINY.sample_rate),) and video.label == batch.labels[2]
    times = synth.sample_times(TINY)
    expected = (torch.arange(TINY.num_frames, dtype=torch.float64) + 0.5) * video.duration / TINY.num_frames
    torch.testing.assert_close(times, expected)
    shown = torch.floor(times * video.fps).long()  # the last frame with pts <= t
    assert torch.equal(batch.frames[2], video.frames[shown].permute(0, 3, 1, 2))
    # one frame either side is the same image: any decoder rounding picks the same content
    assert torch.equal(video.frames[shown - 1], video.frames[shown])
    assert torch.equal(video.frames[shown + 1], video.frames[shown])
    mel = log_mel_windows(video.wave, TINY.sample_rate, times, window_s=TINY.audio_window_s, n_mels=TINY.n_mels,
                          win_ms=TINY.win_ms, hop_ms=TINY.hop_ms)
    torch.testing.assert_close(batch.mel[2], mel, **tol(torch.float32))


def test_labels_are_balanced_in_every_split():
    labels = np.array([synth.label_of(i, 0) for i in range(synth.DEFAULT_VIDEOS)])
    c = len(synth.CLASS_NAMES)
    counts = synth.split_counts(synth.DEFAULT_VIDEOS)
    assert counts == (1100, 200, 500)
    bounds = np.cumsum((0, *counts))
    for lo, hi in itertools.pairwise(bounds):
        per_class = np.bincount(labels[lo:hi], minlength=c)
        assert per_class.max() - per_class.min() <= 2, per_class
    assert (np.sort(labels[:c * 10].reshape(10, c), axis=1) == np.arange(c)).all()  # each block: a permutation
    assert len({tuple(b) for b in labels[:c * 10].reshape(10, c)}) > 1  # and the blocks are shuffled
    assert [synth.label_of(i, 1) for i in range(c * 4)] != list(labels[:c * 4])
    assert sorted(synth.CLASS_NAMES) == list(synth.CLASS_NAMES)
    with pytest.raises(ValueError, match="splits"):
        synth.split_counts(10, (0.5, 0.5, 0.5))


def test_scene_layout_is_temporally_sparse_with_distractors():
    t, s = TINY.num_frames, TINY.frame_size
    for index in range(100):
        scene = synth.sample_scene(index, seed=0, config=TINY)
        runs = (scene.event, *scene.distractors)
        assert 1 <= len(scene.event.boxes) <= 2 and len(scene.distractors) >= 3
        assert scene.event.tiles == synth.GLYPHS[scene.glyph]
        assert all(set(r.tiles) <= set(synth.L_TILES) for r in scene.distractors)
        shown = [seg for r in runs for seg in range(r.start, r.stop)]
        assert len(shown) == len(set(shown)) and all(0 <= seg < t for seg in shown)  # one card per segment
        sound, lo, hi = scene.sound_distractor
        assert synth.SOUNDS[sound] != scene.sound and not set(range(lo, hi)) & set(shown)
        assert lo >= scene.event.stop + 2 or hi + 2 <= scene.event.start
        boxes = scene.card_boxes(F_TILE)
        assert boxes.shape == (len(shown), 5) and (boxes[:, 1:] % F_TILE == 0).all()
        assert (boxes[:, 1:] >= 0).all() and (boxes[:, 3:] <= s).all()


def test_glyph_unreadable_at_glance_readable_in_patch():
    scene = synth.sample_scene(0, seed=0, config=TINY)
    y, x = scene.event.boxes[0]
    glyphs = {**synth.GLYPHS, "neutral": scene.distractors[0].tiles}
    frames = {name: _event_frame(scene, event=dataclasses.replace(scene.event, tiles=tiles))[0]
              for name, tiles in glyphs.items()}
    for a, b in itertools.combinations(glyphs, 2):
        full = (frames[a] - frames[b]).abs().amax(0)
        assert (full > 100).sum() >= 20, (a, b)  # at full resolution the glyphs differ in many pixels ...
        assert full[y:y + CARD, x:x + CARD].sum() == full.sum()  # ... all inside the card, which a patch holds
        for mode in ("area", "bilinear"):  # ... and at glance resolution they are the same grey square
            glance = [F.interpolate(frames[k][None], size=TINY.glance_size, mode=mode) for k in (a, b)]
            assert (glance[0] - glance[1]).abs().max() <= 1.0, (a, b, mode)
    assert CARD <= TINY.patch_size


def test_class_pairs_differ_in_one_modality_only():
    scene = synth.sample_scene(0, seed=0, config=TINY)
    times = synth.sample_times(TINY)
    k = scene.event.start

    def event_mel(wave):
        return log_mel_windows(wave, TINY.sample_rate, times[k:k + 1], window_s=TINY.audio_window_s,
                               n_mels=TINY.n_mels, win_ms=TINY.win_ms, hop_ms=TINY.hop_ms)

    glyph = dataclasses.replace(scene.event, tiles=synth.GLYPHS["checker"])
    buzz = _event_frame(scene, label=_class("checker+buzz"), event=glyph)
    hiss = _event_frame(scene, label=_class("checker+hiss"), event=glyph)
    assert torch.equal(buzz[0], hiss[0])  # same pixels
    assert (event_mel(buzz[1]) - event_mel(hiss[1])).abs().mean() > 1.0  # different sound

    zigzag = _event_frame(scene, label=_class("zigzag+warble"),
                          event=dataclasses.replace(scene.event, tiles=synth.GLYPHS["zigzag"]))
    diamonds = _event_frame(scene, label=_class("diamonds+warble"),
                            event=dataclasses.replace(scene.event, tiles=synth.GLYPHS["diamonds"]))
    assert torch.equal(zigzag[1], diamonds[1])  # same sound
    assert (zigzag[0] - diamonds[0]).abs().max() > 100  # different glyph


@pytest.mark.parametrize("fmt", ["mp4", "webm"])
def test_files_decode_to_the_tensors(tmp_path, fmt):
    out = synth.write_dataset(tmp_path, 3, seed=5, fmt=fmt, config=TINY, splits=(1 / 3, 1 / 3, 1 / 3))
    batch = synth.generate_tensors(3, config=TINY, seed=5)
    _, rows = _read_labels(out)
    limit = synth.CODEC_TOLERANCE
    for i, row in enumerate(rows):
        clip = decode_clip_for(out / row["path"], TINY, backend="pyav")
        assert clip.frames.shape == batch.frames[i].shape and clip.mel.shape == batch.mel[i].shape
        assert clip.audio_present and math.isclose(clip.duration, TINY.num_frames * synth.SEGMENT_S)
        frames, ref = clip.frames.float(), batch.frames[i].float()
        assert (frames - ref).abs().mean() <= limit["frame_mae"]
        assert (frames[1:] - ref[:-1]).abs().mean() > limit["frame_mae"]  # a one-frame shift is caught
        assert (clip.mel - batch.mel[i]).abs().mean() <= limit["mel_mae"]
        assert (clip.mel[1:] - batch.mel[i][:-1]).abs().mean() > limit["mel_mae"]

        scene = synth.sample_scene(i, seed=5, config=TINY)
        y, x = (v + F_TILE for v in scene.event.boxes[0])
        seg = scene.event.start
        glyph, ref_glyph = frames[seg, :, y:y + 4 * F_TILE, x:x + 4 * F_TILE], ref[seg, :, y:y + 4 * F_TILE,
                                                                                    x:x + 4 * F_TILE]
        assert (glyph.mean(0) - ref_glyph.mean(0)).abs().mean() <= limit["glyph_mae"]
        ink = torch.from_numpy(synth.glyph_mask(scene.event.tiles, F_TILE))
        assert glyph.mean(0)[~ink].mean() - glyph.mean(0)[ink].mean() > 100  # the detail survives the codec


def test_write_dataset_labels_readme_and_reuse(tmp_path):
    out = synth.write_dataset(tmp_path / "ds", 10, seed=1, config=TINY)
    header, rows = _read_labels(out)
    assert header == ["path", "label", "split"] and len(rows) == 10
    assert [r["path"] for r in rows] == [f"videos/{i:05d}.mp4" for i in range(10)]
    assert [r["label"] for r in rows] == [synth.CLASS_NAMES[synth.label_of(i, 1)] for i in range(10)]
    n_train, n_val, n_test = synth.split_counts(10)
    assert [r["split"] for r in rows] == ["train"] * n_train + ["val"] * n_val + ["test"] * n_test
    assert all((out / r["path"]).stat().st_size > 1000 for r in rows)
    readme = (out / "README.md").read_text()
    assert all(name in readme for name in synth.CLASS_NAMES) and "seed 1" in readme

    stamps = {p: p.stat().st_mtime_ns for p in (out / "videos").iterdir()}
    synth.write_dataset(out, 12, seed=1, config=TINY)
    assert all(p.stat().st_mtime_ns == stamp for p, stamp in stamps.items())  # existing files kept
    assert len(list((out / "videos").iterdir())) == 12 and len(_read_labels(out)[1]) == 12
    with pytest.raises(ValueError, match="another output folder"):
        synth.write_dataset(out, 12, seed=2, config=TINY)


def test_config_checks():
    with pytest.raises(ValueError, match="glance"):
        synth.generate_tensors(1, config=AVGNConfig.from_name("paper"))
    with pytest.raises(ValueError, match="patch"):
        synth.tile_size(TINY.replace(patch_size=16))


def test_cli_writes_a_dataset(tmp_path, capsys):
    assert cli.main(["synth", "--out", str(tmp_path), "--videos", "2", "--seed", "2", "--format", "webm"]) == 0
    assert "2 webm videos" in capsys.readouterr().out
    _, rows = _read_labels(tmp_path)
    assert [r["path"] for r in rows] == ["videos/00000.webm", "videos/00001.webm"]
    assert all((tmp_path / r["path"]).is_file() for r in rows)


def _patch_box(a: torch.Tensor) -> tuple[int, int, int, int]:
    """(y0, x0, y1, x1) of the P x P patch at centre a (the model's convention: corner = a · (S − P))."""
    y, x = (round(float(v) * (TINY.frame_size - TINY.patch_size)) for v in a)
    return y, x, y + TINY.patch_size, x + TINY.patch_size


def test_oracle_policies_look_where_they_say():
    from avgn_fast.data.synth.oracle import event_reached, oracle_views
    from avgn_fast.models.avtest import uniform_frames

    rng = np.random.default_rng(0)
    reached = []
    for index in range(12):
        scene = synth.sample_scene(index, seed=1, config=TINY)
        # told the event: its frames, and the patch holds everything that tells the class glyph from a neutral one
        kept, a = oracle_views(scene, TINY, "event", rng)
        assert kept.shape == (TINY.k,) and a.shape == (TINY.k, 2) and event_reached(scene, kept)
        for t, centre in zip(kept.tolist(), a, strict=True):
            assert scene.event.start <= t < scene.event.stop
            y0, x0, y1, x1 = _patch_box(centre)
            segment = dataclasses.replace(scene, event=dataclasses.replace(scene.event, start=t, boxes=(
                scene.event.boxes[t - scene.event.start],)))
            frames = [_event_frame(segment, event=dataclasses.replace(segment.event, tiles=tiles))[0]
                      for tiles in (scene.event.tiles, scene.distractors[0].tiles)]
            diff = (frames[0] - frames[1]).abs()
            assert (diff.amax(0) > 100).sum() >= 20 and diff[:, y0:y1, x0:x1].sum() == diff.sum()
        # a perfect visual-only glance: one frame of each of K different card runs, in time order, each patch
        # holding its card
        kept, a = oracle_views(scene, TINY, "cards", rng)
        cards = scene.card_boxes(F_TILE).tolist()
        runs = sorted((scene.event, *scene.distractors), key=lambda run: run.start)
        assert kept.tolist() == sorted(kept.tolist())
        assert len({next(i for i, r in enumerate(runs) if r.start <= t < r.stop) for t in kept.tolist()}) == TINY.k
        for t, centre in zip(kept.tolist(), a, strict=True):
            (_, cy0, cx0, cy1, cx1), = [row for row in cards if row[0] == t]
            y0, x0, y1, x1 = _patch_box(centre)
            assert y0 <= cy0 and cy1 <= y1 and x0 <= cx0 and cx1 <= x1
        reached.append(event_reached(scene, kept))
        kept, a = oracle_views(scene, TINY, "uniform-centre", rng)
        assert torch.equal(kept, uniform_frames(TINY.num_frames, TINY.k, 1)[0]) and bool((a == 0.5).all())
    assert 0 < sum(reached) < len(reached)  # K of 5-7 card runs: the event is kept in some videos, not all
    # the oracle's forward is the model's own where the oracle looks where the model does: uniform frames, centre
    from avgn_fast.data.synth.oracle import oracle_forward
    from avgn_fast.models.avgn import AVGN

    torch.manual_seed(0)
    model = AVGN(TINY.with_overrides(["temporal=uniform", "spatial=center", "audio=false"])).eval()
    clips = synth.generate_tensors(3, config=TINY, seed=2)
    kept, a = (torch.stack(x) for x in zip(*[oracle_views(synth.sample_scene(i, seed=2, config=TINY), TINY,
                                                            "uniform-centre", rng) for i in range(3)], strict=True))
    with torch.no_grad():
        own = model(clips.frames, torch.randn_like(clips.mel), torch.zeros(3, dtype=torch.bool))
        told = oracle_forward(model, clips.frames, kept, a)
    assert torch.equal(told.kept, own.kept) and torch.allclose(told.logits, own.logits, **tol(torch.float32))
    # ... and it looks where it is told: the event's frames
    event = [oracle_views(synth.sample_scene(i, seed=2, config=TINY), TINY, "event", rng) for i in range(3)]
    kept, a = (torch.stack(x) for x in zip(*event, strict=True))
    with torch.no_grad():
        told = oracle_forward(model, clips.frames, kept, a)
    assert torch.equal(told.kept, kept) and torch.equal(told.locations, a) and not torch.allclose(told.logits,
                                                                                                  own.logits)
    with pytest.raises(ValueError, match="unknown oracle policy"):
        oracle_views(scene, TINY, "psychic", rng)
