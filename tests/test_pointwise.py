"""The inference copy of a backbone: 1×1 convs as matrix products on small CPU maps, against the conv itself."""

import pytest
import torch
import torch.nn.functional as F
from tolerances import tol
from torch import nn

from avgn_fast.models import backbones
from avgn_fast.models.backbones import PointwiseConv2d, fold_batch_norms, inference_copy, mobilenet_v2


def _counting_linear(monkeypatch) -> list:
    calls = []
    linear = F.linear

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return linear(*args, **kwargs)

    monkeypatch.setattr(backbones.F, "linear", counted)
    return calls


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("n, c_in, c_out, h, w", [(3, 8, 5, 1, 1), (1, 7, 12, 2, 3), (4, 16, 9, 4, 4),
                                                  (2, 5, 6, 5, 4), (1, 3, 4, 9, 13)])
def test_a_pointwise_conv_is_the_conv_and_takes_the_product_only_on_small_maps(monkeypatch, n, c_in, c_out, h, w,
                                                                                channels_last, bias):
    torch.manual_seed(h * 100 + w)
    conv = nn.Conv2d(c_in, c_out, 1, bias=bias)
    pointwise = PointwiseConv2d(c_in, c_out, 1, bias=bias)
    pointwise.load_state_dict(conv.state_dict())
    x = torch.randn(n, c_in, h, w)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    calls = _counting_linear(monkeypatch)
    with torch.no_grad():
        got = pointwise(x)
        want = F.conv2d(x.contiguous(), conv.weight, conv.bias)
    assert got.shape == (n, c_out, h, w)
    torch.testing.assert_close(got, want, **tol(torch.float32))
    product = h * w <= PointwiseConv2d.SMALL_MAP and (h * w == 1 or channels_last)
    assert len(calls) == product, (h, w, channels_last)
    if product and h * w > 1:  # the product keeps the pixels' order: the map stays channels-last
        assert got.is_contiguous(memory_format=torch.channels_last)


def test_the_inference_copy_turns_only_plain_1x1_convs_and_computes_the_folded_model():
    torch.manual_seed(0)
    model = mobilenet_v2(width_mult=0.5, num_classes=0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):  # statistics away from the identity, so the fold has work to do
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    model.eval()
    folded, copied = fold_batch_norms(model), inference_copy(model)
    assert copied.state_dict().keys() == folded.state_dict().keys()
    assert all(torch.equal(t, folded.state_dict()[key]) for key, t in copied.state_dict().items())
    convs = [m for m in copied.modules() if isinstance(m, nn.Conv2d)]
    pointwise = [m for m in convs if isinstance(m, PointwiseConv2d)]
    plain_1x1 = [m for m in convs if m.kernel_size == (1, 1) and m.stride == (1, 1) and m.groups == 1]
    assert pointwise == plain_1x1 and len(pointwise) > 10
    assert not any(isinstance(m, PointwiseConv2d) for m in model.modules())  # the model itself is left alone
    # 32 × 32 frames end on 1 × 1 maps, 64 × 96 on 2 × 3: both take the product in the last stages
    for size in ((32, 32), (64, 96)):
        x = (8 * torch.randn(3, 3, *size)).contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            got, want = copied(x), folded(x)
        scale = want[0].abs().max().item()
        for g, e in zip(got, want, strict=True):
            torch.testing.assert_close(g, e, atol=tol(torch.float32)["atol"] * scale, rtol=tol(torch.float32)["rtol"])
