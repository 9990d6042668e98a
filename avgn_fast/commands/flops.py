"""Print GMACs (the literature's "GFLOPs") per component and per video for a configuration."""

from __future__ import annotations

import json as jsonlib
from collections.abc import Sequence
from dataclasses import asdict

from avgn_fast.config import AVGNConfig
from avgn_fast.flops import ComponentFlops, component_table, total_gmacs


def add_arguments(parser) -> None:
    parser.add_argument("--config", default="paper", help="configuration name (paper, tiny); default: paper")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a config field, e.g. --set patch_size=96 (repeatable)")
    parser.add_argument("--json", action="store_true", help="print the table as JSON instead of text")


def _shape(shapes: tuple[tuple[int, ...], ...]) -> str:
    return ", ".join("x".join(str(d) for d in shape) for shape in shapes)


def format_table(config: AVGNConfig, rows: list[ComponentFlops]) -> str:
    """Aligned text table: one line per component, then the per-video total."""
    header = ("component", "input", "GMACs", "per", "count", "GMACs/video")
    cells = [(r.name, _shape(r.input_shapes), f"{r.gmacs:.4f}", r.per, str(r.count), f"{r.per_video:.3f}")
             for r in rows]
    width = [max(len(line[i]) for line in [header, *cells]) for i in range(len(header))]
    align = ("<", "<", ">", "<", ">", ">")

    def fmt(line):
        return "  ".join(f"{c:{a}{w}}" for c, a, w in zip(line, align, width, strict=True))

    out = [f"config {config.name!r}: GMACs = multiply-accumulates of conv/linear/matmul/attention, batch 1",
           fmt(header).rstrip()]
    notes = ["" if r.in_total else "  (reference, not in total)" for r in rows]
    out += [fmt(line) + note for line, note in zip(cells, notes, strict=True)]
    label = "total per video (every exit step taken)"
    out.append(f"{label:<{sum(width[:-1]) + 2 * (len(width) - 1)}}{total_gmacs(rows):>{width[-1]}.3f}")
    return "\n".join(out)


def main(config: str = "paper", set: Sequence[str] = (), json: bool = False) -> int:
    cfg = AVGNConfig.from_name(config).with_overrides(list(set))
    rows = component_table(cfg)
    if json:
        print(jsonlib.dumps({
            "config": cfg.name,
            "overrides": list(set),
            "unit": "GMACs",
            "components": [{**asdict(r), "per_video": r.per_video} for r in rows],
            "total_per_video": total_gmacs(rows),
        }, indent=2))
    else:
        print(format_table(cfg, rows))
    return 0
