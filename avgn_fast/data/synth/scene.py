"""What is where and when in an AVSynth video: classes, glyphs, sounds, and the scene of each (seed, index)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from avgn_fast.config import AVGNConfig

SEGMENT_S = 0.25
FRAMES_PER_SEGMENT = 3
SOURCE_FPS = round(FRAMES_PER_SEGMENT / SEGMENT_S)  # 12

# Tile kinds, each f x f with f ink pixels through the centre. Lines make class glyphs, L shapes neutral ones.
H, V, D, A = 0, 1, 2, 3  # horizontal, vertical, diagonal, anti-diagonal line
L_TILES = (4, 5, 6, 7)  # L shapes opening to the four corners
GLYPHS = {
    "hstripes": (H,) * 16,
    "vstripes": (V,) * 16,
    "diagonal": (D,) * 16,
    "antidiag": (A,) * 16,
    "checker": tuple(H if (r + c) % 2 == 0 else V for r in range(4) for c in range(4)),
    "zigzag": tuple(D if r % 2 == 0 else A for r in range(4) for c in range(4)),
    "diamonds": tuple(D if (r + c) % 2 == 0 else A for r in range(4) for c in range(4)),
}
SOUNDS = ("chirp-up", "chirp-down", "two-tone", "clicks", "buzz", "hiss", "warble")
# (glyph, sound) per class, named "glyph+sound" and listed in sorted order so that a loader that sorts
# the names of labels.csv gets the same indices. checker+buzz / checker+hiss differ only in sound,
# diamonds+warble / zigzag+warble only in appearance.
CLASSES = tuple(sorted([
    ("hstripes", "chirp-up"), ("vstripes", "chirp-down"), ("diagonal", "two-tone"), ("antidiag", "clicks"),
    ("checker", "buzz"), ("checker", "hiss"), ("zigzag", "warble"), ("diamonds", "warble"),
], key=lambda gs: f"{gs[0]}+{gs[1]}"))
CLASS_NAMES = tuple(f"{g}+{s}" for g, s in CLASSES)

CARD_TILES = 6  # card side in tiles: the 4 x 4 glyph plus a one-tile margin
_EVENT_SEGMENTS = (1, 2)  # run lengths of the class event, the card distractors and the sound distractor
_DISTRACTOR_RUNS = (4, 6)  # inclusive range of neutral card runs
SOUND_GAP = 2  # segments between the event and the sound distractor, so no frame's window hears both


@dataclass(frozen=True)
class CardRun:
    """A disc with a glyph card shown on consecutive segments ``[start, start + len(boxes))``.

    ``tiles`` are the 16 tile kinds of the 4 x 4 glyph, row-major; ``boxes`` the card's top-left
    (y, x) in frame pixels per segment, multiples of the tile size so the glyph sits on the G grid.
    """

    start: int
    tiles: tuple[int, ...]
    boxes: tuple[tuple[int, int], ...]

    @property
    def stop(self) -> int:
        return self.start + len(self.boxes)


@dataclass(frozen=True)
class Scene:
    """Ground truth of one AVSynth video: what is where and when; appearance comes from ``appearance_seed``.

    ``event`` carries the class glyph while the class sound plays; ``distractors`` carry neutral
    glyphs and no sound; ``sound_distractor`` is (sound index, start, stop) in segments, with no card.
    """

    label: int
    event: CardRun
    distractors: tuple[CardRun, ...]
    sound_distractor: tuple[int, int, int] | None
    appearance_seed: int

    @property
    def glyph(self) -> str:
        return CLASSES[self.label][0]

    @property
    def sound(self) -> str:
        return CLASSES[self.label][1]

    def card_boxes(self, tile: int) -> torch.Tensor:
        """int64 (n, 5) rows (segment, y0, x0, y1, x1) of every card shown, by segment; ``tile`` = ``tile_size``."""
        rows = [(s, y, x, y + CARD_TILES * tile, x + CARD_TILES * tile)
                for run in (self.event, *self.distractors) for s, (y, x) in enumerate(run.boxes, run.start)]
        return torch.tensor(sorted(rows), dtype=torch.int64).reshape(-1, 5)


def tile_size(config: AVGNConfig) -> int:
    """Glyph tile side in frame pixels (S // G); raises ValueError for configs AVSynth cannot serve."""
    f = config.frame_size // config.glance_size
    if f < 3 or config.frame_size % config.glance_size:
        raise ValueError(f"AVSynth needs frame_size = f x glance_size with a whole f >= 3, so the glyph is unreadable "
                         f"at glance resolution; got {config.frame_size=} {config.glance_size=}")
    if config.resize_shorter != config.frame_size:
        raise ValueError(f"AVSynth renders square S x S sources and needs resize_shorter == frame_size, got "
                         f"{config.resize_shorter=} {config.frame_size=}")
    if CARD_TILES * f > config.patch_size:
        raise ValueError(f"the {CARD_TILES * f}-pixel glyph card does not fit the {config.patch_size}-pixel patch")
    if config.num_frames < 8:
        raise ValueError(f"AVSynth needs num_frames >= 8 to place its event and distractors, got {config.num_frames}")
    return f


def sample_times(config: AVGNConfig) -> torch.Tensor:
    """The T frame times in seconds, float64: midpoints of T equal segments of the duration."""
    return (torch.arange(config.num_frames, dtype=torch.float64) + 0.5) * SEGMENT_S


def label_of(index: int, seed: int) -> int:
    """Class of video ``index``: each block of ``len(CLASS_NAMES)`` consecutive indices is a permutation."""
    c = len(CLASS_NAMES)
    return int(np.random.default_rng([seed, index // c, 1]).permutation(c)[index % c])


def sample_scene(index: int, *, seed: int, config: AVGNConfig) -> Scene:
    """Lay out video ``index``: event, distractor runs and sound distractor, on T segments."""
    f = tile_size(config)
    t = config.num_frames
    rng = np.random.default_rng([seed, index])
    label = label_of(index, seed)

    def run_length() -> int:
        return int(rng.integers(_EVENT_SEGMENTS[0], _EVENT_SEGMENTS[1] + 1))

    busy = np.zeros(t, dtype=bool)
    length = run_length()
    start = int(rng.integers(0, t - length + 1))
    busy[start:start + length] = True
    event = _card_run(rng, start, length, GLYPHS[CLASSES[label][0]], f, config.frame_size)

    sound_distractor = None
    length = run_length()
    starts = [s for s in range(t - length + 1)
              if s + length + SOUND_GAP <= event.start or s >= event.stop + SOUND_GAP]
    if starts:
        s = int(rng.choice(starts))
        others = [i for i, name in enumerate(SOUNDS) if name != CLASSES[label][1]]
        sound_distractor = (int(rng.choice(others)), s, s + length)
        busy[s:s + length] = True

    distractors = []
    for _ in range(int(rng.integers(_DISTRACTOR_RUNS[0], _DISTRACTOR_RUNS[1] + 1))):
        length = run_length()
        starts = [s for s in range(t - length + 1) if not busy[s:s + length].any()]
        if not starts:
            continue
        s = int(rng.choice(starts))
        busy[s:s + length] = True
        tiles = tuple(int(k) for k in rng.choice(L_TILES, 16))
        distractors.append(_card_run(rng, s, length, tiles, f, config.frame_size))
    distractors.sort(key=lambda run: run.start)
    return Scene(label, event, tuple(distractors), sound_distractor, int(rng.integers(2**62)))


def _card_run(rng: np.random.Generator, start: int, length: int, tiles: tuple[int, ...], f: int,
              size: int) -> CardRun:
    """Card positions on the tile grid, a tile inside the frame, moving up to one tile per segment (bouncing)."""
    lo, hi = 1, size // f - CARD_TILES - 1  # card top-left in tiles: the card stays a tile inside the frame
    pos = rng.integers(lo, hi + 1, 2)
    vel = rng.integers(-1, 2, 2)
    boxes = []
    for _ in range(length):
        boxes.append((int(pos[0] * f), int(pos[1] * f)))
        nxt = pos + vel
        vel = np.where((nxt < lo) | (nxt > hi), -vel, vel)
        pos = np.clip(pos + vel, lo, hi)
    return CardRun(start, tiles, tuple(boxes))
