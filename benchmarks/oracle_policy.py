"""What a visual-only glance could reach on AVSynth: visual-only models trained and tested with oracle policies.

    python benchmarks/oracle_policy.py --avsynth AVSYNTH_DIR [--cache CACHE_DIR] [--policies event,cards,uniform-centre]
                                       [--epochs 12] [--out oracle_policy.json]

The demo's visual-only glance (learned policy, no audio) ends near chance, like uniform frames + the centre
patch. To tell a policy that learned nothing from a task that leaves nothing to learn, the same visual-only model
(``tiny`` with ``audio=false``) is trained with its frame choice and patch centres replaced by an oracle's
(``avgn_fast.data.synth.oracle``): ``event`` is told where the class glyph is, ``cards`` finds every card but cannot
tell the event's from the neutral ones (the best any visual-only glance can do), ``uniform-centre`` looks where the
baseline does. Everything else is learned: the glance and local encoders, the classifier, with the ordered exit
losses and the local head's multiple-instance loss, AdamW at the demo's learning rate with a cosine over
``--epochs``, batches of 16, one torch thread. The checkpoint of the best validation epoch is tested. Prints one
row per policy (test top-1, how often its frames hold the event, the README's ceiling for ``cards``) and writes
them, with the validation curves, to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import re
import time
from pathlib import Path

import numpy as np
import torch

from avgn_fast.config import AVGNConfig
from avgn_fast.data.synth.oracle import ORACLES, event_reached, oracle_forward, oracle_views
from avgn_fast.data.synth.scene import CLASS_NAMES, sample_scene
from avgn_fast.models.avgn import AVGN
from avgn_fast.training.losses import LossWeights, instance_cross_entropy, ordered_logits_loss


def load(avsynth: Path, cache: Path, config: AVGNConfig, split: str):
    """(frames, labels, scenes) of a split: decoded clips (from the cache) and each video's ground truth."""
    from avgn_fast.data.folder import FolderDataset
    from avgn_fast.training.trainer import FolderSource

    seed = json.loads((avsynth / "avsynth.json").read_text())["seed"]
    dataset = FolderDataset(avsynth, config, split=split, cache_dir=cache)
    failed = dataset.decode_all()
    if failed:
        raise ValueError(f"{avsynth}: {len(failed)} files failed to decode, e.g. {failed[0]}")
    frames, _, labels, _ = FolderSource(dataset).batch(torch.arange(len(dataset)))
    scenes = [sample_scene(int(re.search(r"(\d+)\.\w+$", e.path).group(1)), seed=seed, config=config)
              for e in dataset.entries]
    if [s.label for s in scenes] != labels.tolist():
        raise ValueError(f"{avsynth}: labels.csv disagrees with the scenes of seed {seed}")
    return frames, labels, scenes


def views(scenes, config: AVGNConfig, policy: str, rng: np.random.Generator):
    """(kept (N, K), a (N, K, 2)) of ``policy`` on every scene."""
    pairs = [oracle_views(scene, config, policy, rng) for scene in scenes]
    return torch.stack([k for k, _ in pairs]), torch.stack([a for _, a in pairs])


@torch.no_grad()
def accuracy(model: AVGN, frames, labels, kept, a, batch: int = 64) -> float:
    model.eval()
    right = sum(int((oracle_forward(model, frames[i:i + batch], kept[i:i + batch], a[i:i + batch]).logits[:, -1]
                     .argmax(-1) == labels[i:i + batch]).sum()) for i in range(0, len(labels), batch))
    return right / len(labels)


def train(policy: str, data: dict, config: AVGNConfig, *, epochs: int, seed: int, batch: int = 16,
          lr: float = 2e-3) -> dict:
    torch.manual_seed(seed)
    model = AVGN(config)
    weights = LossWeights()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    frames, labels, scenes = data["train"]
    steps = epochs * math.ceil(len(labels) / batch)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 0.5 * (1 + math.cos(math.pi * i / steps)))
    fixed = {split: views(data[split][2], config, policy, np.random.default_rng([seed, i]))
             for i, split in enumerate(("val", "test"))}
    curve, best, best_state, clock = [], -1.0, None, time.perf_counter()
    for epoch in range(epochs):
        model.train()
        kept, a = views(scenes, config, policy, np.random.default_rng([seed, 100 + epoch]))  # cards: new draws
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed * 1000 + epoch))
        for i in range(0, len(labels), batch):
            index = order[i:i + batch]
            out = oracle_forward(model, frames[index], kept[index], a[index])
            y = labels[index]
            loss = ordered_logits_loss(out.logits, y) + weights.aux_local * instance_cross_entropy(
                model.aux_heads["local"](out.local), y, mix=weights.instance_mix)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        curve.append(accuracy(model, data["val"][0], data["val"][1], *fixed["val"]))
        print(f"{policy}: epoch {epoch + 1}/{epochs} val top-1 {100 * curve[-1]:.1f} %", flush=True)
        if curve[-1] > best:
            best, best_state = curve[-1], {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    kept, _ = fixed["test"]
    reached = float(np.mean([event_reached(s, k) for s, k in zip(data["test"][2], kept, strict=True)]))
    return {"policy": policy, "test_top1": accuracy(model, data["test"][0], data["test"][1], *fixed["test"]),
            "best_val_top1": best, "best_epoch": curve.index(best) + 1, "val_top1": curve, "epochs": epochs,
            "event_in_kept": reached, "wall_s": round(time.perf_counter() - clock, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--avsynth", type=Path, required=True, help="AVSynth folder (avgn-fast synth, or the demo's)")
    parser.add_argument("--cache", type=Path, default=None, help="decoded-clip cache; default: AVSYNTH/../../cache")
    parser.add_argument("--policies", default=",".join(ORACLES), help=f"comma-separated, of {', '.join(ORACLES)}")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("oracle_policy.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = AVGNConfig.from_name("tiny").with_overrides(["audio=false"]).replace(num_classes=len(CLASS_NAMES))
    cache = args.cache or args.avsynth.parent.parent / "cache"
    data = {split: load(args.avsynth, cache, config, split) for split in ("train", "val", "test")}
    rows = [train(policy, data, config, epochs=args.epochs, seed=args.seed) for policy in args.policies.split(",")]
    k = config.k
    # the dataset README's ceiling for a glance that keeps one frame of each of K card runs: reach·15/16 + rest/8
    reach = float(np.mean([min(1.0, k / (1 + len(s.distractors))) for s in data["test"][2]]))
    ceiling = reach * 15 / 16 + (1 - reach) / len(CLASS_NAMES)
    print(f"visual-only tiny model, {len(data['train'][1])} train / {len(data['val'][1])} val / "
          f"{len(data['test'][1])} test videos, {args.epochs} epochs, seed {args.seed}")
    print("| oracle policy | test top-1 % | best val top-1 % (epoch) | kept frames hold the event | wall s |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['policy']} | {100 * r['test_top1']:.1f} | {100 * r['best_val_top1']:.1f} ({r['best_epoch']}) | "
              f"{100 * r['event_in_kept']:.0f} % | {r['wall_s']:.0f} |")
    print(f"README ceiling of a perfect visual-only glance on these test videos: {100 * ceiling:.1f} %")
    payload = {"rows": rows, "ceiling_cards": ceiling, "machine": platform.processor() or platform.machine(),
               "torch": torch.__version__, "avsynth": str(args.avsynth)}
    args.out.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
