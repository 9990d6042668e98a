"""The README.md of a written AVSynth folder: the task, the classes, what each modality carries, the settings."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from avgn_fast.config import AVGNConfig
from avgn_fast.data.synth.render import VERSION
from avgn_fast.data.synth.scene import (
    CLASS_NAMES,
    CLASSES,
    FRAMES_PER_SEGMENT,
    SEGMENT_S,
    SOUND_GAP,
    SOURCE_FPS,
    Scene,
    tile_size,
)
from avgn_fast.data.synth.sound import EVENT_DB, NOISE_DB


def readme_text(scenes: list[Scene], counts: Sequence[int], *, seed: int, fmt: str, config: AVGNConfig) -> str:
    """The dataset folder's README: the task, the classes, what each modality carries, the generation settings."""
    f, t = tile_size(config), config.num_frames
    codecs = "H.264 (yuv420p) + AAC" if fmt == "mp4" else "VP9 (yuv420p) + Opus"
    card_frames = np.mean([sum(len(r.boxes) for r in (s.event, *s.distractors)) / t for s in scenes])
    event_frames = np.mean([len(s.event.boxes) for s in scenes])
    runs = np.mean([len(s.distractors) for s in scenes])
    with_sound = np.mean([s.sound_distractor is not None for s in scenes])
    # a visual-only glance that finds every card run and keeps one frame of each of K runs reaches the event
    reach = np.mean([min(1.0, config.k / (1 + len(s.distractors))) for s in scenes])
    ceiling = reach * 15 / 16 + (1 - reach) / len(CLASS_NAMES)
    table = "\n".join(f"| {i} | `{name}` | {g} | {s} |" for i, (name, (g, s)) in enumerate(zip(CLASS_NAMES, CLASSES,
                                                                                          strict=True)))
    return f"""# AVSynth

A synthetic audio-visual video classification benchmark on which each half of the Audio-Visual
Glance Network is needed: the class shows in one or two of the {t} sampled frames, its visual
detail is readable only at full resolution, and finding it needs the sound.

Written by `avgn-fast synth --videos {len(scenes)} --seed {seed} --format {fmt}` with the `{config.name}`
configuration (T={t}, S={config.frame_size}, G={config.glance_size}, P={config.patch_size}, K={config.k}; generator
version {VERSION}); re-running the same command in this folder keeps the files already here.

## Files

- `videos/NNNNN.{fmt}`: {codecs}. {t * SEGMENT_S:g} s, {SOURCE_FPS} fps, {config.frame_size}x{config.frame_size}
  pixels, mono audio at {config.sample_rate} Hz. The video is {t} segments of {SEGMENT_S} s, each held for
  {FRAMES_PER_SEGMENT} identical frames, so the {t} uniformly sampled frames (midpoints of {t} equal segments of
  the duration) are one per segment whatever rounding a decoder uses.
- `labels.csv`: `path,label,split`; {counts[0]} train, {counts[1]} val, {counts[2]} test videos, every split
  balanced over the classes (labels come in shuffled blocks of {len(CLASS_NAMES)}).
- `avsynth.json`: the generation settings this folder was written with.

The same videos are available as decoded tensors without any file:
`avgn_fast.data.synth.generate_tensors(N, config=config, seed={seed})` gives what decoding these files
gives, up to codec loss (bounds in `avgn_fast.data.synth.CODEC_TOLERANCE`).

## Task

Class = (glyph, sound), {len(CLASS_NAMES)} classes; label index = row of this table (the names sort in this order):

| index | name | glyph | sound |
|---|---|---|---|
{table}

`checker+buzz` and `checker+hiss` differ only in sound; `diamonds+warble` and `zigzag+warble` only in
appearance.

**Video.** Coloured discs move over varying backgrounds (colour gradients, drifting soft blobs, noise).
Some discs carry a light card with a {4 * f}x{4 * f}-pixel glyph: 4x4 tiles of {f}x{f} pixels, every tile
with {f} dark pixels through its centre (a line in one of four orientations for the class glyphs, an L
shape for the neutral glyph). The class glyph is on screen only during the event: {event_frames:.2f} of
the {t} sampled frames on average. Neutral cards (distractors, {runs:.1f} runs of 1-2 segments per video)
look the same at glance resolution: cards are on screen in {100 * card_frames:.0f} % of the sampled frames.

**Audio.** The class sound plays exactly while the event card is on screen. Another class's sound
plays at a time with no card on screen ({100 * with_sound:.0f} % of videos), at least {SOUND_GAP} segments away
from the event so that no frame's {config.audio_window_s:g} s window holds both. Background noise (white to
brown) and sometimes a hum; sound levels {EVENT_DB[0]:g} to {EVENT_DB[1]:g} dBFS, noise {NOISE_DB[0]:g} to
{NOISE_DB[1]:g} dBFS, pitch +-10 %.

## Why each half of AVGN is needed

- **Spatial glance.** Downsampling {config.frame_size} -> {config.glance_size} averages each {f}x{f} tile to
  the same grey, so every glyph, class or neutral, is the same grey square at glance resolution
  (exactly for area / box downsampling and for bilinear without antialiasing; antialiased bilinear or
  bicubic filters leave faint edge artefacts, so use `mode="area"`). In a {config.patch_size}x{config.patch_size}
  full-resolution patch around the card the glyph is plain to read.
- **Temporal glance with audio.** The frames worth a patch are those with a card *and* the sound. Without
  audio the event cannot be told from the neutral cards at glance resolution, so a visual-only glance
  keeping K of {t} frames spends patches on distractors: even one that finds every card run and keeps
  one frame from each of K = {config.k} runs reaches the event in {100 * reach:.0f} % of these videos, a
  top-1 ceiling of about {100 * ceiling:.0f} % (guessing the rest). With the sound, all K frames can go to
  the event and its neighbours.
- **Audio for the class.** Even with the event found, the glyph cannot separate `checker+buzz` from
  `checker+hiss`: a visual-only model tops out at 15/16 = 93.75 % however it chooses frames.
- **Video for the class.** The sound cannot separate `diamonds+warble` from `zigzag+warble`, and the second
  class sound ({100 * with_sound:.0f} % of videos) means audio alone cannot tell which sound is the event.
"""
