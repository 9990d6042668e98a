"""Predictor vs a naive per-file loop on AVSynth videos (CPU, tiny config), and peak RSS vs input count.

    python benchmarks/bench_predictor.py [--videos 200] [--repeat 10] [--workdir /tmp/avgn_bench_predictor]

The naive loop decodes one file, runs the model on it, then moves on. The Predictor decodes ahead in
background workers and classifies in batches. Peak RSS is measured in a fresh process per run, for
``--videos`` inputs and for ``--videos × --repeat`` inputs (the same files listed repeatedly), so flat
memory means the stream is bounded. The checkpoint has random weights: speed does not depend on them.
``benchmarks/test_cpu_benchmarks.py`` runs ``naive_loop`` and ``predict_all`` under pytest-benchmark.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch


def prepare(workdir: Path, videos: int) -> tuple[Path, list[str]]:
    from avgn_fast.checkpoint import save_checkpoint
    from avgn_fast.config import AVGNConfig
    from avgn_fast.data.synth import CLASS_NAMES, write_dataset
    from avgn_fast.models.avgn import AVGN

    config = AVGNConfig.from_name("tiny")
    data = write_dataset(workdir / "data", videos, seed=0, fmt="mp4", config=config)
    ckpt = workdir / "random_tiny.pt"
    if not ckpt.exists():
        torch.manual_seed(0)
        save_checkpoint(ckpt, AVGN(config).eval(), class_names=CLASS_NAMES)
    paths = sorted(str(p) for p in (data / "videos").glob("*.mp4"))[:videos]
    return ckpt, paths


def naive_loop(model, paths: list[str]) -> list:
    """Decode one file, ``glance`` on it, next; returns one ``GlanceResult`` per path."""
    from avgn_fast.data.decode import decode_clip_for

    results = []
    for p in paths:
        clip = decode_clip_for(p, model.config, backend="pyav")
        with torch.inference_mode():
            results.append(model.glance(clip.frames[None], clip.mel[None],
                                        audio_present=torch.tensor([clip.audio_present])))
    return results


def predict_all(pred, paths: list[str]) -> list:
    """Stream ``paths`` through the Predictor; returns the Predictions, raising if any video failed."""
    rows = list(pred.predict_iter(paths))
    failed = [p.error for p in rows if not p.ok]
    if failed:
        raise RuntimeError(f"{len(failed)} videos failed, first: {failed[0]}")
    return rows


def naive(ckpt: Path, paths: list[str]) -> float:
    from avgn_fast.checkpoint import load

    model = load(ckpt)
    start = time.perf_counter()
    naive_loop(model, paths)
    return len(paths) / (time.perf_counter() - start)


def predictor(ckpt: Path, paths: list[str], batch_size: int, workers: int) -> float:
    from avgn_fast.engine.predictor import Predictor

    pred = Predictor(ckpt, device="cpu", batch_size=batch_size, num_workers=workers)
    start = time.perf_counter()
    predict_all(pred, paths)
    return len(paths) / (time.perf_counter() - start)


def peak_rss_mb(ckpt: Path, paths_file: Path, repeat: int, batch_size: int, workers: int) -> float:
    """Peak RSS of a fresh process that streams the listed files ``repeat`` times through the Predictor."""
    code = (
        "import json, resource, sys\n"
        "from avgn_fast.engine.predictor import Predictor\n"
        f"paths = json.load(open({str(paths_file)!r})) * {repeat}\n"
        f"pred = Predictor({str(ckpt)!r}, device='cpu', batch_size={batch_size}, num_workers={workers})\n"
        "n = sum(1 for p in pred.predict_iter(paths) if p.ok)\n"
        "print(json.dumps({'n': n, 'rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["rss_mb"]


def main(videos=200, repeat=10, batch_size=16, workers=2, workdir="/tmp/avgn_bench_predictor") -> dict:
    workdir = Path(workdir)
    ckpt, paths = prepare(workdir, videos)
    paths_file = workdir / "paths.json"
    paths_file.write_text(json.dumps(paths))
    predictor(ckpt, paths[:8], batch_size, workers)  # warm-up: first-call allocations, fvcore cost cache
    rows = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, {len(paths)} videos",
        "torch": torch.__version__,
        "naive_videos_per_s": naive(ckpt, paths),
        "predictor_videos_per_s": predictor(ckpt, paths, batch_size, workers),
        f"peak_rss_mb_{len(paths)}": peak_rss_mb(ckpt, paths_file, 1, batch_size, workers),
        f"peak_rss_mb_{len(paths) * repeat}": peak_rss_mb(ckpt, paths_file, repeat, batch_size, workers),
    }
    rows["speedup"] = rows["predictor_videos_per_s"] / rows["naive_videos_per_s"]
    for k, v in rows.items():
        print(f"{k:>24}: {v:.2f}" if isinstance(v, float) else f"{k:>24}: {v}")
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--videos", type=int, default=200, help="AVSynth videos to classify (default 200)")
    ap.add_argument("--repeat", type=int, default=10, help="list the files this many times for the RSS run")
    ap.add_argument("--batch-size", type=int, default=16, help="Predictor batch size")
    ap.add_argument("--workers", type=int, default=2, help="Predictor decode workers")
    ap.add_argument("--workdir", default="/tmp/avgn_bench_predictor", help="where data and checkpoint go")
    main(**{k.replace("-", "_"): v for k, v in vars(ap.parse_args()).items()})
