"""A sweep's result (its points, the Pareto frontier) and its four files: CSV, JSON, Markdown table, plot."""

from __future__ import annotations

import csv
import dataclasses
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from avgn_fast.pareto.planning import threshold_text

FILES = ("pareto.csv", "pareto.json", "pareto.md", "pareto.png")


@dataclass(frozen=True)
class ParetoPoint:
    """Measured accuracy and cost of one checkpoint at one knob setting, over ``videos`` videos.

    top1 and mean_ap in [0, 1]; gflops: mean GMACs per video from the exits taken; mean_steps: mean
    steps taken (1..k); videos_per_s: model throughput on the sweep's device; frontier: no other point
    of the sweep has lower or equal GFLOPs and higher or equal top-1 with one of them strictly better;
    setting: the knobs as ``Knobs.label`` writes them against the checkpoint's own configuration; seed: the
    training seed of the checkpoint (runs of one method that differ only in it are aggregated, ``seed_rows``).
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
    seed: int = 0

    def __post_init__(self):
        if not (0 <= self.top1 <= 1 and 0 <= self.mean_ap <= 1):
            raise ValueError(f"top1 and mean_ap must lie in [0, 1], got {self.top1=} {self.mean_ap=}")
        if not 1 - 1e-6 <= self.mean_steps <= self.k + 1e-6:
            raise ValueError(f"mean_steps must lie in [1, k={self.k}], got {self.mean_steps=}")
        if self.gflops < 0 or self.videos < 1 or self.videos_per_s <= 0:
            raise ValueError(f"bad measurement: {self.gflops=} {self.videos=} {self.videos_per_s=}")


@dataclass
class ParetoResult:
    """The points of one sweep and where they were measured; ``notes`` say which knobs were skipped and why;
    ``caveat``, when set, heads the table and the plot (a run too small for its accuracy to mean anything)."""

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
    caveat: str = ""

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
                "date": self.date, "versions": self.versions, "notes": self.notes, "warmup_s": self.warmup_s,
                "caveat": self.caveat}

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


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n − 1 in the denominator; 0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    return mean, (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5 if n > 1 else 0.0


@dataclass(frozen=True)
class SeedRow:
    """One method at one setting over its seeds: mean and standard deviation (``mean_std``) of each measure.

    ``setting`` names early-exit thresholds by rank (``τ#1`` the lowest of a checkpoint's), since each seed's
    checkpoint is calibrated to thresholds of its own; ``frontier``: on the Pareto frontier of the means.
    """

    method: str
    setting: str
    seeds: int
    top1: tuple[float, float]
    mean_ap: tuple[float, float]
    gflops: tuple[float, float]
    mean_steps: tuple[float, float]
    videos_per_s: tuple[float, float]
    frontier: bool = False


def _seed_setting(point: ParetoPoint, points: Sequence[ParetoPoint]) -> str:
    """The point's setting with its threshold replaced by its rank among its checkpoint's thresholds."""
    if point.exit_threshold is None:
        return point.setting
    same = sorted({p.exit_threshold for p in points if p.checkpoint == point.checkpoint and p.k == point.k
                   and p.exit_threshold is not None and (p.patch_size, p.glance_size) == (point.patch_size,
                                                                                         point.glance_size)})
    return point.setting.replace(threshold_text(point.exit_threshold), f"τ#{same.index(point.exit_threshold) + 1}")


def seed_rows(points: Sequence[ParetoPoint]) -> list[SeedRow]:
    """The points grouped by method and setting (thresholds by rank), in first-seen order, each measure as
    (mean, std) over the group's seeds."""
    groups: dict[tuple[str, str], list[ParetoPoint]] = {}
    for p in points:
        groups.setdefault((p.method, _seed_setting(p, points)), []).append(p)
    rows = [SeedRow(method, setting, len({p.seed for p in group}),
                    *(mean_std([getattr(p, name) for p in group])
                      for name in ("top1", "mean_ap", "gflops", "mean_steps", "videos_per_s")))
            for (method, setting), group in groups.items()]
    frontier = pareto_frontier([(r.gflops[0], r.top1[0]) for r in rows])
    return [dataclasses.replace(r, frontier=f) for r, f in zip(rows, frontier, strict=True)]


def seeded(result: ParetoResult) -> bool:
    """Whether some method of the sweep was trained with more than one seed."""
    return any(row.seeds > 1 for row in seed_rows(result.points))


def markdown_table(result: ParetoResult) -> str:
    """One row per point, by method then GFLOPs; frontier points marked ◆ in the last column. With several seeds
    per method, one row per method and setting with mean ± std over the seeds (``seed_rows``)."""
    head = [f"**{result.caveat}**", ""] if result.caveat else []
    if seeded(result):
        return "\n".join(head + [_seed_table(result)])
    header = ("method", "setting", "top-1 %", "mAP %", "GFLOPs/video", "steps", "videos/s", "frontier")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---", "---"] + ["---:"] * 5 + [":---:"]) + "|"]
    order = {m: i for i, m in enumerate(result.methods)}
    for p in sorted(result.points, key=lambda p: (order[p.method], p.gflops, p.top1)):
        lines.append(f"| {p.method} | {p.setting} | {100 * p.top1:.2f} | {100 * p.mean_ap:.2f} | "
                     f"{p.gflops:.4g} | {p.mean_steps:.2f} | {p.videos_per_s:.1f} | {'◆' if p.frontier else ''} |")
    return "\n".join(head + lines)


def _seed_table(result: ParetoResult) -> str:
    header = ("method", "setting", "seeds", "top-1 %", "mAP %", "GFLOPs/video", "steps", "videos/s", "frontier")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---", "---"] + ["---:"] * 6 + [":---:"]) + "|"]
    order = {m: i for i, m in enumerate(result.methods)}
    for r in sorted(seed_rows(result.points), key=lambda r: (order[r.method], r.gflops[0], r.top1[0])):
        lines.append(f"| {r.method} | {r.setting} | {r.seeds} | {100 * r.top1[0]:.2f} ± {100 * r.top1[1]:.2f} | "
                     f"{100 * r.mean_ap[0]:.2f} ± {100 * r.mean_ap[1]:.2f} | {r.gflops[0]:.4g} ± {r.gflops[1]:.2g} | "
                     f"{r.mean_steps[0]:.2f} | {r.videos_per_s[0]:.1f} ± {r.videos_per_s[1]:.1f} | "
                     f"{'◆' if r.frontier else ''} |")
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
            "the checkpoint's. With several training seeds per method, each row gives mean ± standard deviation "
            "over the seeds, thresholds named by rank (τ#1 the lowest of each checkpoint's).", "",
            markdown_table(result)]
    if result.notes:
        text += ["", "Notes:", *(f"- {n}" for n in result.notes)]
    Path(path).write_text("\n".join(text) + "\n")
    return Path(path)


def write_plot(result: ParetoResult, path) -> Path:
    """Two panels: top-1 vs GFLOPs, and top-1 vs videos/s measured on the sweep's engine (same backend and
    precision for every method). One line per method through its own frontier, the global frontier highlighted;
    with several seeds, the means with ± one standard deviation as error bars (``seed_rows``)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    marks = _marks(result)
    fig = Figure(figsize=(15, 6), layout="constrained")
    FigureCanvasAgg(fig)
    compute, speed = fig.subplots(1, 2)
    _panel(compute, result, marks, lambda m: m["gflops"], cheaper_is_lower=True)
    compute.set_xlabel("mean GFLOPs per video (GMACs, from the exits taken)")
    _panel(speed, result, marks, lambda m: m["videos_per_s"], cheaper_is_lower=False)
    speed.set_xlabel(f"videos/s ({result.backend} {result.precision}, batched early exit, decoded clips)")
    videos = max(p.videos for p in result.points)
    seeds = f", mean ± std over {max(r.seeds for r in seed_rows(result.points))} seeds" if seeded(result) else ""
    title = f"Accuracy vs compute and vs throughput, {Path(result.data).name} [{result.split}, {videos} videos{seeds}]"
    fig.suptitle((f"{result.caveat}\n" if result.caveat else "") + f"{title}\n{result.device}, {result.date[:10]}",
                 fontsize=10, color="firebrick" if result.caveat else "black")
    fig.savefig(path, dpi=120)
    return Path(path)


def _marks(result: ParetoResult) -> list[dict]:
    """What the plot draws: per point (one seed) or per method and setting (means over the seeds), its method,
    setting, GFLOPs, videos/s, top-1 in % and the top-1 standard deviation in % (0 for one seed)."""
    if seeded(result):
        return [{"method": r.method, "setting": r.setting, "gflops": r.gflops[0], "videos_per_s": r.videos_per_s[0],
                 "top1": 100 * r.top1[0], "std": 100 * r.top1[1]} for r in seed_rows(result.points)]
    return [{"method": p.method, "setting": p.setting, "gflops": p.gflops, "videos_per_s": p.videos_per_s,
             "top1": 100 * p.top1, "std": 0.0} for p in result.points]


def _panel(ax, result: ParetoResult, marks: list[dict], x_of, *, cheaper_is_lower: bool) -> None:
    """Top-1 against ``x_of(mark)``, lower x better when ``cheaper_is_lower`` (GFLOPs), else higher (videos/s)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    sign = 1 if cheaper_is_lower else -1

    def frontier(group):
        return pareto_frontier([(sign * x_of(m), m["top1"]) for m in group])

    for i, method in enumerate(result.methods):
        pts = sorted((m for m in marks if m["method"] == method), key=lambda m: (sign * x_of(m), m["top1"]))
        own = frontier(pts)
        color = f"C{i % 10}"
        line = [m for m, keep in zip(pts, own, strict=True) if keep]
        ax.errorbar([x_of(m) for m in line], [m["top1"] for m in line], yerr=[m["std"] for m in line], fmt="-o",
                    color=color, label=method, zorder=3, capsize=3)
        rest = [m for m, keep in zip(pts, own, strict=True) if not keep]
        ax.errorbar([x_of(m) for m in rest], [m["top1"] for m in rest], yerr=[m["std"] for m in rest], fmt="o",
                    color=color, alpha=0.45, markerfacecolor="none", zorder=3, capsize=2)
    front = sorted((m for m, keep in zip(marks, frontier(marks), strict=True) if keep), key=x_of)
    ax.plot([x_of(m) for m in front], [m["top1"] for m in front], drawstyle="steps-post" if cheaper_is_lower
            else "steps-pre", color="black", linewidth=6, alpha=0.15, label="Pareto frontier (all methods)", zorder=2)
    ax.plot([x_of(m) for m in front], [m["top1"] for m in front], "o", markersize=13, markerfacecolor="none",
            markeredgecolor="black", zorder=4)
    for m in front:
        ax.annotate(m["setting"], (x_of(m), m["top1"]), textcoords="offset points", xytext=(6, -12), fontsize=7)
    xs = [x_of(m) for m in marks if x_of(m) > 0]
    if xs and max(xs) / min(xs) > 20:
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))  # 0.01, 0.02, 0.05, 0.1, ...
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_ylim(bottom=0, top=max(m["top1"] + m["std"] for m in marks) * 1.05 + 1)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right" if cheaper_is_lower else "lower left", fontsize=8)


def write_all(result: ParetoResult, out_dir) -> dict[str, Path]:
    """All four files into ``out_dir`` (created): ``{"csv": ..., "json": ..., "md": ..., "png": ...}``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    writers = (write_csv, write_json, write_markdown, write_plot)
    return {name.rsplit(".", 1)[1]: writer(result, out / name) for name, writer in zip(FILES, writers, strict=True)}
