"""From nothing to an accuracy-vs-GFLOPs curve: synthesize AVSynth, train AVGN and its baselines, sweep them.

Everything goes under --out (default ./avgn_runs); a re-run reuses the videos, the decoded clips and
the finished checkpoints there, so only the sweep runs again.
"""

from __future__ import annotations

from pathlib import Path

from avgn_fast import demo


def add_arguments(parser) -> None:
    full, quick = demo.SIZES["full"], demo.SIZES["quick"]
    parser.add_argument("--quick", action="store_true",
                        help=f"{quick.videos} videos and {quick.epochs} joint epochs (2 minutes on 2 CPU cores) "
                        f"instead of {full.videos} videos and {full.epochs} joint epochs (28 minutes from scratch)")
    parser.add_argument("--out", type=Path, default=Path("avgn_runs"), help="working folder; default: ./avgn_runs")
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:N")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads per process (default 1: fastest for the tiny models on shared cores)")
    parser.add_argument("--workers", type=int, default=None,
                        help="training processes (default: 2 on a CPU with 2+ cores, else 1)")


def main(quick: bool = False, out: Path = Path("avgn_runs"), device: str = "auto", threads: int = 1,
         workers: int | None = None, progress: bool = True) -> int:
    result = demo.run_demo(out, size=demo.SIZES["quick" if quick else "full"], device=device, threads=threads,
                           workers=workers, progress=progress)
    print(demo.summary(result))
    return 0
