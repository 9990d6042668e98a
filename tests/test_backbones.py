"""Backbones: torchvision-identical state_dicts, shapes, checkpoint loading, channels-last."""

import hashlib
import math

import pytest
import torch
import torch.nn.functional as F
from tolerances import tol
from torch import nn

from avgn_fast.models import backbones
from avgn_fast.models.backbones import (
    fold_batch_norms,
    load_pretrained,
    make_divisible,
    mobilenet_v2,
    resnet18,
    resnet50,
)


def _bn(prefix: str, c: int) -> dict:
    return {f"{prefix}.weight": (c,), f"{prefix}.bias": (c,), f"{prefix}.running_mean": (c,),
            f"{prefix}.running_var": (c,), f"{prefix}.num_batches_tracked": ()}


def torchvision_mobilenet_v2_keys() -> dict:
    """torchvision's mobilenet_v2() state_dict (key -> shape), written from the MobileNetV2 table."""
    keys = {"features.0.0.weight": (32, 3, 3, 3), **_bn("features.0.1", 32)}
    c_in, index = 32, 1
    for t, c, n in ((1, 16, 1), (6, 24, 2), (6, 32, 3), (6, 64, 4), (6, 96, 3), (6, 160, 3), (6, 320, 1)):
        for _ in range(n):
            hidden, block = c_in * t, f"features.{index}.conv"
            j = 0
            if t != 1:
                keys[f"{block}.0.0.weight"] = (hidden, c_in, 1, 1)
                keys.update(_bn(f"{block}.0.1", hidden))
                j = 1
            keys[f"{block}.{j}.0.weight"] = (hidden, 1, 3, 3)
            keys.update(_bn(f"{block}.{j}.1", hidden))
            keys[f"{block}.{j + 1}.weight"] = (c, hidden, 1, 1)
            keys.update(_bn(f"{block}.{j + 2}", c))
            c_in, index = c, index + 1
    keys["features.18.0.weight"] = (1280, 320, 1, 1)
    keys.update(_bn("features.18.1", 1280))
    keys["classifier.1.weight"] = (1000, 1280)
    keys["classifier.1.bias"] = (1000,)
    return keys


def torchvision_resnet_keys(blocks: tuple[int, ...], bottleneck: bool) -> dict:
    """torchvision's resnet18()/resnet50() state_dict (key -> shape), written from the ResNet table."""
    keys = {"conv1.weight": (64, 3, 7, 7), **_bn("bn1", 64)}
    c_in = 64
    for stage, n in enumerate(blocks):
        planes = 64 * 2**stage
        c_out = planes * (4 if bottleneck else 1)
        for b in range(n):
            block = f"layer{stage + 1}.{b}"
            if bottleneck:
                convs = [(planes, c_in, 1), (planes, planes, 3), (c_out, planes, 1)]
            else:
                convs = [(planes, c_in, 3), (planes, planes, 3)]
            for i, (o, i_ch, k) in enumerate(convs, 1):
                keys[f"{block}.conv{i}.weight"] = (o, i_ch, k, k)
                keys.update(_bn(f"{block}.bn{i}", o))
            if b == 0 and (stage > 0 or c_in != c_out):
                keys[f"{block}.downsample.0.weight"] = (c_out, c_in, 1, 1)
                keys.update(_bn(f"{block}.downsample.1", c_out))
            c_in = c_out
    keys["fc.weight"] = (1000, c_in)
    keys["fc.bias"] = (1000,)
    return keys


# (factory, expected keys, state_dict length, parameter count, known keys) with torchvision's published counts
TORCHVISION = [
    pytest.param(mobilenet_v2, torchvision_mobilenet_v2_keys(), 314, 3_504_872,
                 {"features.18.0.weight": (1280, 320, 1, 1), "features.1.conv.1.weight": (16, 32, 1, 1),
                  "features.17.conv.2.weight": (320, 960, 1, 1)}, id="mobilenet_v2"),
    pytest.param(resnet18, torchvision_resnet_keys((2, 2, 2, 2), False), 122, 11_689_512,
                 {"layer4.1.conv2.weight": (512, 512, 3, 3), "layer2.0.downsample.0.weight": (128, 64, 1, 1)},
                 id="resnet18"),
    pytest.param(resnet50, torchvision_resnet_keys((3, 4, 6, 3), True), 320, 25_557_032,
                 {"layer4.2.conv3.weight": (2048, 512, 1, 1), "layer1.0.downsample.0.weight": (256, 64, 1, 1),
                  "fc.weight": (1000, 2048)}, id="resnet50"),
]


@pytest.mark.parametrize("factory, expected, length, n_params, known", TORCHVISION)
def test_state_dict_matches_torchvision(factory, expected, length, n_params, known):
    model = factory()
    got = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert len(expected) == length
    assert got == list(expected.items())
    assert sum(p.numel() for p in model.parameters()) == n_params
    assert all(expected[k] == shape for k, shape in known.items())


@pytest.mark.parametrize("factory, head", [(mobilenet_v2, "classifier."), (resnet18, "fc."), (resnet50, "fc.")])
def test_no_head_when_num_classes_is_zero(factory, head):
    with_head = factory(num_classes=1000).state_dict()
    without = factory(num_classes=0).state_dict()
    assert {k for k in with_head if not k.startswith(head)} == set(without)
    assert any(k.startswith(head) for k in with_head)


def test_make_divisible_follows_torchvision():
    # hand-computed: round to the nearest multiple of 8, never below 8 nor 10% below the value
    assert [make_divisible(v) for v in (32.0, 11.2, 12.0, 18.0, 44.8, 3.0, 1792.0)] == [32, 16, 16, 24, 48, 8, 1792]
    assert mobilenet_v2(width_mult=0.35).features[0][0].out_channels == 16
    assert mobilenet_v2(width_mult=0.75).features[1].conv[1].out_channels == 16  # make_divisible(12) = 16
    assert mobilenet_v2(width_mult=0.25).out_channels == 1280  # the last layer never shrinks
    assert mobilenet_v2(width_mult=1.4).out_channels == 1792


def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights and BN statistics, so outputs are O(1) and every buffer matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("running_var") or (name.endswith("weight") and t.dim() == 1):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif name.endswith("num_batches_tracked"):
                t.fill_(7)
            elif t.is_floating_point():
                fan_in = math.prod(t.shape[1:]) if t.dim() > 1 else 4
                t.copy_(torch.randn(t.shape, generator=g) / fan_in**0.5)
    return model.eval()


def _spatial(size: int) -> int:
    for _ in range(5):  # five stride-2 stages, each ceil(size / 2)
        size = (size + 1) // 2
    return size


SMALL = [
    pytest.param(mobilenet_v2, dict(width_mult=0.5), 1280, id="mobilenet_v2-0.5"),
    pytest.param(mobilenet_v2, dict(width_mult=0.25, in_channels=1, num_classes=0), 1280, id="mobilenet_v2-mel"),
    pytest.param(resnet18, dict(width=16, num_classes=0), 128, id="resnet18-w16"),
    pytest.param(resnet50, dict(width=8, in_channels=1, num_classes=5), 256, id="resnet50-w8-mel"),
]


@pytest.mark.parametrize("factory, kwargs, channels", SMALL)
@pytest.mark.parametrize("shape", [(1, 33, 47), (2, 64, 100)])
def test_forward_shapes_and_pooling(factory, kwargs, channels, shape):
    model = _randomize(factory(**kwargs))
    b, h, w = shape
    x = torch.randn(b, kwargs.get("in_channels", 3), h, w)
    with torch.no_grad():
        fmap, pooled = model(x)
    assert model.out_channels == channels
    assert fmap.shape == (b, channels, _spatial(h), _spatial(w))
    assert pooled.shape == (b, channels)
    torch.testing.assert_close(pooled, fmap.mean(dim=(2, 3)), **tol(torch.float32))


@pytest.mark.parametrize("factory, kwargs, channels", SMALL)
def test_channels_last_matches(factory, kwargs, channels):
    model = _randomize(factory(**kwargs))
    x = torch.randn(2, kwargs.get("in_channels", 3), 45, 61)
    with torch.no_grad():
        ref = model(x)
        model = model.to(memory_format=torch.channels_last)
        out = model(x.contiguous(memory_format=torch.channels_last))
    assert out[0].is_contiguous(memory_format=torch.channels_last)
    for got, want in zip(out, ref, strict=True):
        atol, rtol = tol(torch.float32).values()
        # a deep random net reaches large activations: the absolute tolerance scales with them
        torch.testing.assert_close(got, want, atol=atol * want.abs().max().item(), rtol=rtol)


def _bn(sd: dict, prefix: str, x: torch.Tensor) -> torch.Tensor:
    return F.batch_norm(x, sd[f"{prefix}.running_mean"], sd[f"{prefix}.running_var"], sd[f"{prefix}.weight"],
                        sd[f"{prefix}.bias"], training=False, eps=1e-5)


def mobilenet_v2_reference(sd: dict, x: torch.Tensor) -> torch.Tensor:
    """torchvision's MobileNetV2 forward written from the paper's table over a torchvision state_dict."""
    x = F.relu6(_bn(sd, "features.0.1", F.conv2d(x, sd["features.0.0.weight"], stride=2, padding=1)))
    index = 1
    for t, n, s in ((1, 1, 1), (6, 2, 2), (6, 3, 2), (6, 4, 2), (6, 3, 1), (6, 3, 2), (6, 1, 1)):
        for i in range(n):
            block, stride, y = f"features.{index}.conv", s if i == 0 else 1, x
            j = 0
            if t != 1:
                y = F.relu6(_bn(sd, f"{block}.0.1", F.conv2d(y, sd[f"{block}.0.0.weight"])))
                j = 1
            dw = sd[f"{block}.{j}.0.weight"]
            y = F.relu6(_bn(sd, f"{block}.{j}.1", F.conv2d(y, dw, stride=stride, padding=1, groups=dw.shape[0])))
            y = _bn(sd, f"{block}.{j + 2}", F.conv2d(y, sd[f"{block}.{j + 1}.weight"]))
            x = x + y if stride == 1 and y.shape[1] == x.shape[1] else y
            index += 1
    return F.relu6(_bn(sd, "features.18.1", F.conv2d(x, sd["features.18.0.weight"])))


def resnet_reference(sd: dict, x: torch.Tensor, blocks: tuple[int, ...], bottleneck: bool) -> torch.Tensor:
    """torchvision's ResNet (v1.5: stride on the 3x3) forward over a torchvision state_dict."""
    x = F.relu(_bn(sd, "bn1", F.conv2d(x, sd["conv1.weight"], stride=2, padding=3)))
    x = F.max_pool2d(x, 3, 2, 1)
    for stage, n in enumerate(blocks):
        for b in range(n):
            block, stride = f"layer{stage + 1}.{b}", 2 if stage > 0 and b == 0 else 1
            if bottleneck:
                y = F.relu(_bn(sd, f"{block}.bn1", F.conv2d(x, sd[f"{block}.conv1.weight"])))
                y = F.relu(_bn(sd, f"{block}.bn2", F.conv2d(y, sd[f"{block}.conv2.weight"], stride=stride, padding=1)))
                y = _bn(sd, f"{block}.bn3", F.conv2d(y, sd[f"{block}.conv3.weight"]))
            else:
                y = F.relu(_bn(sd, f"{block}.bn1", F.conv2d(x, sd[f"{block}.conv1.weight"], stride=stride, padding=1)))
                y = _bn(sd, f"{block}.bn2", F.conv2d(y, sd[f"{block}.conv2.weight"], padding=1))
            if f"{block}.downsample.0.weight" in sd:
                x = _bn(sd, f"{block}.downsample.1", F.conv2d(x, sd[f"{block}.downsample.0.weight"], stride=stride))
            x = F.relu(y + x)
    return x


REFERENCES = [
    pytest.param(mobilenet_v2, dict(width_mult=0.5), mobilenet_v2_reference, id="mobilenet_v2-0.5"),
    pytest.param(resnet18, dict(width=16), lambda sd, x: resnet_reference(sd, x, (2, 2, 2, 2), False), id="resnet18"),
    pytest.param(resnet50, dict(width=8), lambda sd, x: resnet_reference(sd, x, (3, 4, 6, 3), True), id="resnet50"),
]


@pytest.mark.parametrize("factory, kwargs, reference", REFERENCES)
def test_forward_matches_functional_reference(factory, kwargs, reference):
    model = _randomize(factory(**kwargs))
    x = 8 * torch.randn(2, 3, 45, 61)  # large enough that ReLU6 clips
    with torch.no_grad():
        fmap, pooled = model(x)
        want = reference(model.state_dict(), x)
    atol, rtol = tol(torch.float32).values()
    torch.testing.assert_close(fmap, want, atol=atol * want.abs().max().item(), rtol=rtol)
    torch.testing.assert_close(pooled, want.mean(dim=(2, 3)), atol=atol * want.abs().max().item(), rtol=rtol)


@pytest.mark.parametrize("factory, kwargs, reference", REFERENCES)
def test_folded_batch_norms_match_the_functional_reference_and_leave_the_model_alone(factory, kwargs, reference):
    model = _randomize(factory(**kwargs)).train()
    before = {key: t.clone() for key, t in model.state_dict().items()}
    folded = fold_batch_norms(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules()) and not folded.training
    assert model.training and model.state_dict().keys() == before.keys()
    assert all(torch.equal(t, before[key]) for key, t in model.state_dict().items())
    x = 8 * torch.randn(2, 3, 45, 61)
    with torch.no_grad():
        fmap, pooled = folded(x)
        want = reference(before, x)
    atol, rtol = tol(torch.float32).values()
    torch.testing.assert_close(fmap, want, atol=atol * want.abs().max().item(), rtol=rtol)
    torch.testing.assert_close(pooled, want.mean(dim=(2, 3)), atol=atol * want.abs().max().item(), rtol=rtol)


def test_a_folded_norm_is_the_conv_scaled_and_shifted():
    conv, norm = nn.Conv2d(1, 2, 1, bias=False), nn.BatchNorm2d(2, eps=0.0)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([2.0, -1.0]).view(2, 1, 1, 1))
        norm.running_mean.copy_(torch.tensor([1.0, 3.0]))
        norm.running_var.copy_(torch.tensor([4.0, 0.25]))
        norm.weight.copy_(torch.tensor([3.0, 0.5]))
        norm.bias.copy_(torch.tensor([0.5, -2.0]))
    folded = fold_batch_norms(nn.Sequential(conv, norm))
    # y = γ (w x − μ) / σ + β: channel 0 (3/2)(2x − 1) + 1/2 = 3x − 1; channel 1 (1/2)(−x − 3)/(1/2) − 2 = −x − 5
    assert isinstance(folded[1], nn.Identity)
    assert folded[0].weight.flatten().tolist() == [3.0, -1.0] and folded[0].bias.tolist() == [-1.0, -5.0]
    # a norm without running statistics normalizes by each batch's own: it stays
    batch_stats = fold_batch_norms(nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2, track_running_stats=False)))
    assert isinstance(batch_stats[1], nn.BatchNorm2d)


@pytest.mark.parametrize("factory, kwargs, wrap", [(mobilenet_v2, {}, None), (resnet18, dict(width=16), "state_dict"),
                                                   (resnet50, dict(width=16), "model")])
def test_checkpoint_round_trip(tmp_path, factory, kwargs, wrap):
    source = _randomize(factory(**kwargs), seed=1)
    state = source.state_dict()
    path = tmp_path / "ckpt.pth"
    torch.save(state if wrap is None else {wrap: state, "epoch": 3}, path)
    fresh = factory(**kwargs)
    assert load_pretrained(fresh, path) is fresh
    loaded = fresh.state_dict()
    for k, v in state.items():
        assert torch.equal(loaded[k], v), k
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        for got, want in zip(fresh.eval()(x), source(x), strict=True):
            assert torch.equal(got, want)


def test_encoders_of_an_avgn_checkpoint_load_by_part(tmp_path):
    """``--init-local`` / ``--init-visual`` given a trained AVGN: its local / visual glance encoder's weights."""
    from avgn_fast.config import AVGNConfig
    from avgn_fast.models.avgn import AVGN

    avgn = AVGN(AVGNConfig.from_name("tiny"))
    _randomize(avgn.local, seed=2)
    _randomize(avgn.visual, seed=3)
    path = tmp_path / "best.pt"
    torch.save({"format": "avgn_fast", "state_dict": avgn.state_dict()}, path)
    for part, fresh in (("local", resnet18(width=16, num_classes=0)), ("visual", mobilenet_v2(width_mult=0.25,
                                                                                              num_classes=0))):
        loaded = load_pretrained(fresh, path, part=part).state_dict()
        source = getattr(avgn, part).state_dict()
        assert loaded.keys() == source.keys()
        for k, v in source.items():
            assert torch.equal(loaded[k], v), (part, k)
    with pytest.raises(ValueError, match="missing keys"):  # without the part nothing matches
        load_pretrained(resnet18(width=16, num_classes=0), path)


def test_head_dropped_for_headless_model(tmp_path):
    source = _randomize(resnet18(width=16, num_classes=1000))
    path = tmp_path / "with_head.pth"
    torch.save(source.state_dict(), path)
    headless = load_pretrained(resnet18(width=16, num_classes=0), path).eval()
    x = torch.randn(1, 3, 40, 40)
    with torch.no_grad():
        assert torch.equal(headless(x)[1], source(x)[1])


def test_old_checkpoint_without_batch_counters_loads():
    source = _randomize(mobilenet_v2(width_mult=0.5))
    state = {k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    fresh = load_pretrained(mobilenet_v2(width_mult=0.5), state)
    assert torch.equal(fresh.features[3].conv[1][1].running_mean, source.features[3].conv[1][1].running_mean)


def test_load_errors_name_file_and_keys(tmp_path):
    state = resnet18(width=16).state_dict()
    path = tmp_path / "broken.pth"

    missing = {k: v for k, v in state.items() if k != "layer3.1.conv2.weight"}
    torch.save(missing, path)
    with pytest.raises(ValueError, match=r"broken\.pth.*missing keys: layer3\.1\.conv2\.weight"):
        load_pretrained(resnet18(width=16), path)

    torch.save({**state, "layer5.0.conv1.weight": torch.randn(3)}, path)
    with pytest.raises(ValueError, match=r"broken\.pth.*unexpected keys: layer5\.0\.conv1\.weight"):
        load_pretrained(resnet18(width=16), path)

    with pytest.raises(ValueError, match=r"<state_dict>.*shape mismatches: conv1\.weight \(16, 3, 7, 7\) vs model"):
        load_pretrained(resnet18(width=16, in_channels=1), state)
    with pytest.raises(ValueError, match=r"shape mismatches: fc\.bias \(1000,\) vs model \(10,\)"):
        load_pretrained(resnet18(width=16, num_classes=10), state)

    torch.save([1, 2], path)
    with pytest.raises(ValueError, match="expected a state_dict"):
        load_pretrained(resnet18(width=16), path)


def test_non_strict_skips_missing_and_unexpected_keys():
    source = _randomize(resnet18(width=16))
    state = {k: v for k, v in source.state_dict().items() if not k.startswith("layer4.")}
    state["extra.weight"] = torch.randn(2)
    model = resnet18(width=16)
    before = model.layer4[0].conv1.weight.clone()
    load_pretrained(model, state, strict=False)
    assert torch.equal(model.layer1[0].conv1.weight, source.layer1[0].conv1.weight)
    assert torch.equal(model.layer4[0].conv1.weight, before)
    with pytest.raises(ValueError, match="shape mismatches"):
        load_pretrained(resnet18(width=8), source.state_dict(), strict=False)


def test_imagenet_weights_are_fetched_once_checked_and_loaded(tmp_path, monkeypatch):
    """``load_pretrained(model, "imagenet")`` through torch.hub's real download path, from a file:// URL."""
    source = _randomize(resnet18(), seed=3)
    remote = tmp_path / "remote"
    remote.mkdir()
    raw = remote / "weights.pth"
    torch.save(source.state_dict(), raw)
    served = raw.rename(remote / f"resnet18-{hashlib.sha256(raw.read_bytes()).hexdigest()[:8]}.pth")
    monkeypatch.setitem(backbones.IMAGENET_URLS, "resnet18", served.as_uri())
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))

    model = load_pretrained(resnet18(num_classes=0), "imagenet")
    want = source.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in model.state_dict().items())
    cached = tmp_path / "torch_home" / "hub" / "checkpoints" / served.name
    assert cached.is_file()
    served.unlink()  # the second load reads the cache
    assert torch.equal(load_pretrained(resnet18(num_classes=0), "imagenet").conv1.weight, source.conv1.weight)

    with pytest.raises(ValueError, match=rf"{served.name}: cannot load into ResNet: .*shape mismatches"):
        load_pretrained(resnet18(width=16), "imagenet")  # ImageNet weights fit full-width models only
    wrong = remote / "resnet18-00000000.pth"  # a download whose hash does not match its name
    torch.save(source.state_dict(), wrong)
    monkeypatch.setitem(backbones.IMAGENET_URLS, "resnet18", wrong.as_uri())
    with pytest.raises(ValueError, match=rf"{wrong.name}: could not fetch the ImageNet weights"):
        load_pretrained(resnet18(), "imagenet")


def test_arch_names_are_torchvision_names():
    assert [backbones.arch_name(m) for m in (mobilenet_v2(width_mult=0.5), resnet18(width=8), resnet50(width=8))] == [
        "mobilenet_v2", "resnet18", "resnet50"]
    with pytest.raises(ValueError, match="no torchvision name"):
        backbones.arch_name(backbones.ResNet(backbones.BasicBlock, [1, 1, 1, 1], width=8))
