"""Predictor and `avgn-fast predict` on real encoded files, bad ones included, against `model.glance`."""

import json
import threading

import pytest
import torch
from media import write_audio_only, write_truncated, write_video

from avgn_fast.checkpoint import load, save_checkpoint
from avgn_fast.cli import main as cli_main
from avgn_fast.config import AVGNConfig
from avgn_fast.data.decode import decode_clip_for
from avgn_fast.data.synth import CLASS_NAMES, render_video
from avgn_fast.data.synth import write_video as write_synth_video
from avgn_fast.engine.predictor import Prediction, Predictor, expand_inputs, model_threads
from avgn_fast.models.avgn import AVGN

CONFIG = AVGNConfig.from_name("tiny")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = AVGN(CONFIG).eval()
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    save_checkpoint(path, model, class_names=CLASS_NAMES, metrics={"note": "random weights"})
    return path


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """Good synthetic videos (mp4 and webm), a no-audio mp4, and bad files, in one folder."""
    root = tmp_path_factory.mktemp("media")
    good = []
    for i in range(5):
        path = root / f"good_{i}.{'webm' if i == 3 else 'mp4'}"
        write_synth_video(render_video(i, seed=3, config=CONFIG), path)
        good.append(path)
    silent = write_video(root / "silent.mp4", audio=None, size=(96, 128), fps=12, seconds=2.0)
    empty = root / "empty.mp4"
    empty.write_bytes(b"")
    truncated = write_truncated(good[0], root / "truncated.mp4", keep=0.05)
    audio_only = write_audio_only(root / "audio_only.m4a")
    return {"good": good, "silent": silent, "empty": empty, "truncated": truncated, "audio_only": audio_only,
            "missing": root / "missing.mp4"}


def _reference(model, paths):
    """Decoded clips, a threshold that makes them exit at different steps, and ``model.glance`` with it."""
    clips = [decode_clip_for(p, CONFIG, backend="pyav") for p in paths]
    frames = torch.stack([c.frames for c in clips])
    mel = torch.stack([c.mel for c in clips])
    present = torch.tensor([c.audio_present for c in clips])
    first_step = model.glance(frames, mel, audio_present=present).probs[:, 0].max(-1).values
    threshold = first_step.median().item()
    return clips, threshold, model.glance(frames, mel, audio_present=present, exit_threshold=threshold)


def test_predict_matches_glance_and_keeps_order_with_bad_files(checkpoint, media):
    good = [*media["good"], media["silent"]]
    bad = [media["empty"], media["truncated"], media["missing"], media["audio_only"]]
    inputs = [good[0], bad[0], good[1], good[2], bad[1], bad[2], good[3], good[4], bad[3], good[5]]
    model = load(checkpoint)
    clips, threshold, ref = _reference(model, good)
    predictor = Predictor(checkpoint, device="cpu", batch_size=3, num_workers=2, topk=3, exit_threshold=threshold)
    preds = predictor.predict(inputs)

    assert [p.path for p in preds] == [str(p) for p in inputs]
    for p, path in zip(preds, inputs):
        assert p.ok == (path in good), (path, p.error)
        if not p.ok:
            assert str(path.name) in p.error

    ok = [p for p in preds if p.ok]
    assert [p.label for p in ok] == [CLASS_NAMES[i] for i in ref.prediction.tolist()]
    assert [p.exit_step for p in ok] == ref.exit_step.tolist()
    assert len(set(ref.exit_step.tolist())) > 1, "threshold should give different exits"
    torch.testing.assert_close(torch.tensor([p.gflops for p in ok]), ref.gflops.float())
    torch.testing.assert_close(torch.tensor([p.saliency for p in ok]), ref.saliency.float(), atol=1e-5, rtol=1e-4)
    assert [p.kept_frames for p in ok] == ref.kept.tolist()
    for p, clip, boxes in zip(ok, clips, ref.boxes):
        torch.testing.assert_close(torch.tensor(p.patch_boxes), clip.to_source(boxes), atol=0.01, rtol=0)
        assert p.frame_times == pytest.approx(clip.frame_times[torch.tensor(p.kept_frames)].tolist(), abs=1e-4)
        assert len(p.topk) == 3 and p.topk[0] == (p.label, pytest.approx(p.score))
        assert p.score == pytest.approx(ref.final_logits[ok.index(p)].softmax(-1).max().item(), abs=1e-5)
    assert [p.audio_present for p in ok] == [True] * 5 + [False]


def test_predict_accepts_clips_and_model(checkpoint, media):
    model = load(checkpoint)
    clips, threshold, ref = _reference(model, media["good"][:3])
    preds = Predictor(model, device="cpu", batch_size=2, num_workers=0, exit_threshold=threshold).predict(clips)
    assert [p.label for p in preds] == [CLASS_NAMES[i] for i in ref.prediction.tolist()]
    assert [p.path for p in preds] == [str(c.path) if c.path else None for c in clips]


def test_predict_iter_streams_with_bounded_lookahead(checkpoint, media):
    pulled = []

    def inputs():
        for i in range(40):
            pulled.append(i)
            yield media["good"][i % 5]

    predictor = Predictor(checkpoint, device="cpu", batch_size=2, num_workers=1)
    stream = predictor.predict_iter(inputs())
    first = next(stream)
    assert first.ok
    # at most (num_workers + 1) chunks of batch_size were read ahead when the first result came out
    assert len(pulled) <= 2 * (1 + 1) + 2
    rest = list(stream)
    assert len(rest) == 39 and len(pulled) == 40


def test_model_threads_leave_a_core_to_each_busy_decode_worker():
    assert model_threads(8, 0) == 8 and model_threads(8, 2) == 6
    assert model_threads(2, 2) == 1 and model_threads(1, 1) == 1 and model_threads(3, 1) == 2


def test_the_model_runs_on_fewer_threads_only_while_later_files_decode(checkpoint, media):
    """Two chunks, one worker: while the first is classified the second's first file is held decoding (a gate the
    classification opens), so the model leaves that worker its core; the second chunk, with nothing decoding after
    it, and a run of decoded clips get the caller's threads. The caller's count comes back after each batch."""
    predictor = Predictor(checkpoint, device="cpu", batch_size=2, num_workers=1)
    seen, gate = [], threading.Event()
    classify, decode = predictor.batch.classify, predictor.batch.decode
    later = {str(path) for path in media["good"][2:4]}

    def counting_classify(*args, **kwargs):
        seen.append(torch.get_num_threads())
        gate.set()
        return classify(*args, **kwargs)

    def gated_decode(paths):
        if later & set(paths):
            gate.wait()
        return decode(paths)

    predictor.batch.classify, predictor.batch.decode = counting_classify, gated_decode
    clips = decode(media["good"][:2])
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        assert all(p.ok for p in predictor.predict(clips))
        assert seen == [3] and torch.get_num_threads() == 3
        gate.clear()
        assert all(p.ok for p in predictor.predict(media["good"][:4]))
        assert seen == [3, 2, 3] and torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(threads)


def test_predictor_rejects_bad_settings(checkpoint):
    with pytest.raises(ValueError, match="batch_size"):
        Predictor(checkpoint, device="cpu", batch_size=0)
    with pytest.raises(ValueError, match="fp16"):
        Predictor(checkpoint, device="cpu", precision="fp16")
    with pytest.raises(ValueError, match="precision"):
        Predictor(checkpoint, device="cpu", precision="fp8")
    with pytest.raises(FileNotFoundError):
        Predictor(checkpoint.parent / "nope.pt", device="cpu")


def test_prediction_validates():
    with pytest.raises(ValueError, match="label or an error"):
        Prediction(path="a.mp4")
    with pytest.raises(ValueError, match="patch box"):
        Prediction(path="a.mp4", label="x", kept_frames=[1, 2], patch_boxes=[[0, 0, 1, 1]])


def test_expand_inputs_finds_videos_recursively(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("b.mp4", "a.webm", "sub/c.MKV", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    assert expand_inputs([tmp_path, tmp_path / "x.mp4"]) == [
        str(tmp_path / "a.webm"), str(tmp_path / "b.mp4"), str(tmp_path / "sub/c.MKV"), str(tmp_path / "x.mp4")]


def test_cli_predict_jsonl_explain_and_exit_codes(checkpoint, media, tmp_path, capsys):
    folder = media["good"][0].parent
    jsonl, explain = tmp_path / "out.jsonl", tmp_path / "explain"
    code = cli_main(["predict", str(media["good"][1]), str(media["empty"]), "--checkpoint", str(checkpoint),
                     "--jsonl", str(jsonl), "--topk", "2", "--explain", str(explain), "--device", "cpu"])
    assert code == 0
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [r["path"] for r in rows] == [str(media["good"][1]), str(media["empty"])]
    assert rows[0]["error"] is None and len(rows[0]["topk"]) == 2 and rows[0]["label"] in CLASS_NAMES
    assert rows[1]["error"] and "empty.mp4" in rows[1]["error"]
    assert set(rows[0]) >= {"label", "score", "saliency", "kept_frames", "patch_boxes", "exit_step", "gflops",
                            "audio_present"}
    pngs = sorted(explain.glob("*.png"))
    assert len(pngs) == 1 and pngs[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "1 of 2 videos classified" in capsys.readouterr().err

    assert cli_main(["predict", str(media["empty"]), str(media["missing"]), "--checkpoint", str(checkpoint),
                     "--device", "cpu"]) == 1
    assert cli_main(["predict", str(folder), "--checkpoint", str(checkpoint), "--device", "cpu"]) == 0
