"""The Ray Data path (``engine.distributed``, ``predict --ray``) against the Predictor, on a local Ray cluster.

Real encoded media and a real checkpoint of a small random model on disk. A module fixture starts a
two-CPU local cluster whose workers run a setup hook that injects faults around the real code: a
decode worker process dies (``os._exit``) on files named ``crash_once*`` (first attempt only) and
``crash_always*``, and a model actor dies on the first batch holding ``kill_actor_once*``. Each
pipeline runs once per module (starting workers is the slow part) and several tests read its rows.
"""

import dataclasses
import io
import json
import math
import os
import pickle
import shutil
from urllib.parse import quote

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from media import write_audio_only, write_garbage, write_truncated, write_video
from tolerances import tol

from avgn_fast.checkpoint import load, save_checkpoint
from avgn_fast.cli import main as cli_main
from avgn_fast.config import AVGNConfig
from avgn_fast.data import pyav_backend
from avgn_fast.data.common import DecodeError, DecodeParams
from avgn_fast.data.synth import CLASS_NAMES, render_video
from avgn_fast.data.synth import write_video as write_synth_video
from avgn_fast.engine.batch import BatchPredictor
from avgn_fast.engine.predictor import Prediction, Predictor, expand_inputs
from avgn_fast.models.avgn import AVGN

ray = pytest.importorskip("ray")
distributed = pytest.importorskip("avgn_fast.engine.distributed")

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = AVGNConfig.from_name("tiny")
PARAMS = DecodeParams.from_config(CONFIG)
RETRIES = 1  # decode retries of a file alone after its batch's worker died: 2 attempts alone


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.pt", AVGN(CONFIG).eval(), class_names=CLASS_NAMES)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """Good synthetic videos (mp4, webm), a silent mp4, bad files, and copies of good files named to crash."""
    root = tmp_path_factory.mktemp("media")
    good = []
    for i in range(4):
        path = root / f"good_{i}.{'webm' if i == 2 else 'mp4'}"
        write_synth_video(render_video(i, seed=5, config=CONFIG), path)
        good.append(path)
    good.append(write_video(root / "silent.mp4", audio=None, size=(96, 128), fps=12, seconds=2.0))
    empty = root / "empty.mp4"
    empty.write_bytes(b"")
    bad = [empty, write_truncated(good[0], root / "truncated.mp4", keep=0.05), root / "missing.mp4",
           write_audio_only(root / "audio_only.m4a"), write_garbage(root / "garbage.mp4")]
    twins = {name: shutil.copy(good[i], root / name) for name, i in
             (("crash_once.mp4", 1), ("crash_always.mp4", 2), ("kill_actor_once.mp4", 3))}
    return {"good": good, "bad": bad, "twins": {k: str(v) for k, v in twins.items()}, "root": root}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A folder with a subfolder, a name with a space (quoted in URIs) and an undecodable file."""
    root = tmp_path_factory.mktemp("folder")
    (root / "sub").mkdir()
    for i, name in enumerate(["a clip.mp4", "sub/b.webm", "c.mp4"]):
        write_synth_video(render_video(10 + i, seed=7, config=CONFIG), root / name)
    write_garbage(root / "sub/broken.mp4")
    (root / "notes.txt").write_text("not a video")
    return root


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    marks = str(tmp_path_factory.mktemp("fault_marks"))

    def inject_faults():  # runs in every worker process of the cluster, before its first task
        from avgn_fast.data import pyav_backend
        from avgn_fast.engine import batch

        def mark(name: str) -> bool:
            """Record one attempt on ``name``; True the first time."""
            with open(os.path.join(marks, name), "a") as f:
                first = f.tell() == 0
                f.write("x")
            return first

        decode, classify = pyav_backend.decode_fileobj, batch.BatchPredictor.classify

        def crashing_decode(name, *args, **kwargs):
            base = os.path.basename(name)
            if base.startswith("crash_") and (mark(base) or base.startswith("crash_always")):
                os._exit(1)
            return decode(name, *args, **kwargs)

        def crashing_classify(self, names, *args, **kwargs):
            if any(os.path.basename(n or "").startswith("kill_actor_once") and mark("kill_actor_once")
                   for n in names):
                os._exit(1)
            return classify(self, names, *args, **kwargs)

        pyav_backend.decode_fileobj, batch.BatchPredictor.classify = crashing_decode, crashing_classify

    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"worker_process_setup_hook": inject_faults})
    yield marks
    ray.shutdown()


@pytest.fixture(scope="module")
def listed(cluster, checkpoint, media):
    """(inputs, rows in input order, the dataset) of one run over good, bad, missing and fault-injected files."""
    good, bad, twins = media["good"], media["bad"], media["twins"]
    inputs = [str(p) for p in [good[0], bad[0], good[1], twins["crash_once.mp4"], bad[1], good[2], bad[2],
                               twins["crash_always.mp4"], good[3], bad[3], twins["kill_actor_once.mp4"], good[4],
                               bad[4]]]
    ds = distributed.predict_dataset(inputs, checkpoint, batch_size=3, decode_batch=3, decode_retries=RETRIES)
    return inputs, list(distributed.iter_predictions(ds)), ds


def assert_same_predictions(got, want):
    """Same paths, errors, labels, steps and kept frames; scores, saliency, boxes and GFLOPs within fp32 tolerance."""
    assert [(p.path, p.error, p.label, p.exit_step, p.kept_frames, p.audio_present, p.notes) for p in got] == [
        (p.path, p.error, p.label, p.exit_step, p.kept_frames, p.audio_present, p.notes) for p in want]
    for a, b in zip(got, want):
        if b.ok:
            for name in ("score", "saliency", "patch_boxes", "gflops", "frame_times"):
                torch.testing.assert_close(torch.tensor(getattr(a, name)), torch.tensor(getattr(b, name)),
                                           **tol(torch.float32), msg=f"{b.path}: {name}")
            assert [t[0] for t in a.topk] == [t[0] for t in b.topk]


# --- without Ray: the file-object decoder, folder listing, the actor's rows --------------------------


@pytest.mark.parametrize("in_memory", [True, False])
def test_decode_fileobj_gives_the_path_decoders_clip(media, monkeypatch, in_memory):
    if not in_memory:  # every file is read by seeking, through the file object as through the path
        monkeypatch.setattr(pyav_backend, "IN_MEMORY_BYTES", 0)
    for path in media["good"]:
        want = pyav_backend.decode_file(path, PARAMS)
        got = pyav_backend.decode_fileobj(str(path), io.BytesIO(path.read_bytes()), PARAMS)
        assert torch.equal(got.frames, want.frames) and torch.equal(got.mel, want.mel)
        assert torch.equal(got.frame_times, want.frame_times)
        assert (got.path, got.notes, got.audio_present, got.source_size, got.duration, got.fps) == (
            want.path, want.notes, want.audio_present, want.source_size, want.duration, want.fps)


def test_decode_fileobj_errors_read_as_the_path_decoders(media):
    for path in media["bad"]:
        if not path.exists():
            continue
        with pytest.raises(DecodeError) as want:
            pyav_backend.decode_file(path, PARAMS)
        with pytest.raises(DecodeError) as got:
            pyav_backend.decode_fileobj(str(path), io.BytesIO(path.read_bytes()), PARAMS)
        assert str(got.value) == str(want.value) and str(path) in str(got.value)


def test_expand_sources_lists_folders_and_file_uris_like_expand_inputs(folder):
    local = expand_inputs([folder])
    assert [os.path.relpath(p, folder) for p in local] == ["a clip.mp4", "c.mp4", "sub/b.webm", "sub/broken.mp4"]
    assert distributed.expand_sources(folder) == local
    uri = f"file://{quote(str(folder))}"
    assert distributed.expand_sources([uri, local[0]]) == [f"file://{quote(p)}" for p in local] + [local[0]]


def test_the_actors_rows_hold_every_prediction_field(checkpoint, media):
    """RayClassifier called directly: its Arrow rows give back exactly BatchPredictor's Predictions."""
    model = load(checkpoint)
    paths = [str(media["good"][0]), str(media["good"][4]), "gone.mp4"]
    clips = [pyav_backend.decode_file(p, PARAMS) for p in paths[:2]] + ["gone.mp4: file not found"]
    clips[0].notes = ["audio: 3 non-finite samples zeroed"]
    clips[1].mel = torch.full_like(clips[1].mel, float("nan"))  # a NaN score: stored as NaN, written as null
    batch = pa.table({"index": [7, 8, 9], "path": paths, "error": [None, None, clips[2]],
                      "clip": [pickle.dumps(clips[0]), pickle.dumps(clips[1]), None]})
    table = distributed.RayClassifier(model, dict(device="cpu", batch_size=3))(batch)
    assert table.schema == distributed.row_schema(with_index=True)
    rows = table.to_pylist()
    assert [r["index"] for r in rows] == [7, 8, 9]
    got = [distributed.prediction_from_row(r) for r in rows]
    want = BatchPredictor(model, device="cpu", batch_size=3).classify(paths, clips)
    assert [p.to_json() for p in got] == [p.to_json() for p in want]
    assert math.isnan(got[1].score) and json.loads(got[1].to_json())["score"] is None
    assert got[0].notes == ["audio: 3 non-finite samples zeroed"] and got[2].error == "gone.mp4: file not found"


def test_ray_options_are_checked_before_anything_runs(folder, tmp_path, capsys):
    full = tmp_path / "full"
    full.mkdir()
    (full / "old.parquet").write_bytes(b"x")
    for args, words in ((["--out-parquet", tmp_path / "pq"], "need --ray"),
                        (["--ray", "--explain", tmp_path / "png"], "--ray does not take --explain"),
                        (["--decode", "dali", "--ray"], "--ray does not take --decode dali"),
                        (["--out-parquet", full, "--ray"], "not empty")):
        # a checkpoint that does not exist: the refusal must come first, so it is the error reported
        code = cli_main(["predict", str(folder), "--checkpoint", str(tmp_path / "missing.pt"), *map(str, args)])
        (line,) = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert code == 2 and line.startswith("avgn-fast: error: ") and words in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]


# --- on the local cluster ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(checkpoint, listed):
    """The Predictor's predictions on the same inputs, in this process (no faults injected here)."""
    return Predictor(checkpoint, device="cpu", batch_size=3, num_workers=1).predict(listed[0])


def test_one_row_per_input_equal_to_the_predictors(listed, reference):
    inputs, rows, _ = listed
    assert [r.path for r in rows] == inputs
    assert [r.ok for r in rows] == [True, False, True, True, False, True, False, False, True, False, True, True, False]
    crashed = 7  # crash_always: an error row here, decoded in the Predictor (next test)
    assert_same_predictions(rows[:crashed] + rows[crashed + 1:], reference[:crashed] + reference[crashed + 1:])


def test_a_decode_worker_that_dies_is_retried_then_becomes_an_error_row(listed, reference, cluster):
    inputs, rows, _ = listed
    once, always = inputs[3], inputs[7]
    assert os.path.basename(once) == "crash_once.mp4" and os.path.basename(always) == "crash_always.mp4"
    # every attempt left a mark: crash_once died in its batch, then decoded alone; crash_always died on
    # each attempt alone, and in its batch too unless a file before it there had killed the worker first
    assert open(os.path.join(cluster, "crash_once.mp4")).read() == "xx"
    assert open(os.path.join(cluster, "crash_always.mp4")).read() in ("x" * (RETRIES + 1), "x" * (RETRIES + 2))
    assert rows[3].ok and rows[3].label == reference[3].label
    assert rows[7].label is None and rows[7].error == (
        f"{always}: decode worker died (WorkerCrashedError) on each of {RETRIES + 1} attempts with this file alone")


def test_a_dead_model_actor_is_restarted_and_its_batch_retried(listed, reference, cluster):
    inputs, rows, _ = listed
    assert os.path.basename(inputs[10]) == "kill_actor_once.mp4"
    assert open(os.path.join(cluster, "kill_actor_once")).read() == "xx"  # killed once, then classified
    assert rows[10].ok and rows[10].label == reference[10].label


def test_decode_and_model_run_as_separate_stages(listed):
    stats = listed[2].stats()
    assert "MapBatches(decode_batch_of_files)" in stats and "MapBatches(RayClassifier)" in stats
    assert "->MapBatches(RayClassifier)" not in stats, "decode was fused into the model actors"


def test_a_dataset_of_file_uris_from_a_folder(cluster, checkpoint, folder):
    uris = distributed.expand_sources(f"file://{quote(str(folder))}")
    source = ray.data.from_items([{"path": u} for u in uris])
    rows = {p.path: p for p in distributed.iter_predictions(distributed.predict_dataset(source, checkpoint))}
    assert sorted(rows) == sorted(uris)  # no index in the source: rows come as they complete
    local = expand_inputs([folder])
    want = Predictor(checkpoint, device="cpu", num_workers=1).predict(local)
    got = [rows[f"file://{quote(p)}"] for p in local]
    assert [p.ok for p in got] == [p.ok for p in want] == [True, True, True, False]
    assert got[3].error.startswith(f"file://{quote(local[3])}: InvalidDataError")
    assert_same_predictions([dataclasses.replace(p, path=q) for p, q in zip(got[:3], local)], want[:3])


def test_cli_ray_writes_the_plain_jsonl_and_readable_parquet(cluster, checkpoint, folder, tmp_path, capsys):
    plain, on_ray, parquet = tmp_path / "plain.jsonl", tmp_path / "ray.jsonl", tmp_path / "parquet"
    common = ["predict", str(folder), "--checkpoint", str(checkpoint), "--device", "cpu", "--batch-size", "2"]
    assert cli_main([*common, "--jsonl", str(plain)]) == 0
    capsys.readouterr()
    assert cli_main([*common, "--jsonl", str(on_ray), "--out-parquet", str(parquet), "--ray"]) == 0
    assert "3 of 4 videos classified, 1 failed" in capsys.readouterr().err
    want = [Prediction(**json.loads(line)) for line in plain.read_text().splitlines()]
    got = [Prediction(**json.loads(line)) for line in on_ray.read_text().splitlines()]
    assert_same_predictions(got, want)
    table = pq.read_table(parquet)
    assert table.schema.equals(distributed.row_schema(with_index=True), check_metadata=False)
    rows = sorted(table.to_pylist(), key=lambda r: r["index"])
    assert [distributed.prediction_from_row(r).to_json() for r in rows] == on_ray.read_text().splitlines()


def test_an_exported_folder_is_refused_before_ray_starts(tmp_path):
    # actors receive the model pickled, and an exported folder's runtime sessions do not pickle
    with pytest.raises(ValueError, match="exported folder runs through the Predictor"):
        distributed.predict_dataset(["a.mp4"], tmp_path)
