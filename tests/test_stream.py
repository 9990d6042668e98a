"""Windowed AVGN over long files and the front-to-back reader: the cut file's frames and rows, in order, flat
memory, sound gaps (live sources: test_live.py)."""

import dataclasses
import itertools
import json
import tracemalloc

import numpy as np
import pytest
import torch
from media import default_frames, default_wave, write_tone_chunks, write_video
from random_models import random_model

from avgn_fast.checkpoint import save_checkpoint
from avgn_fast.cli import main as cli_main
from avgn_fast.config import AVGNConfig
from avgn_fast.data.common import DecodeParams
from avgn_fast.data.sequential import SequentialReader
from avgn_fast.engine.batch import BatchPredictor
from avgn_fast.engine.predictor import Predictor
from avgn_fast.engine.stream import WindowRunner, source_windows
from avgn_fast.engine.windows import WindowPlan

CONFIG = AVGNConfig.from_name("tiny")
FPS, RATE = 10, CONFIG.sample_rate
# lossless, intra-only video and PCM audio: a cut-out stretch decodes to exactly the same frames and samples
LOSSLESS = dict(codec="ffv1", audio="pcm_s16le", fps=FPS, sample_rate=RATE, size=(48, 64))


@pytest.fixture(scope="module")
def model():
    return random_model(CONFIG, seed=3)


@pytest.fixture(scope="module")
def long_file(tmp_path_factory):
    """10 s whose sound is silent within 30 ms of every whole second, so a stretch cut there hears the same
    as the whole file (the STFT frames at a window's edges read a few ms beyond it)."""
    seconds = 10
    frames = default_frames(FPS * seconds, (48, 64), seed=1)
    t = np.arange(RATE * seconds) / RATE
    wave = default_wave(1, RATE * seconds, RATE, seed=1) * np.clip(np.abs(t - np.round(t)) / 0.03 - 0.5, 0, 1)
    folder = tmp_path_factory.mktemp("long")
    path = write_video(folder / "long.mkv", frames=frames, wave=wave.astype(np.float32), seconds=seconds, **LOSSLESS)
    return path, frames, wave.astype(np.float32)


def test_window_plan_merges_shared_times_and_checks_its_arguments():
    plan = WindowPlan(4.0, 2.0, 16)
    times = [t for _, t in zip(range(40), plan.all_times())]
    assert times == sorted(times) and len(set(times)) == 40
    assert times[:16] == plan.times(0) and times[16:24] == plan.times(1)[8:]  # hop W/2: half of each window shared
    for bad in [(0, 1, 16), (4, -1, 16), (4, 1, 0), (float("nan"), 1, 16)]:
        with pytest.raises(ValueError):
            WindowPlan(*bad)


@pytest.fixture(scope="module")
def varied_file(tmp_path_factory):
    """``long_file``'s frames and silences with a different tone every 0.2 s: each frame hears its own sound."""
    seconds = 10
    frames = default_frames(FPS * seconds, (48, 64), seed=1)
    t = np.arange(RATE * seconds) / RATE
    pitch = 300 + 170 * ((np.floor(t / 0.2) * 7) % 19)  # 300-3,360 Hz, changing every 0.2 s
    envelope = np.clip(np.abs(t - np.round(t)) / 0.03 - 0.5, 0, 1)
    wave = (0.5 * np.sin(2 * np.pi * np.cumsum(pitch) / RATE) * envelope)[None].astype(np.float32)
    path = write_video(tmp_path_factory.mktemp("varied") / "varied.mkv", frames=frames, wave=wave, seconds=seconds,
                       **LOSSLESS)
    return path, frames, wave


@pytest.mark.parametrize("own_audio", [False, True], ids=["clip-mean", "own-audio"])
def test_window_equals_predict_on_that_window_cut_out(model, long_file, varied_file, tmp_path, own_audio):
    """By default only the visual glance is shared; a model that encodes each frame's audio on its own
    (``audio_clip_mean=False``) shares the audio encoder's features too, and its windows still equal the cut file
    (on a sound that changes every 0.2 s, so a frame given another frame's audio features shows)."""
    path, frames, wave = varied_file if own_audio else long_file
    if own_audio:
        model = random_model(CONFIG.replace(audio_clip_mean=False), seed=3, live_audio=True)
    predictor = Predictor(model, device="cpu", batch_size=4, num_workers=0, exit_threshold=None)
    rows = predictor.predict([path], window_s=4.0, hop_s=2.0)
    assert [(r.start_s, r.end_s) for r in rows] == [(0, 4), (2, 6), (4, 8), (6, 10)]
    assert all(r.ok and r.latency_ms >= 0 for r in rows)
    cost = model.cost().total(CONFIG.k)
    shared = ("visual glance encoder", "audio encoder") if own_audio else ("visual glance encoder",)
    glance = sum(r.gmacs for r in model.flops_table() if r.name in shared)
    if not own_audio:
        assert rows[0].gflops == pytest.approx(cost)  # the first window computes all its frames' features
        assert rows[1].gflops == pytest.approx(cost - glance * CONFIG.num_frames / 2)  # later ones half
    # with its own audio a frame's patch is its own too: one local-encoder pass per distinct frame looked at
    looked = [(t, r.audio_present) for r in rows for t in r.frame_times[:r.exit_step + 1]]
    reused = len(looked) - len(set(looked)) if own_audio else 0
    assert reused > 0 or not own_audio
    patch = next(r.gmacs for r in model.flops_table() if r.name == "local encoder")
    spent = cost * len(rows) - glance * CONFIG.num_frames / 2 * (len(rows) - 1) - patch * reused
    assert sum(r.gflops for r in rows) == pytest.approx(spent)
    # the window from 4 to 8 s, cut out (its sound is silent near the cut, where the window's edge frames hear beyond)
    cut = write_video(tmp_path / "cut4.mkv", frames=frames[4 * FPS:8 * FPS], wave=wave[:, 4 * RATE:8 * RATE],
                      seconds=4, **LOSSLESS)
    ref, row = predictor.predict([cut])[0], rows[2]
    assert row.label == ref.label and row.kept_frames == ref.kept_frames
    assert row.score == pytest.approx(ref.score, abs=1e-4)
    torch.testing.assert_close(torch.tensor(row.saliency), torch.tensor(ref.saliency), atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.tensor(row.patch_boxes), torch.tensor(ref.patch_boxes), atol=0.05, rtol=0)
    assert row.frame_times == pytest.approx([t + 4 for t in ref.frame_times], abs=1e-6)


def test_windows_end_inside_the_file_and_one_just_short_of_a_window_is_one_row(model, long_file, tmp_path):
    path, frames, wave = long_file
    predictor = Predictor(model, device="cpu", batch_size=4, num_workers=0, exit_threshold=None)
    # 3.9 s: every sample time of the window 0-4 lies before the last frame's end, yet the window is not in the file
    short = write_video(tmp_path / "short.mkv", frames=frames[:39], wave=wave[:, :39 * RATE // 10], seconds=3.9,
                        **LOSSLESS)
    (whole,) = predictor.predict([short], window_s=4.0)
    assert whole.ok and (whole.start_s, whole.end_s) == (0, 3.9)
    midpoints = [(i + 0.5) * 3.9 / CONFIG.num_frames for i in range(CONFIG.num_frames)]  # predict's sampling
    assert all(min(abs(t - m) for m in midpoints) < 1e-4 for t in whole.frame_times), whole.frame_times
    longer = np.concatenate([frames, frames[:19]])  # 11.9 s: windows 0-4 and 4-8; 8-12 would end past the file
    tail = write_video(tmp_path / "tail.mkv", frames=longer, wave=np.concatenate([wave, wave[:, :19 * RATE // 10]], 1),
                       seconds=11.9, **LOSSLESS)
    assert [(r.start_s, r.end_s) for r in predictor.predict([tail], window_s=4.0)] == [(0, 4), (4, 8)]


def test_segments_with_known_content_are_covered_in_order(tmp_path):
    # five 2-s segments of flat grey, each its own level: every sample shows its segment's level
    levels = [30, 80, 130, 180, 230]
    frames = np.concatenate([np.full((2 * FPS, 48, 64, 3), v, np.uint8) for v in levels])
    path = write_video(tmp_path / "segments.mp4", codec="h264", audio="aac", frames=frames, fps=FPS, seconds=10)
    plan = WindowPlan(2.0, 1.0, CONFIG.num_frames)
    reader = SequentialReader(str(path), DecodeParams.from_config(CONFIG))
    samples = list(reader.samples(plan.all_times()))
    assert reader.info.end_s == pytest.approx(10.0) and reader.info.audio_present
    assert [s.time for s in samples] == sorted(s.time for s in samples) and samples[-1].time < 10
    for s in samples:
        assert abs(float(s.frame.float().mean()) - levels[int(s.time // 2)]) < 4, s.time
    assert reader.stats.video_frames_decoded == 10 * FPS  # one pass, every frame once


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def test_memory_stays_flat_when_the_file_is_ten_times_longer(model, tmp_path):
    # a 2-s file, then the same video 10x longer: the resident memory, read at every row, must not grow with it
    short = write_video(tmp_path / "short.mp4", size=(96, 128), fps=FPS, seconds=2, sample_rate=RATE)
    long = write_video(tmp_path / "long.mp4", size=(96, 128), fps=FPS, seconds=20, sample_rate=RATE)
    predictor = Predictor(model, device="cpu", batch_size=1, num_workers=0)  # every run in batches of one window
    peaks = []
    for path in (short, short, long):  # the first run pays for the one-time set-up
        rss = [_rss_mb() for row in predictor.predict_iter([path], window_s=2.0, hop_s=2.0) if row.ok]
        peaks.append((len(rss), max(rss)))
    (n_short, rss_short), (n_long, rss_long) = peaks[1:]
    assert (n_short, n_long) == (1, 10)
    assert rss_long < rss_short + 10, peaks


def test_predict_cli_writes_window_rows_and_a_timeline(model, long_file, tmp_path, capsys):
    checkpoint = tmp_path / "random.pt"
    save_checkpoint(checkpoint, model, class_names=[f"c{i}" for i in range(CONFIG.num_classes)])
    out, explain = tmp_path / "rows.jsonl", tmp_path / "explain"
    missing = tmp_path / "missing.mp4"
    code = cli_main(["predict", str(long_file[0]), str(missing), "--checkpoint", str(checkpoint), "--device", "cpu",
                     "--window", "4", "--hop", "4", "--jsonl", str(out), "--explain", str(explain)])
    assert code == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["start_s"], r["end_s"]) for r in rows[:2]] == [(0, 4), (4, 8)]
    assert rows[2]["path"] == str(missing) and "file not found" in rows[2]["error"]
    assert {"label", "score", "topk", "frame_times", "patch_boxes", "gflops", "latency_ms"} <= set(rows[0])
    assert [p.name for p in explain.iterdir()] == ["00000_long_timeline.png"]
    assert "0.00s-4.00s" in capsys.readouterr().out
    assert cli_main(["predict", str(long_file[0]), "--checkpoint", str(checkpoint), "--hop", "2"]) == 2
    for ignored in (["--workers", "2"], ["--decode", "dali"]):  # a usage error, not an option silently left unused
        assert cli_main(["predict", str(long_file[0]), "--checkpoint", str(checkpoint), "--device", "cpu",
                         "--window", "4", *ignored]) == 2
    assert "--window does not take --decode dali" in capsys.readouterr().err
    live = tmp_path / "live.jsonl"  # a file is a live source too; rows are appended as they come
    live.write_text('{"earlier": "row"}\n')
    assert cli_main(["stream", str(long_file[0]), "--checkpoint", str(checkpoint), "--device", "cpu", "--window", "5",
                     "--jsonl", str(live), "--option", "probesize=32768"]) == 0
    lines = live.read_text().splitlines()
    assert lines[0] == '{"earlier": "row"}' and [json.loads(x)["end_s"] for x in lines[1:]] == [5, 10]
    assert cli_main(["stream", "x.ts", "--checkpoint", str(checkpoint), "--window", "2", "--option", "bad"]) == 2


def test_audio_gaps_are_one_counted_note_and_each_row_gets_only_its_own_notes(model, tmp_path):
    starts = range(0, 12 * RATE, 2400)  # 0.1 s of sound, then 0.05 s of none, for 12 s
    path = write_tone_chunks(tmp_path / "gappy.mkv", 12, starts, rate=RATE, fps=FPS)
    rows = Predictor(model, device="cpu", num_workers=0).predict([path], window_s=4.0)
    assert len(rows) == 3 and all(r.ok for r in rows)
    notes = [n for r in rows for n in r.notes]
    assert notes == [f"audio: {len(starts) - 1} gaps or overlaps in the timestamps, samples placed by time"]


def _peak_bytes(reader: SequentialReader, plan: WindowPlan) -> tuple[int, int]:
    """How many samples ``reader`` gives for ``plan`` and the most bytes held at once meanwhile (numpy's
    allocations, where the sound is kept, are traced)."""
    tracemalloc.start()
    try:
        count = sum(1 for _ in reader.samples(plan.all_times()))
        return count, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_sound_is_not_piled_up_when_the_video_stops_or_no_time_is_asked(tmp_path):
    params = DecodeParams.from_config(CONFIG)
    # 1 s of video, 120 s of sound (7.7 MB at 16 kHz in float32): at most _AUDIO_LAG_S of it is held
    path = write_tone_chunks(tmp_path / "long_sound.mkv", 1, range(0, 120 * RATE, 1600), rate=RATE, fps=FPS)
    reader = SequentialReader(str(path), params)
    count, peak = _peak_bytes(reader, WindowPlan(1.0, 1.0, CONFIG.num_frames))
    assert count == CONFIG.num_frames and peak < 4e6, peak
    assert any("ahead of the video" in n for n in reader.stats.notes)
    # 121 s of both, one 1-s window a minute: the 59 s of sound between windows (3.8 MB) is not kept
    path = write_tone_chunks(tmp_path / "sparse.mkv", 121, range(0, 121 * RATE, 1600), rate=RATE, fps=FPS)
    count, peak = _peak_bytes(SequentialReader(str(path), params), WindowPlan(1.0, 60.0, CONFIG.num_frames))
    assert count == 3 * CONFIG.num_frames and peak < 1.5e6, peak


def test_a_window_that_breaks_the_shared_glance_gets_its_own_row_and_the_others_go_on(model, long_file):
    batch = BatchPredictor(model, device="cpu", exit_threshold=None)
    plan, params = WindowPlan(2.0, 2.0, CONFIG.num_frames), DecodeParams.from_config(CONFIG)

    def first_windows():
        return list(itertools.islice(source_windows(SequentialReader(str(long_file[0]), params), plan), 2))

    good, bad = first_windows()
    # log-mels one step longer than the other window's: the two windows' audio cannot be encoded as one batch
    bad.samples = [dataclasses.replace(s, mel=torch.cat([s.mel, s.mel[:, -1:]], 1)) for s in bad.samples]
    rows = WindowRunner(batch)([good, bad])
    (alone,) = WindowRunner(batch)(first_windows()[:1])
    assert len(rows) == 2 and rows[0].ok and alone.ok
    assert rows[0].label == alone.label and rows[0].score == pytest.approx(alone.score, abs=1e-5)


def test_a_source_whose_sound_stops_goes_on_with_silence(model, tmp_path):
    # 2 s of sound in a 16-s video: samples beyond it are not held back waiting for audio that never comes
    path = write_video(tmp_path / "mute_tail.mp4", fps=FPS, seconds=16, sample_rate=RATE,
                       wave=default_wave(1, 2 * RATE, RATE))
    reader = SequentialReader(str(path), DecodeParams.from_config(CONFIG))
    samples = list(reader.samples(WindowPlan(4.0, 4.0, CONFIG.num_frames).all_times()))
    assert len(samples) == 4 * CONFIG.num_frames and reader.info.audio_present
    assert any("behind the video" in note for note in reader.stats.notes)
    silent = samples[-1].mel
    assert torch.equal(silent, torch.full_like(silent, silent.min().item()))  # log(LOG_EPS) everywhere
    assert samples[0].audio and not samples[-1].audio
    rows = Predictor(model, device="cpu", num_workers=0).predict([path], window_s=4.0)
    assert [r.audio_present for r in rows] == [True, False, False, False]  # as the windows cut out would have
    assert sum("behind the video" in n for r in rows for n in r.notes) == 1  # noted once, on the row it came with


def test_a_failed_batch_leaves_the_shared_patches_to_the_retries(monkeypatch):
    """A batch that fails after the engine filled the patch table is retried clip by clip; the table forgets what
    the failed attempt recorded, so the first clip pays for its patches again and the second, on the same rows,
    reuses them (each patch charged once)."""
    from avgn_fast.data.clip import Clip
    from avgn_fast.engine.early_exit import PatchTable
    from avgn_fast.engine.stages import random_inputs

    config = CONFIG.replace(audio_clip_mean=False)
    model = random_model(config, seed=3, live_audio=True)
    batch = BatchPredictor(model, device="cpu", exit_threshold=None)
    frames, mel, _ = random_inputs(config, 1, seed=2)
    s, t = config.frame_size, config.num_frames
    clip = Clip(frames=frames[0], mel=mel[0], audio_present=True, duration=4.0, fps=12.0, source_size=(s, s),
                resize_shorter=s)
    original, failed = BatchPredictor._prediction, []

    def fail_once(self, *args):
        if not failed:
            failed.append(True)
            raise RuntimeError("after the engine")
        return original(self, *args)

    monkeypatch.setattr(BatchPredictor, "_prediction", fail_once)
    table = PatchTable(torch.zeros(t, 2), torch.zeros(t, model.local.out_channels))
    first, second = batch.classify(["a", "b"], [clip, clip], patches=(table, [torch.arange(t), torch.arange(t)]))
    patch = next(r.gmacs for r in model.flops_table() if r.name == "local encoder")
    assert failed and first.ok and second.ok and len(table.known) == config.k
    assert first.gflops == pytest.approx(model.cost().total(config.k))
    assert second.gflops == pytest.approx(model.cost().total(config.k) - config.k * patch)
    assert second.label == first.label and second.score == pytest.approx(first.score, abs=1e-6)


def test_shared_audio_features_equal_each_windows_own_with_and_without_sound(varied_file, tmp_path):
    """A model that encodes each frame's audio on its own: the windows (hop W/2) classified with the audio features
    shared across them equal the same windows encoding their own audio, where the sound plays (``varied_file``)
    and where it has stopped (a window without audio multiplies its features by 0 as the model does)."""
    model = random_model(CONFIG.replace(audio_clip_mean=False), seed=3, live_audio=True)
    batch = BatchPredictor(model, device="cpu", exit_threshold=None)
    params = DecodeParams.from_config(CONFIG)
    mute_tail = write_video(tmp_path / "mute_tail.mkv", frames=default_frames(FPS * 8, (48, 64), seed=2),
                            wave=varied_file[2][:, :2 * RATE], seconds=8, **LOSSLESS)
    for path in (varied_file[0], mute_tail):
        windows = list(source_windows(SequentialReader(str(path), params), WindowPlan(4.0, 2.0, CONFIG.num_frames)))
        shared = WindowRunner(batch)
        assert shared.shares_audio
        rows = shared(windows)
        own = WindowRunner(batch)
        own.shares_audio = False  # each window's audio through the encoder, as classifying it alone does
        own.shares_patches = False  # and its own patches, not the ones ``shared`` left on the samples
        reference = own(windows)
        assert len(rows) == len(windows) >= 3 and all(r.ok for r in rows)
        for row, ref in zip(rows, reference):
            assert row.audio_present == ref.audio_present and row.kept_frames == ref.kept_frames
            assert row.score == pytest.approx(ref.score, abs=1e-5)
            torch.testing.assert_close(torch.tensor(row.saliency), torch.tensor(ref.saliency), atol=1e-5, rtol=0)
            torch.testing.assert_close(torch.tensor(row.patch_boxes), torch.tensor(ref.patch_boxes), atol=0.05, rtol=0)
        assert any(("patch", w.audio_present) in x.features for w in windows for x in w.samples)  # shared: kept
        if path == mute_tail:
            assert [r.audio_present for r in rows][0] and not rows[-1].audio_present
