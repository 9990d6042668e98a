"""GMACs per component and per video, counted with fvcore on the instantiated model's components.

The one source of every cost figure: ``AVGN.cost()`` (what ``predict``, ``eval`` and the engine
report per video), ``avgn-fast flops`` and the Pareto sweep all sum ``component_table(model)``.

"GFLOPs" in the AdaFocus / FrameExit / AVGN literature are multiply-accumulates of conv, linear,
matmul and attention; BN, activations, pooling, sampling and elementwise ops are free. fvcore's
default table also counts norms, upsampling, adaptive pooling and grid_sample, so it is replaced
by an explicit one (``OP_HANDLES``): every aten op without a handle counts 0, and ops that do
multiply-accumulate work but have no handle, custom ops included, raise a warning instead.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from math import prod

import torch
from torch import nn

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

__all__ = ["OP_HANDLES", "ComponentFlops", "component_table", "count_gmacs", "video_and_step_gmacs"]


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
    """GMACs of one run of a component (one ``per``), run ``count`` times per video, or per step taken when
    ``per_step``."""

    name: str
    gmacs: float
    per: str
    count: int
    per_step: bool = False
    input_shapes: tuple[tuple[int, ...], ...] = ()

    def __post_init__(self):
        if self.gmacs < 0 or self.count < 0:
            raise ValueError(f"{self.name}: gmacs and count must be non-negative, got {self.gmacs=} {self.count=}")
        if not self.per:
            raise ValueError(f"{self.name}: per must name a unit (video, frame, patch, ...)")

    def per_video(self, steps: int) -> float:
        """GMACs this component spends on a video that takes ``steps`` steps."""
        return self.gmacs * self.count * (steps if self.per_step else 1)


def component_table(model: nn.Module) -> list[ComponentFlops]:
    """One row per component of the instantiated ``model`` (``model.components()``: name, module, batch-1
    example inputs, unit, runs per video or per step), each counted with ``count_gmacs``."""
    return [ComponentFlops(name=c.name, gmacs=count_gmacs(c.module, *c.inputs), per=c.per, count=c.count,
                           per_step=c.per_step, input_shapes=tuple(tuple(t.shape[1:]) for t in c.inputs))
            for c in model.components()]


def video_and_step_gmacs(rows: list[ComponentFlops]) -> tuple[float, float]:
    """(GMACs spent once per video, GMACs spent per step taken) of a component table."""
    return (sum((row.gmacs * row.count for row in rows if not row.per_step), 0.0),
            sum((row.gmacs * row.count for row in rows if row.per_step), 0.0))
