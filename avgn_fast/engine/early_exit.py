"""The model's forward on a backend, with batched early exit: videos leave the batch once they are confident.

``GlanceEngine(model, backend="inductor", precision="fp16")(frames, mel)`` gives the same
``GlanceResult`` as ``model.glance`` per video. The engine runs the model's own stages
(``engine.stages``, each compiled on its backend) through the model's own forward; it adds only
the batching (padding to static shapes), the compaction of exited videos and the exit rule.

Without an exit threshold every video takes every step: the engine runs ``AVGN.forward``, whose
local encoder sees all B·K patches at once. With a threshold it runs the per-video stages
(``AVGN.look``: glance, AV-TeST, AESPA, once on the whole batch, so every kept frame has its patch
box, also after an exit), then one step at a time: crop, local encoder and ``step_head`` on the
videos still in; those whose top probability passes τ leave the batch. Logits and probabilities of
the steps a video did not take are NaN; its GMACs count the steps it took (``model.cost()``).
An exported folder (``engine.runtime.ExportedModel``) runs the same way: its stage files take the
place of the compiled stages.

Overlapping windows of one source hold the same frames. Where a frame's patch is a function of that
frame alone (``engine.stream``), a ``PatchTable`` lets them share it: the first video to take a step on
the frame crops its patch and runs the local encoder, later steps on the same frame (in this batch or in
a later call) reuse the location and local features, and their GMACs leave that video's count.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from dataclasses import dataclass, field

import torch

from avgn_fast.config import FROM_CHECKPOINT, InferenceSettings, exit_threshold_of
from avgn_fast.engine.backends import StageRunner, bucket_sizes, resolve_backend, resolve_precision, state_hash
from avgn_fast.engine.runtime import ExportedModel
from avgn_fast.engine.stages import build_stages
from avgn_fast.models.avgn import AVGN, STAGES, GlanceResult, RunStage
from avgn_fast.models.classifier import confident

log = logging.getLogger(__name__)

STAGE_NAMES = STAGES  # what the engine calls, in pipeline order
EAGER_STAGES = ("crop",)  # a fused op, run as it is: its inputs are not batch-aligned, so never padded


@dataclass
class PatchTable:
    """Patches shared by the videos that hold the same frame: row r holds one frame's patch location (2,) in
    [0, 1]² and its local features (C_local,); the rows in ``known`` are filled. ``GlanceEngine`` fills a row
    the first time a step takes its frame, and reads it every later time."""

    locations: torch.Tensor
    local: torch.Tensor
    known: set[int] = field(default_factory=set)


class Hook:
    """Observer of the engine's stage calls: ``stage(name, args)`` is a context manager around each call."""

    def stage(self, name: str, args: tuple):
        return contextlib.nullcontext()


class GlanceEngine:
    """Runs ``model`` stage by stage on one backend at one precision; call it like ``model.glance``.

    Args:
        model: an AVGN in eval mode (moved to ``device``), or an exported folder (``runtime.ExportedModel``,
            ``avgn_fast.load(folder)``): its stages run as exported (``ExportedModel.settle``: backend eager,
            the folder's precision and k), through the same forward and early exit.
        backend: eager | inductor | tensorrt | auto (see ``backends.resolve_backend``).
        precision: fp32 | fp16 | bf16 | auto (fp16 on CUDA, fp32 on CPU); stages run under autocast.
        device: where the model and the inputs live; defaults to the model's device.
        max_batch: the largest batch expected; compiled backends pad batches to one of
            ``bucket_sizes(max_batch)`` (and the local encoder to those times K), so each stage has
            at most a few static shapes. Larger batches run at their own size.
        k: frames looked at closely (``InferenceSettings.k``; default: the model's K, or T for dense).
        cuda_graphs: CUDA graphs for inductor on CUDA (default: on there).
        cache_dir: where TensorRT engines are cached (default ``$AVGN_CACHE`` or ~/.cache/avgn_fast).
    """

    def __init__(self, model: AVGN | ExportedModel, *, backend: str = "eager", precision: str = "auto", device=None,
                 max_batch: int = 16, k: int | None = None, cuda_graphs: bool | None = None,
                 cache_dir: str | os.PathLike | None = None):
        exported = isinstance(model, ExportedModel)
        if device is None:
            device = model.device if exported else next(model.parameters()).device
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        if exported:  # its stages run as they were exported, at their precision and k
            self.backend, self.backend_reason, self.dtype, self.k = model.settle(backend, precision, self.device, k)
        else:
            self.backend, self.backend_reason = resolve_backend(backend, self.device)
            self.dtype = resolve_precision(precision, self.device)
            self.k = InferenceSettings(k=k).steps(model.config)
        if max_batch < 1:
            raise ValueError(f"max_batch must be ≥ 1, got {max_batch}")
        compiled = self.backend != "eager"
        cuda_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        batch = bucket_sizes(max_batch) if compiled else ()
        model_hash = state_hash(model) if self.backend == "tensorrt" else ""
        self.stages = model.stages if exported else build_stages(model, self.dtype, self.k)
        self.runners = {
            name: StageRunner(stage, self.backend, cuda_graphs=cuda_graphs, cache_dir=cache_dir, model_hash=model_hash,
                              buckets=tuple(sorted(set(batch) | {b * self.k for b in batch})) if name == "local"
                              else batch)
            for name, stage in self.stages.items() if name not in EAGER_STAGES
        }
        log.info("GlanceEngine: backend=%s (%s) precision=%s device=%s max_batch=%d k=%d stages=%s",
                 self.backend, self.backend_reason, str(self.dtype).removeprefix("torch."), self.device, max_batch,
                 self.k, ",".join(self.stages))

    @torch.inference_mode()
    def __call__(self, frames: torch.Tensor, mel: torch.Tensor, audio_present: torch.Tensor | None = None, *,
                 exit_threshold: float | None | str = FROM_CHECKPOINT, hook: Hook | None = None,
                 glance: dict[str, torch.Tensor] | None = None,
                 patches: tuple[PatchTable, torch.Tensor] | None = None) -> GlanceResult:
        """Classify a batch: frames uint8 (B, T, 3, S, S), mel (B, T, n_mels, n_steps), audio_present (B,) bool.

        ``exit_threshold``: τ; None: never exit early (every video takes every step); ``FROM_CHECKPOINT``
        (the default): the model's ``config.exit_threshold``. ``glance``: the glance stage's outputs for
        this batch, computed before (overlapping windows of a long video share their frames' features,
        ``engine.stream``); the stage is then not run. ``patches``: a ``PatchTable`` and each video's row
        of it for each of its T frames (B, T) int64 (−1: its own); the videos then run step by step (as with
        an exit threshold) and share the patches of the frames the table holds.
        """
        model, hook = self.model, hook or Hook()
        run = self.runner(hook)
        if glance is not None:
            staged = run

            def run(name: str, env: dict) -> dict:
                return dict(glance) if name == "glance" else staged(name, env)
        threshold = exit_threshold_of(model.config, exit_threshold)
        b, c = frames.shape[0], model.config.num_classes
        if patches is None and (threshold is None or self.k == 1):
            out = model(frames, mel, audio_present, k=self.k, run=run)
            logits = out.logits.float()
            exit_step = torch.full((b,), self.k - 1, dtype=torch.int64, device=frames.device)
            final = logits[:, -1]
            saliency, kept, boxes = out.saliency, out.kept, out.boxes
        else:
            env = model.look(frames, mel, model.check_inputs(frames, mel, audio_present), run=run)
            logits = torch.full((b, self.k, c), math.nan, device=frames.device)
            final = torch.full((b, c), math.nan, device=frames.device)
            exit_step = torch.full((b,), self.k - 1, dtype=torch.int64, device=frames.device)
            reused = torch.zeros(b, dtype=torch.int64, device=frames.device)
            self._step_by_step(env, threshold, run, logits, final, exit_step, patches, reused)
            saliency, kept, boxes = env["saliency"], env["kept"], model.boxes(env["locations"])
        gflops = model.cost().gmacs(exit_step + 1).to(frames.device)
        if patches is not None:  # a shared patch cost the video that computed it, not the ones that reused it
            gflops = gflops - reused * next(r.gmacs for r in model.flops_table() if r.name == "local encoder")
        return GlanceResult(logits, logits.softmax(-1), exit_step, final, saliency, kept, boxes, gflops)

    def runner(self, hook: Hook) -> RunStage:
        """Runs a stage of the model's forward on this engine's backend, ``hook`` around each call."""

        def run(name: str, env: dict) -> dict:
            if name not in self.stages:  # the configuration has nothing to do there (``build_stages``)
                return {}
            stage = self.stages[name]
            args = tuple(env[i] for i in stage.inputs)
            with hook.stage(name, args):
                return dict(zip(stage.outputs, self.runners.get(name, stage)(*args)))

        return run

    def _step_by_step(self, env: dict, threshold: float | None, run: RunStage, logits, final, exit_step,
                      patches: tuple[PatchTable, torch.Tensor] | None = None, reused=None) -> None:
        """Steps in saliency order; after each, the videos whose top probability reaches ``threshold`` leave.

        Fills ``logits`` at the steps taken, ``final`` and ``exit_step`` (the last step for videos never confident),
        and with ``patches``, ``reused`` (B,): the steps each video took on a patch of the table.
        """
        frames, steps = env["frames"], self.k
        per_video = {name: env[name] for name in ("audio", "visual") if name in env}  # what the step head reads
        active = torch.arange(frames.shape[0], device=frames.device)
        running = torch.full((active.numel(), self.model.config.fusion_dim), -math.inf, device=frames.device)
        for step in range(steps):
            now = {name: x[active] for name, x in per_video.items()}
            now.update(frames=frames, rows=active, kept=env["kept"][active, step:step + 1],
                       locations=env["locations"][active, step:step + 1], running=running,
                       step=torch.tensor(step, device=frames.device))
            if patches is None:
                now.update(run("crop", now))
                now["local"] = run("local", now)["local"][:, None]  # (n, 1 step, C_local)
            else:
                now["local"] = self._shared_step(run, now, *patches, env["locations"], step, reused)[:, None]
            out = run("step_head", now)
            step_logits = logits[active, step] = out["logits"].float()
            done = confident(step_logits.softmax(-1), threshold) | (step == steps - 1)
            final[active[done]] = step_logits[done]
            exit_step[active[done]] = step
            active, running = active[~done], out["next_running"][~done]
            if not active.numel():
                return

    @staticmethod
    def _shared_step(run: RunStage, now: dict, table: PatchTable, slot: torch.Tensor, locations: torch.Tensor,
                     step: int, reused: torch.Tensor) -> torch.Tensor:
        """Local features (n, C_local) of this step's patches for the videos ``now["rows"]``: a frame's row of
        ``table`` where it is filled (its location then replaces the one in ``locations`` (B, K, 2), and the
        video's ``reused`` count goes up), else the patch cropped and encoded, once per row, and recorded."""
        rows = now["rows"]
        slots = slot[rows, now["kept"][:, 0]].tolist()
        compute, first = [], {}  # the videos that compute their patch; the first video for each table row
        for i, s in enumerate(slots):
            if s < 0 or (s not in table.known and s not in first):
                first[s] = len(compute)
                compute.append(i)
        out = table.local.new_empty((len(slots), table.local.shape[1]))
        if compute:
            part = torch.tensor(compute, device=rows.device)
            mine = {**now, "rows": rows[part], "kept": now["kept"][part], "locations": now["locations"][part]}
            mine.update(run("crop", mine))
            computed = run("local", mine)["local"].to(out.dtype)
            out[part] = computed
            new = [(s, j) for s, j in first.items() if s >= 0]
            if new:
                at, of = (torch.tensor(x, device=rows.device) for x in zip(*new))
                table.local[at] = computed[of]
                table.locations[at] = mine["locations"][of, 0].to(table.locations.dtype)
                table.known.update(s for s, _ in new)
        own = set(compute)
        taken = [i for i in range(len(slots)) if i not in own]
        if taken:
            part = torch.tensor(taken, device=rows.device)
            at = torch.tensor([slots[i] for i in taken], device=rows.device)
            out[part] = table.local[at]
            locations[rows[part], step] = table.locations[at].to(locations.dtype)
            reused[rows[part]] += 1
        return out
