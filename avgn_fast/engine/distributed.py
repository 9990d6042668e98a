"""Batch inference beyond one machine, on Ray Data: decode in CPU tasks, classify in a pool of model actors.

    ds = predict_dataset(["s3://bucket/videos/", "/data/extra.mp4"], "run/best.pt", num_actors=8)
    ds.write_parquet("s3://bucket/predictions/")        # or: for pred in iter_predictions(ds): ...

The pipeline is two ``map_batches`` stages over a dataset of paths or URIs:

1. **Decode**, Ray tasks on CPUs. Each file is read through ``pyarrow.fs`` (local paths, ``file://``,
   ``s3://``, ``gs://``, ``hdfs://``: no shared filesystem needed) and decoded by PyAV from the open
   file (``pyav_backend.decode_fileobj``), ``decode_batch`` files per task. A file that fails to
   decode is an error row, worded as the Predictor words it. If a task's worker process dies (a
   crash inside FFmpeg, the OOM killer), each of its files is decoded again alone in a task of its
   own, retried ``decode_retries`` times, so the file that keeps killing its worker becomes an error
   row and the others are classified.
2. **Classify**, a fixed pool of ``num_actors`` actors (``gpus_per_actor`` GPUs each where the cluster
   has GPUs, else CPU actors), each running ``engine.batch.BatchPredictor`` — the per-batch code the
   Predictor runs — built once per actor from the model the driver loaded, so the nodes need the
   data, not the checkpoint file. An actor that dies is restarted and its batch retried (Ray Data's
   defaults for actor pools: unlimited restarts and task retries).

Each output row is a ``Prediction`` (every field, ``topk`` as ``{label, score}`` structs) plus
``index``, the input's position when the source is a list or a folder: rows arrive in completion
order and ``iter_predictions`` restores the input order. Ray is an optional extra
(``pip install avgn_fast[ray]``); this module imports it only when called.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pickle
from collections.abc import Iterable, Iterator
from urllib.parse import quote

from avgn_fast.config import FROM_CHECKPOINT
from avgn_fast.data.common import DecodeError, DecodeParams
from avgn_fast.engine.batch import BatchPredictor, Prediction, error_line
from avgn_fast.engine.predictor import VIDEO_SUFFIXES, expand_inputs

# The decode stage's own tasks only wait for the tasks that decode (Ray lends a waiting task's CPU to
# those), so they reserve little: two per CPU keep the next files queued while others decode. That
# reservation also differs from the model actors', which keeps Ray Data from fusing the two stages
# into the actors (decode and model would then take turns instead of overlapping).
WAITER_CPUS = 0.5
ACTOR_CPUS = 1.0

__all__ = ["RayClassifier", "connect", "count_parquet", "expand_sources", "iter_predictions", "open_input",
           "predict_dataset", "prediction_from_row", "row_schema"]


def predict_dataset(source, checkpoint, *, batch_size: int = 16, num_actors: int | None = None,
                    gpus_per_actor: float | None = None, decode_cpus: float = 1.0, decode_batch: int = 4,
                    decode_retries: int = 2, precision: str = "auto", backend: str = "eager", topk: int = 5,
                    k: int | None = None, exit_threshold: float | None | str = FROM_CHECKPOINT,
                    max_pixels: int | None = None,
                    keyframes_only: bool = False):
    """A lazy ``ray.data.Dataset`` of prediction rows, one per input (module docstring); runs when consumed.

    ``source``: a list of paths and URIs, or one, folders expanded (``expand_sources``); or a
    ``ray.data.Dataset`` with a ``path`` column (rows then carry no ``index``). Relative paths are
    taken from this process's working directory. ``checkpoint``: a checkpoint path or an ``AVGN``.
    ``batch_size`` videos per model call; ``num_actors`` model actors (default: one per
    ``gpus_per_actor`` GPUs of the cluster, else 1); ``gpus_per_actor`` (default 1 when the cluster
    has GPUs, else 0: CPU actors); ``decode_cpus`` CPUs per decode task; ``decode_batch`` files per
    decode task; ``decode_retries`` retries of a file alone once its batch's decode worker died. ``precision``,
    ``backend``, ``topk``, ``k``, ``exit_threshold``, ``max_pixels`` and ``keyframes_only`` as for
    ``Predictor``. Ray must be initialised (``connect``).
    """
    import ray

    from avgn_fast.checkpoint import load

    if batch_size < 1 or decode_batch < 1 or decode_retries < 0 or decode_cpus <= 0:
        raise ValueError(f"need batch_size ≥ 1, decode_batch ≥ 1, decode_retries ≥ 0, decode_cpus > 0; got "
                         f"{batch_size=} {decode_batch=} {decode_retries=} {decode_cpus=}")
    if isinstance(checkpoint, (str, os.PathLike)) and os.path.isdir(checkpoint):
        # the model is shipped to the actors by pickling, and an exported folder's sessions (onnxruntime,
        # TensorRT) do not pickle
        raise ValueError(f"{checkpoint}: an exported folder runs through the Predictor (predict without --ray); "
                         "give --ray the checkpoint file")
    model = load(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else checkpoint
    gpus = gpus_per_actor if gpus_per_actor is not None else float(ray.cluster_resources().get("GPU", 0) >= 1)
    if num_actors is None:
        num_actors = max(int(ray.cluster_resources().get("GPU", 0) // gpus), 1) if gpus else 1
    if num_actors < 1 or gpus < 0:
        raise ValueError(f"need num_actors ≥ 1 and gpus_per_actor ≥ 0; got {num_actors=} {gpus_per_actor=}")
    params = DecodeParams.from_config(model.config, keyframes_only=keyframes_only,
                                      **({} if max_pixels is None else {"max_pixels": max_pixels}))
    settings = dict(device="cuda" if gpus else "cpu", precision=precision, batch_size=batch_size, topk=topk, k=k,
                    exit_threshold=exit_threshold, backend=backend)
    decoded = _source_dataset(source).map_batches(
        decode_batch_of_files, batch_size=decode_batch, batch_format="pyarrow", num_cpus=WAITER_CPUS,
        fn_kwargs=dict(params=params, base=os.getcwd(), cpus=decode_cpus, retries=decode_retries))
    return decoded.map_batches(
        RayClassifier, batch_size=batch_size, batch_format="pyarrow", num_cpus=ACTOR_CPUS, num_gpus=gpus or None,
        compute=ray.data.ActorPoolStrategy(size=num_actors), fn_constructor_kwargs=dict(model=model, settings=settings))


def connect(address: str = "auto") -> bool:
    """Join a Ray cluster unless this process already has; True when this call started Ray (shut it down after).

    ``"auto"``: the cluster this machine belongs to (``RAY_ADDRESS``, or one ``ray start`` began here),
    else a new local one; anything else is an address for ``ray.init`` (``host:6379``, ``ray://host:10001``).
    """
    import ray

    if ray.is_initialized():
        return False
    ray.init(address=None if address == "auto" else address)
    return True


# --- sources -------------------------------------------------------------------------------------


def expand_sources(sources) -> list[str]:
    """Paths and URIs as given, folders expanded recursively to the video files inside, sorted.

    Local paths are expanded as ``Predictor``'s inputs are (``expand_inputs``); a URI
    (``scheme://...``) that names a folder is listed through ``pyarrow.fs``.
    """
    out = []
    for source in [sources] if isinstance(sources, (str, os.PathLike)) else sources:
        source = str(source)
        out.extend(_list_uri(source) if "://" in source else expand_inputs([source]))
    return out


def _list_uri(uri: str) -> list[str]:
    """``uri`` itself, or, when it names a folder, the URIs of the video files under it (sorted as paths are)."""
    import pyarrow.fs as pafs

    fs, root = pafs.FileSystem.from_uri(uri)
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        return [uri]
    found = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    relative = [os.path.relpath(f.path, root) for f in found
                if f.type == pafs.FileType.File and os.path.splitext(f.path)[1].lower() in VIDEO_SUFFIXES]
    return [uri.rstrip("/") + "/" + quote(r) for r in sorted(relative, key=lambda r: r.split("/"))]


def _source_dataset(source):
    """A Ray dataset with a ``path`` column, and ``index`` (input order) for a list or folder source."""
    import ray

    if isinstance(source, ray.data.Dataset):
        if "path" not in source.columns():
            raise ValueError(f"the source dataset needs a 'path' column; it has {source.columns()}")
        return source.select_columns(["path"])  # its other columns, an 'index' of its own included, stay out
    paths = expand_sources(source)
    if not paths:
        raise ValueError(f"no video files found in {source}")
    return ray.data.from_items([{"index": i, "path": p} for i, p in enumerate(paths)])


def open_input(path: str, base: str = ""):
    """(binary input file, size) of a local path (relative to ``base``) or a URI, opened through ``pyarrow.fs``.

    Raises ``DecodeError`` naming ``path`` as ``common.check_file`` does: not found, not a regular
    file, empty, permission denied.
    """
    import pyarrow.fs as pafs

    fs, inner = pafs.FileSystem.from_uri(path if "://" in path else os.path.join(base, path))
    info = fs.get_file_info(inner)
    if info.type == pafs.FileType.NotFound:
        raise DecodeError(path, "file not found")
    if info.type != pafs.FileType.File:
        raise DecodeError(path, "not a regular file")
    if info.size == 0:
        raise DecodeError(path, "empty file (0 bytes)")
    try:
        return fs.open_input_file(inner), info.size
    except PermissionError as e:
        raise DecodeError(path, "permission denied", transient=True) from e


# --- decode stage: Ray tasks ---------------------------------------------------------------------


def decode_files(paths: list[str], base: str, params: DecodeParams) -> list[tuple[str | None, bytes | None]]:
    """Per path: (None, pickled Clip) when it decodes, else (its error line, None). Runs in a Ray task."""
    from avgn_fast.data import pyav_backend

    out = []
    for path in paths:
        try:
            file, size = open_input(path, base)
            with file:
                out.append((None, pickle.dumps(pyav_backend.decode_fileobj(path, file, params, size=size))))
        except Exception as e:  # this file's problem only
            out.append((error_line(path, e), None))
    return out


@functools.cache
def _decode_task(cpus: float):
    import ray

    # Ray retries a task whose worker process died (max_retries, set per call); a Python exception
    # never escapes decode_files, so it is never retried
    return ray.remote(num_cpus=cpus)(decode_files)


def decode_batch_of_files(batch, *, params: DecodeParams, base: str, cpus: float, retries: int):
    """Decode stage (``map_batches``, pyarrow batches): ``index``/``path`` in, plus ``error`` and ``clip`` out.

    The batch decodes in one task (``decode_files``); this task waits for it, so Ray lends it this
    task's CPU. If its worker dies, each file is decoded alone in its own task, retried ``retries``
    times, so only the file that kills its worker becomes an error row.
    """
    import pyarrow as pa
    import ray

    paths = batch.column("path").to_pylist()
    task = _decode_task(cpus)
    try:
        outcomes = ray.get(task.options(max_retries=0).remote(paths, base, params))
    except _worker_deaths():
        alone = [task.options(max_retries=retries).remote([p], base, params) for p in paths]
        outcomes = [_outcome(path, ref, retries) for path, ref in zip(paths, alone)]
    kept = batch.select([c for c in ("index", "path") if c in batch.column_names])
    kept = kept.append_column("error", pa.array([e for e, _ in outcomes], pa.string()))
    return kept.append_column("clip", pa.array([c for _, c in outcomes], pa.binary()))


def _worker_deaths() -> tuple[type, ...]:
    import ray

    return ray.exceptions.WorkerCrashedError, ray.exceptions.OutOfMemoryError


def _outcome(path: str, ref, retries: int) -> tuple[str | None, bytes | None]:
    import ray

    try:
        return ray.get(ref)[0]
    except _worker_deaths() as e:
        return f"{path}: decode worker died ({type(e).__name__}) on each of {retries + 1} attempts with this file " \
               "alone", None


# --- classify stage: Ray actors --------------------------------------------------------------------


class RayClassifier:
    """Model stage (``map_batches`` callable class): a ``BatchPredictor`` built once per actor.

    Takes the decode stage's rows, returns prediction rows (``row_schema``).
    """

    def __init__(self, model, settings: dict):
        self.predict = BatchPredictor(model, decode_backend="pyav", **settings)

    def __call__(self, batch):
        import pyarrow as pa

        names = batch.column("path").to_pylist()
        clips = [error if clip is None else pickle.loads(clip)
                 for error, clip in zip(batch.column("error").to_pylist(), batch.column("clip").to_pylist())]
        rows = [_row(p) for p in self.predict.classify(names, clips)]
        with_index = "index" in batch.column_names
        if with_index:
            for row, index in zip(rows, batch.column("index").to_pylist()):
                row["index"] = index
        return pa.Table.from_pylist(rows, schema=row_schema(with_index))


def row_schema(with_index: bool = True):
    """The Arrow schema of a prediction row: ``index`` (when known), then every ``Prediction`` field."""
    import pyarrow as pa

    types = {"path": pa.string(), "label": pa.string(), "score": pa.float64(),
             "topk": pa.list_(pa.struct([("label", pa.string()), ("score", pa.float64())])),
             "saliency": pa.list_(pa.float64()), "kept_frames": pa.list_(pa.int64()),
             "frame_times": pa.list_(pa.float64()), "patch_boxes": pa.list_(pa.list_(pa.float64())),
             "exit_step": pa.int64(), "gflops": pa.float64(), "audio_present": pa.bool_(), "error": pa.string(),
             "notes": pa.list_(pa.string())}
    # a Prediction field without an Arrow type here fails (KeyError) instead of going missing from the rows
    fields = [(f.name, types[f.name]) for f in dataclasses.fields(Prediction)]
    return pa.schema(([("index", pa.int64())] if with_index else []) + fields)


def _row(pred: Prediction) -> dict:
    row = dataclasses.asdict(pred)
    row["topk"] = [{"label": label, "score": score} for label, score in pred.topk]
    return row


def prediction_from_row(row: dict) -> Prediction:
    """The ``Prediction`` a row (a dict, as ``to_pylist`` gives it) was made from; ``index`` is dropped."""
    values = {f.name: row[f.name] for f in dataclasses.fields(Prediction)}
    values["topk"] = [(t["label"], t["score"]) for t in values["topk"]]
    return Prediction(**values)


# --- consuming the rows ----------------------------------------------------------------------------


def iter_predictions(ds) -> Iterator[Prediction]:
    """The dataset's Predictions, in input order when the rows carry ``index`` (else as they complete).

    Runs the dataset; holds back only the rows that arrive before an earlier input's row.
    """
    rows = (row for table in ds.iter_batches(batch_format="pyarrow", batch_size=None) for row in table.to_pylist())
    for row in _in_order(rows):
        yield prediction_from_row(row)


def _in_order(rows: Iterable[dict]) -> Iterator[dict]:
    waiting: dict[int, dict] = {}
    following = 0
    for row in rows:
        if "index" not in row:
            yield row
            continue
        waiting[row["index"]] = row
        while following in waiting:
            yield waiting.pop(following)
            following += 1
    if waiting:
        raise RuntimeError(f"no prediction row came back for input {following} (rows after it did)")


def count_parquet(folder: str) -> tuple[int, int]:
    """(rows, rows with an error) of the prediction Parquet files in ``folder`` (a path or URI)."""
    import pyarrow.parquet as pq

    errors = pq.read_table(folder, columns=["error"]).column("error")
    return len(errors), len(errors) - errors.null_count
