"""Write the AVSynth benchmark: real encoded videos, labels.csv with a train/val/test split, and a README.

The default size with the default seed gives 1,100 train, 200 val and 500 test videos. Re-running the
same command in the same folder keeps the videos already written.
"""

from __future__ import annotations

import time
from pathlib import Path

# avgn_fast.data.synth.DEFAULT_VIDEOS, spelled here so that --help does not import torch (tests/test_api.py
# checks that they agree)
DEFAULT_VIDEOS = 1800


def add_arguments(parser) -> None:
    parser.add_argument("--out", required=True, type=Path, help="output folder (created if missing)")
    parser.add_argument("--videos", type=int, default=DEFAULT_VIDEOS,
                        help=f"number of videos (default {DEFAULT_VIDEOS}: 1,100 train / 200 val / 500 test)")
    parser.add_argument("--seed", type=int, default=0,
                        help="generator seed; every video is a function of (seed, index)")
    parser.add_argument("--format", dest="fmt", choices=("mp4", "webm"), default="mp4",
                        help="mp4 = H.264 + AAC, webm = VP9 + Opus (default mp4)")
    parser.add_argument("--config", default="tiny",
                        help="configuration whose T, S, G, P and sample rate shape the videos (default tiny)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a configuration field, e.g. --set num_frames=12 (repeatable)")


def main(out: Path, videos: int = DEFAULT_VIDEOS, seed: int = 0, fmt: str = "mp4", config: str = "tiny",
         overrides: list[str] | None = None) -> int:
    from avgn_fast.config import AVGNConfig
    from avgn_fast.data import synth

    cfg = AVGNConfig.from_name(config).with_overrides(list(overrides or []))
    start = time.perf_counter()
    folder = synth.write_dataset(out, videos, seed=seed, fmt=fmt, config=cfg)
    counts = synth.split_counts(videos)
    print(f"AVSynth: {videos} {fmt} videos ({counts[0]} train / {counts[1]} val / {counts[2]} test), "
          f"{len(synth.CLASS_NAMES)} classes, in {folder} ({time.perf_counter() - start:.1f} s)")
    return 0
