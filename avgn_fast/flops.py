"""GMACs per component and per video, counted with fvcore.

"GFLOPs" in the AdaFocus / FrameExit / AVGN literature are multiply-accumulates of conv, linear,
matmul and attention; BN, activations, pooling, sampling and elementwise ops are free. fvcore's
default table also counts norms, upsampling, adaptive pooling and grid_sample, so it is replaced
by an explicit one (``OP_HANDLES``): every aten op without a handle counts 0, and ops that do
multiply-accumulate work but have no handle, custom ops included, raise a warning instead.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from math import prod

import torch
from torch import nn

from avgn_fast.config import AVGNConfig
from avgn_fast.models.backbones import mobilenet_v2, resnet18, resnet50

with warnings.catch_warnings():
    # fvcore.nn scripts its loss functions on import, which recent torch reports as deprecated
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.* is deprecated", category=DeprecationWarning)
    from fvcore.nn import FlopCountAnalysis
    from fvcore.nn.jit_handles import (
        addmm_flop_jit,
        bmm_flop_jit,
        conv_flop_jit,
        einsum_flop_jit,
        get_shape,
        linear_flop_jit,
        matmul_flop_jit,
    )

__all__ = ["COMPONENTS", "OP_HANDLES", "Component", "ComponentFlops", "component_table", "count_gmacs", "total_gmacs"]


def _attention_macs(inputs, outputs) -> int:
    """q kᵀ plus p v for (..., Lq, E) queries against (..., Lk, E) keys and (..., Lk, Ev) values."""
    q, k, v = (get_shape(t) for t in inputs[:3])
    return prod(q[:-1]) * k[-2] * (q[-1] + v[-1])


def _baddbmm_macs(inputs, outputs) -> int:
    """Batched (N, M, K) @ (N, K, P); the added input is free."""
    n, m, kdim = get_shape(inputs[1])
    return n * m * kdim * get_shape(inputs[2])[-1]


# traced op name -> fvcore handle returning MACs (None: no MACs); a new custom op gets its row here
OP_HANDLES = {
    "aten::_convolution": conv_flop_jit,
    "aten::addmm": addmm_flop_jit,
    "aten::linear": linear_flop_jit,
    "aten::matmul": matmul_flop_jit,
    "aten::mm": matmul_flop_jit,
    "aten::bmm": bmm_flop_jit,
    "aten::einsum": einsum_flop_jit,
    "aten::scaled_dot_product_attention": _attention_macs,
    "avgn_fast::av_attention": _attention_macs,
    "aten::baddbmm": _baddbmm_macs,
    "avgn_fast::crop_patches": None,
}

# aten ops that do multiply-accumulate work but have no handle: a silent 0 for them would be wrong
_UNCOUNTED_MAC_OPS = {
    "aten::addbmm",
    "aten::_native_multi_head_attention",
    "aten::_transformer_encoder_layer_fwd",
    "aten::lstm",
    "aten::gru",
    "aten::rnn_tanh",
    "aten::rnn_relu",
}


def count_gmacs(module: nn.Module, *inputs: torch.Tensor) -> float:
    """Multiply-accumulates (in billions) of one eval-mode ``module(*inputs)`` call.

    Warns about custom or MAC-bearing ops that no handle counts, rather than counting them as 0.
    """
    was_training = module.training
    module.eval()
    # grad mode stays on: nn.MultiheadAttention then traces its plain path (linear + SDPA), not a fused op
    try:
        analysis = FlopCountAnalysis(module, inputs).clear_op_handles().set_op_handle(**OP_HANDLES)
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        total = analysis.total()
        uncounted = sorted(op for op in analysis.unsupported_ops() if not op.startswith("aten::")
                           or op in _UNCOUNTED_MAC_OPS)
    finally:
        module.train(was_training)
    if uncounted:
        warnings.warn(f"{type(module).__name__}: ops not counted (no FLOPs handle): {', '.join(uncounted)}",
                      stacklevel=2)
    return total / 1e9


@dataclass(frozen=True)
class ComponentFlops:
    """GMACs of one component for one unit (``per``), run ``count`` times per video."""

    name: str
    gmacs: float
    per: str
    count: int
    input_shapes: tuple[tuple[int, ...], ...] = ()
    in_total: bool = True  # False: a reference row (e.g. the dense baseline), not part of the model

    def __post_init__(self):
        if self.gmacs < 0 or self.count < 0:
            raise ValueError(f"{self.name}: gmacs and count must be non-negative, got {self.gmacs=} {self.count=}")
        if not self.per:
            raise ValueError(f"{self.name}: per must name a unit (video, frame, patch, ...)")

    @property
    def per_video(self) -> float:
        return self.gmacs * self.count


@dataclass(frozen=True)
class Component:
    """How to count one row: build the module and a batch-1 input for a config; ``count`` runs per video.

    A ``count`` of 0 leaves the row out (the component is not part of that configuration).
    """

    name: str
    per: str
    build: Callable[[AVGNConfig], nn.Module]
    inputs: Callable[[AVGNConfig], tuple[torch.Tensor, ...]]
    count: Callable[[AVGNConfig], int]
    in_total: Callable[[AVGNConfig], bool] = lambda config: True


def _local_encoder(config: AVGNConfig) -> nn.Module:
    factory = {"resnet18": resnet18, "resnet50": resnet50}[config.local_arch]
    return factory(width=config.local_width, num_classes=0)


def _image(size: int) -> tuple[torch.Tensor]:
    return (torch.randn(1, 3, size, size),)


def _mel(config: AVGNConfig) -> tuple[torch.Tensor]:
    n_steps = round(config.audio_window_s * 1000 / config.hop_ms)
    return (torch.randn(1, 1, config.n_mels, n_steps),)


COMPONENTS: list[Component] = [
    Component("visual glance encoder", "frame",
              lambda c: mobilenet_v2(width_mult=c.glance_width, num_classes=0),
              lambda c: _image(c.glance_size),
              lambda c: 0 if c.dense else c.num_frames),
    Component("audio encoder", "frame",
              lambda c: mobilenet_v2(width_mult=c.audio_width, in_channels=1, num_classes=0),
              _mel,
              lambda c: c.num_frames if c.audio and not c.dense else 0),
    Component("local encoder", "patch", _local_encoder, lambda c: _image(c.patch_size),
              lambda c: 0 if c.dense else c.k),
    Component("dense baseline (local encoder, full frame)", "frame", _local_encoder,
              lambda c: _image(c.frame_size), lambda c: c.num_frames, in_total=lambda c: c.dense),
]


def component_table(config: AVGNConfig, components: list[Component] | None = None) -> list[ComponentFlops]:
    """One row per component used by ``config`` (default: ``COMPONENTS``), batch 1, fixed-seed inputs."""
    rows = []
    for component in COMPONENTS if components is None else components:
        count = component.count(config)
        if count == 0:
            continue
        with torch.random.fork_rng():
            torch.manual_seed(0)
            module = component.build(config)
            inputs = component.inputs(config)
        rows.append(ComponentFlops(
            name=component.name,
            gmacs=count_gmacs(module, *inputs),
            per=component.per,
            count=count,
            input_shapes=tuple(tuple(t.shape[1:]) for t in inputs),
            in_total=component.in_total(config),
        ))
    return rows


def total_gmacs(rows: list[ComponentFlops]) -> float:
    """GMACs per video of the rows that belong to the model, every exit step taken."""
    return sum(row.per_video for row in rows if row.in_total)
