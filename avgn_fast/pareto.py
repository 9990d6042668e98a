"""Accuracy-vs-GFLOPs Pareto sweep: every inference knob of every checkpoint, measured for real.

For each checkpoint (AVGN and its baselines, each from its own training run) the sweep runs the
split once per knob setting: K ∈ {1, 2, 4, 8, 16} steps (those the checkpoint has), early-exit
thresholds τ calibrated on the validation split so the points spread over GFLOPs, and other
patch sizes P / glance resolutions G where the checkpoint's weights run them unchanged. Every point
gets top-1, mAP, mean GMACs per video from the exits actually taken, and videos/s of the model on
the current device (decoded clips already in memory). ``write_all`` writes ``pareto.csv``,
``pareto.json``, ``pareto.md`` (frontier marked) and ``pareto.png``.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import json
import math
import platform
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime
from pathlib import Path

import torch

from avgn_fast.config import AVGNConfig

KS = (1, 2, 4, 8, 16)
THRESHOLDS = 4  # calibrated early-exit thresholds per checkpoint
QUICK_THRESHOLDS = 2
FILES = ("pareto.csv", "pareto.json", "pareto.md", "pareto.png")


@dataclass(frozen=True)
class Knobs:
    """One inference setting: ``k`` steps, exit threshold τ (None: never exit early), patch size P, glance size G."""

    k: int
    exit_threshold: float | None
    patch_size: int
    glance_size: int

    def label(self, base: AVGNConfig) -> str:
        """Short text naming the setting, e.g. ``K=4 τ=0.912`` or ``K=4 P=24`` (P and G only where not the base)."""
        parts = [f"K={self.k}"]
        if self.exit_threshold is not None:
            parts.append(f"τ={self.exit_threshold:.4g}")
        if self.patch_size != base.patch_size:
            parts.append(f"P={self.patch_size}")
        if self.glance_size != base.glance_size:
            parts.append(f"G={self.glance_size}")
        return " ".join(parts)


@dataclass(frozen=True)
class ParetoPoint:
    """Measured accuracy and cost of one checkpoint at one knob setting, over ``videos`` videos.

    top1 and mean_ap in [0, 1]; gflops: mean GMACs per video from the exits taken; mean_steps: mean
    steps taken (1..k); videos_per_s: model throughput on the sweep's device; frontier: no other point
    of the sweep has lower or equal GFLOPs and higher or equal top-1 with one of them strictly better;
    setting: the knobs as ``Knobs.label`` writes them against the checkpoint's own configuration.
    """

    method: str
    checkpoint: str
    setting: str
    k: int
    exit_threshold: float | None
    patch_size: int
    glance_size: int
    top1: float
    mean_ap: float
    gflops: float
    mean_steps: float
    videos: int
    videos_per_s: float
    frontier: bool = False

    def __post_init__(self):
        if not (0 <= self.top1 <= 1 and 0 <= self.mean_ap <= 1):
            raise ValueError(f"top1 and mean_ap must lie in [0, 1], got {self.top1=} {self.mean_ap=}")
        if not 1 - 1e-6 <= self.mean_steps <= self.k + 1e-6:
            raise ValueError(f"mean_steps must lie in [1, k={self.k}], got {self.mean_steps=}")
        if self.gflops < 0 or self.videos < 1 or self.videos_per_s <= 0:
            raise ValueError(f"bad measurement: {self.gflops=} {self.videos=} {self.videos_per_s=}")


@dataclass
class ParetoResult:
    """The points of one sweep and where they were measured; ``notes`` say which knobs were skipped and why."""

    points: list[ParetoPoint]
    data: str
    split: str
    device: str
    backend: str
    precision: str
    date: str
    versions: dict[str, str]
    notes: list[str] = field(default_factory=list)
    warmup_s: float = 0.0
    decoded: int = 0  # files this sweep decoded (not in the cache before)

    def __post_init__(self):
        if not self.points:
            raise ValueError("a ParetoResult needs at least one point")
        frontier = pareto_frontier([(p.gflops, p.top1) for p in self.points])
        if [p.frontier for p in self.points] != frontier:
            raise ValueError("the points' frontier flags disagree with pareto_frontier")

    @property
    def methods(self) -> list[str]:
        """Method names in first-seen order."""
        return list(dict.fromkeys(p.method for p in self.points))

    def metadata(self) -> dict:
        return {"data": self.data, "split": self.split, "device": self.device, "backend": self.backend,
                "precision": self.precision,
                "date": self.date, "versions": self.versions, "notes": self.notes, "warmup_s": self.warmup_s}

    def __repr__(self) -> str:
        return (f"ParetoResult({len(self.points)} points, methods={self.methods}, split={self.split!r}, "
                f"device={self.device!r})")


# --- pure parts: names, frontier, calibration, the plan -----------------------------------------------------


def method_name(config: AVGNConfig) -> str:
    """The method a checkpoint trains, from its config switches (AVGN, visual-only glance, uniform+centre, dense)."""
    if config.dense:
        name = "dense"
    elif config.temporal == "avtest" and config.spatial == "policy":
        return "AVGN" if config.audio else "visual-only glance"
    else:
        temporal = "AV-TeST" if config.temporal == "avtest" else "uniform"
        spatial = {"policy": "policy", "center": "centre", "random": "random patch"}[config.spatial]
        name = f"{temporal}+{spatial}"
    return f"{name} + audio" if config.audio else name


def pareto_frontier(points: Sequence[tuple[float, float]]) -> list[bool]:
    """For (cost, accuracy) pairs: True where no other pair has cost ≤ and accuracy ≥, one of them strictly."""
    return [not any(c <= cost and a >= acc and (c < cost or a > acc) for c, a in points)
            for cost, acc in points]


def exit_steps_taken(probs: torch.Tensor, threshold: float | None) -> torch.Tensor:
    """(N,) steps taken (1..K) by ``model.glance``'s exit rule for probabilities (N, K, C)."""
    from avgn_fast.models.classifier import exit_steps

    return exit_steps(probs, threshold) + 1


def calibrate_thresholds(probs: torch.Tensor, count: int) -> list[float]:
    """Up to ``count`` exit thresholds whose mean steps on ``probs`` (N, K, C) spread evenly over (1, K).

    Candidates are quantiles of the per-step top probabilities; for each target mean (``count``
    evenly spaced values strictly between 1 and K) the candidate closest to it is chosen. Returned
    sorted and distinct (fewer than ``count`` when the confidences are too clumped to separate).
    """
    n, k, _ = probs.shape
    if k == 1 or count < 1 or n == 0:
        return []
    confidence = probs.float().amax(-1).flatten()
    candidates = torch.quantile(confidence, torch.linspace(0, 1, 201)).unique().tolist()
    means = torch.tensor([float(exit_steps_taken(probs, t).float().mean()) for t in candidates])
    targets = torch.linspace(1, k, count + 2)[1:-1]
    chosen = {candidates[int((means - target).abs().argmin())] for target in targets}
    return sorted(chosen)


@dataclass(frozen=True)
class ExitChoice:
    """An early-exit threshold and what it gives on the videos it was chosen on (top-1 in [0, 1], mean steps and
    GMACs per video), beside taking every step (``full_*``)."""

    threshold: float | None
    top1: float
    steps: float
    gflops: float
    full_top1: float
    full_gflops: float


def exit_outcome(probs: torch.Tensor, labels: torch.Tensor, threshold: float | None) -> tuple[float, float]:
    """(top-1, mean steps) of ``model.glance``'s exit rule at ``threshold`` on probabilities (N, K, C)."""
    steps = exit_steps_taken(probs, threshold)
    final = probs[torch.arange(len(probs)), steps - 1]
    n = max(len(probs), 1)  # exact fractions: a tolerance compares them
    return int((final.argmax(-1) == labels).sum()) / n, int(steps.sum()) / n


def choose_threshold(probs: torch.Tensor, labels: torch.Tensor, *, per_video: float, per_step: float,
                     max_drop: float = 0.0, candidates: int = 2000) -> ExitChoice:
    """The early-exit threshold with the fewest mean steps on (``probs`` (N, K, C), ``labels``) whose top-1 is at
    most ``max_drop`` below taking every step; ties go to the higher top-1, then the higher threshold. Candidates
    are the distinct top probabilities of the steps that can exit (quantiles of them beyond ``candidates``);
    ``threshold`` is None when none saves a step. GMACs per video = ``per_video + steps · per_step``."""
    n, k, _ = probs.shape
    full_top1, _ = exit_outcome(probs, labels, None)
    full_gflops = per_video + k * per_step
    best = ExitChoice(None, full_top1, float(k), full_gflops, full_top1, full_gflops)
    if n == 0 or k == 1:
        return best
    confidence = probs[:, :-1].float().amax(-1).flatten().unique()
    if len(confidence) > candidates:
        confidence = torch.quantile(confidence, torch.linspace(0, 1, candidates)).unique()
    for tau in confidence.tolist():
        top1, steps = exit_outcome(probs, labels, tau)
        if top1 < full_top1 - max_drop - 1e-12:
            continue
        if (steps, -top1, -tau) < (best.steps, -best.top1, -(best.threshold or 1.0)):
            best = ExitChoice(tau, top1, steps, per_video + steps * per_step, full_top1, full_gflops)
    return best


def default_patch_sizes(config: AVGNConfig) -> list[int]:
    """P·3/4 and P·5/4 (96 and 160 for the paper's 128), those that fit in the frame."""
    return [p for p in (round(config.patch_size * 3 / 4), round(config.patch_size * 5 / 4))
            if 8 <= p <= config.frame_size]


def default_glance_sizes(config: AVGNConfig) -> list[int]:
    """G/2 and G·3/4 (112 and 168 for the paper's 224): cheaper glances."""
    return [g for g in (config.glance_size // 2, round(config.glance_size * 3 / 4)) if g >= 8]


def plan(config: AVGNConfig, *, ks: Iterable[int] = KS, thresholds: Iterable[float] = (),
         patch_sizes: Iterable[int] = (), glance_sizes: Iterable[int] = ()) -> list[Knobs]:
    """Knob settings for a checkpoint: each K ≤ its steps without early exit, then at its full K each threshold,
    each other patch size and each other glance size (one knob changed at a time)."""
    steps = config.num_frames if config.dense else config.k
    p, g = config.patch_size, config.glance_size
    out = [Knobs(k, None, p, g) for k in sorted(set(ks)) if 1 <= k <= steps]
    out += [Knobs(steps, float(t), p, g) for t in thresholds]
    out += [Knobs(steps, None, size, g) for size in sorted(set(patch_sizes)) if size != p]
    out += [Knobs(steps, None, p, size) for size in sorted(set(glance_sizes)) if size != g]
    return out


# --- running the models ---------------------------------------------------------------------------------------


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


def _unique_names(configs: list[AVGNConfig], paths: list[str]) -> list[str]:
    names = [method_name(c) for c in configs]
    return [f"{n} ({Path(p).parent.name or Path(p).stem})" if names.count(n) > 1 else n
            for n, p in zip(names, paths, strict=True)]


def _checkpoint_jobs(model, name: str, path: str, *, ks, thresholds: list[float], patch_sizes, glance_sizes,
                     notes: list[str], engine) -> list[_Job]:
    """The points to measure for one checkpoint's ``model``; settings its weights cannot run go to ``notes``.

    ``engine(model, k)`` builds the engine that runs a model variant at ``k`` steps.
    """
    cfg = model.config
    sizes_p = default_patch_sizes(cfg) if patch_sizes == "auto" else patch_sizes
    sizes_g = default_glance_sizes(cfg) if glance_sizes == "auto" else glance_sizes
    if cfg.dense and (sizes_p or sizes_g):
        notes.append(f"{name}: a dense model has no patch or glance, so P and G are not swept")
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
          log: Callable[[str], None] = print, allow_outside: bool = False) -> ParetoResult:
    """Measure every knob setting of every checkpoint on ``split`` of the folder dataset ``data``.

    ``thresholds`` early-exit thresholds per checkpoint are calibrated on ``val_split`` (none without
    it); ``patch_sizes``/``glance_sizes`` are ``"auto"`` (``default_patch_sizes``/``default_glance_sizes``)
    or explicit sizes, each run only where the checkpoint's weights fit a model of that size (otherwise a
    note says why). Every point runs on the batched early-exit engine (``backend``, ``precision``: see
    ``avgn_fast.engine.early_exit.GlanceEngine``), so videos that exit early leave the batch; compile and
    warm-up time is kept out of videos/s. Decoded clips are cached in ``cache_dir`` so each video is
    decoded once. ``allow_outside`` accepts labels.csv paths outside ``data`` (see ``read_labels``).
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
    names = _unique_names([c.model.config for c in ckpts], paths)
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
        points += [job.point() for job in jobs]
    frontier = pareto_frontier([(p["gflops"], p["top1"]) for p in points])
    return ParetoResult([ParetoPoint(**p, frontier=f) for p, f in zip(points, frontier, strict=True)],
                        data=str(data), split=split, device=device_description(dev),
                        backend=backend, precision=precision_name(dtype),
                        date=datetime.now().astimezone().isoformat(timespec="seconds"), versions=_versions(),
                        notes=notes, warmup_s=round(warmup, 3), decoded=decoded)


# --- writers ------------------------------------------------------------------------------------------------


def write_csv(result: ParetoResult, path) -> Path:
    names = [f.name for f in fields(ParetoPoint)]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(names)
        for p in result.points:
            writer.writerow(["" if v is None else repr(v) if isinstance(v, float) else v
                             for v in (getattr(p, n) for n in names)])
    return Path(path)


def read_csv(path) -> list[ParetoPoint]:
    """Points back from ``write_csv``'s file."""
    kinds = {f.name: f.type for f in fields(ParetoPoint)}
    parse = {"int": int, "float": float, "str": str, "bool": lambda s: s == "True",
             "float | None": lambda s: None if s == "" else float(s)}
    with open(path, newline="") as f:
        return [ParetoPoint(**{k: parse[kinds[k]](v) for k, v in row.items()}) for row in csv.DictReader(f)]


def write_json(result: ParetoResult, path) -> Path:
    payload = {**result.metadata(), "unit": "GMACs per video (fvcore convention)",
               "points": [asdict(p) for p in result.points]}
    Path(path).write_text(json.dumps(payload, indent=2) + "\n")
    return Path(path)


def read_json(path) -> ParetoResult:
    """A ``ParetoResult`` back from ``write_json``'s file."""
    payload = json.loads(Path(path).read_text())
    points = [ParetoPoint(**p) for p in payload.pop("points")]
    payload.pop("unit")
    return ParetoResult(points, **payload)


def markdown_table(result: ParetoResult) -> str:
    """One row per point, by method then GFLOPs; frontier points marked ◆ in the last column."""
    header = ("method", "setting", "top-1 %", "mAP %", "GFLOPs/video", "steps", "videos/s", "frontier")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---", "---"] + ["---:"] * 5 + [":---:"]) + "|"]
    order = {m: i for i, m in enumerate(result.methods)}
    for p in sorted(result.points, key=lambda p: (order[p.method], p.gflops, p.top1)):
        lines.append(f"| {p.method} | {p.setting} | {100 * p.top1:.2f} | {100 * p.mean_ap:.2f} | "
                     f"{p.gflops:.4g} | {p.mean_steps:.2f} | {p.videos_per_s:.1f} | {'◆' if p.frontier else ''} |")
    return "\n".join(lines)


def write_markdown(result: ParetoResult, path) -> Path:
    videos = "/".join(str(n) for n in sorted({p.videos for p in result.points}))
    versions = ", ".join(f"{k} {v}" for k, v in result.versions.items())
    text = [f"# Accuracy vs GFLOPs on {Path(result.data).name} [{result.split}]", "",
            f"{result.device}, {result.backend} {result.precision}, {result.date}; {videos} videos; versions: "
            f"{versions}.", "",
            "GFLOPs = GMACs per video (fvcore convention), averaged over the exits actually taken; videos/s = the "
            "model alone on decoded clips in memory, with batched early exit (exited videos leave the batch). "
            "◆ = on the Pareto frontier of top-1 vs GFLOPs over all methods. Settings: K steps, τ early-exit "
            "threshold (calibrated on the validation split), P patch size, G glance size where they differ from "
            "the checkpoint's.", "", markdown_table(result)]
    if result.notes:
        text += ["", "Notes:", *(f"- {n}" for n in result.notes)]
    Path(path).write_text("\n".join(text) + "\n")
    return Path(path)


def write_plot(result: ParetoResult, path) -> Path:
    """Top-1 vs GFLOPs: one line per method through its own frontier, the global frontier highlighted."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    fig = Figure(figsize=(9, 6), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for i, method in enumerate(result.methods):
        pts = sorted((p for p in result.points if p.method == method), key=lambda p: (p.gflops, p.top1))
        own = pareto_frontier([(p.gflops, p.top1) for p in pts])
        line = [p for p, keep in zip(pts, own, strict=True) if keep]
        color = f"C{i % 10}"
        ax.plot([p.gflops for p in line], [100 * p.top1 for p in line], "-o", color=color, label=method, zorder=3)
        rest = [p for p, keep in zip(pts, own, strict=True) if not keep]
        ax.plot([p.gflops for p in rest], [100 * p.top1 for p in rest], "o", color=color, alpha=0.45,
                markerfacecolor="none", zorder=3)
    front = sorted((p for p in result.points if p.frontier), key=lambda p: p.gflops)
    ax.plot([p.gflops for p in front], [100 * p.top1 for p in front], drawstyle="steps-post", color="black",
            linewidth=6, alpha=0.15, label="Pareto frontier (all methods)", zorder=2)
    ax.plot([p.gflops for p in front], [100 * p.top1 for p in front], "o", markersize=13, markerfacecolor="none",
            markeredgecolor="black", zorder=4)
    for p in front:
        ax.annotate(p.setting, (p.gflops, 100 * p.top1), textcoords="offset points",
                    xytext=(6, -12), fontsize=7)
    costs = [p.gflops for p in result.points if p.gflops > 0]
    if costs and max(costs) / min(costs) > 20:
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))  # 0.01, 0.02, 0.05, 0.1, ...
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("mean GFLOPs per video (GMACs, from the exits taken)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_ylim(bottom=0, top=max(100 * p.top1 for p in result.points) * 1.05 + 1)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    videos = max(p.videos for p in result.points)
    ax.set_title(f"Accuracy vs compute, {Path(result.data).name} [{result.split}, {videos} videos]\n"
                 f"{result.device}, {result.backend} {result.precision}, {result.date[:10]}", fontsize=10)
    fig.savefig(path, dpi=120)
    return Path(path)


def write_all(result: ParetoResult, out_dir) -> dict[str, Path]:
    """All four files into ``out_dir`` (created): ``{"csv": ..., "json": ..., "md": ..., "png": ...}``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    writers = (write_csv, write_json, write_markdown, write_plot)
    return {name.rsplit(".", 1)[1]: writer(result, out / name) for name, writer in zip(FILES, writers, strict=True)}
