"""The training loop shared by the in-memory entry ``train_model`` and ``avgn-fast train``, and evaluation."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from avgn_fast.checkpoint import load_checkpoint, save_checkpoint
from avgn_fast.config import FROM_CHECKPOINT, AVGNConfig
from avgn_fast.engine.early_exit import GlanceEngine
from avgn_fast.models.avgn import AVGN, GlanceResult
from avgn_fast.training.batches import Mixing, TrainingSource
from avgn_fast.training.losses import LossWeights, audio_warmup_losses, avgn_losses, look_losses
from avgn_fast.training.runs import (
    SubsetSource,
    carve_validation,
    chance_floor,
    plateaued,
    resume_run,
    run_summary,
)


@dataclass(frozen=True)
class TrainSettings:
    """Optimisation recipe: AdamW in three stages, the gradient norm clipped per part of the model.

    Stage 1, ``audio_warmup_epochs`` cheap epochs: only the audio encoder and its head learn, the
    frames of a video as multiple instances (``audio_warmup_losses``). Stage 2, ``look_epochs``:
    the audio head names the telling frames; AV-TeST learns to rank frames like it, and on the best
    frame the local encoder learns from candidate patches while the policy learns to point at the
    best one (``look_losses``). Stage 3, ``epochs`` joint epochs with every loss (``avgn_losses``).
    Without audio there is no teacher for stages 1-2: the audio warm-up is skipped and the look
    epochs become joint epochs, so every switch trains for about the same time (``stages``). Each stage warms the
    learning rate up linearly over ``lr_warmup_epochs``; the joint stage then decays it with a
    cosine. Each top-level part (encoders, AV-TeST, AESPA, classifier, heads) has its gradient norm
    clipped to ``grad_clip`` on its own, so a spike in one part's losses does not shrink the
    others' steps.

    Augmentation: the fields from ``temporal_density`` to ``gain_db`` are those of
    ``avgn_fast.data.augment.Augmentation`` (``augmentation()``), applied to training batches on the
    fly (``TrainingSource``), never to validation, eval or predict. A training decode keeps
    ``temporal_density * T`` frames per video. ``mixup``/``cutmix`` (Beta concentrations, 0: off) mix the
    augmented training batches in pairs with soft targets (``avgn_fast.training.batches``).

    Stopping: with ``patience`` (the default), ``epochs`` is a cap: after each joint epoch the
    validation top-1 is measured and the run stops once ``patience`` joint epochs in a row have not
    beaten the best one (``plateaued``); the cosine still spans the cap. A run whose validation top-1
    has not yet risen above chance (``chance_floor``) has not started learning: the rule waits for it
    (on AVSynth the dense baseline can sit at chance for many joint epochs), up to the cap. Without a validation split,
    ``fit`` holds out ``val_fraction`` of the training videos (``carve_validation``). ``patience=None``
    trains exactly ``epochs`` joint epochs.
    """

    epochs: int = 30
    audio_warmup_epochs: int = 3
    look_epochs: int = 3
    batch_size: int = 16
    lr: float = 2e-3
    weight_decay: float = 1e-4
    lr_warmup_epochs: float = 0.5
    grad_clip: float = 5.0
    seed: int = 0
    temporal_density: int = 1
    crop_min_scale: float = 0.8
    crop_max_ratio: float = 1.1
    flip: bool = True
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    time_mask: float = 0.2
    freq_mask: float = 0.15
    gain_db: float = 6.0
    mixup: float = 0.0
    cutmix: float = 0.0
    losses: LossWeights = field(default_factory=LossWeights)
    # stopping at the plateau (see above); None: exactly ``epochs`` joint epochs
    patience: int | None = 4
    val_fraction: float = 0.1  # training videos held out for validation when no validation split is given

    def __post_init__(self):
        if (self.epochs < 1 or self.audio_warmup_epochs < 0 or self.look_epochs < 0 or self.batch_size < 1
                or self.lr <= 0):
            raise ValueError(f"bad settings: {self.epochs=} {self.audio_warmup_epochs=} {self.look_epochs=} "
                             f"{self.batch_size=} {self.lr=}")
        if self.patience is not None and (isinstance(self.patience, bool) or self.patience < 1):
            raise ValueError(f"patience must be None or an int ≥ 1, got {self.patience!r}")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must lie strictly between 0 and 1, got {self.val_fraction}")
        self.augmentation()  # checks its fields
        self.mixing()

    def augmentation(self):
        """The ``Augmentation`` of these settings (imported here: eval and predict never load the module)."""
        from avgn_fast.data.augment import Augmentation

        return Augmentation(**{f.name: getattr(self, f.name) for f in dataclasses.fields(Augmentation)})

    def without_augmentation(self) -> TrainSettings:
        """These settings with every augmentation (``Augmentation.off``) and mixing off: training sees the clips as
        decoded."""
        from avgn_fast.data.augment import Augmentation

        return dataclasses.replace(self, **dataclasses.asdict(Augmentation.off()), mixup=0.0, cutmix=0.0)

    def mixing(self) -> Mixing:
        """The ``Mixing`` (mixup / CutMix) of these settings."""
        return Mixing(self.mixup, self.cutmix)

    def as_dict(self) -> dict:
        """Plain values (the loss weights nested), as saved in checkpoints and compared on resume."""
        return asdict(self)

    def stages(self, config: AVGNConfig) -> list[str]:
        """The stage of every epoch ("audio", "look", "joint") for a model of ``config``.

        Without audio there is no warm-up; without audio, without a glance (dense) or without patches
        (audio-only) the look epochs are joint epochs.
        """
        audio = ["audio"] * self.audio_warmup_epochs if config.audio else []
        look = "look" if config.audio and config.visual and not config.dense else "joint"
        return audio + [look] * self.look_epochs + ["joint"] * self.epochs


class TensorSource:
    """Videos held in memory: frames uint8 (N, T, 3, S, S), mel (N, T, n_mels, n_steps), labels, audio_present."""

    def __init__(self, frames, mel, labels, audio_present=None):
        n = labels.shape[0]
        if frames.shape[0] != n or mel.shape[0] != n:
            raise ValueError(f"frames, mel and labels disagree on N: {frames.shape=} {mel.shape=} {labels.shape=}")
        self.frames, self.mel, self.labels = frames, mel, labels
        self.audio_present = torch.ones(n, dtype=torch.bool) if audio_present is None else audio_present

    @classmethod
    def of(cls, batch) -> TensorSource:
        """From anything with ``frames``, ``mel``, ``labels`` and ``audio_present`` (e.g. a ``SynthBatch``)."""
        return batch if isinstance(batch, TensorSource) else cls(batch.frames, batch.mel, batch.labels,
                                                                 batch.audio_present)

    def __len__(self) -> int:
        return self.labels.shape[0]

    def batch(self, index: torch.Tensor):
        """(frames, mel, labels, audio_present) of the videos at ``index``."""
        return self.frames[index], self.mel[index], self.labels[index], self.audio_present[index]


class FolderSource:
    """Videos of a ``FolderDataset`` (decoded clips cached on disk), batched by stacking clips."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def batch(self, index: torch.Tensor):
        items = [self.dataset[int(i)] for i in index]
        clips = [clip for clip, _ in items]
        return (torch.stack([c.frames for c in clips]), torch.stack([c.mel for c in clips]),
                torch.tensor([label for _, label in items], dtype=torch.int64),
                torch.tensor([c.audio_present for c in clips], dtype=torch.bool))


@dataclass(frozen=True)
class EvalResult:
    """Top-1 accuracy and mAP (in [0, 1]) and mean GMACs per video, over ``videos`` videos."""

    top1: float
    mean_ap: float
    gflops: float
    videos: int

    def as_dict(self) -> dict:
        return asdict(self)


def mean_average_precision(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean over classes with at least one positive of the one-vs-rest average precision; scores (N, C)."""
    aps = []
    for c in range(scores.shape[1]):
        positive = labels == c
        if not positive.any():
            continue
        hits = positive[scores[:, c].argsort(descending=True, stable=True)].float()
        precision = hits.cumsum(0) / torch.arange(1, hits.numel() + 1)
        aps.append(float((precision * hits).sum() / hits.sum()))
    return sum(aps) / len(aps)


def evaluate(model: AVGN, source, *, batch_size: int = 32, k: int | None = None,
             exit_threshold: float | None | str = FROM_CHECKPOINT, backend: str = "eager", precision: str = "auto",
             progress: bool = False) -> EvalResult:
    """Every video of ``source`` (a ``TensorSource``/``FolderSource``) through a ``GlanceEngine`` on the model's
    device, as ``predict`` runs it: ``k`` and ``exit_threshold`` as in ``InferenceSettings``, ``backend`` and
    ``precision`` as in ``GlanceEngine``. The model's training mode is restored afterwards."""
    was_training = model.training
    try:
        engine = GlanceEngine(model, backend=backend, precision=precision, max_batch=batch_size, k=k)
        probs, labels, gflops = [], [], []
        for result, y in engine_results(engine, source, batch_size=batch_size, exit_threshold=exit_threshold,
                                        progress=progress):
            probs.append(result.final_logits.float().softmax(-1).cpu())
            labels.append(y)
            gflops.append(result.gflops.cpu())
    finally:
        model.train(was_training)
    probs, labels, gflops = torch.cat(probs), torch.cat(labels), torch.cat(gflops)
    top1 = float((probs.argmax(-1) == labels).float().mean())
    return EvalResult(top1, mean_average_precision(probs, labels), float(gflops.mean()), len(labels))


def engine_results(engine, source, *, batch_size: int, exit_threshold: float | None | str = FROM_CHECKPOINT,
                   progress: bool = False, desc: str = "eval") -> Iterator[tuple[GlanceResult, torch.Tensor]]:
    """(GlanceResult, labels) for each batch of ``batch_size`` videos of ``source``, in order, on ``engine``."""
    for start in tqdm(range(0, len(source), batch_size), desc=desc, unit="batch", disable=not progress):
        frames, mel, labels, present = source.batch(torch.arange(start, min(start + batch_size, len(source))))
        device = engine.device
        yield engine(frames.to(device), mel.to(device, torch.float32), present.to(device),
                     exit_threshold=exit_threshold), labels


@dataclass
class TrainResult:
    """The trained model (best validation epoch if validated, else last), one metrics dict per epoch, the best
    epoch's, and the run's ``summary`` (``run_summary``: epochs, wall time, plateau, validation curve)."""

    model: AVGN
    history: list[dict]
    best: dict | None
    summary: dict = field(default_factory=dict)


def _schedule(settings: TrainSettings, steps_per_epoch: int, stages: list[str]) -> Callable[[int], float]:
    """Learning-rate factor per optimizer step: a linear ramp at the start of each stage, then constant
    (audio, look) or a cosine decay to 0 (joint)."""
    ramp = max(1, round(settings.lr_warmup_epochs * steps_per_epoch))
    starts = [i for i, stage in enumerate(stages) if i == 0 or stage != stages[i - 1]]

    def factor(step: int) -> float:
        epoch = min(step // steps_per_epoch, len(stages) - 1)
        first = max(i for i in starts if i <= epoch)
        length = (next((i for i in starts if i > first), len(stages)) - first) * steps_per_epoch
        step -= first * steps_per_epoch
        if step < ramp:
            return (step + 1) / ramp
        if stages[first] != "joint":
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - ramp) / max(1, length - ramp))))

    return factor


def fit(model: AVGN, train, val=None, *, settings: TrainSettings, class_names, out_dir=None, resume: bool = False,
        progress: bool = False, log: Callable[[str], None] | None = None) -> TrainResult:
    """Train ``model`` on ``train`` (a source), validating on ``val`` after each joint epoch, until the validation
    top-1 plateaus or the cap is reached (``TrainSettings``: ``patience``, ``epochs``).

    Without ``val`` and with ``patience``, ``settings.val_fraction`` of ``train`` is held out for validation
    (``carve_validation``, seeded by ``settings.seed``; said in the log). With ``out_dir``, writes ``last.pt``
    (resumable: optimizer, schedule, RNG, history, per-epoch seconds) and ``best.pt`` (best validation top-1)
    after every epoch; ``resume`` continues from ``last.pt`` (a run that had plateaued trains no further).
    The run is a pure function of ``settings.seed`` (held-out videos, batch order per epoch, random patches).
    """
    say = log or (lambda line: None)
    out_dir = None if out_dir is None else Path(out_dir)
    validation = "validation split" if val is not None else "none"
    if val is None and settings.patience is not None:
        kept, held = carve_validation(len(train), settings.val_fraction, settings.seed)
        train, val = SubsetSource(train, kept), SubsetSource(train, held)
        validation = f"held out {len(held)} of {len(kept) + len(held)} training videos (seed {settings.seed})"
        say(f"no validation split: {validation} to find the plateau")
    steps_per_epoch = math.ceil(len(train) / settings.batch_size)
    stages = settings.stages(model.config)
    total_epochs = len(stages)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(settings, steps_per_epoch, stages))
    parts = [part for part in model.children() if any(p.requires_grad for p in part.parameters())]
    history, seconds, best, best_state, start_epoch = [], [], None, None, 0
    if resume:
        history, seconds, best = resume_run(model, optimizer, scheduler, out_dir, settings, class_names)
        start_epoch = len(history)
    device = next(model.parameters()).device
    train = TrainingSource(train, settings.augmentation(), model.config.num_frames, device, settings.mixing(),
                           model.config.num_classes)
    val = None if val is None else TrainingSource(val, None, model.config.num_frames, device)

    floor = 0.0 if val is None else chance_floor(model.config.num_classes, len(val))

    def stop() -> bool:  # the validation curve so far has plateaued
        curve = [record["val_top1"] for record in history if "val_top1" in record]
        return settings.patience is not None and plateaued(curve, settings.patience, floor)

    for epoch in range(start_epoch, total_epochs):
        if stop():
            break
        clock = time.perf_counter()
        model.train()
        stage = stages[epoch]
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(settings.seed * 100003 + epoch))
        sums, correct = {}, 0
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{total_epochs} ({stage})", unit="batch",
                   disable=not progress)
        for step in bar:
            frames, mel, labels, present = (t.to(device) for t in
                                            train.batch(order[step * settings.batch_size:][:settings.batch_size]))
            losses = {"audio": audio_warmup_losses, "look": look_losses, "joint": avgn_losses}[stage]
            out = losses(model, frames, mel, labels, present, settings.losses)
            optimizer.zero_grad(set_to_none=True)
            out["total"].backward()
            for part in parts:
                torch.nn.utils.clip_grad_norm_(part.parameters(), settings.grad_clip)
            optimizer.step()
            scheduler.step()
            for name, value in out.items():
                if name != "logits":
                    sums[name] = sums.get(name, 0.0) + float(value.detach()) * len(labels)
            hard = labels if labels.dim() == 1 else labels.argmax(-1)  # a mixed video counts as its larger share
            correct += int((out["logits"][:, -1].argmax(-1) == hard).sum())
            bar.set_postfix(loss=f"{float(out['total'].detach()):.3f}")
        record = {"epoch": epoch + 1, "stage": stage, "train_top1": correct / len(train),
                  **{f"loss_{name}": value / len(train) for name, value in sums.items()}}
        if val is not None and stage == "joint":
            # fp32 on any device: the validation numbers that choose the best epoch do not depend on the GPU
            metrics = evaluate(model, val, precision="fp32").as_dict()
            record.update({f"val_{name}": value for name, value in metrics.items()})
        history.append(record)
        seconds.append(time.perf_counter() - clock)  # kept beside the history, which stays a pure function of seed
        improved = stage == "joint" and (best is None or val is None or record["val_top1"] > best["val_top1"])
        if improved:
            best = record
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if out_dir is not None:
            train_state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                           "rng": torch.get_rng_state(), "history": history, "best": best, "seconds": seconds,
                           "settings": settings.as_dict(),
                           "summary": run_summary(history, seconds, settings, validation, floor)}
            save_checkpoint(out_dir / "last.pt", model, class_names=class_names, metrics=record,
                            train_state=train_state)
            if improved:
                save_checkpoint(out_dir / "best.pt", model, class_names=class_names, metrics=record)
        say("  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
    summary = run_summary(history, seconds, settings, validation, floor)
    if summary["plateaued"]:
        say(f"validation top-1 plateaued: no gain in {settings.patience} joint epochs after epoch "
            f"{summary['best_epoch']}; stopped after epoch {len(history)}")
    elif settings.patience is not None and summary["val_top1"] and not summary["left_chance"]:
        say(f"validation top-1 never rose above chance ({100 * floor:.1f} % on {len(val)} videos): trained to the cap")
    if best_state is None and out_dir is not None and (out_dir / "best.pt").is_file():
        best_state = load_checkpoint(out_dir / "best.pt").model.state_dict()  # best epoch came before a resume
    if best_state is not None:
        model.load_state_dict(best_state)
    return TrainResult(model, history, best, summary)


def train_model(config: AVGNConfig, train_batch, val_batch=None, epochs: int = TrainSettings.epochs, *,
                class_names=None, settings: TrainSettings | None = None, out_dir=None, progress: bool = False,
                log: Callable[[str], None] | None = None, **overrides) -> TrainResult:
    """Build an AVGN for ``config`` and train it on in-memory videos (e.g. ``generate_tensors`` output).

    ``train_batch``/``val_batch``: ``SynthBatch``-like objects or ``TensorSource``; ``epochs`` (joint epochs:
    the cap while ``settings.patience`` stops at the plateau) and ``overrides`` replace fields of ``settings``
    (``batch_size=16, lr=1e-3, seed=1, patience=None``...).
    """
    settings = dataclasses.replace(settings or TrainSettings(), epochs=epochs, **overrides)
    torch.manual_seed(settings.seed)
    model = AVGN(config)
    names = class_names or getattr(train_batch, "class_names", None) or [str(i) for i in range(config.num_classes)]
    val = None if val_batch is None else TensorSource.of(val_batch)
    return fit(model, TensorSource.of(train_batch), val, settings=settings, class_names=names, out_dir=out_dir,
               progress=progress, log=log)
