"""Print GMACs (the literature's "GFLOPs") per component and per video for a configuration.

The table is the instantiated model's own component list (``AVGN.flops_table``): its total is
``AVGN.cost()`` with every step taken, the GFLOPs that ``predict`` and ``eval`` report for a video
that does not exit early.
"""

from __future__ import annotations

import json as jsonlib
from collections.abc import Sequence
from dataclasses import asdict


def add_arguments(parser) -> None:
    parser.add_argument("--config", default="paper", help="configuration name (paper, tiny); default: paper")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a config field, e.g. --set patch_size=96 (repeatable)")
    parser.add_argument("--json", action="store_true", help="print the table as JSON instead of text")


def _shape(shapes: tuple[tuple[int, ...], ...]) -> str:
    return ", ".join("x".join(str(d) for d in shape) for shape in shapes)


def format_table(name: str, rows: list, steps: int, cost) -> str:
    """Aligned text table: one line per component, then GMACs per video, per step and in total (``steps`` taken)."""
    header = ("component", "input", "GMACs", "per", "count", "GMACs/video")
    cells = [(r.name, _shape(r.input_shapes), f"{r.gmacs:.4f}", r.per,
              f"{r.count}/step" if r.per_step else str(r.count), f"{r.per_video(steps):.4f}") for r in rows]
    width = [max(len(line[i]) for line in [header, *cells]) for i in range(len(header))]
    align = ("<", "<", ">", "<", ">", ">")

    def fmt(line):
        return "  ".join(f"{c:{a}{w}}" for c, a, w in zip(line, align, width, strict=True))

    out = [f"config {name!r}: GMACs = multiply-accumulates of conv/linear/matmul/attention, batch 1, {steps} steps",
           fmt(header).rstrip(), *(fmt(line) for line in cells)]
    label = sum(width[:-1]) + 2 * (len(width) - 1)
    for text, value in (("once per video", cost.per_video), ("per step taken", cost.per_step),
                        (f"total per video ({steps} steps taken)", cost.total(steps))):
        out.append(f"{text:<{label}}{value:>{width[-1]}.4f}")
    return "\n".join(out)


def main(config: str = "paper", set: Sequence[str] = (), json: bool = False) -> int:
    import torch

    from avgn_fast.config import AVGNConfig
    from avgn_fast.models.avgn import AVGN

    cfg = AVGNConfig.from_name(config).with_overrides(list(set))
    with torch.random.fork_rng():  # the weights do not change a count: any initialisation will do
        torch.manual_seed(0)
        model = AVGN(cfg).eval()
    rows, cost = model.flops_table(), model.cost()
    if json:
        print(jsonlib.dumps({
            "config": cfg.name,
            "overrides": list(set),
            "unit": "GMACs",
            "steps": model.steps,
            "components": [{**asdict(r), "per_video": r.per_video(model.steps)} for r in rows],
            "per_video": cost.per_video,
            "per_step": cost.per_step,
            "total_per_video": cost.total(model.steps),
        }, indent=2))
    else:
        print(format_table(cfg.name, rows, model.steps, cost))
    return 0
