"""The training loop shared by the in-memory entry ``train_model`` and ``avgn-fast train``, and evaluation."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from avgn_fast.checkpoint import class_name_differences, config_differences, load_checkpoint, save_checkpoint
from avgn_fast.config import AVGNConfig
from avgn_fast.models.avgn import AVGN
from avgn_fast.training.losses import LossWeights, audio_warmup_losses, avgn_losses, look_losses


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
    """

    epochs: int = 8
    audio_warmup_epochs: int = 3
    look_epochs: int = 3
    batch_size: int = 16
    lr: float = 2e-3
    weight_decay: float = 1e-4
    lr_warmup_epochs: float = 0.5
    grad_clip: float = 5.0
    seed: int = 0
    losses: LossWeights = field(default_factory=LossWeights)

    def __post_init__(self):
        if (self.epochs < 1 or self.audio_warmup_epochs < 0 or self.look_epochs < 0 or self.batch_size < 1
                or self.lr <= 0):
            raise ValueError(f"bad settings: {self.epochs=} {self.audio_warmup_epochs=} {self.look_epochs=} "
                             f"{self.batch_size=} {self.lr=}")

    def as_dict(self) -> dict:
        """Plain values (the loss weights nested), as saved in checkpoints and compared on resume."""
        return asdict(self)

    def stages(self, config: AVGNConfig) -> list[str]:
        """The stage of every epoch ("audio", "look", "joint") for a model of ``config``.

        Without audio there is no warm-up; without audio or without patches (dense) the look
        epochs are joint epochs.
        """
        audio = ["audio"] * self.audio_warmup_epochs if config.audio else []
        look = "look" if config.audio and not config.dense else "joint"
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
             exit_threshold: float | None = None, progress: bool = False) -> EvalResult:
    """``model.glance`` over every video of ``source`` (a ``TensorSource``/``FolderSource``), on the model's device."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    probs, labels, gflops = [], [], []
    starts = range(0, len(source), batch_size)
    for start in tqdm(starts, desc="eval", unit="batch", disable=not progress):
        frames, mel, y, present = source.batch(torch.arange(start, min(start + batch_size, len(source))))
        result = model.glance(frames.to(device), mel.to(device), audio_present=present.to(device), k=k,
                              exit_threshold=exit_threshold)
        probs.append(result.final_logits.float().softmax(-1).cpu())
        labels.append(y)
        gflops.append(result.gflops.cpu())
    model.train(was_training)
    probs, labels, gflops = torch.cat(probs), torch.cat(labels), torch.cat(gflops)
    top1 = float((probs.argmax(-1) == labels).float().mean())
    return EvalResult(top1, mean_average_precision(probs, labels), float(gflops.mean()), len(labels))


@dataclass
class TrainResult:
    """The trained model (best validation epoch if validated, else last) and one metrics dict per epoch."""

    model: AVGN
    history: list[dict]
    best: dict | None


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
    """Train ``model`` on ``train`` (a source), validating on ``val`` after each epoch.

    With ``out_dir``, writes ``last.pt`` (resumable: optimizer, schedule, RNG and history) and
    ``best.pt`` (best validation top-1) after every epoch; ``resume`` continues from ``last.pt``.
    The run is a pure function of ``settings.seed`` (batch order per epoch, random patches).
    """
    out_dir = None if out_dir is None else Path(out_dir)
    steps_per_epoch = math.ceil(len(train) / settings.batch_size)
    stages = settings.stages(model.config)
    total_epochs = len(stages)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(settings, steps_per_epoch, stages))
    parts = [part for part in model.children() if any(p.requires_grad for p in part.parameters())]
    history, best, best_state, start_epoch = [], None, None, 0
    if resume:
        last = None if out_dir is None else out_dir / "last.pt"
        if last is None or not last.is_file():
            raise FileNotFoundError(f"cannot resume: no last.pt in {out_dir}")
        state = load_checkpoint(last)
        saved = state.train_state or {}
        missing = {"optimizer", "scheduler", "rng", "history", "best"} - saved.keys()
        if not isinstance(saved.get("settings"), dict):
            missing.add("settings")
        if missing:
            raise ValueError(f"{last}: no training state to resume from (lacks {', '.join(sorted(missing))})")
        # more joint epochs extend a run; any other change would make it a different run
        differ = config_differences(state.model.config.to_dict(), model.config.to_dict())
        differ += [f"settings.{d}" for d in config_differences(state.train_state["settings"], settings.as_dict(),
                                                                skip=("epochs",))]
        differ += class_name_differences(state.class_names, [str(name) for name in class_names])
        if differ:
            raise ValueError(f"{last}: cannot resume, the saved run differs from this one: {'; '.join(differ)}")
        model.load_state_dict(state.model.state_dict())
        optimizer.load_state_dict(state.train_state["optimizer"])
        scheduler.load_state_dict(state.train_state["scheduler"])
        torch.set_rng_state(state.train_state["rng"])
        history, best = state.train_state["history"], state.train_state["best"]
        start_epoch = len(history)
    device = next(model.parameters()).device

    for epoch in range(start_epoch, total_epochs):
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
            correct += int((out["logits"][:, -1].argmax(-1) == labels).sum())
            bar.set_postfix(loss=f"{float(out['total'].detach()):.3f}")
        record = {"epoch": epoch + 1, "stage": stage, "train_top1": correct / len(train),
                  **{f"loss_{name}": value / len(train) for name, value in sums.items()}}
        if val is not None and stage == "joint":
            record.update({f"val_{name}": value for name, value in evaluate(model, val).as_dict().items()})
        history.append(record)
        improved = stage == "joint" and (best is None or val is None or record["val_top1"] > best["val_top1"])
        if improved:
            best = record
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if out_dir is not None:
            train_state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                           "rng": torch.get_rng_state(), "history": history, "best": best,
                           "settings": settings.as_dict()}
            save_checkpoint(out_dir / "last.pt", model, class_names=class_names, metrics=record,
                            train_state=train_state)
            if improved:
                save_checkpoint(out_dir / "best.pt", model, class_names=class_names, metrics=record)
        if log is not None:
            log("  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
    if best_state is None and out_dir is not None and (out_dir / "best.pt").is_file():
        best_state = load_checkpoint(out_dir / "best.pt").model.state_dict()  # best epoch came before a resume
    if best_state is not None:
        model.load_state_dict(best_state)
    return TrainResult(model, history, best)


def train_model(config: AVGNConfig, train_batch, val_batch=None, epochs: int = TrainSettings.epochs, *,
                class_names=None, settings: TrainSettings | None = None, out_dir=None, progress: bool = False,
                log: Callable[[str], None] | None = None, **overrides) -> TrainResult:
    """Build an AVGN for ``config`` and train it on in-memory videos (e.g. ``generate_tensors`` output).

    ``train_batch``/``val_batch``: ``SynthBatch``-like objects or ``TensorSource``; ``epochs`` and
    ``overrides`` replace fields of ``settings`` (``batch_size=16, lr=1e-3, seed=1``...).
    """
    settings = dataclasses.replace(settings or TrainSettings(), epochs=epochs, **overrides)
    torch.manual_seed(settings.seed)
    model = AVGN(config)
    names = class_names or getattr(train_batch, "class_names", None) or [str(i) for i in range(config.num_classes)]
    val = None if val_batch is None else TensorSource.of(val_batch)
    return fit(model, TensorSource.of(train_batch), val, settings=settings, class_names=names, out_dir=out_dir,
               progress=progress, log=log)
