"""The demo's training runs: one job per method and seed, trained in this process or in worker processes.

A job may start some of its encoders from another run of the same seed (``TrainJob.init_from``: the
baselines start from the AVGN run's, ``demo.METHOD_INIT``); it then trains after that run, and its run
folder records where it started (``init.json``), so a folder trained otherwise is not taken for it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from avgn_fast.config import AVGNConfig

if TYPE_CHECKING:
    from avgn_fast.training.trainer import TrainSettings

# training processes take the dearest runs first, after the runs they start from. Measured per epoch on 1,100
# videos, two processes side by side (2026-12-06): dense ~53 s, AVGN ~35 s (its warm-up epochs cheaper), visual-only
# ~33 s, uniform+centre ~24 s, audio-only ~13 s. The baselines start from AVGN's encoders, so AVGN comes first
DEAREST_FIRST = ("avgn", "dense", "visual-only", "uniform-centre", "audio-only")
INIT_FILE = "init.json"  # in a run folder: the run and the encoders its training started from


@dataclass(frozen=True)
class TrainJob:
    """One method to train (picklable: it may run in a worker process)."""

    slug: str  # the run folder's name: the method's, with ``-seed<i>`` for the seeds after the first
    method: str  # the method's slug in ``demo.METHODS``
    config: AVGNConfig
    run_dir: Path
    data: Path
    cache_dir: Path
    settings: TrainSettings
    classes: tuple[str, ...]
    done: int  # epochs an earlier run finished (> 0: resume from its last.pt)
    device: str
    init_from: Path | None = None  # a run folder whose best.pt gives the encoders in ``init_parts``
    init_parts: tuple[str, ...] = ()

    def init_record(self) -> dict | None:
        """What ``INIT_FILE`` says for this job: the run folder's name and the encoders; None when it starts fresh."""
        return None if self.init_from is None else {"from": self.init_from.name, "parts": list(self.init_parts)}


def total_epochs(config: AVGNConfig, settings: TrainSettings) -> int:
    """Epochs ``fit`` runs for ``config`` (``TrainSettings.stages``)."""
    return len(settings.stages(config))


def progress_of(run_dir: Path, config: AVGNConfig, settings: TrainSettings, init: dict | None = None
                ) -> tuple[int, bool]:
    """(epochs an earlier run of ``config`` finished in ``run_dir``, whether it is complete): complete once it has
    run every epoch of its stages or its validation curve has plateaued. (0, False) when there is none to
    continue; a run with another recipe (any setting but the number of joint epochs) or another start (``init``,
    ``TrainJob.init_record``) is not continued.
    """
    from avgn_fast.checkpoint import load_checkpoint
    from avgn_fast.training.runs import plateaued

    last = run_dir / "last.pt"
    if not last.is_file() or started_from(run_dir) != init:
        return 0, False
    try:
        state = load_checkpoint(last)
    except ValueError:  # a damaged file: train again
        return 0, False
    if state.model.config != config or state.train_state is None:
        return 0, False
    recipe = {k: v for k, v in settings.as_dict().items() if k != "epochs"}
    saved = {k: v for k, v in state.train_state.get("settings", {}).items() if k != "epochs"}
    if saved != recipe:
        return 0, False
    history = state.train_state["history"]
    curve = [record["val_top1"] for record in history if "val_top1" in record]
    floor = state.train_state.get("summary", {}).get("chance_floor", 0.0)
    stopped = settings.patience is not None and plateaued(curve, settings.patience, floor)
    return len(history), stopped or len(history) >= total_epochs(config, settings)


def started_from(run_dir: Path) -> dict | None:
    """The run folder's ``INIT_FILE`` (None without one, or when it is unreadable)."""
    try:
        return json.loads((run_dir / INIT_FILE).read_text())
    except (OSError, ValueError):
        return None


def run_record(run_dir: Path, method: str, seed: int) -> dict:
    """A finished run's method, seed and folder with its ``run_summary`` (from its last.pt), and what it started
    from (``init``: the run folder and encoders, or None)."""
    from avgn_fast.checkpoint import load_checkpoint

    summary = load_checkpoint(run_dir / "last.pt").train_state.get("summary", {})
    return {"method": method, "seed": seed, "run": str(run_dir), **summary, "init": started_from(run_dir)}


def load_split(data: Path, config: AVGNConfig, split: str, cache_dir: Path, progress: bool = False):
    """A split as an in-memory ``TensorSource`` (the tiny demo clips fit), decoding what the cache lacks.

    Returns (source, class names, files decoded).
    """
    from tqdm import tqdm

    from avgn_fast.data.folder import FolderDataset
    from avgn_fast.training.trainer import FolderSource, TensorSource

    dataset = FolderDataset(data, config, split=split, cache_dir=cache_dir)
    failed = dataset.decode_all(progress=lambda b: tqdm(b, desc=f"decode {split}", unit="batch", disable=not progress))
    if failed:
        raise ValueError(f"{data}: {len(failed)} AVSynth files failed to decode, e.g. {failed[0]}")
    source = TensorSource(*FolderSource(dataset).batch(torch.arange(len(dataset))))
    return source, dataset.classes, dataset.decodes


def train_job(job: TrainJob, sources: dict | None, progress: bool, log: Callable[[str], None]) -> None:
    """Train ``job`` (``sources``: its train and val splits, else loaded from the cache). A fresh start removes an
    older run's checkpoints from the folder, takes the encoders in ``init_parts`` from ``init_from``'s best.pt and
    records it in ``INIT_FILE``."""
    from avgn_fast.models.avgn import AVGN
    from avgn_fast.models.backbones import load_pretrained
    from avgn_fast.training.trainer import fit

    if sources is None:
        sources = {split: load_split(job.data, job.config, split, job.cache_dir)[0] for split in ("train", "val")}
    torch.manual_seed(job.settings.seed)
    model = AVGN(job.config)
    if job.done == 0:
        job.run_dir.mkdir(parents=True, exist_ok=True)
        for stale in ("last.pt", "best.pt"):  # an older run's: interrupted now, it must not pass for this one
            (job.run_dir / stale).unlink(missing_ok=True)
        if job.init_parts:  # the source checkpoint read once for all its encoders
            start = torch.load(job.init_from / "best.pt", map_location="cpu", weights_only=True)
            for part in job.init_parts:
                load_pretrained(getattr(model, part), start, part=part)
        record = job.init_record()
        if record is not None:
            (job.run_dir / INIT_FILE).write_text(json.dumps(record) + "\n")
        else:
            (job.run_dir / INIT_FILE).unlink(missing_ok=True)
    fit(model.to(job.device), sources["train"], sources["val"], settings=job.settings, class_names=list(job.classes),
        out_dir=job.run_dir, resume=job.done > 0, progress=progress, log=log)


def training_order(jobs: list[TrainJob]) -> list[TrainJob]:
    """``jobs`` dearest first (``DEAREST_FIRST``), each after the job whose run it starts from."""
    pending, order = sorted(jobs, key=lambda job: DEAREST_FIRST.index(job.method)), []
    while pending:
        later = {job.run_dir for job in pending}
        job = next((job for job in pending if job.init_from not in later), pending[0])
        pending.remove(job)
        order.append(job)
    return order


_QUEUE = None  # a worker process's queue to the parent, for per-epoch progress


def _init_worker(queue, threads: int | None) -> None:
    global _QUEUE
    _QUEUE = queue
    if threads is not None:
        torch.set_num_threads(threads)


def _train_in_worker(job: TrainJob) -> str:
    train_job(job, None, False, lambda line: _QUEUE.put((job.slug, line)))
    return job.slug


def train_parallel(jobs: list[TrainJob], *, workers: int, threads: int | None, progress: bool,
                   log: Callable[[str], None]) -> None:
    """Train ``jobs`` in ``workers`` processes, dearest first; a job that starts from another job's run waits for
    it. One bar advancing per finished epoch."""
    import multiprocessing
    import queue as queues
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    from tqdm import tqdm

    context = multiprocessing.get_context("spawn")  # fork would copy the parent's OpenMP state
    channel = context.Queue()
    remaining = sum(total_epochs(job.config, job.settings) - job.done for job in jobs)  # at most: plateaus stop
    waiting = training_order(jobs)
    running = {}  # future → job
    with tqdm(total=remaining, desc=f"train ({workers} processes)", unit="epoch", disable=not progress) as bar, \
            ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                                initargs=(channel, threads)) as pool:
        def drain(timeout: float) -> None:
            while True:
                try:
                    slug, line = channel.get(timeout=timeout)
                except queues.Empty:
                    return
                bar.update(line.startswith("epoch="))
                (bar.write if progress else log)(f"  {slug}: {line}")

        def start() -> None:  # as many as there are free processes, of the jobs whose start is trained
            unfinished = {job.run_dir for job in waiting} | {job.run_dir for job in running.values()}
            for job in [job for job in waiting if job.init_from not in unfinished]:
                if len(running) == workers:
                    return
                waiting.remove(job)
                running[pool.submit(_train_in_worker, job)] = job

        start()
        while running:
            done, _ = wait(running, timeout=0.5, return_when=FIRST_COMPLETED)
            drain(0.01)
            for future in done:
                running.pop(future)
                future.result()  # a failed run raises here
            start()
        drain(0.5)
