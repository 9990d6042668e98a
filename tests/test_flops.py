"""FLOPs counting: the literature's test vectors, what is (not) counted, the model's component table, and the
one cost: ``avgn-fast flops`` total == ``AVGN.cost()`` == the GFLOPs the engine reports, every switch."""

import json
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from switches import SWITCHES, TINY
from torch import nn

from avgn_fast import cli, flops
from avgn_fast.commands import flops as flops_command
from avgn_fast.config import AVGNConfig
from avgn_fast.engine.early_exit import GlanceEngine
from avgn_fast.engine.stages import random_inputs
from avgn_fast.flops import component_table, count_gmacs
from avgn_fast.models.avgn import AVGN
from avgn_fast.models.backbones import mobilenet_v2, resnet18, resnet50

SIG3 = 5e-4  # "to 3 significant digits"
COMPONENTS = ["visual glance encoder", "audio encoder", "AV-TeST", "AESPA + policy", "local encoder",
              "classifier (fusion + exit head)"]

pytestmark = pytest.mark.usefixtures("one_thread")  # small shapes: see conftest


@pytest.fixture(scope="module")
def resnet50_headless():
    return resnet50(num_classes=0)


def test_mobilenet_v2_vector():
    assert math.isclose(count_gmacs(mobilenet_v2(), torch.randn(1, 3, 224, 224)), 0.2995, rel_tol=SIG3)


@pytest.mark.parametrize("size, expected", [(96, 0.7507), (128, 1.3346), (160, 2.0853), (192, 3.0028), (224, 4.087)])
def test_resnet50_vectors(resnet50_headless, size, expected):
    assert math.isclose(count_gmacs(resnet50_headless, torch.randn(1, 3, size, size)), expected, rel_tol=SIG3)


def test_head_is_not_counted():
    x = torch.randn(1, 3, 64, 64)
    assert count_gmacs(resnet18(num_classes=1000), x) == count_gmacs(resnet18(num_classes=0), x)


class _FreeOps(nn.Module):
    """One conv (the only MACs) followed by every op the convention leaves out."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=True)
        self.bn = nn.BatchNorm2d(8)
        self.gn = nn.GroupNorm(2, 8)
        self.inorm = nn.InstanceNorm2d(8, affine=True)
        self.ln = nn.LayerNorm(16)

    def forward(self, x):
        y = self.inorm(self.gn(F.relu6(self.bn(self.conv(x)))))
        y = F.interpolate(y, scale_factor=2, mode="bilinear") + F.interpolate(y, scale_factor=2, mode="nearest")
        theta = torch.tensor([[[0.5, 0.0, 0.1], [0.0, 0.5, -0.2]]]).expand(x.shape[0], 2, 3)
        grid = F.affine_grid(theta, (x.shape[0], 8, 16, 16), align_corners=False)
        y = F.grid_sample(y, grid, align_corners=False)
        y = F.max_pool2d(torch.sigmoid(y) * y, 2) + F.avg_pool2d(y, 2)
        return self.ln(F.adaptive_avg_pool2d(y, 4).flatten(2)).softmax(-1)


def test_only_conv_counted_among_free_ops():
    b, h, w = 2, 16, 16
    assert count_gmacs(_FreeOps(), torch.randn(b, 3, h, w)) * 1e9 == b * 8 * 3 * 3 * 3 * h * w


class _MatmulFamily(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 5)
        self.w = nn.Parameter(torch.randn(5, 7))

    def forward(self, x, a, b, q, k, v, mask):
        y = self.fc(x) @ self.w  # linear (2*3*6*5) + matmul (2*3*5*7)
        z = torch.bmm(a, b) + torch.einsum("nij,njk->nik", a, b)  # 2 * (4*3*9*2)
        s = torch.baddbmm(mask, a, b)  # 4*3*9*2
        o = F.scaled_dot_product_attention(q, k, v)  # 2*3*5*7*(8+4)
        return y.sum() + z.sum() + s.sum() + o.sum()


def test_matmul_family_and_attention_counted():
    inputs = (torch.randn(2, 3, 6), torch.randn(4, 3, 9), torch.randn(4, 9, 2), torch.randn(2, 3, 5, 8),
              torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 4), torch.randn(4, 3, 2))
    expected = 2 * 3 * 6 * 5 + 2 * 3 * 5 * 7 + 3 * (4 * 3 * 9 * 2) + 2 * 3 * 5 * 7 * (8 + 4)
    assert round(count_gmacs(_MatmulFamily(), *inputs) * 1e9) == expected


def test_multihead_attention_counted_on_the_plain_path():
    e, heads, b, length = 16, 2, 2, 5
    mha = nn.MultiheadAttention(e, heads, batch_first=True)

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = mha

        def forward(self, x):
            return self.mha(x, x, x, need_weights=False)[0]

    projections = b * length * e * (3 * e + e)
    attention = 2 * b * length * length * e  # heads * (e / heads) = e
    assert round(count_gmacs(Wrap(), torch.randn(b, length, e)) * 1e9) == projections + attention


@torch.library.custom_op("avgn_flops_test::attention", mutates_args=())
def _test_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v)


@torch.library.custom_op("avgn_flops_test::crop", mutates_args=())
def _test_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    return images[..., :size, :size].clone()


class _CustomOps(nn.Module):
    def forward(self, q, k, v, images):
        return torch.ops.avgn_flops_test.attention(q, k, v).sum() + torch.ops.avgn_flops_test.crop(images, 4).sum()


def test_custom_op_handles(monkeypatch):
    # stand-ins with our ops' argument order, counted by the handles registered for our op names
    monkeypatch.setitem(flops.OP_HANDLES, "avgn_flops_test::attention", flops.OP_HANDLES["avgn_fast::av_attention"])
    monkeypatch.setitem(flops.OP_HANDLES, "avgn_flops_test::crop", flops.OP_HANDLES["avgn_fast::crop_patches"])
    b, h, lq, lk, d = 2, 4, 9, 6, 8
    inputs = (torch.randn(b, h, lq, d), torch.randn(b, h, lk, d), torch.randn(b, h, lk, d), torch.randn(3, 3, 8, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # both ops have handles: nothing to warn about
        gmacs = count_gmacs(_CustomOps(), *inputs)
    assert round(gmacs * 1e9) == 2 * b * h * lq * lk * d


def test_unhandled_custom_op_warns():
    inputs = (torch.randn(1, 1, 2, 4), torch.randn(1, 1, 3, 4), torch.randn(1, 1, 3, 4), torch.randn(1, 3, 8, 8))
    with pytest.warns(UserWarning, match="avgn_flops_test::attention, avgn_flops_test::crop"):
        assert count_gmacs(_CustomOps(), *inputs) == 0


class _AddBmm(nn.Module):
    def forward(self, c, a, b):
        return torch.addbmm(c, a, b)


def test_unhandled_mac_op_warns():
    with pytest.warns(UserWarning, match="aten::addbmm"):
        count_gmacs(_AddBmm(), torch.randn(3, 2), torch.randn(4, 3, 5), torch.randn(4, 5, 2))


def test_counting_leaves_module_state_alone():
    model = resnet18(width=8)
    stats = {k: v.clone() for k, v in model.state_dict().items()}
    count_gmacs(model, torch.randn(2, 3, 32, 32))
    assert model.training
    assert all(torch.equal(v, stats[k]) for k, v in model.state_dict().items())


def _by_name(rows):
    return {r.name: r for r in rows}


def _model(config, seed=0):
    torch.manual_seed(seed)
    return AVGN(config).eval()


def test_component_table_of_the_tiny_model():
    # pinned values, so retuning the tiny preset does not change what this test checks
    config = TINY.replace(n_mels=32, audio_window_s=1.0, hop_ms=10.0, glance_width=0.25, audio_width=0.25,
                          glance_size=32, patch_size=32, k=4, local_arch="resnet18", local_width=16)
    model = _model(config)
    rows = _by_name(component_table(model))
    assert list(rows) == COMPONENTS
    n_steps = model.mel_steps
    assert n_steps in (100, 101)  # 1.0 s window / 10 ms hop
    expected = {  # the encoders, built here on their own
        "visual glance encoder": (mobilenet_v2(width_mult=0.25), (1, 3, 32, 32), "frame", 16, False),
        "audio encoder": (mobilenet_v2(width_mult=0.25, in_channels=1), (1, 1, 32, n_steps), "frame", 16, False),
        "local encoder": (resnet18(width=16), (1, 3, 32, 32), "patch", 1, True),
    }
    for name, (module, shape, per, count, per_step) in expected.items():
        row = rows[name]
        assert (row.per, row.count, row.per_step, row.input_shapes) == (per, count, per_step, (shape[1:],))
        assert row.gmacs == count_gmacs(module, torch.randn(shape))
    assert (rows["AV-TeST"].per_step, rows["AESPA + policy"].per_step) == (False, True)
    fused, hidden = model.classifier.fuse[0].in_features, config.fusion_dim
    assert round(rows["classifier (fusion + exit head)"].gmacs * 1e9) == (fused * hidden + hidden * hidden
                                                                           + hidden * config.num_classes)
    cost = model.cost()
    assert cost.per_video == pytest.approx(sum(rows[n].gmacs * rows[n].count for n in
                                               ("visual glance encoder", "audio encoder", "AV-TeST")))
    assert cost.per_step == pytest.approx(sum(rows[n].gmacs for n in
                                              ("AESPA + policy", "local encoder", "classifier (fusion + exit head)")))
    for row in rows.values():
        assert row.per_video(config.k) == row.gmacs * row.count * (config.k if row.per_step else 1)


@pytest.mark.parametrize("name, absent", [("visual_only", {"audio encoder"}), ("uniform", {"AV-TeST"}),
                                          ("center", {"AESPA + policy"}), ("random", {"AESPA + policy"}),
                                          ("dense", {"visual glance encoder", "AV-TeST", "AESPA + policy"}),
                                          ("audio_only", {"visual glance encoder", "AV-TeST", "AESPA + policy",
                                                          "local encoder"})])
def test_component_table_follows_the_switches(name, absent):
    config = TINY.replace(**SWITCHES[name])
    rows = _by_name(component_table(_model(config)))
    assert list(rows) == [name for name in COMPONENTS if name not in absent]
    if config.dense:  # the local encoder on every full frame, one step per frame
        s = config.frame_size
        assert rows["local encoder"].input_shapes == ((3, s, s),)
        assert rows["local encoder"].gmacs == count_gmacs(resnet18(width=config.local_width), torch.randn(1, 3, s, s))


def _cli_json(capsys, config: str, overrides: list[str]) -> dict:
    argv = ["flops", "--config", config, "--json"] + [a for o in overrides for a in ("--set", o)]
    assert cli.main(argv) == 0
    return json.loads(capsys.readouterr().out)


def _overrides(switch: dict) -> list[str]:
    return [f"{key}={str(value).lower()}" for key, value in switch.items()]


@pytest.mark.parametrize("name", list(SWITCHES))
def test_flops_total_is_the_cost_and_the_engine_gflops_tiny(name, capsys):
    config = TINY.replace(**SWITCHES[name])
    model = _model(config)
    report = _cli_json(capsys, "tiny", _overrides(SWITCHES[name]))
    cost, k = model.cost(), model.steps
    assert report["steps"] == k and (report["per_video"], report["per_step"]) == (cost.per_video, cost.per_step)
    assert report["total_per_video"] == pytest.approx(cost.per_video + k * cost.per_step, rel=1e-12)
    assert report["total_per_video"] == pytest.approx(sum(c["per_video"] for c in report["components"]), rel=1e-9)

    frames, mel, present = random_inputs(config, 3, seed=1)
    engine = GlanceEngine(model, device="cpu")
    full = engine(frames, mel, present, exit_threshold=None)
    torch.testing.assert_close(full.gflops, torch.full((3,), report["total_per_video"]))
    early = engine(frames, mel, present, exit_threshold=0.0)  # every video out after its first step
    torch.testing.assert_close(early.gflops, torch.full((3,), report["per_video"] + report["per_step"]))


@pytest.mark.parametrize("name", list(SWITCHES))
def test_flops_total_is_the_cost_paper(name, capsys):
    config = AVGNConfig.from_name("paper", **SWITCHES[name])
    model = _model(config)
    report = _cli_json(capsys, "paper", _overrides(SWITCHES[name]))
    cost = model.cost()
    assert report["total_per_video"] == pytest.approx(cost.per_video + model.steps * cost.per_step, rel=1e-12)
    rows = _by_name(model.flops_table())
    # DESIGN.md's test vectors: MobileNetV2 at 224, ResNet-50 on a 128 patch (a 224 frame for dense)
    if "visual glance encoder" in rows:
        assert math.isclose(rows["visual glance encoder"].gmacs, 0.2995, rel_tol=SIG3)
    if "local encoder" in rows:
        assert math.isclose(rows["local encoder"].gmacs, 4.087 if config.dense else 1.3346, rel_tol=SIG3)
    if name == "avgn":  # the engine reports the same on a paper-sized video
        frames, mel, present = random_inputs(config, 1)
        result = GlanceEngine(model, device="cpu")(frames, mel, present, exit_threshold=None)
        assert float(result.gflops) == pytest.approx(report["total_per_video"], rel=1e-6)


def test_flops_command_text(capsys):
    assert flops_command.main(config="tiny", set=["k=2"]) == 0
    out = capsys.readouterr().out.splitlines()
    model = _model(TINY.replace(k=2))
    rows, cost = model.flops_table(), model.cost()
    assert out[0].startswith("config 'tiny'") and out[0].endswith("2 steps")
    assert out[1].split() == ["component", "input", "GMACs", "per", "count", "GMACs/video"]
    assert [line.split("  ")[0] for line in out[2:2 + len(rows)]] == [r.name for r in rows]
    p = TINY.patch_size
    local = out[2 + [r.name for r in rows].index("local encoder")]
    assert local.split()[2:7] == [f"3x{p}x{p}", f"{rows[4].gmacs:.4f}", "patch", "1/step", f"{2 * rows[4].gmacs:.4f}"]
    assert out[-3].startswith("once per video") and out[-3].split()[-1] == f"{cost.per_video:.4f}"
    assert out[-2].startswith("per step taken") and out[-2].split()[-1] == f"{cost.per_step:.4f}"
    assert out[-1].startswith("total per video (2 steps taken)") and out[-1].split()[-1] == f"{cost.total(2):.4f}"
    assert len({len(line) for line in out[1:2 + len(rows)]}) == 1  # aligned columns


def test_flops_command_bad_override(capsys):
    assert cli.main(["flops", "--config", "tiny", "--set", "no_such_field=1"]) == 2
    assert "no_such_field" in capsys.readouterr().err


def test_audio_only_costs_its_audio_encoder_and_classifier(capsys):
    """The audio-only baseline: the audio encoder on T frames once, then per step the fusion MLP over the
    audio vector alone and one exit head, counted by hand; ``flops`` prints the same."""
    config = TINY.replace(visual=False)
    model = _model(config)
    assert model.visual is None and model.local is None and model.avtest is None and model.aespa is None
    mel = torch.randn(1, 1, config.n_mels, model.mel_steps)
    audio, hidden = model.audio.out_channels, config.fusion_dim
    per_step = (audio * hidden + hidden * hidden + hidden * config.num_classes) / 1e9
    cost = model.cost()
    encoder = mobilenet_v2(width_mult=config.audio_width, in_channels=1, num_classes=0)
    assert cost.per_video == pytest.approx(config.num_frames * count_gmacs(encoder, mel), rel=1e-12)
    assert cost.per_step == pytest.approx(per_step, rel=1e-12)
    report = _cli_json(capsys, "tiny", ["visual=false"])
    assert report["total_per_video"] == pytest.approx(cost.per_video + config.k * per_step, rel=1e-12)
