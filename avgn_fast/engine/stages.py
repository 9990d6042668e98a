"""The AVGN inference path cut into stages with named tensor inputs and outputs, each compiled or exported alone.

A stage is a small ``nn.Module`` over the model's own stage methods: ``glance`` (visual and audio
encoders on B·T frames), ``avtest`` (saliency and the K kept frames), ``aespa`` (patch centres of
the kept frames), ``local`` (the local encoder on N patches), ``head`` (the step classifier on all
K steps) and ``step_head`` (one step of it, for early exit). Each declares ``inputs`` and
``outputs`` as names, takes and returns tensors only, and runs under autocast at its compute
dtype, so eager, torch.compile, torch.export, ONNX and TensorRT all see the same graph. Parts a
configuration lacks have no stage: ``build_stages`` leaves them out, and the engine computes them
eagerly (they are a constant or a random draw). The patch crop is no stage: it is one fused op.
"""

from __future__ import annotations

import abc
import copy

import torch
from torch import nn

from avgn_fast.config import AVGNConfig
from avgn_fast.data.audio import frame_params
from avgn_fast.models.avgn import AVGN, GlanceFeatures


class Stage(nn.Module, abc.ABC):
    """Base of the stages: positional tensors in ``inputs`` order, a tuple in ``outputs`` order."""

    name: str = ""
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    uses: tuple[str, ...] = ()  # the model's submodules this stage runs

    def __init__(self, model: AVGN, dtype: torch.dtype):
        super().__init__()
        self.model = inference_view(model, self.uses)
        self.dtype = dtype

    def run(self, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """``compute`` on the named inputs under autocast; each subclass's ``forward`` calls it.

        Every subclass has a ``forward`` of its own: torch.compile keeps its compiled graphs per
        code object, so one shared ``forward`` would make the stages share (and exhaust) one cache.
        """
        if len(args) != len(self.inputs):
            raise ValueError(f"stage {self.name} takes {self.inputs}, got {len(args)} tensors")
        with torch.autocast(args[0].device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            return self.compute(**dict(zip(self.inputs, args)))

    @abc.abstractmethod
    def compute(self, **tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The stage's work on its named inputs, in ``outputs`` order."""

    def extra_repr(self) -> str:
        return f"{self.inputs} -> {self.outputs}, dtype={self.dtype}"


class GlanceStage(Stage):
    """frames uint8 (B, T, 3, S, S), mel (B, T, n_mels, n_steps), audio_present (B,) → the glance features."""

    name = "glance"
    inputs = ("frames", "mel", "audio_present")
    uses = ("visual", "audio_norm", "audio")

    def __init__(self, model: AVGN, dtype: torch.dtype):
        super().__init__(model, dtype)
        parts = []
        if model.aespa is not None:
            parts.append("tokens")
        if model.visual is not None:
            parts.append("visual")
        if model.audio is not None:
            parts += ["audio_tokens", "audio"]
        self.outputs = tuple(parts)

    def forward(self, *args):
        return self.run(args)

    def compute(self, frames, mel, audio_present):
        feats = self.model.encode(frames, mel, audio_present)
        return tuple(getattr(feats, name) for name in self.outputs)


class AVTeSTStage(Stage):
    """Pooled visual (and audio) vectors → saliency (B, T) and the kept frames (B, K) in step order."""

    name = "avtest"
    outputs = ("saliency", "kept")
    uses = ("avtest",)

    def __init__(self, model: AVGN, dtype: torch.dtype, k: int):
        super().__init__(model, dtype)
        self.k = k
        self.inputs = ("visual", "audio", "audio_present") if model.audio is not None else ("visual",)

    def forward(self, *args):
        return self.run(args)

    def compute(self, visual, audio=None, audio_present=None):
        present = audio_present if audio_present is not None else _all_present(visual)
        saliency = self.model.saliency(GlanceFeatures(None, visual, None, audio, present))
        return saliency, self.model.select(saliency, self.k)


class AESPAStage(Stage):
    """Glance-map tokens (and audio) of the kept frames → patch centres a (B, K, 2) in [0, 1]."""

    name = "aespa"
    outputs = ("a",)
    uses = ("aespa",)

    def __init__(self, model: AVGN, dtype: torch.dtype):
        super().__init__(model, dtype)
        audio = model.audio is not None
        self.inputs = ("tokens", "audio", "audio_tokens", "kept", "audio_present") if audio else \
            ("tokens", "visual", "kept")

    def forward(self, *args):
        return self.run(args)

    def compute(self, tokens, kept, visual=None, audio=None, audio_tokens=None, audio_present=None):
        present = audio_present if audio_present is not None else _all_present(tokens)
        return (self.model.locate(GlanceFeatures(tokens, visual, audio_tokens, audio, present), kept),)


class LocalStage(Stage):
    """Patches (N, 3, P, P), normalized → local features (N, C_local)."""

    name = "local"
    inputs = ("patches",)
    outputs = ("local",)
    uses = ("local",)

    def forward(self, *args):
        return self.run(args)

    def compute(self, patches):
        return (self.model.local(patches)[1],)


class HeadStage(Stage):
    """Per-step features (B, K, fused_dim) → logits (B, K, C) after every step, as ``model.classifier``."""

    name = "head"
    inputs = ("features",)
    outputs = ("logits",)
    uses = ("classifier",)

    def forward(self, *args):
        return self.run(args)

    def compute(self, features):
        return (self.model.classifier(features),)


class StepHeadStage(Stage):
    """One classifier step for the videos still in: fused features, the running max, that step's exit head.

    features (N, fused_dim), running (N, hidden) float32 (−inf before the first step), step: int64
    scalar → logits (N, C) and the next running max. The exit heads are stacked, so one graph serves
    every step.
    """

    name = "step_head"
    inputs = ("features", "running", "step")
    outputs = ("logits", "next_running")
    uses = ("classifier",)

    def __init__(self, model: AVGN, dtype: torch.dtype):
        super().__init__(model, dtype)
        heads = model.classifier.heads
        self.register_buffer("weight", torch.stack([h.weight.detach() for h in heads]), persistent=False)
        self.register_buffer("bias", torch.stack([h.bias.detach() for h in heads]), persistent=False)

    def forward(self, *args):
        return self.run(args)

    def compute(self, features, running, step):
        # the fused vector is ≥ 0 (ReLU) and the max is exact, so the float32 running max loses nothing
        running = torch.maximum(running, self.model.classifier.fuse(features).float())
        # index_select, not indexing: it keeps the picked weight 2-D for every exporter
        pick = step.reshape(1)
        weight, bias = self.weight.index_select(0, pick)[0], self.bias.index_select(0, pick)[0]
        return nn.functional.linear(running, weight, bias), running


def _all_present(like: torch.Tensor) -> torch.Tensor:
    return torch.ones(like.shape[0], dtype=torch.bool, device=like.device)


def inference_view(model: AVGN, keep: tuple[str, ...]) -> AVGN:
    """The model with only the submodules in ``keep``; the others become empty placeholders.

    Every tensor is shared with ``model``. A stage then carries (and exports) only the weights it
    uses, while the model's ``is not None`` checks, which encode its configuration, still hold. The
    training-only auxiliary heads are always dropped (``ExportedProgram.module()`` also cannot
    rebuild a module whose submodule path holds the keyword ``global``, one of their names).
    """
    view = copy.copy(model)
    view._modules = {name: m if name in keep or m is None else nn.Module()
                     for name, m in model._modules.items() if name != "aux_heads"}
    return view


def build_stages(model: AVGN, dtype: torch.dtype, k: int) -> dict[str, Stage]:
    """The stages this model's configuration has, by name, in pipeline order."""
    stages: list[Stage] = []
    glance = GlanceStage(model, dtype)
    if glance.outputs:
        stages.append(glance)
    if model.avtest is not None:
        stages.append(AVTeSTStage(model, dtype, k))
    if model.aespa is not None:
        stages.append(AESPAStage(model, dtype))
    stages += [LocalStage(model, dtype), HeadStage(model, dtype), StepHeadStage(model, dtype)]
    return {stage.name: stage.eval() for stage in stages}


def random_inputs(config: AVGNConfig, batch: int, device=None, *, seed: int = 0):
    """Random decoded clips for ``config``: frames uint8 (B, T, 3, S, S), log-mel-like mel, audio_present (B,)."""
    g = torch.Generator().manual_seed(seed)
    t, s = config.num_frames, config.frame_size
    steps = frame_params(config.sample_rate, window_s=config.audio_window_s, win_ms=config.win_ms,
                         hop_ms=config.hop_ms).n_steps
    frames = torch.randint(0, 256, (batch, t, 3, s, s), dtype=torch.uint8, generator=g)
    mel = torch.randn(batch, t, config.n_mels, steps, generator=g) * 3 - 4
    present = torch.ones(batch, dtype=torch.bool)
    return frames.to(device), mel.to(device), present.to(device)
