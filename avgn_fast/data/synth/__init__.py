"""AVSynth: a synthetic audio-visual benchmark on which each half of AVGN is needed.

A video is ``T`` segments of ``SEGMENT_S`` seconds (T = ``config.num_frames``), each held for
``FRAMES_PER_SEGMENT`` frames at ``SOURCE_FPS``, so the T uniformly sampled frame times (midpoints of
T equal segments of the duration) fall one per segment, between two identical frames, whatever
rounding a decoder uses. Source frames are S x S (S = ``config.frame_size``), audio is mono at
``config.sample_rate``.

The event of class ``c`` = (glyph, sound): for 1-2 segments a coloured disc carrying a light card
shows the class glyph while the class sound plays. Glyphs are 4 x 4 tiles of ``f = S // G`` pixels,
every tile holding ``f`` ink pixels through its centre (a line in one of four orientations), and
cards sit on the f-pixel grid, so area downsampling to G (or, for odd f, bilinear without
antialiasing) turns every glyph into the same grey square: unreadable at glance resolution,
readable in a P x P patch. Distractors: 4-6 runs of the same disc and card carrying a neutral
glyph (L-shaped tiles) and no sound; one other class's sound with no card on screen; plain discs.
Backgrounds, noise, motion, colours, pitch and loudness vary per video. Everything is a pure
function of ``(seed, index)``.

Modules, each importing only those before it: ``scene`` (classes, glyphs, the layout of each video),
``sound`` (the wave), ``render`` (frames, ``RenderedVideo``, ``generate_tensors``), ``readme`` (the
folder's README text) and ``write`` (encoding, splits, ``write_dataset``).
"""

from avgn_fast.data.synth.render import (
    VERSION,
    RenderedVideo,
    SynthBatch,
    generate_tensors,
    glyph_mask,
    render_scene,
    render_video,
)
from avgn_fast.data.synth.scene import (
    CLASS_NAMES,
    FRAMES_PER_SEGMENT,
    GLYPHS,
    L_TILES,
    SEGMENT_S,
    SOUNDS,
    SOURCE_FPS,
    A,
    CardRun,
    D,
    H,
    Scene,
    V,
    label_of,
    sample_scene,
    sample_times,
    tile_size,
)
from avgn_fast.data.synth.write import (
    CODEC_TOLERANCE,
    DEFAULT_SPLITS,
    DEFAULT_VIDEOS,
    SPLIT_NAMES,
    split_counts,
    split_of,
    write_dataset,
    write_video,
)

__all__ = [
    "A", "CLASS_NAMES", "CODEC_TOLERANCE", "D", "DEFAULT_SPLITS", "DEFAULT_VIDEOS", "FRAMES_PER_SEGMENT", "GLYPHS",
    "H", "L_TILES", "SEGMENT_S", "SOUNDS", "SOURCE_FPS", "SPLIT_NAMES", "V", "VERSION", "CardRun", "RenderedVideo",
    "Scene", "SynthBatch", "generate_tensors", "glyph_mask", "label_of", "render_scene", "render_video",
    "sample_scene", "sample_times", "split_counts", "split_of", "tile_size", "write_dataset", "write_video",
]
