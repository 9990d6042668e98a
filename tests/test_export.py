"""Export of every stage: torch.export programs (dynamic batch) and ONNX graphs checked against eager stages."""

import importlib.util
import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from random_models import random_model
from tolerances import tol

from avgn_fast.checkpoint import save_checkpoint
from avgn_fast.cli import main as cli_main
from avgn_fast.config import AVGNConfig
from avgn_fast.engine.export import export, stage_examples

TINY = AVGNConfig.from_name("tiny")
STAGES = ["glance", "avtest", "aespa", "crop", "local", "head", "step_head"]
BATCH = 2


pytestmark = pytest.mark.usefixtures("one_thread")  # small shapes: see conftest



@pytest.fixture(scope="module")
def model():
    return random_model(TINY)  # patch centres that depend on the inputs


@pytest.fixture(scope="module")
def examples(model):
    stages, args = stage_examples(model, batch_size=BATCH)
    with torch.no_grad():
        want = {name: stage(*args[name]) for name, stage in stages.items()}
    return stages, args, want


def _first_rows(args, n):
    return tuple(a[:n] if a.dim() else a for a in args)


def test_every_stage_exports_with_a_dynamic_batch_and_matches_eager(model, examples, tmp_path):
    stages, args, want = examples
    assert list(stages) == STAGES
    manifest = export(model, "exported-program", tmp_path, batch_size=BATCH, class_names=list("abcdefgh"))
    assert json.loads((tmp_path / "manifest.json").read_text()) == manifest
    assert manifest["dynamic_batch"] and manifest["class_names"] == list("abcdefgh")
    cost = model.cost()
    assert manifest["k"] == TINY.k and manifest["cost"] == {"per_video": cost.per_video, "per_step": cost.per_step}
    # early exit crops the videos still in, one step at a time: its rows and steps are dynamic apart from the videos
    assert [i["dynamic"] for i in manifest["stages"]["crop"]["inputs"]] == [
        {"0": "videos"}, {"0": "rows"}, {"0": "rows", "1": "steps"}, {"0": "rows", "1": "steps"}]
    for name in STAGES:
        entry = manifest["stages"][name]
        assert [i["name"] for i in entry["inputs"]] == list(stages[name].inputs)
        assert entry["outputs"] == list(stages[name].outputs)
        program = torch.export.load(tmp_path / entry["file"])
        for n in (BATCH, 1):  # the exported batch, and another one
            with torch.no_grad():
                got = program.module()(*_first_rows(args[name], n))
                ref = stages[name](*_first_rows(args[name], n))
            assert len(got) == len(ref)
            for g, r in zip(got, ref):
                assert g.shape == r.shape and g.dtype == r.dtype, name
                torch.testing.assert_close(g, r, **tol(torch.float32))
    exported_params = torch.export.load(tmp_path / "local.pt2").state_dict
    assert all(key.startswith("model.local.") for key in exported_params), "a stage carries only its weights"


def test_cli_exports_onnx_that_onnxruntime_runs_like_eager(model, examples, tmp_path):
    stages, args, want = examples
    checkpoint = tmp_path / "model.pt"
    save_checkpoint(checkpoint, model, class_names=[f"c{i}" for i in range(TINY.num_classes)])
    out = tmp_path / "onnx"
    code = cli_main(["export", "--checkpoint", str(checkpoint), "--format", "onnx", "--out", str(out),
                     "--batch-size", str(BATCH), "--device", "cpu"])
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "onnx" and not manifest["dynamic_batch"] and manifest["batch_size"] == BATCH
    for name in STAGES:
        session = ort.InferenceSession(str(out / manifest["stages"][name]["file"]))
        assert [i.name for i in session.get_inputs()] == list(stages[name].inputs)
        feed = {n: np.ascontiguousarray(a.numpy()) for n, a in zip(stages[name].inputs, args[name])}
        got = session.run(None, feed)
        for g, r in zip(got, want[name]):
            assert tuple(g.shape) == tuple(r.shape), name
            if r.is_floating_point():
                torch.testing.assert_close(torch.from_numpy(g), r, atol=1e-4, rtol=1e-4)
            else:
                assert torch.equal(torch.from_numpy(g).to(r.dtype), r), name


@pytest.mark.skipif(importlib.util.find_spec("torch_tensorrt") is not None, reason="torch_tensorrt is installed")
def test_tensorrt_export_without_tensorrt_is_a_clear_error(model, tmp_path, capsys):
    checkpoint = tmp_path / "model.pt"
    save_checkpoint(checkpoint, model, class_names=[f"c{i}" for i in range(TINY.num_classes)])
    assert cli_main(["export", "--checkpoint", str(checkpoint), "--format", "tensorrt", "--out", str(tmp_path / "t"),
                     "--device", "cpu"]) == 2
    assert "torch_tensorrt is not installed" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()
