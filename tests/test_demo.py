"""The demo's orchestration at a test-only size: end to end, a re-run that reuses everything, a resumed run."""

import dataclasses
import inspect
import json
from pathlib import Path

import pytest
import torch

from avgn_fast import demo, demo_jobs, pareto
from avgn_fast.checkpoint import load_checkpoint
from avgn_fast.cli import build_parser
from avgn_fast.commands import calibrate as calibrate_command
from avgn_fast.training import TrainSettings
from avgn_fast.training.trainer import evaluate

# 12 videos (7 train / 1 val / 4 test) of AVSynth's smallest layout, one epoch: the orchestration, not accuracy
TINY = demo.DemoSize("test", train=7, val=1, test=4, epochs=1, audio_warmup_epochs=1, look_epochs=1, batch_size=4,
                     thresholds=1, sizes=False, overrides=("num_frames=8", "k=2"))


def _settings(epochs: int) -> TrainSettings:
    return TrainSettings(epochs=epochs, audio_warmup_epochs=TINY.audio_warmup_epochs, look_epochs=TINY.look_epochs)


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    assert torch.get_num_threads() == threads  # the demo puts torch's thread count back


def _mtimes(paths):
    return {p: p.stat().st_mtime_ns for p in paths}


def test_demo_end_to_end_reuses_and_resumes(tmp_path):
    lines = []
    # two training processes (the default on a 2-core CPU); the resumed run below trains in this process
    first = demo.run_demo(tmp_path, size=TINY, device="cpu", workers=2, progress=False, log=lines.append)
    here = tmp_path / "test"
    slugs = [slug for slug, _ in demo.METHODS]
    assert first.written == 12 and first.trained == slugs
    assert first.decoded == 12  # every video once: train and val for training, test for the sweep
    assert sorted(first.paths) == ["calibration", "calibration_json", "csv", "curves", "json", "md", "png"]
    assert all(path.is_file() and path.parent == here / "pareto" for path in first.paths.values())
    result = first.result
    assert result.methods == ["AVGN", "visual-only glance", "uniform+centre", "dense", "audio-only"]
    assert not pareto.seeded(result) and result.caveat == ""
    for slug, overrides in demo.METHODS:
        ckpt = load_checkpoint(here / "runs" / slug / "best.pt")
        assert ckpt.model.config == TINY.config().with_overrides(list(overrides)).replace(num_classes=8)
        train_state = load_checkpoint(here / "runs" / slug / "last.pt").train_state
        history = train_state["history"]
        assert train_state["settings"]["lr"] == demo.METHOD_SETTINGS.get(slug, {}).get("lr", TrainSettings.lr)
        assert len(history) == demo_jobs.total_epochs(ckpt.model.config, _settings(1))
        # every epoch's line came back from the worker processes
        assert sum(line.startswith(f"  {slug}: epoch=") for line in lines) == len(history)
    # the baselines that look at frames start from the AVGN run's encoders, so they train after it
    for slug, parts in demo.METHOD_INIT.items():
        assert demo_jobs.started_from(here / "runs" / slug) == {"from": "avgn", "parts": list(parts)}
        assert (here / "runs" / "avgn" / "best.pt").stat().st_mtime_ns <= \
            (here / "runs" / slug / demo_jobs.INIT_FILE).stat().st_mtime_ns
    assert [r["init"] for r in first.runs] == [
        {"from": "avgn", "parts": list(demo.METHOD_INIT[slug])} if slug in demo.METHOD_INIT else None for slug in slugs]
    assert {p.method for p in result.points if p.exit_threshold is not None} == set(result.methods)
    assert all(p.videos == 4 and 0 <= p.top1 <= 1 for p in result.points)
    assert pareto.read_json(first.paths["json"]).points == result.points
    assert first.paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = demo.summary(first)
    assert pareto.markdown_table(result) in text and demo.training_table(first.runs) in text
    assert [(r["method"], r["seed"], r["epochs"], r["stopped"]) for r in first.runs] == [
        (slug, 0, demo_jobs.total_epochs(load_checkpoint(here / "runs" / slug / "best.pt").model.config, _settings(1)),
         "epochs") for slug in slugs]
    assert all(str(path) in text for path in first.paths.values())
    assert str(here / "runs" / "dense" / "best.pt") in text and str(here / "avsynth") in text

    # each run's early exit, chosen on val, checked on test: what eval measures there with that threshold
    assert [(r["method"], r["seed"]) for r in first.calibration] == [(m, 0) for m in result.methods]
    assert demo.calibration_table(first.calibration) in text
    assert json.loads(first.paths["calibration_json"].read_text())["runs"] == first.calibration
    test = demo_jobs.load_split(here / "avsynth", TINY.config(), "test", tmp_path / "cache")[0]
    for row in first.calibration:
        model = load_checkpoint(Path(row["run"]) / "best.pt").model
        at_tau, every = (evaluate(model, test, exit_threshold=tau) for tau in (row["threshold"], None))
        assert (at_tau.top1, every.top1, at_tau.gflops) == pytest.approx(
            (row["test_top1"], row["test_full_top1"], row["test_gflops"]))
        assert row["gained"] - row["lost"] == round((row["test_top1"] - row["test_full_top1"]) * row["test_videos"])
        assert row["test_videos"] == 4 and 1 <= row["test_steps"] <= row["steps_max"] == model.config.steps

    videos = sorted((here / "avsynth" / "videos").iterdir())
    kept = _mtimes([*videos, *(here / "runs").glob("*/*.pt"), *(tmp_path / "cache").rglob("*.pt")])
    lines.clear()
    second = demo.run_demo(tmp_path, size=TINY, device="cpu", progress=False, log=lines.append)
    assert (second.written, second.decoded, second.trained) == (0, 0, [])
    assert _mtimes(kept) == kept  # no video re-encoded, no checkpoint rewritten, no clip decoded again
    assert sum("reusing" in line for line in lines) == len(slugs)
    assert [(p.method, p.setting) for p in second.result.points] == [(p.method, p.setting) for p in result.points]
    # the same checkpoints on the same clips: the same accuracy and cost (only the timing is new)
    assert [(p.top1, p.gflops) for p in second.result.points] == [(p.top1, p.gflops) for p in result.points]

    # a dense run that started from scratch (an older demo's) is not taken for one that starts from AVGN's encoder
    (here / "runs" / "dense" / demo_jobs.INIT_FILE).unlink()
    lines.clear()
    again = demo.run_demo(tmp_path, size=TINY, device="cpu", workers=1, progress=False, log=lines.append)
    assert again.trained == ["dense"] and any("local encoder from avgn)" in line for line in lines)
    assert demo_jobs.started_from(here / "runs" / "dense") == {"from": "avgn", "parts": ["local"]}
    # AVGN trained again (its last.pt lost): the runs that start from its encoders train again too
    (here / "runs" / "avgn" / "last.pt").unlink()
    again = demo.run_demo(tmp_path, size=TINY, device="cpu", workers=1, progress=False, log=lines.append)
    assert sorted(again.trained) == sorted(["avgn", *demo.METHOD_INIT])

    # more epochs and a second seed: every first-seed run resumes from its last.pt, the second seed's start
    lines.clear()
    resumed = demo.run_demo(tmp_path, size=dataclasses.replace(TINY, epochs=2), device="cpu", workers=1, seeds=2,
                            progress=False, log=lines.append)
    second_seed = [f"{slug}-seed1" for slug in slugs]
    assert (resumed.written, resumed.decoded, resumed.trained) == (0, 0, slugs + second_seed)
    assert sum(line.startswith("demo: training") and "resuming" in line for line in lines) == len(slugs)
    assert {p.seed for p in resumed.result.points} == {0, 1} and resumed.result.methods == result.methods
    assert pareto.seeded(resumed.result) and " ± " in demo.summary(resumed)
    assert [(r["method"], r["seed"]) for r in resumed.calibration] == [(m, s) for s in (0, 1) for m in result.methods]
    for slug in second_seed:
        assert load_checkpoint(here / "runs" / slug / "last.pt").train_state["settings"]["seed"] == 1
    for slug in slugs:
        ckpt = load_checkpoint(here / "runs" / slug / "last.pt")
        total = demo_jobs.total_epochs(ckpt.model.config, _settings(2))
        assert [h["epoch"] for h in ckpt.train_state["history"]] == list(range(1, total + 1))


def test_a_job_starts_from_the_encoders_of_the_run_it_names(tmp_path):
    """``train_job`` with ``init_from``: the encoders named start as that run's best.pt has them (one epoch at a
    learning rate too small to move a weight measurably), the others as a fresh model of the seed has them."""
    from avgn_fast.checkpoint import save_checkpoint
    from avgn_fast.data.synth import write_dataset
    from avgn_fast.models.avgn import AVGN

    config = TINY.config().replace(num_classes=8)
    data = tmp_path / "avsynth"
    write_dataset(data, TINY.videos, seed=0, config=TINY.config(),
                  splits=(TINY.train / TINY.videos, TINY.val / TINY.videos, TINY.test / TINY.videos))
    source = AVGN(config)
    with torch.no_grad():
        for p in source.parameters():
            p.normal_(0, 0.1)
    classes = tuple(f"c{i}" for i in range(8))
    save_checkpoint(tmp_path / "runs" / "avgn" / "best.pt", source, class_names=list(classes))
    settings = dataclasses.replace(_settings(1), lr=1e-12, batch_size=4)
    job = demo_jobs.TrainJob("visual-only", "visual-only", config.replace(audio=False), tmp_path / "runs" / "vo",
                             data, tmp_path / "cache", settings, classes, 0, "cpu", tmp_path / "runs" / "avgn",
                             ("local",))
    demo_jobs.train_job(job, None, False, lambda line: None)
    trained = load_checkpoint(job.run_dir / "last.pt").model
    torch.manual_seed(settings.seed)
    fresh = AVGN(job.config)
    for name, p in trained.local.named_parameters():
        torch.testing.assert_close(p, dict(source.local.named_parameters())[name], atol=1e-6, rtol=0)
    for name, p in trained.visual.named_parameters():
        torch.testing.assert_close(p, dict(fresh.visual.named_parameters())[name], atol=1e-6, rtol=0)
    assert demo_jobs.started_from(job.run_dir) == {"from": "avgn", "parts": ["local"]}


def test_a_fresh_start_drops_an_older_runs_checkpoints(tmp_path, monkeypatch):
    """A run trained again from scratch (its start changed) and interrupted in its first epoch must not leave the
    older run's last.pt beside the new ``init.json``: the next demo would take the older run for the new one."""
    run_dir = tmp_path / "runs" / "dense"
    run_dir.mkdir(parents=True)
    for name in ("last.pt", "best.pt"):
        (run_dir / name).write_bytes(b"an older run's checkpoint")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    from avgn_fast.checkpoint import save_checkpoint
    from avgn_fast.models.avgn import AVGN

    monkeypatch.setattr("avgn_fast.training.trainer.fit", interrupted)
    save_checkpoint(tmp_path / "runs" / "avgn" / "best.pt", AVGN(TINY.config().replace(num_classes=8)),
                    class_names=[f"c{i}" for i in range(8)])
    config = TINY.config().with_overrides(["dense=true", "audio=false"]).replace(num_classes=8)
    job = demo_jobs.TrainJob("dense", "dense", config, run_dir, tmp_path, tmp_path / "cache", _settings(1),
                             tuple(f"c{i}" for i in range(8)), 0, "cpu", tmp_path / "runs" / "avgn", ("local",))
    with pytest.raises(KeyboardInterrupt):
        demo_jobs.train_job(job, {"train": None, "val": None}, False, lambda line: None)
    assert not (run_dir / "last.pt").exists() and not (run_dir / "best.pt").exists()
    assert demo_jobs.progress_of(run_dir, config, _settings(1), job.init_record()) == (0, False)


def test_calibration_table_aggregates_seeds_by_hand():
    rows = [{"method": "AVGN", "seed": seed, "threshold": tau, "steps_max": 4, "test_top1": top1, "test_full_top1": 0.9,
             "test_steps": steps, "test_gflops": 0.05, "lost": lost, "gained": 0}
            for seed, tau, top1, steps, lost in ((0, 0.9, 0.8, 2.0, 1), (1, None, 0.9, 4.0, 4))]
    rows.append({**rows[0], "method": "dense", "threshold": 0.5})
    table = demo.calibration_table(rows).splitlines()
    assert table[4] == "| AVGN | 0 | 0.9 | 80.00 | 90.00 | 2.00 / 4 | 0.05 | 1 | 0 |"
    assert table[5].startswith("| AVGN | 1 | none | 90.00 |")
    # seeds 0 and 1: top-1 80 and 90 (std sqrt(50)), steps 2 and 4 (std sqrt(2)), lost 1 and 4 (std sqrt(4.5))
    assert table[7] == "| AVGN | mean ± std of 2 | | 85.00 ± 7.07 | | 3.00 ± 1.41 | | 2.5 ± 2.1 | |"
    assert len(table) == 8  # dense has one seed: no mean row


def test_demo_command_line():
    assert demo.CALIBRATION_MARGIN == inspect.signature(calibrate_command.main).parameters["margin"].default
    args = vars(build_parser().parse_args(["demo", "--quick", "--out", "somewhere", "--threads", "2"]))
    assert (args["quick"], str(args["out"]), args["threads"], args["device"]) == (True, "somewhere", 2, "auto")
    assert set(demo.SIZES) == {"full", "quick"}
    full, quick = demo.SIZES["full"], demo.SIZES["quick"]
    assert quick.videos < full.videos and quick.epochs <= full.epochs and not quick.sizes
    assert full.patience and quick.caveat.startswith("Plumbing check") and not full.caveat
    args = vars(build_parser().parse_args(["demo", "--seeds", "3"]))
    assert (args["seeds"], args["quick"]) == (3, False)
    with pytest.raises(ValueError, match="bad demo size"):
        demo.DemoSize("x", train=2, val=0, test=1, epochs=1)
