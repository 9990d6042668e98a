"""The toolkit's main job from nothing: AVSynth on disk, AVGN and its baselines trained, the Pareto curve measured.

``run_demo`` writes everything under one folder (default ``./avgn_runs``) and reuses what a previous
run left there: the AVSynth files, the decoded-clip cache, and every finished training run (an
interrupted one resumes from its ``last.pt``). Layout::

    avgn_runs/cache/                  decoded clips, shared by every size
    avgn_runs/<size>/avsynth/         videos/, labels.csv, README.md
    avgn_runs/<size>/runs/<method>/   best.pt, last.pt (with the per-epoch history and the run's summary),
                                      init.json (the run whose encoders it started from, if any)
    avgn_runs/<size>/runs/<method>-seed<i>/   the same method trained with seed i (``seeds`` > 1)
    avgn_runs/<size>/pareto/          pareto.csv, pareto.json, pareto.md, pareto.png, curves.png (validation),
                                      calibration.md, calibration.json (early exit chosen on val, checked on test)

Every method trains with one recipe (``METHOD_SETTINGS`` changes a setting where a method measurably trains
better with another: the dense baseline's learning rate), the baselines that look at frames starting their
encoders from the AVGN run of their seed (``METHOD_INIT``: as every method of the paper starts from ImageNet
weights; AVGN and audio-only start from scratch), until its validation top-1 plateaus
(``DemoSize.patience``, at most ``DemoSize.epochs`` joint epochs; a run still at chance has no plateau and trains
on), or a fixed count where the size says so (``quick``). Each run's early-exit threshold is then chosen on val
as ``avgn-fast calibrate`` chooses it and checked on test (``calibration.md``). With several seeds, the table
and the plot give each method's mean ± std. On a CPU the trainings run in two processes of one torch thread
each. ``quick`` checks the plumbing in about 3 minutes on 2 cores: too little data and training for its
accuracies to mean anything, and its table and plot say so.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from avgn_fast import pareto
from avgn_fast.config import AVGNConfig
from avgn_fast.demo_jobs import (
    DEAREST_FIRST,
    TrainJob,
    load_split,
    progress_of,
    run_record,
    total_epochs,
    train_job,
    train_parallel,
    training_order,
)
from avgn_fast.demo_report import (
    CALIBRATION_MARGIN,
    calibrate_runs,
    calibration_table,
    training_table,
    write_calibration,
    write_curves,
)

# (run folder, config overrides): AVGN and the baselines of the Pareto claim, all trained the same way
METHODS = (
    ("avgn", ()),
    ("visual-only", ("audio=false",)),
    ("uniform-centre", ("temporal=uniform", "spatial=center", "audio=false")),
    ("dense", ("dense=true", "audio=false")),
    ("audio-only", ("visual=false",)),
)
# where a method trains better with another setting of the shared recipe (measured on the full size, 2026-12-06):
# at lr 2e-3 the dense baseline memorizes its training videos (train top-1 30 %) with validation still at chance
# after 19 joint epochs; at 5e-4 validation leaves chance (27 % after 9, train 74 %)
METHOD_SETTINGS = {"dense": {"lr": 5e-4}}
# the encoders each baseline starts from: those of the AVGN run of its seed (``INIT_FROM``), as the paper's methods
# all start from ImageNet weights. From scratch, neither dense nor the visual-only glance learned to read a glyph
# (README: validation at chance over 28 epochs on two seeds of three); dense from AVGN's local encoder reached 87.5 %
METHOD_INIT = {"dense": ("local",), "visual-only": ("visual", "local"), "uniform-centre": ("visual", "local")}
INIT_FROM = "avgn"


@dataclass(frozen=True)
class DemoSize:
    """How much data and training one demo size uses, and how densely it sweeps."""

    name: str
    train: int  # AVSynth videos per split
    val: int
    test: int
    epochs: int  # joint epochs (TrainSettings.epochs): the cap when stopping at the plateau
    audio_warmup_epochs: int = 3
    look_epochs: int = 3
    batch_size: int = 16
    thresholds: int = pareto.THRESHOLDS
    sizes: bool = True  # sweep other patch / glance sizes
    overrides: tuple[str, ...] = ()  # config fields changed from ``tiny`` (FIELD=VALUE)
    seed: int = 0
    patience: int | None = None  # TrainSettings.patience: stop at the plateau; None: exactly ``epochs``
    caveat: str = ""  # heads the table and the plot (a size too small for its accuracy to mean anything)

    def __post_init__(self):
        if min(self.train, self.val, self.test, self.epochs, self.batch_size) < 1:
            raise ValueError(f"bad demo size: {self.train=} {self.val=} {self.test=} {self.epochs=} "
                             f"{self.batch_size=}")

    @property
    def videos(self) -> int:
        return self.train + self.val + self.test

    def config(self) -> AVGNConfig:
        return AVGNConfig.from_name("tiny").with_overrides(list(self.overrides))


# Full is AVSynth's default split, every method trained to its plateau, at most 25 joint epochs. Measured from
# scratch on 2 cores, one torch thread per process (2026-12-06): 24.8 min (writing 156 s, decoding 24 s, training
# 1,145 s, the sweep 128 s, calibration 36 s); 38.1 min when the baselines started from scratch and three of them
# trained to the cap at chance. ``quick``: 1.2 min.
SIZES = {
    "full": DemoSize("full", train=1100, val=200, test=500, epochs=25, patience=4),
    "quick": DemoSize("quick", train=100, val=25, test=50, epochs=2, audio_warmup_epochs=1, look_epochs=1,
                      thresholds=pareto.QUICK_THRESHOLDS, sizes=False,
                      caveat="Plumbing check (--quick): too few videos and epochs for these accuracies to mean "
                      "anything; the full demo measures the curve"),
}


@dataclass
class DemoResult:
    """What a demo run produced: the sweep, the files, and what it did itself rather than reuse."""

    result: pareto.ParetoResult
    paths: dict[str, Path]
    written: int  # AVSynth videos written by this run
    decoded: int  # files decoded by this run
    trained: list[str] = field(default_factory=list)  # runs trained or resumed by this run
    seconds: dict[str, float] = field(default_factory=dict)  # wall time per phase
    runs: list[dict] = field(default_factory=list)  # per training run: method, seed, folder, ``run_summary``
    calibration: list[dict] = field(default_factory=list)  # per training run: ``calibrate_runs``' row


def _video_count(folder: Path) -> int:
    return sum(1 for _ in (folder / "videos").glob("*.*")) if (folder / "videos").is_dir() else 0


def run_demo(out="./avgn_runs", *, size: DemoSize = SIZES["full"], device: str = "auto", threads: int | None = 1,
             workers: int | None = None, seeds: int = 1, progress: bool = True,
             log: Callable[[str], None] = print) -> DemoResult:
    """Synthesize AVSynth, train every method of ``METHODS`` with ``seeds`` seeds each, sweep them, write the
    Pareto files (several seeds: mean ± std per method and setting).

    ``threads``: torch CPU threads per process (None keeps torch's setting; one is fastest for the tiny
    models and does not fight other work for shared cores). ``workers``: training processes (default:
    two on a CPU with at least two cores, else one; one trains in this process with a bar per epoch).
    """
    import dataclasses
    import os

    from avgn_fast.data import synth
    from avgn_fast.engine.predictor import resolve_device
    from avgn_fast.training.trainer import TrainSettings

    if seeds < 1:
        raise ValueError(f"seeds must be at least 1, got {seeds}")
    root = Path(out)
    here = root / size.name
    dev = resolve_device(device)
    if workers is None:
        workers = 2 if dev.type == "cpu" and (os.cpu_count() or 1) >= 2 else 1
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    seconds, trained, decoded = {}, [], 0
    try:
        clock = time.perf_counter()
        base = size.config()
        data = here / "avsynth"
        before = _video_count(data)
        synth.write_dataset(data, size.videos, seed=size.seed, config=base,
                            splits=(size.train / size.videos, size.val / size.videos, size.test / size.videos))
        written = _video_count(data) - before
        seconds["synthesize"] = time.perf_counter() - clock

        clock = time.perf_counter()
        sources, classes = {}, []
        for split in ("train", "val"):
            sources[split], classes, count = load_split(data, base, split, root / "cache", progress)
            decoded += count
        seconds["decode"] = time.perf_counter() - clock

        clock = time.perf_counter()
        checkpoints, run_seeds, runs, jobs = [], [], [], []
        # no augmentation: AVSynth's glyphs are oriented lines that a mirror turns into another class; AVGN does not
        # overfit here (on 611 AVSynth videos the default augmentation cost it 0.7 points of test top-1 and 1.3x
        # the training time, docs/augmentation.md), and the baselines that memorize their training videos (dense,
        # uniform+centre) did not generalize better with it (dense: validation 10-14 % after 7 joint epochs)
        recipe = TrainSettings(epochs=size.epochs, audio_warmup_epochs=size.audio_warmup_epochs,
                               look_epochs=size.look_epochs, batch_size=size.batch_size, seed=size.seed,
                               patience=size.patience).without_augmentation()
        for index in range(seeds):
            for method, overrides in METHODS:
                settings = dataclasses.replace(recipe, seed=size.seed + index, **METHOD_SETTINGS.get(method, {}))
                slug = method if index == 0 else f"{method}-seed{index}"
                config = base.with_overrides(list(overrides)).replace(num_classes=len(classes))
                run_dir = here / "runs" / slug
                checkpoints.append(run_dir / "best.pt")
                run_seeds.append(settings.seed)
                runs.append((run_dir, method, settings.seed))
                parts = METHOD_INIT.get(method, ())  # encoders each such configuration has
                init_from = here / "runs" / (INIT_FROM if index == 0 else f"{INIT_FROM}-seed{index}") if parts else None
                job = TrainJob(slug, method, config, run_dir, data, root / "cache", settings, tuple(classes), 0,
                               str(dev), init_from, parts)
                done, complete = progress_of(run_dir, config, settings, job.init_record())
                if init_from in {j.run_dir for j in jobs if j.done == 0}:  # its start is trained anew: so is it
                    done, complete = 0, False
                if complete and (run_dir / "best.pt").is_file():
                    log(f"demo: {slug}: reusing {run_dir / 'best.pt'}")
                    continue
                total = total_epochs(config, settings)
                stop = f"until validation plateaus, at most {total}" if settings.patience else str(total)
                own = "".join(f", {k}={v:g}" for k, v in METHOD_SETTINGS.get(method, {}).items())
                encoders = f"{' and '.join(parts)} encoder{'s' * (len(parts) > 1)}"
                start = f", {encoders} from {init_from.name}" if parts else ""
                log(f"demo: training {slug} ({pareto.method_name(config)}, seed {settings.seed}{own}{start}), {stop} "
                    f"epochs on {len(sources['train'])} videos" + (f", resuming after epoch {done}" if done else ""))
                jobs.append(dataclasses.replace(job, done=done))
        if min(workers, len(jobs)) > 1:
            train_parallel(jobs, workers=min(workers, len(jobs)), threads=threads, progress=progress, log=log)
        else:
            for job in training_order(jobs):
                train_job(job, sources, progress, lambda line, s=job.slug: log(f"  {s}: {line}"))
        trained = [job.slug for job in jobs]
        records = [run_record(run_dir, method, seed) for run_dir, method, seed in runs]
        seconds["train"] = time.perf_counter() - clock

        clock = time.perf_counter()
        result = pareto.sweep(checkpoints, data, cache_dir=root / "cache", thresholds=size.thresholds,
                              patch_sizes="auto" if size.sizes else (), glance_sizes="auto" if size.sizes else (),
                              device=str(dev), progress=progress, log=log, seeds=run_seeds)
        result.caveat = size.caveat
        decoded += result.decoded
        paths = pareto.write_all(result, here / "pareto")
        paths["curves"] = write_curves(records, here / "pareto" / "curves.png", caveat=size.caveat)
        seconds["sweep"] = time.perf_counter() - clock

        clock = time.perf_counter()
        test = load_split(data, base, "test", root / "cache")[0]  # decoded by the sweep: from the cache
        calibration = calibrate_runs(runs, sources["val"], test, device=dev, progress=progress)
        paths.update(write_calibration(calibration, here / "pareto", caveat=size.caveat))
        seconds["calibrate"] = time.perf_counter() - clock
    finally:
        torch.set_num_threads(previous_threads)
    return DemoResult(result, paths, written, decoded, trained, seconds, records, calibration)


def summary(demo: DemoResult) -> str:
    """The table, the notes, the phase times and the paths written, as the demo command prints them."""
    result = demo.result
    lines = [pareto.markdown_table(result), "", training_table(demo.runs), "", calibration_table(demo.calibration), ""]
    lines += [f"note: {note}" for note in result.notes]
    phases = ", ".join(f"{name} {s:.0f} s" for name, s in demo.seconds.items())
    lines.append(f"{result.device}, {result.backend} {result.precision}, {result.date}: {phases} "
                 f"(total {sum(demo.seconds.values()) / 60:.1f} min)")
    lines.append("wrote:")
    data = Path(result.data)
    lines.append(f"  data        {data} ({demo.written} videos written now)")
    lines += [f"  checkpoint  {path}" for path in dict.fromkeys(p.checkpoint for p in result.points)]
    lines += [f"  {kind:<11} {path}" for kind, path in demo.paths.items()]
    return "\n".join(lines)


__all__ = ["CALIBRATION_MARGIN", "DEAREST_FIRST", "INIT_FROM", "METHODS", "METHOD_INIT", "METHOD_SETTINGS", "SIZES",
           "DemoResult", "DemoSize", "calibrate_runs", "calibration_table", "run_demo", "summary", "training_table",
           "write_calibration", "write_curves"]
