"""The Audio-Visual Glance Network: glance at every frame and its sound, then look closely at a few patches."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from avgn_fast.config import FROM_CHECKPOINT, AVGNConfig, InferenceSettings
from avgn_fast.data.audio import frame_params
from avgn_fast.models import ops
from avgn_fast.models.aespa import AESPA
from avgn_fast.models.avtest import AVTeST, top_k_frames, uniform_frames
from avgn_fast.models.backbones import mobilenet_v2, resnet18, resnet50
from avgn_fast.models.classifier import StepClassifier, exit_steps
from avgn_fast.models.outputs import Component, Cost, ForwardOutput, GlanceFeatures, GlanceResult
from avgn_fast.models.resize import area_resize

__all__ = ["AVGN", "STAGES", "Component", "Cost", "ForwardOutput", "GlanceFeatures", "GlanceResult", "RunStage",
           "gather_frames"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# last torchvision MobileNetV2 ``features`` index at each output stride (stride 32 is the final map)
_MOBILENET_STAGE_END = {8: 6, 16: 13, 32: 18}
_TABLES: dict[AVGNConfig, list] = {}  # the component GMACs of each configuration, counted once

# the inference path in order; each stage takes and returns named tensors (``AVGN.stage_io``)
STAGES = ("glance", "avtest", "aespa", "crop", "local", "head", "step_head")
# runs one stage: (stage name, named tensors holding at least its inputs) → its named outputs
RunStage = Callable[[str, dict], dict]


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
    the policy, ``dense=True`` runs the local encoder on all T full frames without a glance, and
    ``visual=False`` keeps only the audio encoder and the classifier (K uniform frames, no patches).

    The inference path is one list of stages (``STAGES``, ``stage_io``, ``run_stage``) and one
    forward over them; training, evaluation and the engine all run that forward.
    """

    def __init__(self, config: AVGNConfig):
        super().__init__()
        c = self.config = config
        self.steps = c.steps
        self.mel_steps = frame_params(c.sample_rate, window_s=c.audio_window_s, win_ms=c.win_ms,
                                      hop_ms=c.hop_ms).n_steps
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN) * 255, persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD) * 255, persistent=False)

        self.visual = None if c.dense or not c.visual else mobilenet_v2(width_mult=c.glance_width, num_classes=0)
        if c.audio:
            self.audio_norm = nn.BatchNorm2d(1)
            self.audio = mobilenet_v2(width_mult=c.audio_width, in_channels=1, num_classes=0)
        else:
            self.audio_norm = self.audio = None
        local = {"resnet18": resnet18, "resnet50": resnet50}[c.local_arch]
        self.local = local(width=c.local_width, num_classes=0) if c.visual else None

        audio_dim = self.audio.out_channels if self.audio is not None else 0
        visual_dim = self.visual.out_channels if self.visual is not None else 0
        local_dim = self.local.out_channels if self.local is not None else 0
        self.avtest = None
        self.aespa = None
        if self.visual is not None and c.temporal == "avtest":
            self.avtest = AVTeST(visual_dim, audio_dim, c.num_frames, c.avtest_dim, c.avtest_layers,
                                 c.avtest_heads)
        if self.visual is not None and c.spatial == "policy":
            self.token_layer = _MOBILENET_STAGE_END[c.glance_token_stride]
            tap = self.visual.features[self.token_layer]
            token_channels = [m for m in tap.modules() if isinstance(m, nn.Conv2d)][-1].out_channels
            grid = _grid(c.glance_size, c.glance_token_stride)
            audio_tokens = _grid(c.n_mels, 32) * _grid(self.mel_steps, 32)
            self.aespa = AESPA(token_channels, (grid, grid), audio_dim or visual_dim, c.aespa_dim, c.aespa_heads,
                               audio_channels=audio_dim, audio_tokens=audio_tokens)

        # each part of a step's features is layer-normalized before fusion, so the narrow local vector
        # is not drowned by the wide glance vectors
        parts = [d for d in (audio_dim, visual_dim, local_dim) if d]
        self.part_norms = nn.ModuleList(nn.LayerNorm(d) for d in parts)
        fused_dim = sum(parts)
        self.classifier = StepClassifier(fused_dim, c.fusion_dim, c.num_classes, self.steps)
        # auxiliary heads, used only by the training losses
        aux = {"local": local_dim} if local_dim else {}
        if audio_dim:
            aux["audio"] = audio_dim
        if visual_dim:
            aux["global"] = visual_dim
        self.aux_heads = nn.ModuleDict({name: nn.Linear(dim, c.num_classes) for name, dim in aux.items()})
        self.stage_io = self._stage_io()
        # channels-last convolutions are markedly faster on CPU (oneDNN) and on GPU tensor cores
        self.to(memory_format=torch.channels_last)

    # --- the forward, stage by stage ----------------------------------------------------------------

    def forward(self, frames, mel, audio_present=None, *, k: int | None = None, run: RunStage | None = None,
                detach_audio: bool = False, crop_gradient: float = 1.0) -> ForwardOutput:
        """Every stage on every video, all k steps (default K) → the intermediates (``ForwardOutput``).

        ``run`` calls the stages (default: ``run_stage``, eager; the engine passes its compiled
        ones). Training hooks, which leave the values unchanged: ``detach_audio`` makes AV-TeST and
        AESPA read the audio features detached; ``crop_gradient`` scales the gradient that reaches
        the patch locations through the differentiable crop (0: none).
        """
        k = InferenceSettings(k=k).steps(self.config)
        audio_present = self.check_inputs(frames, mel, audio_present)
        run = run or (lambda name, env: self.run_stage(name, env, k=k))  # eager, here
        env = self.look(frames, mel, audio_present, run=run, detach_audio=detach_audio)
        locations = env["locations"]
        if crop_gradient != 1.0:  # the same value, its gradient scaled
            env["locations"] = locations.detach() + crop_gradient * (locations - locations.detach())
        env["rows"] = torch.arange(frames.shape[0], device=frames.device)
        env.update(run("crop", env))
        env["local"] = run("local", env)["local"].unflatten(0, env["kept"].shape)  # patch rows → (video, step)
        env.update(run("head", env))
        return ForwardOutput(GlanceFeatures.of(env), env["saliency"], env["kept"], locations, self.boxes(locations),
                             env["patches"], env["local"], env["logits"])

    def look(self, frames, mel, audio_present, *, run: RunStage, detach_audio: bool = False) -> dict:
        """The per-video stages (glance encoders on all T frames, frame choice, patch locations) → the named
        tensors: the inputs, the glance features, ``saliency``, ``kept`` and ``locations``."""
        env = {"frames": frames, "mel": mel, "audio_present": audio_present}
        env.update(run("glance", env))
        guide = audio_detached(env) if detach_audio else env
        env.update(run("avtest", guide))
        env.update(run("aespa", {**guide, "kept": env["kept"]}))
        return env

    @torch.no_grad()
    def glance(self, frames, mel, *, audio_present=None, k: int | None = None,
               exit_threshold: float | None | str = FROM_CHECKPOINT) -> GlanceResult:
        """Classify a batch with early exit (no gradients): the reference the engine is checked against.

        All k steps are computed; each video exits at the first step whose top probability is
        ≥ ``exit_threshold`` (``InferenceSettings``: the checkpoint's by default, None = never), and
        its GMACs count the steps up to that exit.
        """
        threshold = InferenceSettings(exit_threshold=exit_threshold).threshold(self.config)
        out = self(frames, mel, audio_present, k=k)
        probs = out.logits.float().softmax(-1)
        exit_step = exit_steps(probs, threshold)
        final = out.logits[torch.arange(out.logits.shape[0], device=out.logits.device), exit_step]
        gflops = self.cost().gmacs(exit_step + 1).to(out.logits.device)
        return GlanceResult(out.logits, probs, exit_step, final, out.saliency, out.kept, out.boxes, gflops)

    # --- the stages ---------------------------------------------------------------------------------

    def _stage_io(self) -> dict[str, tuple[tuple[str, ...], tuple[str, ...]]]:
        """Names of every stage's tensor inputs and outputs for this configuration."""
        audio, visual, policy = self.audio is not None, self.visual is not None, self.aespa is not None
        features = ("tokens",) * policy + ("visual",) * visual + ("audio_tokens", "audio") * audio
        avtest = ("visual", "audio", "audio_present") if audio else ("visual",)
        avtest = avtest if self.avtest is not None else ("audio_present",)  # uniform or all frames: the batch size
        aespa = ("tokens", "audio", "audio_tokens", "kept", "audio_present") if audio else ("tokens", "visual", "kept")
        aespa = aespa if policy else ("kept",)  # without a policy: the centre, or a random draw
        parts = ("audio",) * audio + ("visual",) * visual
        return {
            "glance": (("frames", "mel", "audio_present"), features),
            "avtest": (avtest, ("saliency", "kept")),
            "aespa": (aespa, ("locations",)),
            "crop": (("frames", "rows", "kept", "locations"), ("patches",)),
            "local": (("patches",), ("local",)),
            "head": ((*parts, "kept", "local"), ("logits",)),
            "step_head": ((*parts, "kept", "local", "running", "step"), ("logits", "next_running")),
        }

    def run_stage(self, name: str, env: dict, *, k: int) -> dict:
        """Stage ``name`` on its inputs, read by name from ``env``, → its named outputs (``stage_io``).

        glance: frames, mel, audio_present → the glance features of all T frames (``encode``).
        avtest: → saliency (B, T) and the k kept frames (B, k) in step order.
        aespa: → patch locations (B, k, 2) in [0, 1]² of the kept frames.
        crop: frames (B, T, 3, S, S), rows (n,) int64, kept and locations (n, g[, 2]) → patches
            (n·g, 3, P, P) of frame kept[i, j] of video rows[i], in the autocast dtype (else float32).
        local: patches → local (n·g, C_local), which the forward views as (n, g, C_local).
        head: the videos' pooled glance vectors (n, T, C), kept (n, g), local (n, g, C_local) → logits
            (n, g, C) after each of g steps.
        step_head: the same for one step (g = 1), running (n, hidden) float32 (−inf before step 0)
            and step (int64 scalar) → logits (n, C) and next_running.
        """
        inputs, outputs = self.stage_io[name]
        x = {n: env[n] for n in inputs}  # a stage reads nothing but its declared inputs
        if name == "glance":
            features = self.encode(x["frames"], x["mel"], x["audio_present"])
            return {n: getattr(features, n) for n in outputs}
        if name == "avtest":
            saliency = self.saliency(GlanceFeatures.of(x))
            return {"saliency": saliency, "kept": self.select(saliency, k)}
        if name == "aespa":
            return {"locations": self.locate(GlanceFeatures.of(x), x["kept"])}
        if name == "crop":
            return {"patches": self.crop(x["frames"], x["kept"], x["locations"], rows=x["rows"])}
        if name == "local":  # without a local encoder (audio-only) a patch has no features: width 0
            patches = x["patches"]
            return {"local": self.local(patches)[1] if self.local is not None else patches.new_zeros(len(patches), 0)}
        features = self.step_features(GlanceFeatures.of(x), x["kept"], x["local"])
        if name == "head":
            return {"logits": self.classifier(features)}
        logits, running = self.classifier.step(features[:, 0], x["running"], x["step"])
        return {"logits": logits, "next_running": running}

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
        tokens = visual = audio_tokens = audio = None
        if self.visual is not None:
            tokens, visual = self.encode_visual(frames)
        if self.audio is not None:
            audio_tokens, audio = self.encode_audio(mel, audio_present)
        return GlanceFeatures(tokens, visual, audio_tokens, audio, audio_present)

    def encode_visual(self, frames):
        """Visual glance encoder on uint8 frames (B, T, 3, S, S) → tokens (B, T, h·w, C_tok) (None without AESPA)
        and pooled (B, T, C_v).

        Each frame is encoded on its own (eval-mode norms), so a frame's features do not depend on the
        clip around it: overlapping windows of a long video share them (``engine.stream``).
        """
        b, t = frames.shape[:2]
        tokens = None
        x = frames.flatten(0, 1)
        g = self.config.glance_size
        x = area_resize(x, g) if g != self.config.frame_size else x.float()
        x = (x - self.pixel_mean.view(1, 3, 1, 1)) / self.pixel_std.view(1, 3, 1, 1)
        x = x.contiguous(memory_format=torch.channels_last)
        for i, layer in enumerate(self.visual.features):
            x = layer(x)
            if self.aespa is not None and i == self.token_layer:
                tokens = x.flatten(2).transpose(1, 2).reshape(b, t, -1, x.shape[1])
        return tokens, x.mean((2, 3)).view(b, t, -1)

    def encode_audio(self, mel, audio_present):
        """Audio encoder on every frame's log-mel → tokens (B, T, La, C_a) and pooled (B, T, C_a), 0 without audio."""
        b, t = mel.shape[:2]
        present = audio_present.to(mel.dtype).view(b, 1, 1, 1)
        if self.config.audio_clip_mean:  # spectral mean normalization per video: the stationary background removed
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
        if c.dense or c.spatial == "center" or not c.visual:
            return torch.full((b, k, 2), 0.5, device=kept.device)
        if c.spatial == "random":
            return torch.rand(b, k, 2, device=kept.device)
        tokens = gather_frames(feats.tokens, kept).flatten(0, 1)
        present = None if feats.audio_present is None else feats.audio_present[:, None].expand(b, k).flatten()
        if self.audio is not None:
            query = gather_frames(feats.audio, kept).flatten(0, 1)
            audio_tokens = gather_frames(feats.audio_tokens, kept).flatten(0, 1)
        else:
            query, audio_tokens = gather_frames(feats.visual, kept).flatten(0, 1), None
        a, _ = self.aespa(tokens, query, audio_tokens, present)
        return a.view(b, k, 2)

    def patch_size(self) -> int:
        """P: S for dense, 0 for audio-only (nothing is cropped: an empty box at the frame centre)."""
        return 0 if not self.config.visual else self.config.frame_size if self.config.dense else self.config.patch_size

    def centers(self, a: torch.Tensor) -> torch.Tensor:
        """Patch centres in frame pixels (..., 2) (cy, cx) from a ∈ [0, 1]²: corner a·(S − P) plus P/2."""
        p = self.patch_size()
        return a * (self.config.frame_size - p) + p / 2

    def boxes(self, a: torch.Tensor) -> torch.Tensor:
        """(…, 4) patch boxes (y0, x0, y1, x1) in frame pixels."""
        centers = self.centers(a)
        half = self.patch_size() / 2
        return torch.cat([centers - half, centers + half], dim=-1)

    def crop(self, frames: torch.Tensor, kept: torch.Tensor, a: torch.Tensor,
             rows: torch.Tensor | None = None) -> torch.Tensor:
        """Normalized channels-last patches (n·g, 3, P, P) of frames kept (n, g) of the videos ``rows`` (n,)
        (default: all B, n = B) at centres ``a`` (n, g, 2); float32, or the autocast dtype when autocast is on."""
        b, t = frames.shape[:2]
        rows = torch.arange(b, device=kept.device) if rows is None else rows
        index = (rows[:, None] * t + kept).flatten()
        device = frames.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else torch.float32
        if self.local is None:  # audio-only: nothing to look at closely
            return torch.zeros(len(index), 3, 0, 0, device=frames.device, dtype=dtype)
        return ops.crop_patches(frames.flatten(0, 1), self.centers(a).flatten(0, 1), self.patch_size(), index=index,
                                mean=self.pixel_mean, std=self.pixel_std, out_dtype=dtype, channels_last=True)

    def local_features(self, patches: torch.Tensor, b: int) -> torch.Tensor:
        """Local encoder on (B·k, 3, P, P) patches → (B, k, C_local)."""
        return self.local(patches)[1].view(b, -1, self.local.out_channels)

    def step_features(self, feats: GlanceFeatures, kept: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        """(B, k, fused_dim): per kept frame [audio; global; local], each part layer-normalized."""
        parts = [gather_frames(x, kept) for x in (feats.audio, feats.visual) if x is not None]
        parts += [local] if self.local is not None else []  # audio-only: local has width 0
        return torch.cat([norm(x) for norm, x in zip(self.part_norms, parts, strict=True)], dim=-1)

    # --- cost -----------------------------------------------------------------------------------------

    def components(self) -> list[Component]:
        """Every part of the inference path that does multiply-accumulate work (``model_components``)."""
        from avgn_fast.models.components import model_components

        return model_components(self)

    def flops_table(self) -> list:
        """``avgn_fast.flops.component_table`` of this model: one ``ComponentFlops`` row per component, counted
        once per configuration (the counts depend on the configuration only)."""
        key = self.config.replace(name="", exit_threshold=None)  # fields that change no component
        if key not in _TABLES:
            from avgn_fast.flops import component_table

            _TABLES[key] = component_table(self)
        return _TABLES[key]

    def cost(self) -> Cost:
        """GMACs per video and per step taken: the sums of ``flops_table()``."""
        from avgn_fast.flops import video_and_step_gmacs

        return Cost(*video_and_step_gmacs(self.flops_table()))


def audio_detached(env: dict) -> dict:
    """``env`` with the audio features detached: what AV-TeST and AESPA read while they learn.

    Their losses chase targets that the audio head itself defines (the teacher); letting them
    reshape the audio encoder measurably unlearns the class sounds, so the audio encoder learns
    from its own head and from the classifier only.
    """
    return {name: x.detach() if name in ("audio", "audio_tokens") and x is not None else x for name, x in env.items()}


def gather_frames(x: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """x (B, T, ...) → (B, k, ...) at the kept frame indices (B, k)."""
    index = kept.view(*kept.shape, *([1] * (x.dim() - 2))).expand(*kept.shape, *x.shape[2:])
    return x.gather(1, index)
