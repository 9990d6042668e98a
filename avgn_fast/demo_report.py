"""The demo's reports beside the Pareto files: the training runs (a table and their validation curves) and each
run's early-exit threshold chosen on val and checked on test."""

from __future__ import annotations

from pathlib import Path

import torch

from avgn_fast import pareto

CALIBRATION_MARGIN = 0.05  # avgn-fast calibrate's default --margin (tests/test_demo.py checks that they agree)


def calibrate_runs(runs: list[tuple[Path, str, int]], val, test, *, device: torch.device, batch_size: int = 32,
                   progress: bool = False) -> list[dict]:
    """For each training run (folder, method, seed): the early-exit threshold ``avgn-fast calibrate`` chooses on
    ``val`` (no top-1 loss, ``CALIBRATION_MARGIN``), and what it does on ``test`` (``pareto.exit_check``).

    One row per run: method, seed, τ (None: no threshold saves a step), validation top-1 and steps at τ, and on
    test top-1 at τ and after every step, steps and GMACs per video at τ, and the videos τ loses and gains.
    """
    from avgn_fast.checkpoint import load_checkpoint

    rows = []
    for run_dir, _, seed in runs:
        ckpt = load_checkpoint(run_dir / "best.pt")
        model = ckpt.model.to(device).eval()
        engine = pareto.exit_engine(model, model.config.steps, backend="eager", precision="auto",
                                    batch_size=batch_size)
        cost = model.cost()
        probs = {name: pareto.step_probs(engine, source, batch_size=batch_size, device=device, progress=progress)
                 for name, source in (("val", val), ("test", test))}
        choice = pareto.choose_threshold(*probs["val"], per_video=cost.per_video, per_step=cost.per_step,
                                         margin=CALIBRATION_MARGIN)
        check = pareto.exit_check(*probs["test"], choice.threshold)
        rows.append({"method": pareto.method_name(model.config), "seed": seed, "run": str(run_dir),
                     "threshold": choice.threshold, "steps_max": model.config.steps, "val_top1": choice.top1,
                     "val_steps": choice.steps, "test_top1": check.top1, "test_full_top1": check.full_top1,
                     "test_steps": check.steps, "test_gflops": cost.total(check.steps),
                     "test_full_gflops": cost.total(model.config.steps), "lost": check.lost, "gained": check.gained,
                     "test_videos": check.videos})
    return rows


def calibration_table(rows: list[dict]) -> str:
    """The thresholds of ``calibrate_runs`` and what they do on test: one row per run and, for a method with
    several seeds, one with the mean ± std of test top-1 at τ, steps, and the videos lost."""
    lines = [f"Early exit chosen on val (no top-1 loss, margin {CALIBRATION_MARGIN}) and checked on test:", "",
             "| method | seed | τ | test top-1 % at τ | every step | steps | GFLOPs/video | lost | gained |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        tau = "none" if r["threshold"] is None else f"{r['threshold']:.4g}"
        lines.append(f"| {r['method']} | {r['seed']} | {tau} | {100 * r['test_top1']:.2f} | "
                     f"{100 * r['test_full_top1']:.2f} | {r['test_steps']:.2f} / {r['steps_max']} | "
                     f"{r['test_gflops']:.4g} | {r['lost']} | {r['gained']} |")
    for method in dict.fromkeys(r["method"] for r in rows):
        group = [r for r in rows if r["method"] == method]
        if len(group) < 2:
            continue
        top1, steps, lost = (pareto.mean_std([r[key] for r in group]) for key in ("test_top1", "test_steps", "lost"))
        lines.append(f"| {method} | mean ± std of {len(group)} | | {100 * top1[0]:.2f} ± {100 * top1[1]:.2f} | | "
                     f"{steps[0]:.2f} ± {steps[1]:.2f} | | {lost[0]:.1f} ± {lost[1]:.1f} | |")
    return "\n".join(lines)


def write_calibration(rows: list[dict], out_dir, *, caveat: str = "") -> dict[str, Path]:
    """``calibration.json`` (the rows) and ``calibration.md`` (``calibration_table`` under the caveat) in
    ``out_dir``."""
    import json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "calibration.json").write_text(json.dumps({"margin": CALIBRATION_MARGIN, "caveat": caveat, "runs": rows},
                                                     indent=2) + "\n")
    head = f"**{caveat}**\n\n" if caveat else ""
    (out / "calibration.md").write_text(head + calibration_table(rows) + "\n")
    return {"calibration": out / "calibration.md", "calibration_json": out / "calibration.json"}


def training_table(runs: list[dict]) -> str:
    """One row per training run: method, seed, where its encoders started (``init``: a run's, else from scratch),
    epochs (joint ones), how it stopped (and whether its validation top-1 never rose above chance), best validation
    top-1 and its epoch, wall time."""
    lines = ["| run | seed | encoders from | epochs (joint) | stopped | best val top-1 % (epoch) | wall s |",
             "|---|---:|---|---:|---|---:|---:|"]
    for r in runs:
        curve = r.get("val_top1") or []
        best = f"{100 * max(curve):.2f} ({r['best_epoch']})" if curve else "-"
        stopped = r.get("stopped", "-") + (", never above chance" if r.get("left_chance") is False else "")
        init = r.get("init")
        start = f"{init['from']} ({', '.join(init['parts'])})" if init else "scratch"
        lines.append(f"| {Path(r['run']).name} | {r['seed']} | {start} | {r.get('epochs', '-')} "
                     f"({r.get('joint_epochs', '-')}) | {stopped} | {best} | {r.get('wall_s', 0):.0f} |")
    return "\n".join(lines)


def write_curves(runs: list[dict], path, *, caveat: str = "") -> Path:
    """Validation top-1 after each joint epoch of every training run (``run_summary``'s curve), one line per run,
    its best epoch marked, and the chance floor of the patience rule: whether each method reached its plateau can
    be seen."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    methods = list(dict.fromkeys(r["method"] for r in runs))
    for r in runs:
        curve = [100 * v for v in r.get("val_top1") or []]
        if not curve:
            continue
        color = f"C{methods.index(r['method']) % 10}"
        label = f"{r['method']} (seed {r['seed']}, {r.get('stopped', '?')})"
        ax.plot(range(1, len(curve) + 1), curve, "-o", color=color, markersize=3, label=label)
        best = max(range(len(curve)), key=lambda i: (curve[i], -i))
        ax.plot([best + 1], [curve[best]], "*", color=color, markersize=12)
    floors = {r["chance_floor"] for r in runs if r.get("chance_floor")}
    if floors:  # one validation split: one floor
        ax.axhline(100 * max(floors), color="grey", linestyle="--", linewidth=1,
                   label="chance + 3 s.e.: no plateau below it")
    ax.set_xlabel("joint epoch")
    ax.set_ylabel("validation top-1 (%)")
    ax.set_ylim(0, 100)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")
    ax.set_title((f"{caveat}\n" if caveat else "") + "Validation curves (★ best epoch, kept as best.pt)", fontsize=10)
    fig.savefig(path, dpi=120)
    return Path(path)
