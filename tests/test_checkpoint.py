"""Checkpoints: every field checked before the model is allocated, errors naming the file; --resume checks."""

import argparse
import dataclasses
import json
import math
import subprocess
import sys

import pytest
import torch

import avgn_fast
from avgn_fast.checkpoint import load_checkpoint, save_checkpoint
from avgn_fast.config import AVGNConfig
from avgn_fast.data.synth import generate_tensors
from avgn_fast.engine.predictor import Predictor
from avgn_fast.models.avgn import AVGN
from avgn_fast.training import LossWeights, TensorSource, TrainSettings, fit

TINY = AVGNConfig.from_name("tiny")  # 8 classes, a ~10 MB checkpoint
SMALL = TINY.replace(num_frames=8, k=2)  # AVSynth's smallest layout: fast to train for the resume tests
NAMES = [f"class{i}" for i in range(TINY.num_classes)]

pytestmark = pytest.mark.usefixtures("one_thread")  # small shapes: see conftest


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A real checkpoint of the tiny model, written by ``save_checkpoint``."""
    torch.manual_seed(0)
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "good.pt", AVGN(TINY), class_names=NAMES)


def _payload(good):
    return torch.load(good, map_location="cpu", weights_only=True)


# each change takes a saved payload and returns the payload to write


def _set(key, value):
    return lambda payload: {**payload, key: value}


def _drop(key):
    return lambda payload: {k: v for k, v in payload.items() if k != key}


def _config(**changes):
    return lambda payload: {**payload, "config": {**payload["config"], **changes}}


def _weights(change):
    """A change of the state_dict (``change`` edits it in place)."""
    def apply(payload):
        change(payload["state_dict"])
        return payload
    return apply


FIRST = "visual.features.0.0.weight"  # the first weight of the tiny model, (8, 3, 3, 3) float32


def _nan(state):
    state[FIRST][0, 0, 0, 0] = math.nan


def _half(state):
    state[FIRST] = state[FIRST].half()


def _list(state):
    state[FIRST] = [1.0, 2.0]


def _without(state):
    del state["classifier.fuse.0.weight"]


def _extra(state):
    state["classifier.extra.weight"] = torch.zeros(2)


# (how the saved payload is changed, what the error must say)
BROKEN = {
    "not_a_dict": (lambda payload: [payload], "no 'avgn_fast.checkpoint' format tag"),
    "future_version": (_set("version", 2), "checkpoint version 2; this avgn_fast reads 1"),
    "no_state_dict": (_drop("state_dict"), "checkpoint lacks ['state_dict']"),
    "metrics_not_dict": (_set("metrics", [0.5]), "metrics must be a dict, got list"),
    "state_dict_not_dict": (_set("state_dict", [1]), "state_dict must be a dict, got list"),
    "three_names_for_eight_classes": (_set("class_names", ["a", "b", "c"]),
                                      "3 class names for a model with num_classes=8"),
    "names_a_tuple": (_set("class_names", tuple(NAMES)), "class_names must be a list of str"),
    "names_not_str": (_set("class_names", list(range(8))), "class_names must be a list of str"),
    "names_repeated": (_set("class_names", ["a", "b", "a", "c", "b", "d", "e", "f"]), "class_names repeat 'a', 'b'"),
    "config_not_dict": (_set("config", "tiny"), "config must be a dict of fields, got str"),
    "config_unknown_field": (_config(depth=3), "unknown config fields ['depth']"),
    "int_field_str": (_config(k="4"), "k must be an int, got '4' (str)"),
    "int_field_float": (_config(fusion_dim=128.0), "fusion_dim must be an int, got 128.0 (float)"),
    "bool_field_int": (_config(audio=1), "audio must be a bool, got 1 (int)"),
    "float_field_str": (_config(hop_ms="10"), "hop_ms must be a number, got '10' (str)"),
    "literal_field_wrong": (_config(local_arch="vgg"), "local_arch must be 'resnet18' or 'resnet50', got 'vgg'"),
    "zero_size": (_config(fusion_dim=0), "fusion_dim must be at least 1, got 0"),
    "negative_heads": (_config(aespa_heads=-2), "aespa_heads must be at least 1, got -2"),
    "nan_duration": (_config(audio_window_s=math.nan), "audio_window_s must be a finite number above 0, got nan"),
    "threshold_above_one": (_config(exit_threshold=2.0), "exit_threshold must be None or a probability"),
    "k_beyond_frames": (_config(k=17), "k must be in [1, num_frames=16], got 17"),
    "heads_not_dividing": (_config(avtest_heads=3), "avtest_dim=64 must be divisible by avtest_heads=3"),
    "crop_beyond_resize": (_config(resize_shorter=64), "resize_shorter=64 is smaller than frame_size=96"),
    "tensor_not_a_tensor": (_weights(_list), f"state_dict entries that are not tensors: {FIRST!r}"),
    "tensor_missing": (_weights(_without), "state_dict lacks 'classifier.fuse.0.weight'"),
    "tensor_extra": (_weights(_extra), "state_dict has unexpected 'classifier.extra.weight'"),
    "tensor_other_dtype": (_weights(_half), f"{FIRST} is (8, 3, 3, 3) torch.float16, the config needs "
                                            "(8, 3, 3, 3) torch.float32"),
    "tensor_other_shape": (_config(fusion_dim=96), "classifier.fuse.0.weight is (128, 2688) torch.float32, the config "
                                                   "needs (96, 2688) torch.float32"),
    "nan_weight": (_weights(_nan), f"non-finite (NaN or inf) weights in {FIRST!r}"),
    "cost_not_numbers": (_set("cost", {"per_video": "1", "per_step": 0.5}), "cost must be"),
    "cost_negative": (_set("cost", {"per_video": -1.0, "per_step": 0.5}), "cost must be"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_checkpoint_is_refused_naming_the_file_and_the_problem(good, tmp_path, case):
    change, message = BROKEN[case]
    path = tmp_path / f"{case}.pt"
    torch.save(change(_payload(good)), path)
    with pytest.raises(ValueError) as info:
        load_checkpoint(path)
    text = str(info.value)
    assert text.startswith(f"{path}: ") and message in text, text
    assert "\n" not in text


def test_unreadable_or_absent_files_are_refused_naming_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"^{tmp_path / 'absent.pt'}: no such checkpoint file"):
        load_checkpoint(tmp_path / "absent.pt")
    with pytest.raises(ValueError, match=f"^{tmp_path}: not a checkpoint file"):
        load_checkpoint(tmp_path)
    hostile = tmp_path / "hostile.pt"
    torch.save({"format": "avgn_fast.checkpoint", "hook": argparse.Namespace(command="rm")}, hostile)
    with pytest.raises(ValueError) as info:  # weights_only: the pickled object is not built
        load_checkpoint(hostile)
    assert str(info.value).startswith(f"{hostile}: not a readable avgn_fast checkpoint") and "\n" not in str(info.value)


def test_plain_numbers_where_floats_are_declared_still_load(good, tmp_path):
    payload = _payload(good)
    payload["config"].update(win_ms=25, hop_ms=10, exit_threshold=1)  # ints for float fields: the same config
    torch.save(payload, tmp_path / "ints.pt")
    ckpt = load_checkpoint(tmp_path / "ints.pt")
    assert ckpt.model.config == TINY.replace(exit_threshold=1.0) and ckpt.class_names == NAMES
    want = _payload(good)["state_dict"]
    assert all(torch.equal(v, want[k]) for k, v in ckpt.model.state_dict().items())
    assert ckpt.model.cost().per_video == payload["cost"]["per_video"]


def test_every_loader_refuses_a_checkpoint_with_too_few_class_names(good, tmp_path):
    payload = _payload(good)
    payload["class_names"] = ["a", "b", "c"]
    path = tmp_path / "three.pt"
    torch.save(payload, path)
    for load in (avgn_fast.load, lambda p: Predictor(p, device="cpu")):
        with pytest.raises(ValueError, match="3 class names for a model with num_classes=8") as info:
            load(path)
        assert str(info.value).startswith(f"{path}: ")


# run in a fresh interpreter: its peak RSS is this load's alone
_PEAK_RSS = """
import json, resource, sys
from avgn_fast.checkpoint import load_checkpoint
try:
    load_checkpoint(sys.argv[1])
    error = None
except ValueError as e:
    error = str(e)
print(json.dumps({"error": error, "peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def test_a_huge_config_on_small_weights_is_refused_before_allocation(good, tmp_path):
    # fusion_dim=60000 makes the classifier's second layer 60000 x 60000 floats, 14.4 GB, for a 10 MB file
    payload = _payload(good)
    payload["config"]["fusion_dim"] = 60000
    path = tmp_path / "huge.pt"
    torch.save(payload, path)
    assert path.stat().st_size < 20e6
    run = subprocess.run([sys.executable, "-c", _PEAK_RSS, str(path)], capture_output=True, text=True, timeout=300,
                         check=True)
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["error"].startswith(f"{path}: ")
    assert "classifier.fuse.0.weight is (128, 2688) torch.float32, the config needs (60000, 2688)" in result["error"]
    assert result["peak_kib"] < 1.5 * 2**20  # KiB: under 1.5 GiB, a tenth of what building the model would take


def test_config_fields_are_checked_wherever_a_config_is_built():
    with pytest.raises(ValueError, match="num_frames must be an int, got True"):
        TINY.replace(num_frames=True)
    with pytest.raises(ValueError, match="glance_width must be a finite number above 0, got 0.0"):
        TINY.replace(glance_width=0.0)
    with pytest.raises(ValueError, match="aespa_dim=60 must be divisible by aespa_heads=8"):
        TINY.replace(aespa_dim=60, aespa_heads=8)
    with pytest.raises(ValueError, match="exit_threshold must be a number or None, got '0.5'"):
        TINY.replace(exit_threshold="0.5")
    assert TINY.with_overrides(["exit_threshold=0.5", "avtest_layers=0"]).exit_threshold == 0.5


# --- --resume --------------------------------------------------------------------------------------------------

SETTINGS = TrainSettings(epochs=1, audio_warmup_epochs=0, look_epochs=0, batch_size=4, seed=0)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run directory with a last.pt after one joint epoch on four AVSynth videos, and those videos."""
    synth = generate_tensors(4, config=SMALL, seed=1)
    out = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    fit(AVGN(SMALL), TensorSource.of(synth), None, settings=SETTINGS, class_names=list(synth.class_names),
        out_dir=out)
    return out, synth


def _resume(run, config=SMALL, settings=SETTINGS, class_names=None):
    out, synth = run
    names = list(synth.class_names) if class_names is None else class_names
    return fit(AVGN(config), TensorSource.of(synth), None, settings=settings, class_names=names, out_dir=out,
               resume=True)


def test_resume_refuses_another_run_naming_the_file_and_every_difference(run):
    out, synth = run
    names = list(synth.class_names)
    other_losses = dataclasses.replace(SETTINGS, lr=1e-3, losses=LossWeights(saliency=2.0))
    cases = [
        (dict(config=SMALL.replace(k=1, fusion_dim=64)), ["k=2 there, 1 here", "fusion_dim=128 there, 64 here"]),
        (dict(settings=other_losses), ["settings.lr=0.002 there, 0.001 here", "settings.losses.saliency=1.0 there, "
                                                                              "2.0 here"]),
        (dict(settings=dataclasses.replace(SETTINGS, seed=4, look_epochs=1)),
         ["settings.look_epochs=0 there, 1 here", "settings.seed=0 there, 4 here"]),
        (dict(class_names=[*names[:-1], "newcomer"]), [f"only there: {names[-1]!r}; only here: 'newcomer'"]),
        (dict(class_names=[names[1], names[0], *names[2:]]),
         [f"class_names in another order or repeated: from #0, {names[:2]} there"]),
    ]
    before = (out / "last.pt").read_bytes()
    for changes, messages in cases:
        with pytest.raises(ValueError) as info:
            _resume(run, **changes)
        text = str(info.value)
        assert text.startswith(f"{out / 'last.pt'}: cannot resume") and all(m in text for m in messages), text
    assert (out / "last.pt").read_bytes() == before  # refused before any epoch ran


def test_resume_refuses_a_last_checkpoint_without_its_settings(run, tmp_path):
    out, _ = run
    payload = torch.load(out / "last.pt", weights_only=True)
    del payload["train_state"]["settings"]
    torch.save(payload, tmp_path / "last.pt")
    with pytest.raises(ValueError, match=f"^{tmp_path / 'last.pt'}: no training state to resume from "
                                         r"\(lacks settings\)"):
        _resume((tmp_path, run[1]))


def test_resume_with_more_joint_epochs_continues_the_run(run, tmp_path):
    out, synth = run
    (tmp_path / "last.pt").write_bytes((out / "last.pt").read_bytes())
    more = _resume((tmp_path, synth), settings=dataclasses.replace(SETTINGS, epochs=2))
    assert [h["epoch"] for h in more.history] == [1, 2]
    assert load_checkpoint(tmp_path / "last.pt").train_state["settings"]["epochs"] == 2
