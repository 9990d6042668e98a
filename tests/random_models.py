"""Random-weight models for tests whose outputs must depend on their inputs."""

from __future__ import annotations

import torch

from avgn_fast.engine.stages import inference_view, random_inputs
from avgn_fast.models.avgn import AVGN


def random_model(config, seed: int = 0, *, exits: bool = False, live_audio: bool = False) -> AVGN:
    """An eval-mode AVGN with random weights (``seed``) and a policy that moves the patch, so patch locations
    depend on the inputs; ``exits``: exit heads confident enough that videos leave at different steps;
    ``live_audio``: audio features that differ between sounds (below; implied for the audio-only baseline with
    ``exits``)."""
    torch.manual_seed(seed)
    model = AVGN(config).eval()
    with torch.no_grad():
        if model.aespa is not None:
            model.aespa.policy[-1].weight.normal_(0, 0.5)
            if exits:
                model.aespa.policy[-1].bias.normal_(0, 0.5)
        if exits:
            for head in model.classifier.heads:
                head.weight.normal_(0, 0.5)
    if live_audio or (exits and model.visual is None and model.local is None):
        # audio-only: at its initial BatchNorm statistics the random audio encoder's features vanish (~1e-9) and
        # every video looks alike; the statistics of one batch of random clips make them differ
        norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        for m in norms:
            m.momentum = 1.0
        _, mel, present = random_inputs(config, 8, seed=9)
        with torch.no_grad():
            model.train().encode_audio(mel, present)
        for m in norms:
            m.momentum = 0.1
        model.eval()
    return model


def folded(model: AVGN) -> AVGN:
    """``model`` with its conv backbones' batch norms folded into their convs, as the engine's stages run them (its
    ``inference_view`` keeping every part): the reference where a comparison expects the engine's own float rounding
    (an ill-conditioned random model moves by more than the float32 tolerance between the folded and the unfolded
    sums)."""
    return inference_view(model, tuple(name for name, _ in model.named_children()))
