"""The glance pipeline on a backend, with batched early exit: videos leave the batch once they are confident.

``GlanceEngine(model, backend="inductor", precision="fp16")(frames, mel)`` gives the same
``GlanceResult`` as ``model.glance`` per video. Without an exit threshold every video takes every
step, and the local encoder runs once on all B·K patches. With a threshold, frames are taken in
saliency order one step at a time: after each step the videos whose top probability passes τ
leave the batch, and the crop, local encoder and classifier run only on those still in. AV-TeST
and AESPA run once on the whole batch before the steps (one small stage, static in shape), so
every kept frame has its patch box, also after an exit. Logits and probabilities of the steps a
video did not take are NaN; its GMACs count the steps it took (``model.cost()``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os

import torch

from avgn_fast.engine.backends import StageRunner, bucket_sizes, resolve_backend, resolve_precision, state_hash
from avgn_fast.engine.stages import build_stages
from avgn_fast.models import ops
from avgn_fast.models.avgn import AVGN, GlanceFeatures, GlanceResult

log = logging.getLogger(__name__)

# what the engine calls, in pipeline order; "crop" is the fused patch op, not a compiled stage
STAGE_NAMES = ("glance", "avtest", "aespa", "crop", "local", "head")


class Hook:
    """Observer of the engine's stage calls: ``stage(name, args)`` is a context manager around each call."""

    def stage(self, name: str, args: tuple):
        return contextlib.nullcontext()


class GlanceEngine:
    """Runs ``model`` stage by stage on one backend at one precision; call it like ``model.glance``.

    Args:
        model: an AVGN in eval mode (moved to ``device``).
        backend: eager | inductor | tensorrt | auto (see ``backends.resolve_backend``).
        precision: fp32 | fp16 | bf16 | auto (fp16 on CUDA, fp32 on CPU); stages run under autocast.
        device: where the model and the inputs live; defaults to the model's device.
        max_batch: the largest batch expected; compiled backends pad batches to one of
            ``bucket_sizes(max_batch)`` (and the local encoder to those times K), so each stage has
            at most a few static shapes. Larger batches run at their own size.
        k: frames looked at closely (default: the model's K, or T for dense).
        cuda_graphs: CUDA graphs for inductor on CUDA (default: on there).
        cache_dir: where TensorRT engines are cached (default ``$AVGN_CACHE`` or ~/.cache/avgn_fast).
    """

    def __init__(self, model: AVGN, *, backend: str = "eager", precision: str = "auto", device=None,
                 max_batch: int = 16, k: int | None = None, cuda_graphs: bool | None = None,
                 cache_dir: str | os.PathLike | None = None):
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model = model.to(self.device).eval()
        self.backend, self.backend_reason = resolve_backend(backend, self.device)
        self.dtype = resolve_precision(precision, self.device)
        self.k = model.steps if k is None else k
        if not 1 <= self.k <= model.steps:
            raise ValueError(f"k must be in [1, {model.steps}] for this model, got {k}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be ≥ 1, got {max_batch}")
        compiled = self.backend != "eager"
        cuda_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        batch = bucket_sizes(max_batch) if compiled else ()
        model_hash = state_hash(model) if self.backend == "tensorrt" else ""
        self.stages = build_stages(model, self.dtype, self.k)
        self.runners = {
            name: StageRunner(stage, self.backend, cuda_graphs=cuda_graphs, cache_dir=cache_dir, model_hash=model_hash,
                              buckets=tuple(sorted(set(batch) | {b * self.k for b in batch})) if name == "local"
                              else batch)
            for name, stage in self.stages.items()
        }
        log.info("GlanceEngine: backend=%s (%s) precision=%s device=%s max_batch=%d k=%d stages=%s",
                 self.backend, self.backend_reason, str(self.dtype).removeprefix("torch."), self.device, max_batch,
                 self.k, ",".join(self.stages))

    @torch.inference_mode()
    def __call__(self, frames: torch.Tensor, mel: torch.Tensor, audio_present: torch.Tensor | None = None, *,
                 exit_threshold: float | None = None, hook: Hook | None = None) -> GlanceResult:
        """Classify a batch: frames uint8 (B, T, 3, S, S), mel (B, T, n_mels, n_steps), audio_present (B,) bool.

        ``exit_threshold`` defaults to the config's; None there too means every video takes every step.
        """
        model, hook = self.model, hook or Hook()
        present = model.check_inputs(frames, mel, audio_present)
        threshold = model.config.exit_threshold if exit_threshold is None else exit_threshold
        b = frames.shape[0]

        env = {"frames": frames, "mel": mel, "audio_present": present}
        if "glance" in self.stages:
            env.update(self._run("glance", env, hook))
        feats = GlanceFeatures(env.get("tokens"), env.get("visual"), env.get("audio_tokens"), env.get("audio"),
                               present)
        if "avtest" in self.stages:
            env.update(self._run("avtest", env, hook))
        else:
            with hook.stage("avtest", ()):
                env["saliency"] = model.saliency(feats)
                env["kept"] = model.select(env["saliency"], self.k)
        if "aespa" in self.stages:
            env.update(self._run("aespa", env, hook))
        else:  # a constant, or a random draw taken exactly as model.locate takes it
            with hook.stage("aespa", ()):
                env["a"] = model.locate(feats, env["kept"])
        kept, a = env["kept"], env["a"]

        steps = self.k
        logits = torch.full((b, steps, model.config.num_classes), math.nan, device=frames.device)
        final = torch.full((b, model.config.num_classes), math.nan, device=frames.device)
        exit_step = torch.full((b,), steps - 1, dtype=torch.int64, device=frames.device)
        if threshold is None or steps == 1:
            local = self._local(frames, kept, a, torch.arange(b, device=frames.device), range(steps), hook)
            features = model.step_features(feats, kept, local)
            logits[:] = self._run("head", {"features": features}, hook)["logits"].float()
            final[:] = logits[:, -1]
        else:
            self._step_by_step(frames, feats, kept, a, threshold, logits, final, exit_step, hook)
        gflops = model.cost().gmacs(exit_step + 1).to(frames.device)
        return GlanceResult(logits, logits.softmax(-1), exit_step, final, env["saliency"], kept, model.boxes(a), gflops)

    # --- internals ------------------------------------------------------------------------------

    def _run(self, name: str, env: dict, hook: Hook) -> dict:
        stage = self.stages[name]
        args = tuple(env[i] for i in stage.inputs)
        with hook.stage(name, args):
            return dict(zip(stage.outputs, self.runners[name](*args)))

    def _local(self, frames, kept, a, active, steps, hook: Hook) -> torch.Tensor:
        """Local features (n, len(steps), C_local) of the ``active`` videos' kept frames at ``steps``."""
        model, t = self.model, frames.shape[1]
        cols = torch.tensor(list(steps), device=frames.device)
        n, g = active.numel(), cols.numel()
        index = active.repeat_interleave(g) * t + kept[active][:, cols].flatten()
        args = (frames.flatten(0, 1), model.centers(a[active][:, cols].reshape(-1, 2)), model.patch_size())
        with hook.stage("crop", args):
            patches = ops.crop_patches(*args, index=index, mean=model.pixel_mean, std=model.pixel_std,
                                       out_dtype=self.dtype, channels_last=True)
        return self._run("local", {"patches": patches}, hook)["local"].view(n, g, -1)

    def _step_by_step(self, frames, feats, kept, a, threshold, logits, final, exit_step, hook: Hook) -> None:
        """Steps in saliency order; after each, the videos whose top probability reaches ``threshold`` leave.

        Fills ``logits`` at the steps taken, ``final`` and ``exit_step`` (the last step for videos never confident).
        """
        model, steps = self.model, self.k
        active = torch.arange(frames.shape[0], device=frames.device)
        running = torch.full((active.numel(), model.config.fusion_dim), -math.inf, device=frames.device)
        for step in range(steps):
            local = self._local(frames, kept, a, active, [step], hook)
            features = model.step_features(_subset(feats, active), kept[active, step:step + 1], local)[:, 0]
            env = {"features": features, "running": running, "step": torch.tensor(step, device=frames.device)}
            out = self._run("step_head", env, hook)
            step_logits = logits[active, step] = out["logits"].float()
            done = step_logits.softmax(-1).amax(-1) >= threshold
            if step == steps - 1:
                done[:] = True
            final[active[done]] = step_logits[done]
            exit_step[active[done]] = step
            active, running = active[~done], out["next_running"][~done]
            if not active.numel():
                return


def _subset(feats: GlanceFeatures, rows: torch.Tensor) -> GlanceFeatures:
    """The pooled glance vectors (all the classifier reads) of the videos at ``rows``."""

    def pick(x):
        return None if x is None else x[rows]

    return GlanceFeatures(None, pick(feats.visual), None, pick(feats.audio), feats.audio_present[rows])
