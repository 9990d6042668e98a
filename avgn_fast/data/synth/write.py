"""AVSynth on disk: encoded videos, labels.csv with a train/val/test split, README.md and the settings manifest."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import numpy as np

from avgn_fast.config import AVGNConfig
from avgn_fast.data.synth.readme import readme_text
from avgn_fast.data.synth.render import VERSION, RenderedVideo, render_scene
from avgn_fast.data.synth.scene import CLASS_NAMES, sample_scene, tile_size

DEFAULT_VIDEOS = 1800
DEFAULT_SPLITS = (1100 / 1800, 200 / 1800, 500 / 1800)  # 1,100 train / 200 val / 500 test at the default size
SPLIT_NAMES = ("train", "val", "test")

# How far decoding a written file (PyAV path) may land from ``generate_tensors``, per video: mean
# absolute difference of the uint8 frames, of the luma inside the event's glyph, and of the log-mel
# (nats). Measured on 16 videos per format: at most 3.1, 3.3 and 0.21; a one-frame shift gives >= 9.7
# and >= 1.39, so the bounds still tell the right frames and windows from their neighbours.
CODEC_TOLERANCE = {"frame_mae": 4.0, "glyph_mae": 5.0, "mel_mae": 0.35}


def split_counts(num_videos: int, splits: Sequence[float] = DEFAULT_SPLITS) -> tuple[int, int, int]:
    """Videos per (train, val, test): train and val rounded from their fractions, test the rest."""
    if len(splits) != 3 or min(splits) < 0 or abs(sum(splits) - 1) > 1e-6:
        raise ValueError(f"splits must be three non-negative fractions (train, val, test) summing to 1, got {splits}")
    n_train = round(num_videos * splits[0])
    n_val = min(round(num_videos * splits[1]), num_videos - n_train)
    return n_train, n_val, num_videos - n_train - n_val


def split_of(index: int, counts: Sequence[int]) -> str:
    """Split of video ``index``: the first ``counts[0]`` indices train, the next ``counts[1]`` val, then test."""
    return SPLIT_NAMES[0] if index < counts[0] else SPLIT_NAMES[1] if index < counts[0] + counts[1] else SPLIT_NAMES[2]


_CODECS = {
    # container suffix: (video encoder, its options, audio encoder, audio bit rate)
    "mp4": ("libx264", {"crf": "12", "preset": "medium"}, "aac", 48_000),
    "webm": ("libvpx-vp9", {"crf": "12", "b": "0", "deadline": "good", "cpu-used": "4"}, "libopus", 48_000),
}


def write_video(video: RenderedVideo, path) -> None:
    """Encode ``video`` with PyAV, H.264 + AAC for ``.mp4`` and VP9 + Opus for ``.webm``; written atomically."""
    import av

    path = Path(path)
    fmt = path.suffix.lstrip(".")
    if fmt not in _CODECS:
        raise ValueError(f"unsupported container {path.suffix!r}; AVSynth writes {', '.join(_CODECS)}")
    vcodec, options, acodec, abitrate = _CODECS[fmt]
    tmp = path.with_name(f".{path.name}.tmp")
    frames = video.frames.numpy()
    with av.open(str(tmp), "w", format=fmt) as container:
        vstream = container.add_stream(vcodec, rate=video.fps, options=options)
        vstream.width, vstream.height = frames.shape[2], frames.shape[1]
        vstream.pix_fmt = "yuv420p"
        astream = container.add_stream(acodec, rate=video.sample_rate, layout="mono")
        astream.bit_rate = abitrate
        for i, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = i
            container.mux(vstream.encode(frame))
        container.mux(vstream.encode())
        wave = video.wave.numpy()[None]
        chunk = astream.codec_context.frame_size or 1024
        for start in range(0, wave.shape[1], chunk):
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(wave[:, start:start + chunk]), format="fltp",
                                               layout="mono")
            frame.sample_rate, frame.pts, frame.time_base = video.sample_rate, start, Fraction(1, video.sample_rate)
            container.mux(astream.encode(frame))
        container.mux(astream.encode())
    os.replace(tmp, path)


def write_dataset(out_dir, num_videos: int = DEFAULT_VIDEOS, *, seed: int = 0, fmt: str = "mp4",
                  config: AVGNConfig | None = None, splits: Sequence[float] = DEFAULT_SPLITS) -> Path:
    """Write AVSynth to ``out_dir``: ``videos/NNNNN.<fmt>``, ``labels.csv`` (path,label,split) and ``README.md``.

    ``config`` (default ``tiny``) sets T, S, G, P and the sample rate. Files already written with the
    same seed, format and rendering are kept, so re-running only adds what is missing; a folder
    written with other settings raises ValueError. Returns ``out_dir`` as a Path.
    """
    from tqdm import tqdm

    config = AVGNConfig.from_name("tiny") if config is None else config
    if fmt not in _CODECS:
        raise ValueError(f"fmt must be one of {', '.join(_CODECS)}, got {fmt!r}")
    if num_videos < 1:
        raise ValueError(f"num_videos must be >= 1, got {num_videos}")
    tile_size(config)
    counts = split_counts(num_videos, splits)
    out = Path(out_dir)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    _check_manifest(out, {"version": VERSION, "seed": seed, "format": fmt, "num_frames": config.num_frames,
                          "frame_size": config.frame_size, "glance_size": config.glance_size,
                          "patch_size": config.patch_size, "sample_rate": config.sample_rate})
    rows, scenes = [], []
    for index in tqdm(range(num_videos), desc="AVSynth", unit="video"):
        rel = f"videos/{index:05d}.{fmt}"
        scene = sample_scene(index, seed=seed, config=config)
        if not (out / rel).is_file():
            write_video(render_scene(scene, config), out / rel)
        rows.append((rel, CLASS_NAMES[scene.label], split_of(index, counts)))
        scenes.append(scene)
    with open(out / "labels.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(("path", "label", "split"))
        writer.writerows(rows)
    (out / "README.md").write_text(readme_text(scenes, counts, seed=seed, fmt=fmt, config=config))
    return out


def _check_manifest(out: Path, manifest: dict) -> None:
    path = out / "avsynth.json"
    if path.is_file():
        found = json.loads(path.read_text())
        if found != manifest:
            raise ValueError(f"{out} holds AVSynth written with {found}; these arguments give {manifest}. "
                             f"Use another output folder.")
    else:
        path.write_text(json.dumps(manifest, indent=1) + "\n")
