"""A sweep's result (its points, the Pareto frontier) and its four files: CSV, JSON, Markdown table, plot."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

FILES = ("pareto.csv", "pareto.json", "pareto.md", "pareto.png")


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


def pareto_frontier(points: Sequence[tuple[float, float]]) -> list[bool]:
    """For (cost, accuracy) pairs: True where no other pair has cost ≤ and accuracy ≥, one of them strictly."""
    return [not any(c <= cost and a >= acc and (c < cost or a > acc) for c, a in points)
            for cost, acc in points]


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
