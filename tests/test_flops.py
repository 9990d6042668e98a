"""FLOPs counting: the literature's test vectors, what is (not) counted, the per-video table, the CLI."""

import json
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from avgn_fast import cli, flops
from avgn_fast.commands import flops as flops_command
from avgn_fast.config import AVGNConfig
from avgn_fast.flops import COMPONENTS, Component, component_table, count_gmacs, total_gmacs
from avgn_fast.models.backbones import mobilenet_v2, resnet18, resnet50

SIG3 = 5e-4  # "to 3 significant digits"


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


def test_component_table_tiny():
    # pinned values, so retuning the tiny preset does not change what this test checks
    config = AVGNConfig.from_name("tiny").replace(n_mels=32, audio_window_s=1.0, hop_ms=10.0, glance_width=0.25,
                                                 audio_width=0.25, glance_size=32, patch_size=32, k=4,
                                                 local_arch="resnet18", local_width=16)
    rows = _by_name(component_table(config))
    assert list(rows) == ["visual glance encoder", "audio encoder", "local encoder",
                          "dense baseline (local encoder, full frame)"]
    n_steps = 100  # 1.0 s window / 10 ms hop
    expected = {
        "visual glance encoder": (mobilenet_v2(width_mult=0.25), (1, 3, 32, 32), "frame", 16),
        "audio encoder": (mobilenet_v2(width_mult=0.25, in_channels=1), (1, 1, 32, n_steps), "frame", 16),
        "local encoder": (resnet18(width=16), (1, 3, 32, 32), "patch", 4),
        "dense baseline (local encoder, full frame)": (resnet18(width=16), (1, 3, 96, 96), "frame", 16),
    }
    for name, (module, shape, per, count) in expected.items():
        row = rows[name]
        assert (row.per, row.count, row.input_shapes) == (per, count, (shape[1:],))
        assert row.gmacs == count_gmacs(module, torch.randn(shape))
        assert row.per_video == row.gmacs * count
    assert not rows["dense baseline (local encoder, full frame)"].in_total
    assert total_gmacs(list(rows.values())) == pytest.approx(
        16 * rows["visual glance encoder"].gmacs + 16 * rows["audio encoder"].gmacs + 4 * rows["local encoder"].gmacs)


def test_component_table_follows_config_switches():
    tiny = AVGNConfig.from_name("tiny")
    silent = _by_name(component_table(tiny.replace(audio=False)))
    assert "audio encoder" not in silent
    dense = component_table(tiny.replace(dense=True))
    assert [(r.name, r.in_total) for r in dense] == [("dense baseline (local encoder, full frame)", True)]
    assert total_gmacs(dense) == dense[0].gmacs * tiny.num_frames
    smaller = _by_name(component_table(tiny.replace(patch_size=16, k=2)))["local encoder"]
    assert smaller.count == 2 and smaller.input_shapes == ((3, 16, 16),)


def test_component_table_takes_more_rows():
    extra = Component("fusion head", "video", lambda c: nn.Linear(c.fusion_dim, c.num_classes),
                      lambda c: (torch.randn(1, c.fusion_dim),), lambda c: 1)
    config = AVGNConfig.from_name("tiny")
    rows = component_table(config, [*COMPONENTS, extra])
    assert rows[-1].name == "fusion head"
    assert round(rows[-1].gmacs * 1e9) == config.fusion_dim * config.num_classes
    assert total_gmacs(rows) == pytest.approx(total_gmacs(rows[:-1]) + rows[-1].gmacs)


def test_flops_command_text(capsys):
    assert flops_command.main(config="tiny", set=["k=2"]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = component_table(AVGNConfig.from_name("tiny").replace(k=2))
    assert out[0].startswith("config 'tiny'")
    assert out[1].split() == ["component", "input", "GMACs", "per", "count", "GMACs/video"]
    assert [line.split("  ")[0] for line in out[2:-1]] == [r.name for r in rows]
    p = AVGNConfig.from_name("tiny").patch_size
    assert out[4].split()[2:6] == [f"3x{p}x{p}", f"{rows[2].gmacs:.4f}", "patch", "2"]
    assert out[5].endswith("(reference, not in total)")
    assert out[-1].startswith("total per video") and out[-1].split()[-1] == f"{total_gmacs(rows):.3f}"
    assert len({len(line) for line in out[1:5]}) == 1  # aligned columns


def test_flops_command_json_through_cli(capsys):
    assert cli.main(["flops", "--config", "tiny", "--set", "audio=false", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["config"] == "tiny" and report["overrides"] == ["audio=false"]
    assert [c["name"] for c in report["components"]] == ["visual glance encoder", "local encoder",
                                                         "dense baseline (local encoder, full frame)"]
    counted = [c["per_video"] for c in report["components"] if c["in_total"]]
    assert report["total_per_video"] == pytest.approx(sum(counted))


def test_flops_command_bad_override(capsys):
    assert cli.main(["flops", "--config", "tiny", "--set", "no_such_field=1"]) == 2
    assert "no_such_field" in capsys.readouterr().err
