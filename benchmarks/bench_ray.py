"""The Predictor vs the Ray Data path (``predict --ray``) on the same AVSynth files (CPU, tiny config).

    python benchmarks/bench_ray.py [--videos 200] [--batch-size 16] [--workdir /tmp/avgn_bench_ray]

Both classify the same ``--videos`` mp4 files with the same random-weight checkpoint (speed does not
depend on the weights) on this machine. The Predictor runs in this process (one decode thread per
core, the model in the main thread); the Ray path on a local Ray cluster with every core (decode in
CPU tasks, one CPU model actor), started once and timed apart. A Ray run is timed from the call to
its last row, starting its actor pool and workers included, as every run pays it (after a first,
warm-up run that starts Ray's worker processes); a run over the files listed three times gives the
marginal rate, ``2 × videos / (time(3 × videos) − time(videos))``, with that start-up cost taken
out. For sizing a cluster, measured last on one torch thread (as a CPU actor or decode task runs):
the model's rate on clips decoded beforehand and PyAV's decode rate, per core. Prints the machine
(cores, load: others' jobs slow every figure), versions, videos/s of each and the ratios.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch
from bench_predictor import prepare  # the same files and random-weight checkpoint as the Predictor benchmark


def timed(predictions, n: int) -> float:
    """Seconds until all ``n`` predictions came, each of them ok."""
    start = time.perf_counter()
    done = 0
    for pred in predictions:
        if not pred.ok:
            raise RuntimeError(pred.error)
        done += 1
    if done != n:
        raise RuntimeError(f"{done} predictions for {n} inputs")
    return time.perf_counter() - start


def predictor(ckpt: Path, paths: list[str], batch_size: int) -> float:
    from avgn_fast.engine.predictor import Predictor

    pred = Predictor(ckpt, device="cpu", batch_size=batch_size)
    pred.predict(paths[:batch_size])  # warm-up: first-call allocations
    return len(paths) / timed(pred.predict_iter(paths), len(paths))


def on_ray(ckpt: Path, paths: list[str], batch_size: int) -> tuple[float, float]:
    """(videos/s of one run, marginal videos/s: see the module docstring), after a warm-up run."""
    from avgn_fast.engine.distributed import iter_predictions, predict_dataset

    def run(inputs: list[str]) -> float:
        return timed(iter_predictions(predict_dataset(inputs, ckpt, batch_size=batch_size, gpus_per_actor=0)),
                     len(inputs))

    run(paths[:batch_size])
    once, thrice = run(paths), run(paths * 3)
    return len(paths) / once, 2 * len(paths) / (thrice - once)


def decode_per_core(paths: list[str]) -> float:
    """PyAV videos/s in this thread, one file after another."""
    from avgn_fast.config import AVGNConfig
    from avgn_fast.data.decode import decode_clip_for

    start = time.perf_counter()
    for p in paths:
        decode_clip_for(p, AVGNConfig.from_name("tiny"), backend="pyav")
    return len(paths) / (time.perf_counter() - start)


def model_rate(ckpt: Path, paths: list[str], batch_size: int) -> float:
    """Model videos/s on this CPU on clips decoded beforehand, in batches of ``batch_size``."""
    from avgn_fast.engine.batch import BatchPredictor

    batch = BatchPredictor(ckpt, device="cpu", batch_size=batch_size)
    clips = batch.decode(paths)
    batch.classify(paths[:batch_size], clips[:batch_size])  # warm-up
    start = time.perf_counter()
    for i in range(0, len(clips), batch_size):
        batch.classify(paths[i:i + batch_size], clips[i:i + batch_size])
    return len(clips) / (time.perf_counter() - start)


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo where there is one, else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main(videos=200, batch_size=16, workdir="/tmp/avgn_bench_ray") -> dict:
    ckpt, paths = prepare(Path(workdir), videos)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    rows = {"machine": f"{cpu_name()}, {cores} cores, load average {os.getloadavg()[0]:.1f} at start, "
                       f"{len(paths)} videos, batch {batch_size}",
            "predictor_videos_per_s": predictor(ckpt, paths, batch_size)}
    import av
    import ray  # only now: the Predictor runs as in a process without Ray

    rows["versions"] = f"torch {torch.__version__}, ray {ray.__version__}, av {av.__version__}"
    start = time.perf_counter()
    ray.init(num_cpus=cores, include_dashboard=False, logging_level="ERROR")
    rows["ray_init_s"] = time.perf_counter() - start
    try:
        rows["ray_videos_per_s"], rows["ray_marginal_videos_per_s"] = on_ray(ckpt, paths, batch_size)
    finally:
        ray.shutdown()
    rows["ratio_ray_to_predictor"] = rows["ray_videos_per_s"] / rows["predictor_videos_per_s"]
    rows["ratio_marginal_to_predictor"] = rows["ray_marginal_videos_per_s"] / rows["predictor_videos_per_s"]
    torch.set_num_threads(1)
    rows["model_videos_per_s_per_core"] = model_rate(ckpt, paths[:64], batch_size)
    rows["pyav_decode_videos_per_s_per_core"] = decode_per_core(paths[:50])
    rows["load_average_at_end"] = os.getloadavg()[0]
    for k, v in rows.items():
        print(f"{k:>34}: {v:.2f}" if isinstance(v, float) else f"{k:>34}: {v}")
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--videos", type=int, default=200, help="AVSynth videos to classify (default 200)")
    ap.add_argument("--batch-size", type=int, default=16, help="videos per model batch, both paths (default 16)")
    ap.add_argument("--workdir", default="/tmp/avgn_bench_ray", help="where the data and checkpoint go")
    main(**vars(ap.parse_args()))
