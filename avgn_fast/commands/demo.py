"""From nothing to an accuracy-vs-GFLOPs curve: synthesize AVSynth, train AVGN and its baselines, sweep them.

Every method (AVGN, visual-only glance, uniform+centre, dense, audio-only) trains until its validation
top-1 plateaus; the baselines that look at frames start their encoders from the AVGN run of their seed (as
the paper's methods all start from ImageNet weights). --seeds N trains each N times and the table and plot
give mean ± std. Everything goes under --out (default ./avgn_runs); a re-run reuses the videos, the decoded
clips and the finished checkpoints there, so only the sweep runs again. --quick is a plumbing check: its
accuracies mean nothing.
"""

from __future__ import annotations

from pathlib import Path

# (videos, joint epochs) of avgn_fast.demo.SIZES, spelled here so that --help does not import torch
# (tests/test_api.py checks that they agree); full's epochs are a cap, each method stops at its plateau
SIZES = {"full": (1800, 25), "quick": (175, 2)}


def add_arguments(parser) -> None:
    (full_videos, full_epochs), (quick_videos, quick_epochs) = SIZES["full"], SIZES["quick"]
    parser.add_argument("--quick", action="store_true",
                        help=f"plumbing check, no accuracy claim: {quick_videos} videos and {quick_epochs} joint "
                        f"epochs (about 3 minutes on 2 CPU cores) instead of {full_videos} videos and training to "
                        f"the plateau (at most {full_epochs} joint epochs)")
    parser.add_argument("--out", type=Path, default=Path("avgn_runs"), help="working folder; default: ./avgn_runs")
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:N")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads per process (default 1: fastest for the tiny models on shared cores)")
    parser.add_argument("--seeds", type=int, default=1,
                        help="train each method with this many seeds; the table and plot show mean ± std; default: 1")
    parser.add_argument("--workers", type=int, default=None,
                        help="training processes (default: 2 on a CPU with 2+ cores, else 1)")


def main(quick: bool = False, out: Path = Path("avgn_runs"), device: str = "auto", threads: int = 1,
         workers: int | None = None, seeds: int = 1, progress: bool = True) -> int:
    from avgn_fast import demo

    result = demo.run_demo(out, size=demo.SIZES["quick" if quick else "full"], device=device, threads=threads,
                           workers=workers, seeds=seeds, progress=progress)
    print(demo.summary(result))
    return 0
