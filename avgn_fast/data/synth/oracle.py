"""Where a policy told AVSynth's ground truth would look: the frames and patch centres of three oracle policies.

They bound what a learned glance can gain on AVSynth (``benchmarks/oracle_policy.py`` trains a visual-only model
on each):

- ``event``: told where the class glyph is: the event's frames, each patch centred on the event's card;
- ``cards``: the best a visual-only glance can do. It finds every card, but at glance resolution a neutral card
  looks exactly like the event's (the dataset's README), so it keeps one frame of each of K card runs drawn at
  random, each patch centred on that frame's card;
- ``uniform-centre``: K uniformly spaced frames and the frame centre, as the uniform+centre baseline looks.

Frame t of the T sampled frames is segment t of the scene (``sample_times``).
"""

from __future__ import annotations

import numpy as np
import torch

from avgn_fast.config import AVGNConfig
from avgn_fast.data.synth.scene import CARD_TILES, Scene, tile_size

ORACLES = ("event", "cards", "uniform-centre")


def card_centre(box: tuple[int, int], config: AVGNConfig) -> list[float]:
    """The patch centre a ∈ [0, 1]² (the model's convention: corner = a·(S − P)) of a patch centred on the card
    whose top-left pixel is ``box`` (y, x), clipped so the patch stays inside the frame."""
    s, p = config.frame_size, config.patch_size
    half_card = CARD_TILES * tile_size(config) / 2
    return [min(1.0, max(0.0, (corner + half_card - p / 2) / (s - p))) for corner in box]


def oracle_views(scene: Scene, config: AVGNConfig, policy: str, rng: np.random.Generator):
    """(kept (K,) int64 in step order, a (K, 2) float32) of ``policy`` (``ORACLES``) on one video.

    Where the policy has fewer than K distinct views (an event of 1-2 frames), its views repeat in turn; ``cards``
    keeps its K runs in time order and draws the runs and the frame of each from ``rng``.
    """
    k = config.k
    if policy == "event":
        views = [(s, card_centre(box, config)) for s, box in enumerate(scene.event.boxes, scene.event.start)]
    elif policy == "cards":
        runs = sorted((scene.event, *scene.distractors), key=lambda run: run.start)
        chosen = sorted(rng.choice(len(runs), size=min(k, len(runs)), replace=False).tolist())
        views = []
        for i in chosen:
            j = int(rng.integers(len(runs[i].boxes)))
            views.append((runs[i].start + j, card_centre(runs[i].boxes[j], config)))
    elif policy == "uniform-centre":
        from avgn_fast.models.avtest import uniform_frames

        views = [(int(t), [0.5, 0.5]) for t in uniform_frames(config.num_frames, k, 1)[0]]
    else:
        raise ValueError(f"unknown oracle policy {policy!r}; known: {', '.join(ORACLES)}")
    views = [views[i % len(views)] for i in range(k)]
    return (torch.tensor([t for t, _ in views], dtype=torch.int64),
            torch.tensor([a for _, a in views], dtype=torch.float32))


def event_reached(scene: Scene, kept: torch.Tensor) -> bool:
    """Whether any of the ``kept`` frames shows the event."""
    return any(scene.event.start <= int(t) < scene.event.stop for t in kept)


def oracle_forward(model, frames: torch.Tensor, kept: torch.Tensor, a: torch.Tensor):
    """``model``'s forward (``AVGN.forward``: glance, crop, local encoder, classifier; no audio) with its frame
    choice and patch centres replaced by ``kept`` (B, K) and ``a`` (B, K, 2): AV-TeST and AESPA do not run."""
    b, t = frames.shape[:2]

    def run(name, env):
        if name == "avtest":
            return {"saliency": torch.zeros(b, t, device=frames.device), "kept": kept}
        if name == "aespa":
            return {"locations": a}
        return model.run_stage(name, env, k=kept.shape[1])

    mel = torch.zeros(b, t, model.config.n_mels, model.mel_steps, device=frames.device)
    return model(frames, mel, torch.zeros(b, dtype=torch.bool, device=frames.device), run=run)

