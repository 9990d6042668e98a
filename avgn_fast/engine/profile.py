"""Throughput profile of the glance pipeline per backend, precision and batch size, on whatever device is here.

For each configuration: videos/s, batch latency p50/p90, milliseconds per stage and batch (decode,
glance, AV-TeST, AESPA, crop, local, head), peak GPU memory, GMACs per video (from the exits
taken) and the TFLOP/s that makes, and the warm-up (compile) time, measured apart from the timed
runs. With ``compare``, the same configurations of the dense baseline (the local encoder on all T
frames at S, no glance, no audio) are measured in the same run, as is eager fp32, and
``format_table`` prints the ratios. Rows carry the device name and versions, so CSVs from
different GPUs line up.
"""

from __future__ import annotations

import csv as csvlib
import datetime
import logging
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from avgn_fast.engine.backends import TENSORRT_NOTE, precision_name, resolve_backend, resolve_precision
from avgn_fast.engine.early_exit import GlanceEngine, Hook
from avgn_fast.engine.stages import random_inputs
from avgn_fast.models.avgn import AVGN

log = logging.getLogger(__name__)

STAGES = ("decode", "glance", "avtest", "aespa", "crop", "local", "head")
# the engine's stage names → the profile's columns
_COLUMN = {"glance": "glance", "avtest": "avtest", "aespa": "aespa", "crop": "crop", "local": "local", "head": "head",
           "step_head": "head"}


@dataclass
class ProfileRow:
    """One measured configuration; times in ms per batch, NaN where not measured (decode without data, CPU memory)."""

    device: str
    torch: str
    triton: str
    tensorrt: str
    date: str
    config: str
    model: str  # "avgn" or "dense"
    backend: str
    precision: str
    batch: int
    videos_per_s: float
    latency_p50_ms: float
    latency_p90_ms: float
    decode_ms: float
    glance_ms: float
    avtest_ms: float
    aespa_ms: float
    crop_ms: float
    local_ms: float
    head_ms: float
    peak_mem_mib: float
    gflops_per_video: float
    tflops: float
    warmup_s: float
    notes: str = ""

    def __post_init__(self):
        if self.batch < 1 or not self.videos_per_s > 0 or not self.latency_p90_ms >= self.latency_p50_ms > 0:
            raise ValueError(f"implausible measurement: {self.batch=} {self.videos_per_s=} {self.latency_p50_ms=} "
                             f"{self.latency_p90_ms=}")
        if self.model not in ("avgn", "dense"):
            raise ValueError(f"model must be 'avgn' or 'dense', got {self.model!r}")

    @property
    def key(self) -> tuple:
        return self.model, self.backend, self.precision, self.batch


class _StageTimer(Hook):
    """Wall time of every stage call, the device synchronized on both sides, summed per column."""

    def __init__(self, device: torch.device):
        self.device, self.ms = device, dict.fromkeys(STAGES[1:], 0.0)

    def stage(self, name, args):
        return _Timed(self, _COLUMN[name])


class _Timed:
    def __init__(self, timer: _StageTimer, column: str):
        self.timer, self.column = timer, column

    def __enter__(self):
        _sync(self.timer.device)
        self.start = time.perf_counter()

    def __exit__(self, *exc):
        _sync(self.timer.device)
        self.timer.ms[self.column] += (time.perf_counter() - self.start) * 1e3


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def environment(device: torch.device) -> dict:
    """Device name and versions, the key columns of every row."""
    import importlib.metadata

    def version(package):
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return ""

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu {platform.processor() or ''}"
    return {"device": name.strip(), "torch": torch.__version__, "triton": version("triton"),
            "tensorrt": version("torch-tensorrt") or version("torch_tensorrt"),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")}


def dense_baseline(model: AVGN) -> AVGN:
    """The dense baseline of ``model``'s configuration: its local encoder on all T frames at S, no audio."""
    config = model.config.replace(name=f"{model.config.name}-dense", dense=True, audio=False)
    return AVGN(config).to(next(model.parameters()).device).eval()


def measure(model: AVGN, backend: str, precision: str, inputs: tuple, *, device: torch.device, iters: int = 10,
            warmup: int = 2, exit_threshold: float | None = None, decode_ms: float = math.nan,
            env: dict | None = None) -> ProfileRow:
    """Profile one configuration on one batch of ``inputs`` (frames, mel, audio_present, on ``device``)."""
    if iters < 1 or warmup < 1:
        raise ValueError(f"need iters ≥ 1 and warmup ≥ 1, got {iters=} {warmup=}")
    frames, mel, present = inputs
    batch = frames.shape[0]
    if backend == "inductor":
        torch._dynamo.reset()  # every configuration compiles from scratch, so its warm-up is its own
    start = time.perf_counter()
    engine = GlanceEngine(model, backend=backend, precision=precision, device=device, max_batch=batch)
    for _ in range(warmup):
        engine(frames, mel, present, exit_threshold=exit_threshold)
    _sync(device)
    warmup_s = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    latencies = []
    for _ in range(iters):
        t0 = time.perf_counter()
        result = engine(frames, mel, present, exit_threshold=exit_threshold)
        _sync(device)
        latencies.append((time.perf_counter() - t0) * 1e3)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else math.nan
    timer = _StageTimer(device)
    for _ in range(iters):
        engine(frames, mel, present, exit_threshold=exit_threshold, hook=timer)
    gmacs = float(result.gflops.float().mean())
    videos_per_s = batch * iters / (sum(latencies) / 1e3)
    lat = torch.tensor(latencies)
    notes = [engine.backend_reason] + ([TENSORRT_NOTE] if engine.backend == "tensorrt" else [])
    return ProfileRow(
        **(env or environment(device)), config=model.config.name, model="dense" if model.config.dense else "avgn",
        backend=engine.backend, precision=precision_name(engine.dtype), batch=batch, videos_per_s=videos_per_s,
        latency_p50_ms=float(lat.quantile(0.5)), latency_p90_ms=float(lat.quantile(0.9)), decode_ms=decode_ms,
        **{f"{name}_ms": ms / iters for name, ms in timer.ms.items()}, peak_mem_mib=peak, gflops_per_video=gmacs,
        tflops=2 * gmacs * videos_per_s / 1e3, warmup_s=warmup_s, notes="; ".join(notes))


def load_data(data: str | os.PathLike, model: AVGN, count: int, device: torch.device) -> tuple[tuple, float]:
    """``count`` decoded clips from the videos in ``data`` (cycled if fewer) on ``device``, and decode ms per clip."""
    from avgn_fast.data.decode import decode_many, resolve_backend
    from avgn_fast.engine.predictor import expand_inputs

    paths = expand_inputs([data])
    if not paths:
        raise ValueError(f"no video files found in {data}")
    paths = paths[:count]
    start = time.perf_counter()
    clips = list(decode_many(paths, model.config, backend=resolve_backend("auto", device), device=device,
                             batch_size=len(paths)))
    per_clip_ms = (time.perf_counter() - start) * 1e3 / len(paths)
    clips = [clips[i % len(clips)] for i in range(count)]
    frames = torch.stack([c.frames for c in clips]).to(device)
    mel = torch.stack([c.mel for c in clips]).to(device, torch.float32)
    present = torch.tensor([c.audio_present for c in clips], device=device)
    return (frames, mel, present), per_clip_ms


def profile(model: AVGN, *, backends=("eager",), precisions=("auto",), batch_sizes=(1, 8), data=None,
            device: str | torch.device = "cpu", iters: int = 10, warmup: int = 2, compare: bool = False,
            exit_threshold: float | None = None, csv: str | os.PathLike | None = None,
            progress: bool = False) -> list[ProfileRow]:
    """Measure every (backend, precision, batch size); with ``compare`` also eager fp32 and the dense baseline.

    Without ``data`` the inputs are random decoded clips made on the device (decode not timed); with
    a folder of videos, clips are decoded once up front and decode ms per batch is reported.
    Rows are appended to ``csv`` when given.
    """
    device = torch.device(device)
    model = model.to(device).eval()
    # resolved first: an unavailable backend fails before anything is measured, and "auto" is not measured twice
    configs = list(dict.fromkeys((resolve_backend(b, device)[0], precision_name(resolve_precision(p, device)))
                                 for b in backends for p in precisions))
    if compare and ("eager", "fp32") not in configs:
        configs.insert(0, ("eager", "fp32"))
    models = [model, dense_baseline(model)] if compare else [model]
    largest = max(batch_sizes)
    if data is not None:
        clips, per_clip_ms = load_data(data, model, largest, device)
    else:
        clips, per_clip_ms = random_inputs(model.config, largest, device), math.nan
    env = environment(device)
    jobs = [(m, b, p, n) for n in batch_sizes for b, p in configs for m in models]
    if progress:
        from tqdm import tqdm

        jobs = tqdm(jobs, desc="profile", unit="config")
    rows = []
    for m, backend, precision, n in jobs:
        inputs = tuple(t[:n] for t in clips)
        rows.append(measure(m, backend, precision, inputs, device=device, iters=iters, warmup=warmup,
                            exit_threshold=exit_threshold, decode_ms=per_clip_ms * n, env=env))
        log.info("%s", rows[-1])
    if csv is not None:
        append_csv(csv, rows)
    return rows


def append_csv(path: str | os.PathLike, rows: list[ProfileRow]) -> Path:
    """Append ``rows`` to the CSV at ``path`` (header written once); ValueError if its header differs."""
    path = Path(path)
    names = [f.name for f in fields(ProfileRow)]
    exists = path.is_file() and path.stat().st_size > 0
    if exists:
        with path.open(newline="") as f:
            header = next(csvlib.reader(f), [])
        if header != names:
            raise ValueError(f"{path}: its header is not a profile's ({header[:4]}…); write to a new file")
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", newline="") as f:
        writer = csvlib.DictWriter(f, fieldnames=names)
        if not exists:
            writer.writeheader()
        writer.writerows(asdict(r) for r in rows)
    return path


def format_table(rows: list[ProfileRow], *, compare: bool = False) -> str:
    """Aligned text: one line per row; with ``compare``, ratios vs eager fp32 and vs the dense baseline."""
    by_key = {r.key: r for r in rows}
    header = ["model", "backend", "prec", "batch", "videos/s", "p50 ms", "p90 ms",
              *[f"{s} ms" for s in STAGES], "peak MiB", "GFLOPs/v", "TFLOP/s", "warm-up s"]
    if compare:
        header += ["x eager fp32", "x dense"]
    lines = []
    for r in rows:
        cells = [r.model, r.backend, r.precision, str(r.batch), f"{r.videos_per_s:,.1f}", f"{r.latency_p50_ms:.2f}",
                 f"{r.latency_p90_ms:.2f}", *[_num(getattr(r, f"{s}_ms"), ".2f") for s in STAGES],
                 _num(r.peak_mem_mib, ".0f"), f"{r.gflops_per_video:.3f}", f"{r.tflops:.3f}", f"{r.warmup_s:.1f}"]
        if compare:
            eager = by_key.get((r.model, "eager", "fp32", r.batch))
            dense = by_key.get(("dense", r.backend, r.precision, r.batch))
            cells += [_ratio(r, eager), _ratio(r, dense) if r.model == "avgn" else "-"]
        lines.append(cells)
    width = [max(len(line[i]) for line in [header, *lines]) for i in range(len(header))]
    out = ["  ".join(f"{c:>{w}}" for c, w in zip(line, width)) for line in [header, *lines]]
    if rows:
        r = rows[0]
        out.insert(0, f"{r.device} · torch {r.torch} · triton {r.triton or '-'} · torch-tensorrt "
                      f"{r.tensorrt or '-'} · config {r.config} · ms per batch")
    return "\n".join(out)


def write_plot(rows: list[ProfileRow], path):
    """Where each configuration's batch time goes: one horizontal bar per row, stacked by stage (ms per batch;
    stages not measured, NaN, are left out), labelled with its videos/s. Returns the figure."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not rows:
        raise ValueError("no profile rows to plot")
    fig = Figure(figsize=(10, 1.2 + 0.45 * len(rows)), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    labels = [f"{r.model} {r.backend} {r.precision} b{r.batch}" for r in rows]
    y = list(range(len(rows)))[::-1]  # first row on top
    left = [0.0] * len(rows)
    for i, stage in enumerate(STAGES):
        widths = [getattr(r, f"{stage}_ms") for r in rows]
        if all(math.isnan(w) for w in widths):
            continue
        widths = [0.0 if math.isnan(w) else w for w in widths]
        ax.barh(y, widths, left=left, color=f"C{i}", label=stage, height=0.6)
        left = [a + w for a, w in zip(left, widths)]
    for yi, total, r in zip(y, left, rows):
        ax.annotate(f"{r.videos_per_s:,.0f} videos/s", (total, yi), textcoords="offset points", xytext=(4, -3),
                    fontsize=8)
    ax.set_yticks(y, labels)
    ax.set_xlabel("ms per batch, by stage (each stage timed alone, synchronized)")
    ax.set_xlim(right=max(left) * 1.25)
    handles, names = ax.get_legend_handles_labels()
    fig.legend(handles, names, loc="outside lower center", ncols=len(names), fontsize=8)
    ax.grid(True, axis="x", alpha=0.3)
    r = rows[0]
    ax.set_title(f"{r.device} · torch {r.torch} · config {r.config} · {r.date[:10]}", fontsize=10)
    fig.savefig(path, dpi=120)
    return fig


def _num(x: float, spec: str) -> str:
    return "-" if math.isnan(x) else format(x, spec)


def _ratio(row: ProfileRow, base: ProfileRow | None) -> str:
    return f"{row.videos_per_s / base.videos_per_s:.2f}" if base is not None else "-"
