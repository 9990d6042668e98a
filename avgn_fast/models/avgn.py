"""The Audio-Visual Glance Network: glance at every frame and its sound, then look closely at a few patches."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from avgn_fast.config import AVGNConfig
from avgn_fast.data.audio import frame_params
from avgn_fast.models import ops
from avgn_fast.models.aespa import AESPA
from avgn_fast.models.avtest import AVTeST, top_k_frames, uniform_frames
from avgn_fast.models.backbones import mobilenet_v2, resnet18, resnet50
from avgn_fast.models.classifier import StepClassifier, exit_steps

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# last torchvision MobileNetV2 ``features`` index at each output stride (stride 32 is the final map)
_MOBILENET_STAGE_END = {8: 6, 16: 13, 32: 18}
_COSTS: dict[AVGNConfig, Cost] = {}  # cost depends on the configuration only


@dataclass(frozen=True)
class Cost:
    """GMACs of one video: ``per_video`` once (glance, audio, AV-TeST), then ``per_step`` for each step taken."""

    per_video: float
    per_step: float

    def gmacs(self, steps_taken: torch.Tensor) -> torch.Tensor:
        """(B,) GMACs for ``steps_taken`` (B,) steps per video."""
        return self.per_video + self.per_step * steps_taken.to(torch.float32)


@dataclass
class GlanceFeatures:
    """What the glance stage computes for all T frames (``None`` where the configuration has no such part).

    tokens (B, T, h·w, C_tok): glance-map positions for AESPA; visual (B, T, C_v): pooled glance vector;
    audio_tokens (B, T, La, C_a) and audio (B, T, C_a), zero for videos without audio; audio_present (B,).
    """

    tokens: torch.Tensor | None
    visual: torch.Tensor | None
    audio_tokens: torch.Tensor | None
    audio: torch.Tensor | None
    audio_present: torch.Tensor


@dataclass
class GlanceResult:
    """Per-video outputs of ``AVGN.glance`` for a batch of B videos, K steps, C classes.

    logits/probs (B, K, C): after each step, frames in saliency order; exit_step (B,) int64: the
    first step whose top probability passed the threshold, else K − 1; final_logits (B, C): the
    logits at the exit; saliency (B, T) (zeros without AV-TeST); kept (B, K) int64 frame indices in
    step order; boxes (B, K, 4) float (y0, x0, y1, x1) in frame pixels; gflops (B,): GMACs spent.
    """

    logits: torch.Tensor
    probs: torch.Tensor
    exit_step: torch.Tensor
    final_logits: torch.Tensor
    saliency: torch.Tensor
    kept: torch.Tensor
    boxes: torch.Tensor
    gflops: torch.Tensor

    def __post_init__(self):
        if self.logits.dim() != 3 or self.probs.shape != self.logits.shape:
            raise ValueError(f"logits and probs must be equal (B, K, C), got {self.logits.shape=} {self.probs.shape=}")
        b, k, c = self.logits.shape
        expected = {"exit_step": (b,), "final_logits": (b, c), "kept": (b, k), "boxes": (b, k, 4), "gflops": (b,)}
        for name, shape in expected.items():
            if tuple(getattr(self, name).shape) != shape:
                raise ValueError(f"{name} must have shape {shape}, got {getattr(self, name).shape}")
        if self.saliency.dim() != 2 or self.saliency.shape[0] != b:
            raise ValueError(f"saliency must be (B={b}, T), got {self.saliency.shape=}")
        for name in ("exit_step", "kept"):
            if getattr(self, name).dtype != torch.int64:
                raise ValueError(f"{name} must be int64, got {getattr(self, name).dtype}")
        if b and (int(self.exit_step.min()) < 0 or int(self.exit_step.max()) >= k):
            raise ValueError(f"exit_step must lie in [0, {k}), got {self.exit_step.tolist()}")

    @property
    def prediction(self) -> torch.Tensor:
        """(B,) int64 class index at the exit."""
        return self.final_logits.argmax(-1)

    def __repr__(self) -> str:
        shapes = ", ".join(f"{name}={tuple(getattr(self, name).shape)}" for name in
                           ("logits", "exit_step", "final_logits", "saliency", "kept", "boxes", "gflops"))
        return f"GlanceResult({shapes})"


def _grid(size: int, stride: int) -> int:
    """Output size of ``log2(stride)`` stride-2, padding-1, 3×3 convolutions on ``size`` pixels."""
    for _ in range(int(math.log2(stride))):
        size = (size + 1) // 2
    return size


class AVGN(nn.Module):
    """Audio-Visual Glance Network built from an ``AVGNConfig`` (see DESIGN.md's data flow).

    Inputs: frames uint8 (B, T, 3, S, S), mel float (B, T, n_mels, n_steps), optional
    audio_present (B,) bool. The baseline switches of the config decide which parts exist:
    ``audio=False`` drops the audio encoder (visual-only AV-TeST and AESPA), ``temporal="uniform"``
    replaces AV-TeST by K uniformly spaced frames, ``spatial="center"|"random"`` replaces AESPA and
    the policy, and ``dense=True`` runs the local encoder on all T full frames without a glance.
    """

    def __init__(self, config: AVGNConfig):
        super().__init__()
        c = self.config = config
        self.steps = c.num_frames if c.dense else c.k
        self.mel_steps = frame_params(c.sample_rate, window_s=c.audio_window_s, win_ms=c.win_ms,
                                      hop_ms=c.hop_ms).n_steps
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN) * 255, persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD) * 255, persistent=False)
        self._cost: Cost | None = None

        self.visual = None if c.dense else mobilenet_v2(width_mult=c.glance_width, num_classes=0)
        if c.audio:
            self.audio_norm = nn.BatchNorm2d(1)
            self.audio = mobilenet_v2(width_mult=c.audio_width, in_channels=1, num_classes=0)
        else:
            self.audio_norm = self.audio = None
        local = {"resnet18": resnet18, "resnet50": resnet50}[c.local_arch]
        self.local = local(width=c.local_width, num_classes=0)

        audio_dim = self.audio.out_channels if self.audio is not None else 0
        visual_dim = self.visual.out_channels if self.visual is not None else 0
        self.avtest = None
        self.aespa = None
        if not c.dense and c.temporal == "avtest":
            self.avtest = AVTeST(visual_dim, audio_dim, c.num_frames, c.avtest_dim, c.avtest_layers,
                                 c.avtest_heads)
        if not c.dense and c.spatial == "policy":
            self.token_layer = _MOBILENET_STAGE_END[c.glance_token_stride]
            tap = self.visual.features[self.token_layer]
            token_channels = [m for m in tap.modules() if isinstance(m, nn.Conv2d)][-1].out_channels
            grid = _grid(c.glance_size, c.glance_token_stride)
            audio_tokens = _grid(c.n_mels, 32) * _grid(self.mel_steps, 32)
            self.aespa = AESPA(token_channels, (grid, grid), audio_dim or visual_dim, c.aespa_dim, c.aespa_heads,
                               audio_channels=audio_dim, audio_tokens=audio_tokens)

        # each part of a step's features is layer-normalized before fusion, so the narrow local vector
        # is not drowned by the wide glance vectors
        parts = [d for d in (audio_dim, visual_dim, self.local.out_channels) if d]
        self.part_norms = nn.ModuleList(nn.LayerNorm(d) for d in parts)
        fused_dim = sum(parts)
        self.classifier = StepClassifier(fused_dim, c.fusion_dim, c.num_classes, self.steps)
        # auxiliary heads, used only by the training losses
        aux = {"local": self.local.out_channels}
        if audio_dim:
            aux["audio"] = audio_dim
        if visual_dim:
            aux["global"] = visual_dim
        self.aux_heads = nn.ModuleDict({name: nn.Linear(dim, c.num_classes) for name, dim in aux.items()})
        # channels-last convolutions are markedly faster on CPU (oneDNN) and on GPU tensor cores
        self.to(memory_format=torch.channels_last)

    # --- stages -----------------------------------------------------------------------------------

    def check_inputs(self, frames, mel, audio_present=None):
        """Raise ValueError unless the inputs match the config; returns audio_present (B,) bool."""
        c = self.config
        s, t = c.frame_size, c.num_frames
        if frames.dim() != 5 or frames.dtype != torch.uint8 or tuple(frames.shape[1:]) != (t, 3, s, s):
            raise ValueError(f"frames must be uint8 (B, {t}, 3, {s}, {s}), got {frames.shape=} {frames.dtype=}")
        b = frames.shape[0]
        if tuple(mel.shape) != (b, t, c.n_mels, self.mel_steps) or not mel.is_floating_point():
            raise ValueError(f"mel must be float ({b}, {t}, {c.n_mels}, {self.mel_steps}), got {mel.shape=} "
                             f"{mel.dtype=}")
        if audio_present is None:
            return torch.ones(b, dtype=torch.bool, device=frames.device)
        if tuple(audio_present.shape) != (b,) or audio_present.dtype != torch.bool:
            raise ValueError(f"audio_present must be bool ({b},), got {audio_present.shape=} {audio_present.dtype=}")
        return audio_present

    def encode(self, frames, mel, audio_present) -> GlanceFeatures:
        """Glance encoders on all T frames (visual at G, audio on the log-mel)."""
        b, t = frames.shape[:2]
        tokens = visual = audio_tokens = audio = None
        if self.visual is not None:
            x = frames.flatten(0, 1).float()
            if self.config.glance_size != self.config.frame_size:
                x = F.interpolate(x, size=(self.config.glance_size,) * 2, mode="area")
            x = (x - self.pixel_mean.view(1, 3, 1, 1)) / self.pixel_std.view(1, 3, 1, 1)
            x = x.contiguous(memory_format=torch.channels_last)
            for i, layer in enumerate(self.visual.features):
                x = layer(x)
                if self.aespa is not None and i == self.token_layer:
                    tokens = x.flatten(2).transpose(1, 2).reshape(b, t, -1, x.shape[1])
            visual = x.mean((2, 3)).view(b, t, -1)
        if self.audio is not None:
            audio_tokens, audio = self.encode_audio(mel, audio_present)
        return GlanceFeatures(tokens, visual, audio_tokens, audio, audio_present)

    def encode_audio(self, mel, audio_present):
        """Audio encoder on every frame's log-mel → tokens (B, T, La, C_a) and pooled (B, T, C_a), 0 without audio."""
        b, t = mel.shape[:2]
        present = audio_present.to(mel.dtype).view(b, 1, 1, 1)
        # spectral mean normalization per video: the stationary background spectrum is removed
        mel = mel - mel.mean(dim=(1, 3), keepdim=True)
        x = self.audio_norm(mel.flatten(0, 1)[:, None]).contiguous(memory_format=torch.channels_last)
        fmap, pooled = self.audio(x)
        tokens = fmap.flatten(2).transpose(1, 2).reshape(b, t, -1, fmap.shape[1]) * present
        return tokens, pooled.view(b, t, -1) * present.view(b, 1, 1)

    def saliency(self, feats: GlanceFeatures) -> torch.Tensor:
        """(B, T) saliency per frame from AV-TeST; zeros when the configuration has none."""
        if self.avtest is None:
            b = feats.audio_present.shape[0]
            return torch.zeros(b, self.config.num_frames, device=feats.audio_present.device)
        return self.avtest(feats.visual, feats.audio, feats.audio_present)

    def select(self, saliency: torch.Tensor, k: int) -> torch.Tensor:
        """(B, k) int64 frames in step order: top-k by saliency, K uniform frames, or all T for dense."""
        b, t = saliency.shape
        if self.config.dense:
            return torch.arange(k, device=saliency.device).expand(b, k).contiguous()
        if self.avtest is None:
            return uniform_frames(t, k, b, saliency.device)
        return top_k_frames(saliency, k)

    def locate(self, feats: GlanceFeatures, kept: torch.Tensor) -> torch.Tensor:
        """Patch centres a (B, k, 2) in [0, 1] ((ay, ax); corner = a·(S − P)) for the kept frames."""
        b, k = kept.shape
        c = self.config
        if c.dense or c.spatial == "center":
            return torch.full((b, k, 2), 0.5, device=kept.device)
        if c.spatial == "random":
            return torch.rand(b, k, 2, device=kept.device)
        tokens = gather_frames(feats.tokens, kept).flatten(0, 1)
        present = feats.audio_present[:, None].expand(b, k).flatten()
        if self.audio is not None:
            query = gather_frames(feats.audio, kept).flatten(0, 1)
            audio_tokens = gather_frames(feats.audio_tokens, kept).flatten(0, 1)
        else:
            query, audio_tokens = gather_frames(feats.visual, kept).flatten(0, 1), None
        a, _ = self.aespa(tokens, query, audio_tokens, present)
        return a.view(b, k, 2)

    def patch_size(self) -> int:
        return self.config.frame_size if self.config.dense else self.config.patch_size

    def centers(self, a: torch.Tensor) -> torch.Tensor:
        """Patch centres in frame pixels (..., 2) (cy, cx) from a ∈ [0, 1]²: corner a·(S − P) plus P/2."""
        p = self.patch_size()
        return a * (self.config.frame_size - p) + p / 2

    def boxes(self, a: torch.Tensor) -> torch.Tensor:
        """(…, 4) patch boxes (y0, x0, y1, x1) in frame pixels."""
        centers = self.centers(a)
        half = self.patch_size() / 2
        return torch.cat([centers - half, centers + half], dim=-1)

    def crop(self, frames: torch.Tensor, kept: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """Normalized float32 channels-last patches (B·k, 3, P, P) of the kept frames at centres ``a``."""
        b, t = frames.shape[:2]
        index = (torch.arange(b, device=kept.device)[:, None] * t + kept).flatten()
        return ops.crop_patches(frames.flatten(0, 1), self.centers(a).flatten(0, 1), self.patch_size(), index=index,
                                mean=self.pixel_mean, std=self.pixel_std, out_dtype=torch.float32,
                                channels_last=True)

    def local_features(self, patches: torch.Tensor, b: int) -> torch.Tensor:
        """Local encoder on (B·k, 3, P, P) patches → (B, k, C_local)."""
        return self.local(patches)[1].view(b, -1, self.local.out_channels)

    def step_features(self, feats: GlanceFeatures, kept: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        """(B, k, fused_dim): per kept frame [audio; global; local]."""
        parts = [gather_frames(x, kept) for x in (feats.audio, feats.visual) if x is not None]
        return torch.cat([norm(x) for norm, x in zip(self.part_norms, [*parts, local], strict=True)], dim=-1)

    # --- inference --------------------------------------------------------------------------------

    def forward(self, frames, mel, audio_present=None, k: int | None = None):
        """Returns logits (B, k, C) per step, saliency (B, T), kept frames (B, k), patch boxes (B, k, 4)."""
        k = self.steps if k is None else k
        if not 1 <= k <= self.steps:
            raise ValueError(f"k must be in [1, {self.steps}] for this model, got {k}")
        audio_present = self.check_inputs(frames, mel, audio_present)
        feats = self.encode(frames, mel, audio_present)
        saliency = self.saliency(feats)
        kept = self.select(saliency, k)
        a = self.locate(feats, kept)
        local = self.local_features(self.crop(frames, kept, a), frames.shape[0])
        logits = self.classifier(self.step_features(feats, kept, local))
        return logits, saliency, kept, self.boxes(a)

    @torch.no_grad()
    def glance(self, frames, mel, *, audio_present=None, k: int | None = None,
               exit_threshold: float | None = None) -> GlanceResult:
        """Classify a batch with early exit (no gradients).

        All k steps are computed; each video exits at the first step whose top probability is
        ≥ ``exit_threshold`` (default: the config's; None = the last step), and its GMACs count the
        glance plus the steps up to that exit.
        """
        logits, saliency, kept, boxes = self(frames, mel, audio_present, k)
        probs = logits.float().softmax(-1)
        threshold = self.config.exit_threshold if exit_threshold is None else exit_threshold
        exit_step = exit_steps(probs, threshold)
        final = logits[torch.arange(logits.shape[0], device=logits.device), exit_step]
        gflops = self.cost().gmacs(exit_step + 1).to(logits.device)
        return GlanceResult(logits, probs, exit_step, final, saliency, kept, boxes, gflops)

    def cost(self) -> Cost:
        """GMACs per video and per step, counted with fvcore on batch-1 inputs once per configuration."""
        if self._cost is None:
            self._cost = _COSTS.get(self.config) or self._count_cost()
            _COSTS[self.config] = self._cost
        return self._cost

    def _count_cost(self) -> Cost:
        from avgn_fast.flops import count_gmacs

        c = self.config
        param = next(self.parameters())
        gen, t = torch.Generator().manual_seed(0), c.num_frames

        def rand(*shape):  # a private generator: counting must not move the global RNG
            return torch.randn(*shape, generator=gen).to(param.device, param.dtype)

        per_video = per_step = 0.0
        if self.visual is not None:
            per_video += count_gmacs(self.visual, rand(t, 3, c.glance_size, c.glance_size))
        if self.audio is not None:
            per_video += count_gmacs(self.audio, rand(t, 1, c.n_mels, self.mel_steps))
        audio_dim = self.audio.out_channels if self.audio is not None else 0
        if self.avtest is not None:
            inputs = [rand(1, t, self.visual.out_channels)] + ([rand(1, t, audio_dim)] if audio_dim else [])
            per_video += count_gmacs(self.avtest, *inputs)
        if self.aespa is not None:
            positions = self.aespa.visual_pos.shape[0]
            tokens = rand(1, positions, self.aespa.visual_proj.in_features)
            query = rand(1, self.aespa.query[1].in_features)
            extra = [rand(1, self.aespa.audio_pos.shape[0], audio_dim)] if audio_dim else []
            per_step += count_gmacs(self.aespa, tokens, query, *extra)
        p = self.patch_size()
        per_step += count_gmacs(self.local, rand(1, 3, p, p))
        per_step += count_gmacs(self.classifier.fuse, rand(1, self.classifier.fuse[0].in_features))
        per_step += count_gmacs(self.classifier.heads[0], rand(1, c.fusion_dim))
        return Cost(per_video, per_step)

    def save(self, path, *, class_names, metrics: dict | None = None) -> None:
        """Write one checkpoint file (see ``avgn_fast.checkpoint``)."""
        from avgn_fast.checkpoint import save_checkpoint

        save_checkpoint(path, self, class_names=class_names, metrics=metrics)


def gather_frames(x: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """x (B, T, ...) → (B, k, ...) at the kept frame indices (B, k)."""
    index = kept.view(*kept.shape, *([1] * (x.dim() - 2))).expand(*kept.shape, *x.shape[2:])
    return x.gather(1, index)
