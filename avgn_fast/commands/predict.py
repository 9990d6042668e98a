"""Classify video files or folders with a trained checkpoint: labels, scores, where the model looked, GFLOPs."""

from __future__ import annotations

import contextlib
import os
import secrets
import sys
import time
from pathlib import Path

from avgn_fast.commands.options import add_engine_arguments, add_inference_arguments


def add_arguments(p) -> None:
    p.add_argument("paths", nargs="+", metavar="PATH_OR_DIR", help="video files, or folders searched recursively")
    p.add_argument("--checkpoint", required=True,
                   help="checkpoint file written by `avgn-fast train`, or a folder written by `avgn-fast export`")
    p.add_argument("--jsonl", default=None,
                   help="write one JSON object per input, in input order, to this file (replaced at the end; never "
                        "one of the inputs)")
    p.add_argument("--topk", type=int, default=5, help="how many classes to list per video (default 5)")
    p.add_argument("--explain", default=None, metavar="DIR",
                   help="write one PNG per video: kept frames with their patch boxes and the saliency timeline "
                        "(refused if a PNG of the same name exists)")
    add_engine_arguments(p)
    p.add_argument("--devices", default=None, metavar="LIST",
                   help="shard over one worker process per device, e.g. 0,1 or cpu,cpu (overrides --device)")
    p.add_argument("--decode", default="auto", help="decode backend: auto (DALI with a GPU), pyav, dali")
    p.add_argument("--batch-size", type=int, default=16, help="videos per model batch (default 16)")
    p.add_argument("--workers", type=int, default=None, help="background decode workers (default: one per core)")
    p.add_argument("--max-pixels", type=int, default=None, metavar="N",
                   help="refuse videos whose frames have more than N pixels, read from the header before decoding "
                        "(default 67,108,864 = 8192x8192)")
    p.add_argument("--keyframes-only", action="store_true",
                   help="fast mode for long files: show the model the keyframe nearest to each sampled time and "
                        "decode keyframes only (frames differ from the default sampling)")
    add_inference_arguments(p)
    p.add_argument("--window", type=float, default=None, metavar="SECONDS",
                   help="classify each file in windows of this many seconds: one row per window (start_s, end_s, "
                        "label, ...), the file read once front to back; --explain then draws one timeline per file")
    p.add_argument("--hop", type=float, default=None, metavar="SECONDS",
                   help="with --window: seconds between window starts (default: the window; half of it shares half "
                        "of each window's frames with the next)")
    p.add_argument("--ray", nargs="?", const="auto", default=None, metavar="auto|ADDRESS",
                   help="run on a Ray cluster (Ray Data): decode in CPU tasks, the model in an actor pool; inputs "
                        "may be URIs (s3://, gs://, file://). auto (the default value): this machine's cluster, else "
                        "a new local one; or a cluster address. Needs `pip install avgn_fast[ray]`")
    p.add_argument("--ray-actors", type=int, default=None, metavar="N",
                   help="with --ray: model actors (default: one per GPU of the cluster, else 1)")
    p.add_argument("--out-parquet", default=None, metavar="DIR",
                   help="with --ray: write the prediction rows as Parquet files into DIR (a new or empty folder, "
                        "or a URI) through Ray's writer; rows carry their input's index")


def main(paths, checkpoint, jsonl=None, topk=5, explain=None, device="auto", precision="auto", decode="auto",
         batch_size=16, workers=None, k=None, exit_threshold="checkpoint", backend="eager", devices=None,
         max_pixels=None, keyframes_only=False, ray=None, ray_actors=None, out_parquet=None, window=None,
         hop=None) -> int:
    """Classify ``paths``; returns 1 when every input failed, else 0.

    Outputs are checked before the model loads (``check_outputs``). JSONL rows go to a temporary file
    beside ``jsonl``, flushed per row and renamed onto it at the end, also when the run stops early
    (Ctrl-C, an error): ``jsonl`` then holds the whole rows written so far, never a partial one.
    With ``ray`` the same rows come from a Ray cluster (``engine.distributed``), in input order. With
    ``window`` each file gives one row per window (``Predictor.predict_iter``'s ``window_s``).
    """
    from avgn_fast.config import parse_exit_threshold
    from avgn_fast.engine.predictor import Predictor, expand_inputs

    if isinstance(exit_threshold, str):
        exit_threshold = parse_exit_threshold(exit_threshold, "--exit-threshold")
    if window is None and hop is not None:
        raise ValueError("--hop needs --window")
    if window is not None:
        check_window_options(ray=ray, devices=devices, keyframes_only=keyframes_only, decode=decode, workers=workers)
    if ray is None:
        if out_parquet is not None or ray_actors is not None:
            raise ValueError("--out-parquet and --ray-actors need --ray")
        inputs = expand_inputs(paths)
    else:
        from avgn_fast.engine.distributed import expand_sources

        check_ray_options(explain=explain, devices=devices, decode=decode, workers=workers)
        inputs = expand_sources(paths)
    if not inputs:
        raise ValueError(f"no video files found in {', '.join(map(str, paths))}")
    check_outputs(inputs, jsonl, explain)
    if out_parquet is not None:
        check_parquet_output(out_parquet)
    settings = dict(precision=precision, batch_size=batch_size, topk=topk, k=k, exit_threshold=exit_threshold,
                    backend=backend, max_pixels=max_pixels, keyframes_only=keyframes_only)
    if ray is not None:
        return _predict_on_ray(ray, inputs, checkpoint, device, ray_actors, jsonl, out_parquet, settings)
    predictor = Predictor(checkpoint, device=device, decode_backend=decode, num_workers=workers, devices=devices,
                          **settings)
    if window is not None:
        return write_rows(predictor.predict_iter(inputs, explain_dir=explain, window_s=window, hop_s=hop), jsonl)
    return write_predictions(predictor.predict_iter(inputs, explain_dir=explain), len(inputs), jsonl, explain)


def write_predictions(predictions, total: int, jsonl: str | None, explain: str | None = None, *,
                      progress: bool = True, start: float | None = None) -> int:
    """Write each Prediction to ``jsonl`` (``LineWriter``) and one line per video to stdout; a summary at the end.

    Returns 1 when every input failed, else 0. ``progress`` shows a progress bar; the summary's rate
    counts from ``start`` (a ``time.perf_counter()`` value; default: now).
    """
    from tqdm import tqdm

    done = failed = 0
    start = time.perf_counter() if start is None else start
    try:
        with LineWriter(jsonl) if jsonl else contextlib.nullcontext() as out:
            bar = tqdm(predictions, total=total, unit="video", desc="predict", file=sys.stderr, disable=not progress)
            for pred in bar:
                if out:
                    out.write(pred.to_json())
                done += 1
                if pred.ok:
                    bar.write(f"{pred.path}\t{pred.label}\t{pred.score:.3f}\tsteps {pred.exit_step + 1}\t"
                              f"{pred.gflops:.3f} GFLOPs")
                else:
                    failed += 1
                    bar.write(f"{pred.path}\tERROR\t{pred.error}")
    finally:
        print(summary(done, failed, total, time.perf_counter() - start)
              + (f"; results in {jsonl}" if jsonl else "") + (f"; explanations in {explain}" if explain else ""),
              file=sys.stderr)
    return 1 if failed == total else 0


def write_rows(rows, jsonl: str | None, *, append: bool = False) -> int:
    """Write each window row to ``jsonl`` (``LineWriter``; ``append``: added to the file as rows come) and one line
    per row to stdout; a summary at the end. Returns 1 when every row was an error (or none came), else 0."""
    done = failed = 0
    start = time.perf_counter()
    try:
        with LineWriter(jsonl, append=append) if jsonl else contextlib.nullcontext() as out:
            for row in rows:
                if out is not None:
                    out.write(row.to_json())
                done += 1
                span = f"{_seconds(row.start_s)}-{_seconds(row.end_s)}"
                if row.ok:
                    latency = "" if row.latency_ms is None else f"\t{row.latency_ms:.0f} ms"
                    print(f"{row.path}\t{span}\t{row.label}\t{row.score:.3f}\t{row.gflops:.3f} GFLOPs{latency}",
                          flush=True)
                else:
                    failed += 1
                    print(f"{row.path}\t{span}\tERROR\t{row.error}", flush=True)
    finally:
        print(f"{done - failed} windows classified, {failed} errors in {time.perf_counter() - start:.1f} s"
              + (f"; rows in {jsonl}" if jsonl else ""), file=sys.stderr)
    return 1 if failed == done else 0


def _seconds(value) -> str:
    return "?" if value is None else f"{value:.2f}s"


def summary(done: int, failed: int, total: int, seconds: float) -> str:
    """The run's one summary line: videos classified and failed, and videos per second."""
    return (f"{done - failed} of {total} videos classified, {failed} failed"
            + (f", stopped after {done}" if done < total else "") + f", {done / max(seconds, 1e-9):.1f} videos/s")


def _predict_on_ray(address: str, inputs: list[str], checkpoint, device: str, actors: int | None,
                    jsonl: str | None, out_parquet: str | None, settings: dict) -> int:
    """``main`` on a Ray cluster: JSONL (and stderr lines) in input order, and/or Parquet through Ray's writer."""
    import ray

    from avgn_fast.engine.distributed import connect, count_parquet, iter_predictions, predict_dataset

    gpus = {"auto": None, "cpu": 0}.get(device, 1)
    started = connect(address)
    try:
        ds = predict_dataset(inputs, checkpoint, num_actors=actors, gpus_per_actor=gpus, **settings)
        start = time.perf_counter()  # the dataset runs from here on (Ray shows its own progress bars)
        if out_parquet is None:
            return write_predictions(iter_predictions(ds), len(inputs), jsonl, progress=False, start=start)
        if jsonl is not None:
            ds = ds.materialize()  # run once, write twice
        ds.write_parquet(out_parquet)
        if jsonl is not None:
            return write_predictions(iter_predictions(ds), len(inputs), jsonl, progress=False, start=start)
        rows, failed = count_parquet(out_parquet)
        print(summary(rows, failed, len(inputs), time.perf_counter() - start) + f"; Parquet in {out_parquet}",
              file=sys.stderr)
        return 1 if failed == len(inputs) else 0
    finally:
        if started:
            ray.shutdown()


def check_window_options(*, ray, devices, keyframes_only, decode, workers) -> None:
    """Refuse, as usage errors, the options ``--window`` would otherwise ignore: it reads each file front to back with
    PyAV in one background reader, on one device."""
    unsupported = [flag for flag, value in (("--ray", ray), ("--devices", devices), ("--workers", workers))
                   if value is not None] + (["--keyframes-only"] if keyframes_only else [])
    if decode not in ("auto", "pyav"):
        unsupported.append(f"--decode {decode}")
    if unsupported:
        raise ValueError(f"--window does not take {', '.join(unsupported)} (each file is read front to back by one "
                         "PyAV reader, on one device)")


def check_ray_options(*, explain, devices, decode, workers) -> None:
    """Refuse, as usage errors, the options the Ray path does not take."""
    unsupported = [flag for flag, value in (("--explain", explain), ("--devices", devices), ("--workers", workers))
                   if value is not None]
    if decode not in ("auto", "pyav"):
        unsupported.append(f"--decode {decode}")
    if unsupported:
        raise ValueError(f"--ray does not take {', '.join(unsupported)} (decode runs as PyAV CPU tasks, placed by "
                         "Ray; explanations are drawn without --ray)")


def check_parquet_output(folder: str) -> None:
    """Raise ValueError unless ``folder`` (a path or URI) is a new or empty folder, so no old Parquet file mixes in."""
    import pyarrow.fs as pafs

    fs, inner = pafs.FileSystem.from_uri(folder if "://" in folder else os.path.abspath(folder))
    info = fs.get_file_info(inner)
    if info.type == pafs.FileType.File:
        raise ValueError(f"--out-parquet {folder} is an existing file; name a new or empty folder")
    if info.type == pafs.FileType.Directory and fs.get_file_info(pafs.FileSelector(inner)):
        raise ValueError(f"--out-parquet {folder} is a folder that is not empty; name a new or empty folder")


def check_outputs(inputs: list[str], jsonl: str | None, explain: str | None) -> None:
    """Raise ValueError, before anything is written, for outputs that would overwrite an input or a file.

    ``jsonl`` may replace an existing file unless it is one of ``inputs`` (through symlinks or hard links)
    or a directory. ``explain`` must be a folder or not exist, and none of the PNGs it would get may exist
    already or name an input or ``jsonl``.
    """
    from avgn_fast.engine.explain import explanation_path

    if jsonl is not None:
        if os.path.isdir(jsonl):
            raise ValueError(f"--jsonl {jsonl} is a directory; name a file")
        clash = next((p for p in inputs if _same_file(p, jsonl)), None)
        if clash is not None:
            raise ValueError(f"--jsonl {jsonl} is the input {clash}; refusing to overwrite it")
        if not os.path.isdir(os.path.dirname(os.path.abspath(jsonl))):
            raise ValueError(f"--jsonl {jsonl}: folder {os.path.dirname(os.path.abspath(jsonl))} does not exist")
    if explain is not None:
        if os.path.lexists(explain) and not os.path.isdir(explain):
            raise ValueError(f"--explain {explain} is an existing file, not a folder")
        taken = {os.path.realpath(p) for p in [*inputs, *([jsonl] if jsonl else [])]}
        pngs = (explanation_path(explain, p, i) for i, p in enumerate(inputs))
        clash = [str(png) for png in pngs if os.path.lexists(png) or os.path.realpath(png) in taken]
        if clash:
            raise ValueError(f"--explain {explain}: {len(clash)} explanation file(s) would overwrite existing "
                             f"files, e.g. {clash[0]}; choose a new or empty folder")


def _same_file(a, b) -> bool:
    """True when ``a`` and ``b`` name one file: the same path after symlinks, or the same inode (hard links)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist
        return False


class LineWriter:
    """Lines to a temporary file beside ``path``, flushed one by one, renamed onto ``path`` on exit.

    ``path`` is untouched until the rename, which happens however the ``with`` block ends, so it only
    ever holds whole lines. With ``append`` the lines go straight to the end of ``path`` instead, each
    flushed as it is written: a live run's rows are readable as they come.
    """

    def __init__(self, path, *, append: bool = False):
        self.path, self.append = Path(path), append
        # a short name of its own: a long ``path`` name plus a suffix could exceed the file system's limit
        self.tmp = None if append else self.path.with_name(f".avgn-fast-{os.getpid()}-{secrets.token_hex(4)}.tmp")

    def __enter__(self) -> LineWriter:
        self.file = open(self.path, "a", encoding="utf-8") if self.append else open(self.tmp, "x", encoding="utf-8")
        return self

    def write(self, line: str) -> None:
        self.file.write(line + "\n")
        self.file.flush()

    def __exit__(self, *exc) -> None:
        self.file.close()
        if not self.append:
            os.replace(self.tmp, self.path)
