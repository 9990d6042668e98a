"""MobileNetV2 and ResNet-18/50 backbones whose state_dicts match torchvision's key for key.

Every backbone returns ``(feature_map, pooled)``: the last feature map (B, C, h, w) and its global
average (B, C), with ``out_channels == C``. The classifier head (``classifier.1`` / ``fc``) exists
only so torchvision checkpoints load without renaming; ``forward`` never applies it, and
``num_classes=0`` builds none.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "IMAGENET_URLS",
    "fold_batch_norms",
    "inference_copy",
    "PointwiseConv2d",
    "BasicBlock",
    "Bottleneck",
    "MobileNetV2",
    "ResNet",
    "load_pretrained",
    "make_divisible",
    "mobilenet_v2",
    "resnet18",
    "resnet50",
]


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round a channel count to a multiple of ``divisor`` without losing more than 10% (torchvision's rule)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def _global_pool(x: torch.Tensor) -> torch.Tensor:
    return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


def fold_batch_norms(module: nn.Module) -> nn.Module:
    """A copy of ``module`` for inference in which every BatchNorm2d that follows a Conv2d is folded into it.

    The conv takes the norm's eval-mode affine map into its weight and bias, and the norm becomes an
    ``nn.Identity``: one op instead of two, the same function up to float rounding. The pairs are a
    Sequential's neighbours and the ``convN``/``bnN`` of this module's ResNet blocks and stem (whose forward
    applies each norm right after its conv); a norm without running statistics stays. ``module`` itself
    is left as it is.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    folded = copy.deepcopy(module).eval()
    for m in folded.modules():
        children = dict(m.named_children())
        names = list(children)
        pairs = list(zip(names, names[1:])) if isinstance(m, nn.Sequential) else \
            [(f"conv{i}", f"bn{i}") for i in range(1, 4) if f"conv{i}" in children] \
            if isinstance(m, (BasicBlock, Bottleneck, ResNet)) else []
        for conv, norm in pairs:
            bn = children.get(norm)
            if isinstance(children[conv], nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) \
                    and bn.running_mean is not None:
                setattr(m, conv, fuse_conv_bn_eval(children[conv], bn))
                setattr(m, norm, nn.Identity())
    return folded


class PointwiseConv2d(nn.Conv2d):
    """A 1×1 conv (stride 1, no padding, one group) that runs as one matrix product on a small CPU map.

    On a map of at most ``SMALL_MAP`` pixels per image (a small backbone's last stages), oneDNN's conv
    costs up to three times the same product through ``F.linear``: the pixels of a channels-last map
    (or of a 1×1 map in any layout) are already the rows of a matrix, so no copy is made. Larger maps,
    other layouts and other devices run the conv. Same weights and state_dict as the conv it replaces.
    """

    SMALL_MAP = 16  # pixels per image up to which the product beats the conv on the CPU (benchmarks/RESULTS.md)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        if x.device.type != "cpu" or h * w > self.SMALL_MAP or \
                (h * w > 1 and not x.is_contiguous(memory_format=torch.channels_last)):
            return super().forward(x)
        y = F.linear(x.permute(0, 2, 3, 1).reshape(n * h * w, c), self.weight.flatten(1), self.bias)
        return y.view(n, h, w, self.out_channels).permute(0, 3, 1, 2)


def inference_copy(module: nn.Module) -> nn.Module:
    """``fold_batch_norms(module)`` with every plain 1×1 conv a ``PointwiseConv2d`` sharing its weights."""
    folded = fold_batch_norms(module)
    for m in list(folded.modules()):
        for name, conv in m.named_children():
            if type(conv) is nn.Conv2d and conv.kernel_size == (1, 1) and conv.stride == (1, 1) \
                    and conv.padding == (0, 0) and conv.dilation == (1, 1) and conv.groups == 1 \
                    and conv.padding_mode == "zeros":
                pointwise = PointwiseConv2d(conv.in_channels, conv.out_channels, 1, bias=conv.bias is not None,
                                            device="meta")
                pointwise.weight, pointwise.bias = conv.weight, conv.bias
                setattr(m, name, pointwise.train(conv.training))
    return folded


class ConvBNReLU6(nn.Sequential):
    """conv (no bias) → BN → ReLU6; indices 0/1 match torchvision's ``Conv2dNormActivation``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, groups: int = 1):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, stride, (kernel_size - 1) // 2, groups=groups,
                      bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    """Expand (1×1) → depthwise (3×3) → project (1×1, linear), with a skip when shapes allow."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = int(round(in_channels * expand_ratio))
        self.use_residual = stride == 1 and in_channels == out_channels
        expand = [ConvBNReLU6(in_channels, hidden, kernel_size=1)] if expand_ratio != 1 else []
        self.conv = nn.Sequential(
            *expand,
            ConvBNReLU6(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


# expansion t, channels c, repeats n, first stride s (MobileNetV2 paper, table 2)
_MOBILENET_V2_SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                         (6, 320, 1, 1))


class MobileNetV2(nn.Module):
    """MobileNetV2 feature extractor; ``in_channels=1`` for log-mel input."""

    head_prefix = "classifier."

    def __init__(self, width_mult: float = 1.0, in_channels: int = 3, num_classes: int = 1000):
        super().__init__()
        if width_mult <= 0 or in_channels < 1 or num_classes < 0:
            raise ValueError(f"bad MobileNetV2 arguments: {width_mult=} {in_channels=} {num_classes=}")
        channels = make_divisible(32 * width_mult)
        self.out_channels = make_divisible(1280 * max(1.0, width_mult))
        layers: list[nn.Module] = [ConvBNReLU6(in_channels, channels, stride=2)]
        for t, c, n, s in _MOBILENET_V2_SETTING:
            out = make_divisible(c * width_mult)
            for i in range(n):
                layers.append(InvertedResidual(channels, out, s if i == 0 else 1, t))
                channels = out
        layers.append(ConvBNReLU6(channels, self.out_channels, kernel_size=1))
        self.features = nn.Sequential(*layers)
        if num_classes > 0:
            self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(self.out_channels, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fmap = self.features(x)
        return fmap, _global_pool(fmap)


class BasicBlock(nn.Module):
    """Two 3×3 convs (ResNet-18/34)."""

    expansion = 1

    def __init__(self, in_channels: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1×1 reduce → 3×3 (carries the stride, as torchvision's ResNet v1.5) → 1×1 expand ×4."""

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ResNet feature extractor; ``width`` is the stem/first-stage width (64 = torchvision), stages double it."""

    head_prefix = "fc."

    def __init__(self, block: type[BasicBlock | Bottleneck], layers: list[int], num_classes: int = 1000,
                 in_channels: int = 3, width: int = 64):
        super().__init__()
        if len(layers) != 4 or width < 1 or in_channels < 1 or num_classes < 0:
            raise ValueError(f"bad ResNet arguments: {layers=} {width=} {in_channels=} {num_classes=}")
        self.conv1 = nn.Conv2d(in_channels, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        channels = width
        for i, blocks in enumerate(layers):
            planes, stride = width * 2**i, 1 if i == 0 else 2
            downsample = None
            if stride != 1 or channels != planes * block.expansion:
                downsample = nn.Sequential(
                    nn.Conv2d(channels, planes * block.expansion, 1, stride, bias=False),
                    nn.BatchNorm2d(planes * block.expansion),
                )
            stage = [block(channels, planes, stride, downsample)]
            channels = planes * block.expansion
            stage += [block(channels, planes) for _ in range(1, blocks)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
        self.out_channels = channels
        if num_classes > 0:
            self.fc = nn.Linear(channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        fmap = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return fmap, _global_pool(fmap)


def mobilenet_v2(**kwargs) -> MobileNetV2:
    return MobileNetV2(**kwargs)


def resnet18(**kwargs) -> ResNet:
    return ResNet(BasicBlock, [2, 2, 2, 2], **kwargs)


def resnet50(**kwargs) -> ResNet:
    return ResNet(Bottleneck, [3, 4, 6, 3], **kwargs)


# torchvision's ImageNet-1k weights (IMAGENET1K_V1), for ``load_pretrained(model, "imagenet")``
IMAGENET_URLS = {
    "mobilenet_v2": "https://download.pytorch.org/models/mobilenet_v2-b0353104.pth",
    "resnet18": "https://download.pytorch.org/models/resnet18-f37072fd.pth",
    "resnet50": "https://download.pytorch.org/models/resnet50-0676ba61.pth",
}


def arch_name(model: MobileNetV2 | ResNet) -> str:
    """torchvision's name of the architecture: mobilenet_v2, resnet18 or resnet50."""
    if isinstance(model, MobileNetV2):
        return "mobilenet_v2"
    blocks = [len(layer) for layer in (model.layer1, model.layer2, model.layer3, model.layer4)]
    if isinstance(model.layer1[0], BasicBlock) and blocks == [2, 2, 2, 2]:
        return "resnet18"
    if isinstance(model.layer1[0], Bottleneck) and blocks == [3, 4, 6, 3]:
        return "resnet50"
    raise ValueError(f"no torchvision name for a ResNet of {type(model.layer1[0]).__name__} blocks {blocks}")


def _listing(keys, limit: int = 8) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_pretrained(model: MobileNetV2 | ResNet, path_or_state_dict: str | os.PathLike | Mapping, *,
                    strict: bool = True, part: str | None = None) -> MobileNetV2 | ResNet:
    """Load a torchvision-format checkpoint into ``model`` in place and return it.

    Accepts a file path, a state_dict, or ``"imagenet"``: torchvision's ImageNet weights for the
    model's architecture (``IMAGENET_URLS``), downloaded once into torch.hub's cache
    (``$TORCH_HOME/hub/checkpoints``) and checked against the hash in their file name; they fit
    only the full-width models (``glance_width=1``, ``local_width=64``, as in the paper config).
    A dict holding the state_dict under ``state_dict`` or ``model`` is unwrapped; when its keys hold a
    ``part`` (an AVGN checkpoint: ``part="local"`` for its local encoder, ``"visual"`` for its visual glance
    encoder), that submodule's keys are taken. Head keys are
    dropped when the model has no head; BN ``num_batches_tracked`` counters absent from old
    checkpoints keep the model's value. Any other missing or unexpected key (only when ``strict``)
    or any shape mismatch raises ``ValueError`` naming the source and the keys.
    """
    if isinstance(path_or_state_dict, Mapping):
        source, state = "<state_dict>", path_or_state_dict
    elif path_or_state_dict == "imagenet":
        source = IMAGENET_URLS[arch_name(model)]
        try:
            state = torch.hub.load_state_dict_from_url(source, map_location="cpu", check_hash=True, weights_only=True)
        except (OSError, RuntimeError) as e:  # no network, a partial download, a hash mismatch
            raise ValueError(f"{source}: could not fetch the ImageNet weights ({type(e).__name__}: {e})") from e
    else:
        source = os.fspath(path_or_state_dict)
        state = torch.load(source, map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(wrapper), Mapping):
            state = state[wrapper]
    if not isinstance(state, Mapping):
        raise ValueError(f"{source}: expected a state_dict, got {type(state).__name__}")
    prefix = f"{part}."
    if part is not None and any(isinstance(k, str) and k.startswith(prefix) for k in state):
        state = {k[len(prefix):]: v for k, v in state.items() if isinstance(k, str) and k.startswith(prefix)}

    own = model.state_dict()
    has_head = any(key.startswith(model.head_prefix) for key in own)
    state = {k: v for k, v in state.items() if has_head or not k.startswith(model.head_prefix)}
    for key in own.keys() - state.keys():
        if key.endswith("num_batches_tracked"):
            state[key] = own[key]
    missing = own.keys() - state.keys()
    unexpected = state.keys() - own.keys()
    mismatched = [f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in sorted(own.keys() & state.keys()) if state[k].shape != own[k].shape]
    problems = []
    if strict and missing:
        problems.append(f"missing keys: {_listing(missing)}")
    if strict and unexpected:
        problems.append(f"unexpected keys: {_listing(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches: {_listing(mismatched)}")
    if problems:
        raise ValueError(f"{source}: cannot load into {type(model).__name__}: " + "; ".join(problems))
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=strict)
    return model
