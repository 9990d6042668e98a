"""The parts of an AVGN that do multiply-accumulate work, as its cost (``avgn_fast.flops``) counts them."""

from __future__ import annotations

import torch
from torch import nn

from avgn_fast.models.outputs import Component


def model_components(model: nn.Module) -> list[Component]:
    """Every part of ``model``'s (an ``AVGN``'s) inference path that does multiply-accumulate work, with batch-1
    example inputs.

    Per video: the glance encoders on each of the T frames, AV-TeST once. Per step taken: AESPA and the
    policy on that step's frame, the local encoder on its patch, the classifier (fusion MLP, one exit head);
    the crop, part norms and running max do none. (The engine runs AESPA on all k kept frames up front so
    every kept frame has a box; the boxes of steps not taken are not counted.) Parts the configuration
    lacks (the audio-only baseline has neither glance nor patches) have no row.
    """
    c, t, p = model.config, model.config.num_frames, model.patch_size()
    param = next(model.parameters())
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):  # a private generator: counting must not move the global RNG
        return torch.randn(*shape, generator=gen).to(param.device, param.dtype)

    audio_dim = model.audio.out_channels if model.audio is not None else 0
    rows = []
    if model.visual is not None:
        rows.append(Component("visual glance encoder", model.visual, (rand(1, 3, c.glance_size, c.glance_size),),
                              "frame", t))
    if model.audio is not None:
        rows.append(Component("audio encoder", model.audio, (rand(1, 1, c.n_mels, model.mel_steps),), "frame", t))
    if model.avtest is not None:
        inputs = (rand(1, t, model.visual.out_channels),) + ((rand(1, t, audio_dim),) if audio_dim else ())
        rows.append(Component("AV-TeST", model.avtest, inputs, "video", 1))
    if model.aespa is not None:
        aespa = model.aespa
        inputs = (rand(1, aespa.visual_pos.shape[0], aespa.visual_proj.in_features),
                  rand(1, aespa.query[1].in_features))
        if audio_dim:
            inputs += (rand(1, aespa.audio_pos.shape[0], audio_dim),)
        rows.append(Component("AESPA + policy", aespa, inputs, "kept frame", 1, per_step=True))
    if model.local is not None:
        rows.append(Component("local encoder", model.local, (rand(1, 3, p, p),), "patch", 1, per_step=True))
    one_step = nn.Sequential(model.classifier.fuse, model.classifier.heads[0])
    rows.append(Component("classifier (fusion + exit head)", one_step,
                          (rand(1, model.classifier.fuse[0].in_features),), "step", 1, per_step=True))
    return rows
