"""Exported folders run like the model they came from: in a fresh process with no checkpoint and no training code,
through the Predictor and `avgn-fast predict`, and refuse what they cannot run with a clear error."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from media import write_video
from random_models import random_model
from tolerances import tol

import avgn_fast
from avgn_fast.cli import main as cli_main
from avgn_fast.config import AVGNConfig
from avgn_fast.data.decode import decode_clip_for
from avgn_fast.data.synth import CLASS_NAMES, render_video
from avgn_fast.data.synth import write_video as write_synth_video
from avgn_fast.engine.early_exit import GlanceEngine
from avgn_fast.engine.export import export
from avgn_fast.engine.predictor import Predictor
from avgn_fast.engine.stages import random_inputs

TINY = AVGNConfig.from_name("tiny")
FORMATS = ("exported-program", "onnx")
# exported programs hold the eager stages' own ops (float32 table); onnxruntime's kernels differ from torch's by
# at most 2e-7 in the logits and 8e-6 px in the boxes measured here, so 1e-4 leaves room across CPUs
TOLERANCE = {"exported-program": tol(torch.float32), "onnx": {"atol": 1e-4, "rtol": 1e-4}}
EXPORT_BATCH = 2  # smaller than the batches run below: static ONNX graphs are padded and chunked

pytestmark = pytest.mark.usefixtures("one_thread")  # small shapes: see conftest

# runs in a fresh interpreter: only avgn_fast is imported, and the folder is all it reads besides the inputs
FRESH_PROCESS = textwrap.dedent("""
    import sys

    import torch

    import avgn_fast

    folder, inputs, out = sys.argv[1:]
    x = torch.load(inputs)
    engine = avgn_fast.GlanceEngine(avgn_fast.load(folder), device="cpu")
    results = {}
    for name, threshold in (("never", None), ("early", x["threshold"])):
        r = engine(x["frames"], x["mel"], x["present"], exit_threshold=threshold)
        results[name] = {f: getattr(r, f) for f in ("logits", "exit_step", "final_logits", "saliency", "kept",
                                                    "boxes", "gflops")}
    results["training_imported"] = "avgn_fast.training" in sys.modules
    torch.save(results, out)
""")


@pytest.fixture(scope="module")
def model():
    return random_model(TINY)  # patch centres that depend on the inputs


@pytest.fixture(scope="module")
def folders(model, tmp_path_factory):
    root = tmp_path_factory.mktemp("exported")
    for fmt in FORMATS:
        export(model, fmt, root / fmt, batch_size=EXPORT_BATCH, class_names=CLASS_NAMES)
    return {fmt: root / fmt for fmt in FORMATS}


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """Five synthetic videos with sound and one without, as real encoded files."""
    root = tmp_path_factory.mktemp("media")
    paths = []
    for i in range(5):
        paths.append(root / f"v{i}.mp4")
        write_synth_video(render_video(i, seed=5, config=TINY), paths[-1])
    paths.append(write_video(root / "silent.mp4", audio=None, size=(96, 128), fps=12, seconds=2.0))
    return paths


@pytest.fixture(scope="module")
def inputs(model, videos):
    """The decoded videos, a threshold at which they leave at different steps, and ``model.glance`` with it."""
    clips = [decode_clip_for(p, TINY, backend="pyav") for p in videos]
    frames = torch.stack([c.frames for c in clips])
    mel = torch.stack([c.mel for c in clips])
    present = torch.tensor([c.audio_present for c in clips])
    first = model.glance(frames, mel, audio_present=present, exit_threshold=None).probs[:, 0].max(-1).values
    threshold = first.median().item()
    reference = model.glance(frames, mel, audio_present=present, exit_threshold=threshold)
    return {"frames": frames, "mel": mel, "present": present, "threshold": threshold, "reference": reference}


@pytest.mark.parametrize("fmt", FORMATS)
def test_exported_folder_runs_in_a_fresh_process_like_eager(model, folders, inputs, fmt, tmp_path):
    folder = folders[fmt]
    assert sorted(p.suffix for p in folder.iterdir() if p.name != "manifest.json") == \
        [".onnx" if fmt == "onnx" else ".pt2"] * 7, "the stage files and the manifest are the whole folder"
    torch.save({k: v for k, v in inputs.items() if k != "reference"}, tmp_path / "inputs.pt")
    subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(folder), str(tmp_path / "inputs.pt"),
                    str(tmp_path / "out.pt")], check=True, timeout=300)
    got = torch.load(tmp_path / "out.pt")
    assert got["training_imported"] is False

    engine = GlanceEngine(model, device="cpu")
    for name, threshold in (("never", None), ("early", inputs["threshold"])):
        want = engine(inputs["frames"], inputs["mel"], inputs["present"], exit_threshold=threshold)
        assert torch.equal(got[name]["exit_step"], want.exit_step), name
        assert torch.equal(got[name]["kept"], want.kept), name
        assert torch.equal(got[name]["gflops"], want.gflops), name
        for field in ("logits", "final_logits", "saliency", "boxes"):
            torch.testing.assert_close(got[name][field], getattr(want, field), equal_nan=True, **TOLERANCE[fmt],
                                       msg=f"{fmt} {name} {field}")
    never, early = got["never"]["exit_step"], got["early"]["exit_step"]
    assert never.tolist() == [TINY.k - 1] * len(never)
    assert len(set(early.tolist())) > 1, "the threshold should make videos leave at different steps"


@pytest.mark.parametrize("fmt", FORMATS)
def test_predictor_runs_an_exported_folder_like_the_model(folders, videos, inputs, fmt):
    want = inputs["reference"]
    got = Predictor(folders[fmt], device="cpu", batch_size=4, num_workers=1, exit_threshold=inputs["threshold"]
                    ).predict(videos)
    assert all(p.ok for p in got), [p.error for p in got]
    assert [p.label for p in got] == [CLASS_NAMES[i] for i in want.prediction.tolist()]
    assert [p.exit_step for p in got] == want.exit_step.tolist()
    assert [p.kept_frames for p in got] == want.kept.tolist()
    assert [p.gflops for p in got] == want.gflops.tolist()
    scores = want.final_logits.softmax(-1).max(-1).values.tolist()
    assert [p.score for p in got] == pytest.approx(scores, abs=1e-5)


def test_cli_predict_takes_an_exported_folder(folders, videos, inputs, tmp_path):
    jsonl = tmp_path / "out.jsonl"
    assert cli_main(["predict", *map(str, videos), "--checkpoint", str(folders["exported-program"]), "--jsonl",
                     str(jsonl), "--exit-threshold", str(inputs["threshold"]), "--device", "cpu"]) == 0
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    want = inputs["reference"]
    assert [r["path"] for r in rows] == list(map(str, videos))
    assert [r["label"] for r in rows] == [CLASS_NAMES[i] for i in want.prediction.tolist()]
    assert [r["exit_step"] for r in rows] == want.exit_step.tolist()


def test_loaded_folder_describes_itself(model, folders):
    exported = avgn_fast.load(folders["onnx"])
    assert exported.config == model.config and exported.class_names == list(CLASS_NAMES)
    assert exported.cost() == model.cost() and exported.k == TINY.k and exported.format == "onnx"
    out = exported(*random_inputs(TINY, 3))  # the staged forward over the stages, all steps
    assert out.logits.shape == (3, TINY.k, TINY.num_classes)
    manifest = exported.manifest
    assert manifest["versions"]["torch"] == torch.__version__ and manifest["versions"]["avgn_fast"]
    assert manifest["stages"]["glance"]["inputs"][0]["dynamic"] == {}, "the area resize keeps ONNX glance static"
    assert manifest["stages"]["crop"]["inputs"][2]["dynamic"] == {"0": "rows", "1": "steps"}


def test_engine_refuses_what_a_folder_was_not_exported_for(folders):
    exported = avgn_fast.load(folders["onnx"])
    folder = str(folders["onnx"])
    with pytest.raises(ValueError, match=f"{folder}: exported with k=4, cannot run with k=2"):
        GlanceEngine(exported, k=2)
    with pytest.raises(ValueError, match=f"{folder}: an exported folder runs its own onnx graphs"):
        GlanceEngine(exported, backend="inductor")
    with pytest.raises(ValueError, match=f"{folder}: exported at fp32, cannot run at bf16"):
        GlanceEngine(exported, precision="bf16")


def test_load_names_the_folder_and_the_problem(folders, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=f"{empty}: no manifest.json"):
        avgn_fast.load(empty)
    manifest = json.loads((folders["onnx"] / "manifest.json").read_text())
    cases = {
        "garbage": "{not json",
        "old": json.dumps({k: v for k, v in manifest.items() if k != "artifact"}),
        "k": json.dumps({**manifest, "k": 99}),
        "classes": json.dumps({**manifest, "class_names": ["a"]}),
        "lost_file": json.dumps(manifest),
    }
    expected = {"garbage": "not valid JSON", "old": "older avgn_fast must be exported again",
                "k": r"k must be an int in \[1, 4\], got 99", "classes": "class_names must be 8 strings",
                "lost_file": "stage glance: file 'glance.onnx' is not in the folder"}
    for name, text in cases.items():
        folder = tmp_path / name
        folder.mkdir()
        (folder / "manifest.json").write_text(text)
        with pytest.raises(ValueError, match=f"{folder}/manifest.json: .*{expected[name]}") as info:
            avgn_fast.load(folder)
        assert "\n" not in str(info.value)

