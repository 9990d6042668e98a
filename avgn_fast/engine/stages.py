"""The model's stages as modules with named tensor inputs and outputs, each compiled or exported alone.

One module per stage of ``avgn_fast.models.avgn.STAGES``: ``glance`` (visual and audio encoders on
B·T frames), ``avtest`` (saliency and the K kept frames: AV-TeST, uniform frames or all of them),
``aespa`` (patch locations of the kept frames: AESPA and the policy, the centre or a random draw),
``crop`` (the patches, one fused op), ``local`` (the local encoder on N patches), ``head`` (the part
norms and the step classifier on all K steps) and ``step_head`` (one step of them, for early exit).
Each calls ``AVGN.run_stage``, the one implementation, on a view of the model that holds only the
weights the stage uses, so a set of exported stages carries every weight of the inference path
and nothing else. A stage declares ``inputs`` and ``outputs`` (``AVGN.stage_io``), takes and
returns tensors only, and runs under autocast at its compute dtype, so eager, torch.compile,
torch.export, ONNX and TensorRT all see the same graph. Only ``glance`` can be empty (dense and
visual-only: nothing to glance at), and is then left out.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from avgn_fast.config import AVGNConfig
from avgn_fast.data.audio import frame_params
from avgn_fast.models.avgn import AVGN
from avgn_fast.models.backbones import inference_copy


class Stage(nn.Module):
    """Base of the stages: positional tensors in ``inputs`` order, a tuple in ``outputs`` order."""

    name: str = ""
    uses: tuple[str, ...] = ()  # the model's submodules this stage runs

    def __init__(self, model: AVGN, dtype: torch.dtype, k: int):
        super().__init__()
        self.model = inference_view(model, self.uses)
        self.dtype, self.k = dtype, k
        self.inputs, self.outputs = model.stage_io[self.name]

    def run(self, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """``AVGN.run_stage`` on the named inputs under autocast; each subclass's ``forward`` calls it.

        Every subclass has a ``forward`` of its own: torch.compile keeps its compiled graphs per
        code object, so one shared ``forward`` would make the stages share (and exhaust) one cache.
        """
        if len(args) != len(self.inputs):
            raise ValueError(f"stage {self.name} takes {self.inputs}, got {len(args)} tensors")
        with torch.autocast(args[0].device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            out = self.model.run_stage(self.name, dict(zip(self.inputs, args)), k=self.k)
        return tuple(out[name] for name in self.outputs)

    def extra_repr(self) -> str:
        return f"{self.inputs} -> {self.outputs}, dtype={self.dtype}"


class GlanceStage(Stage):
    """frames uint8 (B, T, 3, S, S), mel (B, T, n_mels, n_steps), audio_present (B,) → the glance features."""

    name = "glance"
    uses = ("visual", "audio_norm", "audio")

    def forward(self, *args):
        return self.run(args)


class AVTeSTStage(Stage):
    """Pooled visual (and audio) vectors → saliency (B, T) and the kept frames (B, K) in step order."""

    name = "avtest"
    uses = ("avtest",)

    def forward(self, *args):
        return self.run(args)


class AESPAStage(Stage):
    """Glance-map tokens (and audio) of the kept frames → patch locations (B, K, 2) in [0, 1]²."""

    name = "aespa"
    uses = ("aespa",)

    def forward(self, *args):
        return self.run(args)


class CropStage(Stage):
    """frames, rows (n,), kept (n, g), locations (n, g, 2) → normalized patches (n·g, 3, P, P) in the stage dtype.

    The engine runs it eagerly (a fused op; its inputs are not batch-aligned, so it is never padded).
    """

    name = "crop"

    def forward(self, *args):
        return self.run(args)


class LocalStage(Stage):
    """Patches (N, 3, P, P), normalized → local features (N, C_local)."""

    name = "local"
    uses = ("local",)

    def forward(self, *args):
        return self.run(args)


class HeadStage(Stage):
    """Pooled glance vectors (B, T, ·), kept (B, K), local (B, K, C_local) → logits (B, K, C) after every step."""

    name = "head"
    uses = ("part_norms", "classifier")

    def forward(self, *args):
        return self.run(args)


class StepHeadStage(Stage):
    """One classifier step for the videos still in: as ``head`` for their step's frame (kept (N, 1), local
    (N, 1, C_local)), with running (N, hidden) float32 (−inf before the first step) and step, an int64
    scalar → logits (N, C) and the next running max."""

    name = "step_head"
    uses = ("part_norms", "classifier")

    def forward(self, *args):
        return self.run(args)


FOLDED = ("visual", "audio", "local")  # the conv backbones: each stage runs an ``inference_copy`` of them


def inference_view(model: AVGN, keep: tuple[str, ...]) -> AVGN:
    """The model with only the submodules in ``keep``; the others become empty placeholders.

    A stage then carries (and exports) only the weights it uses, while the model's ``is not None``
    checks, which encode its configuration, still hold. The conv backbones it keeps are copies with
    their batch norms folded into the convs (in eval mode, 20 % of the tiny model's CPU time went to the
    norms) and their 1×1 convs run as matrix products on small CPU maps (``inference_copy``); every other
    tensor is shared with ``model``. A stage built from
    a model therefore keeps the backbones' weights of that moment: build a new engine after training on.
    The training-only auxiliary heads are always dropped (``ExportedProgram.module()`` also cannot
    rebuild a module whose submodule path holds the keyword ``global``, one of their names).
    """
    modules = {}
    for name, m in model._modules.items():
        if name == "aux_heads":
            continue
        if m is not None and name not in keep:
            m = nn.Module()
        elif m is not None and name in FOLDED:
            m = inference_copy(m)
        modules[name] = m
    view = copy.copy(model)
    view._modules = modules
    return view


STAGE_TYPES = (GlanceStage, AVTeSTStage, AESPAStage, CropStage, LocalStage, HeadStage, StepHeadStage)


def build_stages(model: AVGN, dtype: torch.dtype, k: int) -> dict[str, Stage]:
    """The stages of this model's configuration by name, in pipeline order (``glance`` left out when empty)."""
    stages = (kind(model, dtype, k) for kind in STAGE_TYPES)
    return {stage.name: stage.eval() for stage in stages if stage.outputs}


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
