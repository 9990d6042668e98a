"""Accuracy-vs-GFLOPs Pareto sweep: every inference knob of every checkpoint, measured for real.

For each checkpoint (AVGN and its baselines, each from its own training run) the sweep runs the
split once per knob setting: K ∈ {1, 2, 4, 8, 16} steps (those the checkpoint has), early-exit
thresholds τ calibrated on the validation split so the points spread over GFLOPs, and other
patch sizes P / glance resolutions G where the checkpoint's weights run them unchanged. Every point
gets top-1, mAP, mean GMACs per video from the exits actually taken, and videos/s of the model on
the current device (decoded clips already in memory). ``write_all`` writes ``pareto.csv``,
``pareto.json``, ``pareto.md`` (frontier marked) and ``pareto.png``.

Modules, each importing only those before it: ``plan`` (knob settings, method names), ``calibration``
(early-exit thresholds from per-step probabilities), ``report`` (result types, frontier, the four files),
``sweep`` (loading checkpoints and running the engine).
"""

from avgn_fast.pareto.calibration import (
    ExitCheck,
    ExitChoice,
    calibrate_thresholds,
    choose_threshold,
    exit_changes,
    exit_check,
    exit_outcome,
    exit_steps_taken,
)
from avgn_fast.pareto.planning import (
    KS,
    QUICK_THRESHOLDS,
    THRESHOLDS,
    Knobs,
    default_glance_sizes,
    default_patch_sizes,
    method_name,
    plan,
)
from avgn_fast.pareto.report import (
    FILES,
    ParetoPoint,
    ParetoResult,
    SeedRow,
    markdown_table,
    mean_std,
    pareto_frontier,
    read_csv,
    read_json,
    seed_rows,
    seeded,
    write_all,
    write_csv,
    write_json,
    write_markdown,
    write_plot,
)
from avgn_fast.pareto.sweep import (
    device_description,
    exit_engine,
    model_variant,
    source_batches,
    step_probs,
    sweep,
)

__all__ = [
    "FILES", "KS", "QUICK_THRESHOLDS", "THRESHOLDS", "ExitCheck", "ExitChoice", "Knobs", "ParetoPoint",
    "ParetoResult", "SeedRow", "calibrate_thresholds", "choose_threshold", "default_glance_sizes",
    "default_patch_sizes", "device_description", "exit_changes", "exit_check", "exit_engine", "exit_outcome",
    "exit_steps_taken", "markdown_table", "mean_std", "method_name", "model_variant", "pareto_frontier", "plan",
    "read_csv", "read_json", "seed_rows", "seeded", "source_batches", "step_probs", "sweep", "write_all", "write_csv",
    "write_json", "write_markdown", "write_plot",
]
