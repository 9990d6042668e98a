"""Running the sweep: every knob setting of every checkpoint measured on the batched early-exit engine.

``sweep`` loads the checkpoints, calibrates their exit thresholds on the validation split, builds one engine
per model variant and K, and runs the split once per setting, each batch loaded once for all of them.
"""

from __future__ import annotations

import contextlib
import functools
import math
import platform
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import torch

from avgn_fast.config import AVGNConfig
from avgn_fast.pareto.calibration import calibrate_thresholds
from avgn_fast.pareto.planning import (
    KS,
    THRESHOLDS,
    Knobs,
    default_glance_sizes,
    default_patch_sizes,
    method_name,
    plan,
)
from avgn_fast.pareto.report import ParetoPoint, ParetoResult, pareto_frontier


def model_variant(model, patch_size: int, glance_size: int):
    """The checkpoint's weights in a model with patch size P and glance size G that never exits on its own.

    Raises ValueError when that model cannot exist (P > S) or the weights do not fit it (e.g. AESPA's
    position grid is tied to G).
    """
    from avgn_fast.models.avgn import AVGN

    config = model.config.replace(patch_size=patch_size, glance_size=glance_size, exit_threshold=None)
    if config == model.config:
        return model
    variant = AVGN(config)
    try:
        variant.load_state_dict(model.state_dict())
    except RuntimeError as e:
        first = str(e).strip().splitlines()[-1].strip().split(":")[0]  # "size mismatch for <parameter>"
        raise ValueError(f"the weights do not fit ({first})") from e
    return variant.to(next(model.parameters()).device).eval()


def exit_engine(model, k: int, *, backend: str, precision: str, batch_size: int):
    """The batched early-exit engine for ``model`` at ``k`` steps: exited videos leave the batch."""
    from avgn_fast.engine.early_exit import GlanceEngine

    return GlanceEngine(model, backend=backend, precision=precision, max_batch=batch_size, k=k)


@dataclass
class _Job:
    """One point to measure: the model variant, its knobs, and what is accumulated over the batches."""

    name: str
    checkpoint: str
    engine: object  # GlanceEngine
    knobs: Knobs
    setting: str
    probs: list = field(default_factory=list)
    labels: list = field(default_factory=list)
    gflops: list = field(default_factory=list)
    steps: list = field(default_factory=list)
    seconds: float = 0.0

    def point(self) -> dict:
        from avgn_fast.training.trainer import mean_average_precision

        probs, labels = torch.cat(self.probs), torch.cat(self.labels)
        k = self.knobs
        return dict(method=self.name, checkpoint=self.checkpoint, setting=self.setting, k=k.k,
                    exit_threshold=k.exit_threshold, patch_size=k.patch_size, glance_size=k.glance_size,
                    top1=float((probs.argmax(-1) == labels).float().mean()),
                    mean_ap=mean_average_precision(probs, labels), gflops=float(torch.cat(self.gflops).mean()),
                    mean_steps=float(torch.cat(self.steps).float().mean()), videos=len(labels),
                    videos_per_s=len(labels) / max(self.seconds, 1e-9))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def source_batches(source, batch_size: int, device: torch.device):
    for start in range(0, len(source), batch_size):
        frames, mel, labels, present = source.batch(torch.arange(start, min(start + batch_size, len(source))))
        yield frames.to(device), mel.to(device, torch.float32), labels, present.to(device)


def _run_split(jobs: list[_Job], source, *, batch_size: int, device: torch.device, progress: bool) -> None:
    """Run every job over every batch of ``source``, each batch loaded once for all jobs; timing per job."""
    from tqdm import tqdm

    bar = tqdm(total=len(jobs) * math.ceil(len(source) / batch_size), desc=f"sweep {len(jobs)} settings",
               unit="run", disable=not progress)
    with bar:
        for frames, mel, labels, present in source_batches(source, batch_size, device):
            for job in jobs:
                _sync(device)
                begin = time.perf_counter()
                result = job.engine(frames, mel, present, exit_threshold=job.knobs.exit_threshold)
                _sync(device)
                job.seconds += time.perf_counter() - begin
                job.probs.append(result.final_logits.float().softmax(-1).cpu())
                job.labels.append(labels)
                job.gflops.append(result.gflops.float().cpu())
                job.steps.append((result.exit_step + 1).cpu())
                bar.update()


def step_probs(engine, source, *, batch_size: int, device: torch.device,
               progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K, C) probabilities after every step at the engine's K, no early exit, and the (N,) labels."""
    from tqdm import tqdm

    probs, labels = [], []
    batches = tqdm(source_batches(source, batch_size, device), desc="all steps", unit="batch",
                   total=math.ceil(len(source) / batch_size), disable=not progress)
    for frames, mel, batch_labels, present in batches:
        probs.append(engine(frames, mel, present).probs.float().cpu())
        labels.append(batch_labels)
    return torch.cat(probs), torch.cat(labels)


def device_description(device: torch.device) -> str:
    """The GPU's name, or the CPU's model and the thread count torch uses."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):  # not Linux: keep platform's answer
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    threads = torch.get_num_threads()
    return f"CPU {name}, {threads} thread{'s' if threads > 1 else ''}"


def _versions() -> dict[str, str]:
    import avgn_fast

    versions = {"avgn_fast": avgn_fast.__version__, "torch": torch.__version__, "python": platform.python_version()}
    if torch.version.cuda:
        versions["cuda"] = torch.version.cuda
    return versions


def _unique_names(configs: list[AVGNConfig], paths: list[str], seeds: list[int]) -> list[str]:
    """Method names, the run folder added where two checkpoints of one method share a seed (runs of one method
    with different seeds keep its name: they are aggregated)."""
    names = [method_name(c) for c in configs]
    keys = list(zip(names, seeds, strict=True))
    return [f"{n} ({Path(p).parent.name or Path(p).stem})" if keys.count(key) > 1 else n
            for n, p, key in zip(names, paths, keys, strict=True)]


def _checkpoint_jobs(model, name: str, path: str, *, ks, thresholds: list[float], patch_sizes, glance_sizes,
                     notes: list[str], engine) -> list[_Job]:
    """The points to measure for one checkpoint's ``model``; settings its weights cannot run go to ``notes``.

    ``engine(model, k)`` builds the engine that runs a model variant at ``k`` steps.
    """
    cfg = model.config
    sizes_p = default_patch_sizes(cfg) if patch_sizes == "auto" else patch_sizes
    sizes_g = default_glance_sizes(cfg) if glance_sizes == "auto" else glance_sizes
    if (cfg.dense or not cfg.visual) and (sizes_p or sizes_g):
        kind = "a dense" if cfg.dense else "an audio-only"
        notes.append(f"{name}: {kind} model has no patch or glance, so P and G are not swept")
        sizes_p = sizes_g = ()
    variants, engines, jobs = {(cfg.patch_size, cfg.glance_size): model}, {}, []
    for knobs in plan(cfg, ks=ks, thresholds=thresholds, patch_sizes=sizes_p, glance_sizes=sizes_g):
        key = (knobs.patch_size, knobs.glance_size)
        if key not in variants:
            try:
                variants[key] = model_variant(model, *key)
            except ValueError as e:
                notes.append(f"{name}: {knobs.label(cfg)} not run: {e}")
                continue
        if (*key, knobs.k) not in engines:
            engines[(*key, knobs.k)] = engine(variants[key], knobs.k)
        jobs.append(_Job(name, path, engines[(*key, knobs.k)], knobs, knobs.label(cfg)))
    return jobs


def sweep(checkpoints: Sequence[str | Path], data, *, cache_dir, split: str = "test", val_split: str | None = "val",
          ks: Iterable[int] = KS, thresholds: int = THRESHOLDS,
          patch_sizes: str | Iterable[int] = "auto", glance_sizes: str | Iterable[int] = "auto", batch_size: int = 32,
          device: str = "auto", backend: str = "eager", precision: str = "auto", progress: bool = True,
          log: Callable[[str], None] = print, allow_outside: bool = False,
          seeds: Sequence[int] | None = None) -> ParetoResult:
    """Measure every knob setting of every checkpoint on ``split`` of the folder dataset ``data``.

    ``thresholds`` early-exit thresholds per checkpoint are calibrated on ``val_split`` (none without
    it); ``patch_sizes``/``glance_sizes`` are ``"auto"`` (``default_patch_sizes``/``default_glance_sizes``)
    or explicit sizes, each run only where the checkpoint's weights fit a model of that size (otherwise a
    note says why). Every point runs on the batched early-exit engine (``backend``, ``precision``: see
    ``avgn_fast.engine.early_exit.GlanceEngine``), so videos that exit early leave the batch; compile and
    warm-up time is kept out of videos/s. Decoded clips are cached in ``cache_dir`` so each video is
    decoded once. ``allow_outside`` accepts labels.csv paths outside ``data`` (see ``read_labels``).
    ``seeds``: each checkpoint's training seed (default all 0), carried by its points; runs of one method with
    different seeds share its name, and the table and plot give their mean ± std (``seed_rows``).
    """

    from avgn_fast.checkpoint import load_checkpoint
    from avgn_fast.data.decode import DecodeParams
    from avgn_fast.data.folder import decoded_split, read_labels
    from avgn_fast.engine.backends import precision_name, resolve_backend, resolve_precision
    from avgn_fast.engine.predictor import resolve_device
    from avgn_fast.training.trainer import FolderSource

    if not checkpoints:
        raise ValueError("sweep needs at least one checkpoint")
    dev = resolve_device(device)
    dtype = resolve_precision(precision, dev)
    backend = resolve_backend(backend, dev)[0]
    engine = functools.partial(exit_engine, backend=backend, precision=precision, batch_size=batch_size)
    ks = tuple(ks)
    patch_sizes = patch_sizes if patch_sizes == "auto" else tuple(patch_sizes)
    glance_sizes = glance_sizes if glance_sizes == "auto" else tuple(glance_sizes)
    ckpts = [load_checkpoint(path) for path in checkpoints]
    paths = [str(path) for path in checkpoints]
    seeds = [0] * len(paths) if seeds is None else list(seeds)
    if len(seeds) != len(paths):
        raise ValueError(f"{len(seeds)} seeds given for {len(paths)} checkpoints")
    names = _unique_names([c.model.config for c in ckpts], paths, seeds)
    rows = read_labels(data, allow_outside=allow_outside)
    calibrate = thresholds > 0 and val_split is not None and any(e.split == val_split for e in rows)
    notes = [] if calibrate or thresholds < 1 else [f"no {val_split!r} split in {data}: no early-exit thresholds"]
    decoded = 0

    def dataset(config, which):
        nonlocal decoded
        ds = decoded_split(data, config, which, cache_dir=cache_dir, progress=progress,
                           log=lambda line: log(f"pareto: {line}"), allow_outside=allow_outside)
        decoded += ds.decodes
        return FolderSource(ds)

    # checkpoints whose decode parameters agree share one decoded dataset
    groups: dict[DecodeParams, list[int]] = {}
    for i, ckpt in enumerate(ckpts):
        groups.setdefault(DecodeParams.from_config(ckpt.model.config), []).append(i)
    points, warmup = [], 0.0
    for members in groups.values():
        test = dataset(ckpts[members[0]].model.config, split)
        val = dataset(ckpts[members[0]].model.config, val_split) if calibrate else None
        jobs = []
        for i in members:
            if ckpts[i].class_names != test.dataset.classes:
                raise ValueError(f"{paths[i]}: classes {ckpts[i].class_names} differ from {data}'s "
                                 f"{test.dataset.classes}")
            model = model_variant(ckpts[i].model.to(dev).eval(), ckpts[i].model.config.patch_size,
                             ckpts[i].model.config.glance_size)
            taus = [] if val is None else calibrate_thresholds(
                step_probs(engine(model, model.steps), val, batch_size=batch_size, device=dev)[0], thresholds)
            jobs += _checkpoint_jobs(model, names[i], paths[i], ks=ks, thresholds=taus, patch_sizes=patch_sizes,
                                     glance_sizes=glance_sizes, notes=notes, engine=engine)
        begin = time.perf_counter()
        frames, mel, _, present = next(source_batches(test, min(batch_size, len(test)), dev))
        for job in jobs:  # compiles (other backends) and first-call costs, kept out of videos/s
            job.engine(frames, mel, present, exit_threshold=job.knobs.exit_threshold)
        _sync(dev)
        warmup += time.perf_counter() - begin
        _run_split(jobs, test, batch_size=batch_size, device=dev, progress=progress)
        points += [{**job.point(), "seed": seeds[paths.index(job.checkpoint)]} for job in jobs]
    frontier = pareto_frontier([(p["gflops"], p["top1"]) for p in points])
    return ParetoResult([ParetoPoint(**p, frontier=f) for p, f in zip(points, frontier, strict=True)],
                        data=str(data), split=split, device=device_description(dev),
                        backend=backend, precision=precision_name(dtype),
                        date=datetime.now().astimezone().isoformat(timespec="seconds"), versions=_versions(),
                        notes=list(dict.fromkeys(notes)), warmup_s=round(warmup, 3), decoded=decoded)  # once per seed
