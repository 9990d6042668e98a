"""Safe outputs of `avgn-fast predict`, per-file isolation in the Predictor, Ctrl-C and the CLI's error style.

Real encoded media from ``media.py`` and a real checkpoint of a small random model on disk.
"""

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from media import write_video

from avgn_fast.checkpoint import save_checkpoint
from avgn_fast.cli import main as cli_main
from avgn_fast.config import AVGNConfig
from avgn_fast.data import decode
from avgn_fast.data.decode import decode_clip_for
from avgn_fast.engine.predictor import Prediction, Predictor
from avgn_fast.models.avgn import AVGN

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = AVGNConfig.from_name("tiny")
CLASS_NAMES = [f"class{i}" for i in range(CONFIG.num_classes)]
HAS_DALI = importlib.util.find_spec("nvidia.dali") is not None


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    return save_checkpoint(path, AVGN(CONFIG).eval(), class_names=CLASS_NAMES)


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """Four short VP9 + Opus webm files (decodable by PyAV and by DALI's CPU decoder)."""
    root = tmp_path_factory.mktemp("videos")
    return [write_video(root / f"v{i}.webm", codec="vp9", audio="opus", size=(48, 64), seconds=1.0, seed=i)
            for i in range(4)]


@pytest.fixture(scope="module")
def predictor(checkpoint):
    return Predictor(checkpoint, device="cpu", decode_backend="pyav", batch_size=4, num_workers=1, topk=3)


def strict_loads(line: str):
    """json.loads that refuses the NaN / Infinity tokens Python's json accepts by default."""
    def refuse(token):
        raise ValueError(f"non-standard JSON constant {token}")

    return json.loads(line, parse_constant=refuse)


def predict_cli(*args) -> list[str]:
    return ["predict", *map(str, args), "--device", "cpu", "--decode", "pyav"]


def error_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


# --- refused outputs ---------------------------------------------------------------------------


@pytest.mark.parametrize("alias", ["same", "relative", "symlink", "hardlink"])
def test_jsonl_naming_an_input_is_refused_before_the_model_loads(videos, tmp_path, capsys, alias, monkeypatch):
    target = tmp_path / "input.webm"
    target.write_bytes(videos[0].read_bytes())
    original = target.read_bytes()
    jsonl = {"same": target, "relative": "input.webm", "symlink": tmp_path / "link.jsonl",
             "hardlink": tmp_path / "hard.jsonl"}[alias]
    if alias == "symlink":
        jsonl.symlink_to(target)
    if alias == "hardlink":
        os.link(target, jsonl)
    monkeypatch.chdir(tmp_path)
    before = sorted(tmp_path.iterdir())
    # a checkpoint that does not exist: the refusal must come first, so it is the error reported
    code = cli_main(predict_cli(target, "--checkpoint", tmp_path / "missing.pt", "--jsonl", jsonl))
    assert code == 2
    (line,) = error_lines(capsys)
    assert line.startswith("avgn-fast: error: --jsonl") and "input" in line and "missing.pt" not in line
    assert target.read_bytes() == original
    assert sorted(tmp_path.iterdir()) == before


def test_jsonl_naming_a_directory_is_refused(videos, tmp_path, capsys):
    code = cli_main(predict_cli(videos[0], "--checkpoint", tmp_path / "missing.pt", "--jsonl", tmp_path))
    assert code == 2
    (line,) = error_lines(capsys)
    assert line.startswith("avgn-fast: error: --jsonl") and "directory" in line


def test_explain_naming_a_file_or_holding_its_pngs_is_refused(videos, tmp_path, capsys):
    not_a_folder = tmp_path / "notes.txt"
    not_a_folder.write_text("keep me")
    code = cli_main(predict_cli(videos[0], "--checkpoint", tmp_path / "missing.pt", "--explain", not_a_folder))
    assert code == 2
    (line,) = error_lines(capsys)
    assert line.startswith("avgn-fast: error: --explain") and "not a folder" in line
    assert not_a_folder.read_text() == "keep me"

    # the second input's explanation would be 00001_v1.png: an existing file of that name is refused
    explain = tmp_path / "explain"
    explain.mkdir()
    taken = explain / "00001_v1.png"
    taken.write_bytes(b"user's picture")
    code = cli_main(predict_cli(videos[0], videos[1], "--checkpoint", tmp_path / "missing.pt", "--explain", explain))
    assert code == 2
    (line,) = error_lines(capsys)
    assert line.startswith("avgn-fast: error: --explain") and str(taken) in line
    assert taken.read_bytes() == b"user's picture" and sorted(explain.iterdir()) == [taken]

    # an input that lies where an explanation would go (here: input 0's PNG name) is refused too
    clash = explain / "00000_v0.png"
    clash.write_bytes(videos[0].read_bytes())
    code = cli_main(predict_cli(videos[0], clash, "--checkpoint", tmp_path / "missing.pt", "--explain", explain))
    assert code == 2 and str(clash) in error_lines(capsys)[0]
    assert clash.read_bytes() == videos[0].read_bytes()


def test_existing_jsonl_is_replaced_whole_and_no_temporary_file_is_left(checkpoint, videos, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    jsonl = out / "rows.jsonl"
    jsonl.write_text("old results\n")
    explain = out / "explain"
    code = cli_main(predict_cli(videos[0], tmp_path / "missing.webm", videos[1], "--checkpoint", checkpoint,
                                "--jsonl", jsonl, "--explain", explain))
    assert code == 0
    rows = [strict_loads(line) for line in jsonl.read_text().splitlines()]
    assert [r["path"] for r in rows] == [str(videos[0]), str(tmp_path / "missing.webm"), str(videos[1])]
    assert rows[1]["error"].startswith(f"{tmp_path / 'missing.webm'}: ") and rows[1]["label"] is None
    assert rows[0]["label"] in CLASS_NAMES and rows[2]["label"] in CLASS_NAMES
    assert sorted(p.name for p in out.iterdir()) == ["explain", "rows.jsonl"]
    assert sorted(p.name for p in explain.iterdir()) == ["00000_v0.png", "00002_v1.png"]
    assert "2 of 3 videos classified, 1 failed" in capsys.readouterr().err


# --- strict JSON ---------------------------------------------------------------------------------


def test_non_finite_values_become_null_and_the_label_stays():
    nan, inf = float("nan"), float("inf")
    pred = Prediction(path="a.mp4", label="cat", score=nan, topk=[("cat", nan), ("dog", 0.25)],
                      saliency=[0.5, -inf, inf], kept_frames=[0], frame_times=[nan], patch_boxes=[[0.0, nan, 4.0, 4.0]],
                      exit_step=0, gflops=inf, audio_present=True)
    row = strict_loads(pred.to_json())
    assert row["label"] == "cat" and row["score"] is None and row["gflops"] is None
    assert row["topk"] == [["cat", None], ["dog", 0.25]]
    assert row["saliency"] == [0.5, None, None] and row["frame_times"] == [None]
    assert row["patch_boxes"] == [[0.0, None, 4.0, 4.0]] and row["error"] is None


def test_nan_audio_gives_a_labelled_row_in_strict_json(predictor, videos):
    clip = decode_clip_for(videos[0], CONFIG, backend="pyav")
    clip.mel = torch.full_like(clip.mel, float("nan"))
    (pred,) = predictor.predict([clip])
    assert pred.ok and pred.label in CLASS_NAMES
    assert math.isnan(pred.score), "NaN audio should reach the score, else this test checks nothing"
    row = strict_loads(pred.to_json())
    assert row["label"] == pred.label and row["score"] is None


# --- per-file isolation --------------------------------------------------------------------------


def test_a_clip_that_breaks_the_batch_fails_alone(predictor, videos):
    clips = [decode_clip_for(v, CONFIG, backend="pyav") for v in videos[:3]]
    wrong = decode_clip_for(videos[3], CONFIG, backend="pyav")
    half = wrong.size // 2
    wrong.frames = wrong.frames[..., :half, :half].contiguous()  # a valid Clip the model cannot take
    wrong.path = "wrong.webm"
    alone = predictor.predict(clips)
    mixed = predictor.predict([clips[0], wrong, clips[1], clips[2]])
    # the batch fails in torch.stack (RuntimeError); alone, the clip fails the engine's shape check
    assert mixed[1].label is None and mixed[1].error.startswith("wrong.webm: ValueError: frames must be")
    assert "\n" not in mixed[1].error
    good = [mixed[0], mixed[2], mixed[3]]
    assert [p.label for p in good] == [p.label for p in alone]
    assert [p.score for p in good] == pytest.approx([p.score for p in alone], abs=1e-5)


@pytest.mark.parametrize("backend", ["pyav", pytest.param("dali", marks=pytest.mark.skipif(not HAS_DALI,
                                                                                           reason="no DALI"))])
def test_an_exception_from_decode_many_fails_only_its_file(checkpoint, videos, monkeypatch, backend):
    """No real file makes ``decode_many`` raise (it returns DecodeErrors in place), so one is made to: the
    real decoder runs for every call, except that a call holding the culprit raises MemoryError."""
    culprit, real = str(videos[2]), decode.decode_many
    calls = []

    def failing_for_culprit(paths, *args, **kwargs):
        calls.append(list(paths))
        if culprit in paths:
            raise MemoryError
        return real(paths, *args, **kwargs)

    monkeypatch.setattr(decode, "decode_many", failing_for_culprit)
    predictor = Predictor(checkpoint, device="cpu", decode_backend=backend, batch_size=4, num_workers=1)
    preds = predictor.predict([*videos, videos[0]])
    assert [p.path for p in preds] == [str(v) for v in [*videos, videos[0]]]
    assert preds[2].error == f"{culprit}: MemoryError" and preds[2].label is None
    assert all(p.ok and p.label in CLASS_NAMES for i, p in enumerate(preds) if i != 2)
    if backend == "dali":  # the failed batch of four was retried one file at a time
        assert calls[:5] == [[str(v) for v in videos], *([str(v)] for v in videos)]


def test_an_explanation_that_cannot_be_written_keeps_the_label(predictor, videos, tmp_path):
    explain = tmp_path / "explain"
    explain.mkdir()
    taken = explain / "00001_v1.png"
    taken.write_bytes(b"user's picture")
    preds = predictor.predict(videos[:3], explain_dir=explain)
    assert preds[0].ok and preds[2].ok
    assert preds[1].label in CLASS_NAMES and not preds[1].ok
    assert preds[1].error.startswith(f"{videos[1]}: explanation: FileExistsError")
    assert taken.read_bytes() == b"user's picture"
    assert sorted(p.name for p in explain.iterdir()) == ["00000_v0.png", "00001_v1.png", "00002_v2.png"]


# --- Ctrl-C --------------------------------------------------------------------------------------


def test_ctrl_c_stops_promptly_and_leaves_whole_lines(checkpoint, videos, tmp_path):
    inputs = [str(v) for v in videos] * 150  # 600 inputs: far more than are done when the signal comes
    out = tmp_path / "out"
    out.mkdir()
    jsonl = out / "rows.jsonl"
    command = [sys.executable, "-m", "avgn_fast.cli", *predict_cli(*inputs, "--checkpoint", checkpoint, "--jsonl",
                                                                   jsonl, "--batch-size", "2", "--workers", "2")]
    with open(tmp_path / "stderr.txt", "w") as err:
        # Ctrl-C's default disposition in the child, as in a terminal: a runner started in the background by a
        # non-interactive shell ignores SIGINT, and a Python started with it ignored never raises KeyboardInterrupt
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            deadline = time.monotonic() + 300
            while not any(f.is_file() and b"\n" in f.read_bytes() for f in out.iterdir()):
                assert proc.poll() is None, (tmp_path / "stderr.txt").read_text()
                assert time.monotonic() < deadline, "no JSONL line within 300 s"
                time.sleep(0.02)
            proc.send_signal(signal.SIGINT)
            sent = time.monotonic()
            code = proc.wait(timeout=60)
            stopped_in = time.monotonic() - sent
        finally:
            if proc.poll() is None:
                proc.kill()
    assert code == 130, (tmp_path / "stderr.txt").read_text()
    assert stopped_in < 30
    assert [p.name for p in out.iterdir()] == ["rows.jsonl"]
    text = jsonl.read_text()
    assert text.endswith("\n")
    rows = [strict_loads(line) for line in text.splitlines()]
    assert 1 <= len(rows) < len(inputs)
    assert [r["path"] for r in rows] == inputs[:len(rows)] and all(r["label"] in CLASS_NAMES for r in rows)
    assert "avgn-fast: interrupted" in (tmp_path / "stderr.txt").read_text()


# --- CLI error style -----------------------------------------------------------------------------


def test_usage_errors_are_one_line_with_code_2(tmp_path, capsys):
    assert cli_main(["predict", "x.mp4"]) == 2
    (line,) = error_lines(capsys)
    assert line.startswith("avgn-fast: error: ") and "--checkpoint" in line
    assert cli_main(["predict", "x.mp4", "--checkpoint", "c.pt", "--topk", "many"]) == 2
    (line,) = error_lines(capsys)
    assert line.startswith("avgn-fast: error: ") and "--topk" in line
    assert cli_main(["predict", str(tmp_path / "x.mp4"), "--checkpoint", str(tmp_path / "none.pt")]) == 2
    (line,) = error_lines(capsys)
    assert line.startswith("avgn-fast: error: ") and "none.pt" in line
    assert cli_main(["--help"]) == 0


def test_runtime_failures_are_one_line_with_code_1(tmp_path, capsys, monkeypatch):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    args = ["synth", "--out", str(a_file / "data"), "--videos", "1"]  # a folder inside a regular file
    assert cli_main(args) == 1
    (line,) = error_lines(capsys)
    assert line.startswith("avgn-fast: error: NotADirectoryError: ") and str(a_file) in line
    monkeypatch.setenv("AVGN_DEBUG", "1")
    with pytest.raises(NotADirectoryError):
        cli_main(args)
