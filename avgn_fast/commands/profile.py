"""Throughput of the glance pipeline per backend, precision and batch size on this machine's device.

Per configuration: videos/s, batch latency p50/p90, ms per stage, peak GPU memory, GFLOPs per
video and achieved TFLOP/s; warm-up (compile) time is reported apart. ``--compare`` also measures
eager fp32 and the dense baseline (the local encoder on all T frames at S) in the same run and
prints the ratios. Without ``--checkpoint`` the model has random weights (speed does not depend
on them; early exits do, so with a threshold profile a trained checkpoint).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def add_arguments(parser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", default=None, help="checkpoint to profile (default: random weights)")
    source.add_argument("--config", default="paper", help="configuration name when no checkpoint (default: paper)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a config field of --config, e.g. --set glance_size=112 (repeatable)")
    # spelled as predict spells them; here each takes a comma list and every combination is measured
    parser.add_argument("--backend", default="eager", help="comma list of eager, inductor, tensorrt, auto "
                                                            "(default: eager)")
    parser.add_argument("--precision", default="auto", help="comma list of fp32, fp16, bf16, auto "
                                                             "(default: auto = fp16 on CUDA, fp32 on CPU)")
    parser.add_argument("--batch-size", default="1,8", help="comma list of batch sizes (default: 1,8)")
    parser.add_argument("--data", default=None, metavar="DIR",
                        help="folder of videos to decode and use (default: random decoded clips on the device)")
    parser.add_argument("--compare", action="store_true",
                        help="also measure eager fp32 and the dense baseline, and print ratios against them")
    parser.add_argument("--csv", default=None, metavar="PATH", help="append the rows to this CSV")
    parser.add_argument("--plot", default=None, metavar="PNG", help="write a per-stage bar chart of the rows here")
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:N")
    parser.add_argument("--iters", type=int, default=10, help="timed batches per configuration (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed warm-up batches, compile included (default 2)")
    parser.add_argument("--exit-threshold", default="checkpoint", metavar="TAU",
                        help="early-exit confidence threshold in [0, 1], 'never' or 'checkpoint' (default: the "
                             "checkpoint's)")


def _split(text: str, cast=str) -> list:
    items = [cast(x.strip()) for x in text.split(",") if x.strip()]
    if not items:
        raise ValueError(f"empty list {text!r}")
    return items


def main(checkpoint=None, config: str = "paper", set: Sequence[str] = (), backend: str = "eager",
         precision: str = "auto", batch_size: str = "1,8", data=None, compare: bool = False, csv=None, plot=None,
         device: str = "auto", iters: int = 10, warmup: int = 2, exit_threshold: str | float | None = "checkpoint",
         progress: bool = True) -> int:
    from avgn_fast.config import AVGNConfig, parse_exit_threshold
    from avgn_fast.engine.predictor import resolve_device
    from avgn_fast.engine.profile import format_table, profile, write_plot

    if checkpoint is not None:
        if set:
            raise ValueError("--set changes --config; a checkpoint's configuration is fixed")
        from avgn_fast.checkpoint import load

        model = load(checkpoint)
    else:
        import torch

        from avgn_fast.models.avgn import AVGN

        torch.manual_seed(0)
        model = AVGN(AVGNConfig.from_name(config).with_overrides(list(set))).eval()
    if isinstance(exit_threshold, str):
        exit_threshold = parse_exit_threshold(exit_threshold, "--exit-threshold")
    sizes = _split(str(batch_size), int)
    if min(sizes) < 1:
        raise ValueError(f"batch sizes must be ≥ 1, got {sizes}")
    rows = profile(model, backends=_split(backend), precisions=_split(precision), batch_sizes=sizes, data=data,
                   device=resolve_device(device), iters=iters, warmup=warmup, compare=compare,
                   exit_threshold=exit_threshold, csv=csv, progress=progress)
    print(format_table(rows, compare=compare))
    if csv:
        print(f"{len(rows)} rows appended to {csv}", file=sys.stderr)
    if plot:
        write_plot(rows, plot)
        print(f"per-stage chart written to {plot}", file=sys.stderr)
    return 0
