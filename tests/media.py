"""Real encoded test media written with PyAV, with known content, for any test to reuse.

``write_video`` writes H.264 (mp4), VP9 (webm) or MJPEG (avi) video with optional AAC or Opus audio;
``indexed_frames`` makes frames whose flat grey level identifies their index after a lossy round
trip; ``write_audio_only``, ``write_truncated`` and ``write_garbage`` make the broken inputs decode
paths must survive.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np

SUFFIX = {"h264": ".mp4", "vp9": ".webm", "mjpeg": ".avi"}
_ENCODER = {"h264": "libx264", "vp9": "libvpx-vp9", "mjpeg": "mjpeg", "aac": "aac", "opus": "libopus"}
_PIX_FMT = {"h264": "yuv420p", "vp9": "yuv420p", "mjpeg": "yuvj420p"}
_LAYOUT = {1: "mono", 2: "stereo", 6: "5.1"}
_AUDIO_CHUNK = 1024


def default_frames(n: int, size: tuple[int, int], seed: int = 0) -> np.ndarray:
    """Random-ish uint8 (n, h, w, 3) content: a colour gradient, a moving square and mild noise."""
    h, w = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([255 * yy / max(h - 1, 1), 255 * xx / max(w - 1, 1), np.full((h, w), 128.0)], -1)
    out = np.empty((n, h, w, 3), dtype=np.uint8)
    side = max(2, min(h, w) // 4)
    for i in range(n):
        img = base + rng.normal(0, 6, (h, w, 3))
        y0 = (i * 3) % max(h - side, 1)
        x0 = (i * 5) % max(w - side, 1)
        img[y0:y0 + side, x0:x0 + side] = rng.integers(0, 256, 3)
        out[i] = np.clip(img, 0, 255).astype(np.uint8)
    return out


def indexed_frames(n: int, size: tuple[int, int]) -> np.ndarray:
    """Flat grey uint8 (n, h, w, 3) frames at ``frame_level(i)``: lossy codecs keep flat levels within ~2."""
    levels = np.array([frame_level(i) for i in range(n)], dtype=np.uint8)
    return np.broadcast_to(levels[:, None, None, None], (n, *size, 3)).copy()


def frame_level(i: int) -> int:
    """Grey level of frame ``i`` in ``indexed_frames``: 16 levels apart for 12 frames, then it wraps."""
    return 24 + 16 * (i % 12)


def default_wave(channels: int, n: int, sample_rate: int, seed: int = 0) -> np.ndarray:
    """Float32 (channels, n) audio in [-0.5, 0.5]: two tones per channel (below 0.4 x Nyquist) plus noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / sample_rate
    out = np.empty((channels, n), dtype=np.float32)
    for c in range(channels):
        f1, f2 = rng.uniform(0.05, 0.4, 2) * sample_rate / 2
        out[c] = 0.25 * np.sin(2 * np.pi * f1 * t) + 0.15 * np.sin(2 * np.pi * f2 * t) + rng.normal(0, 0.02, n)
    return out


def write_video(path, *, codec: str = "h264", audio: str | None = "aac", size: tuple[int, int] = (48, 64),
                fps: int = 10, seconds: float = 2.0, sample_rate: int = 16000, channels: int = 1,
                frames: np.ndarray | None = None, wave: np.ndarray | None = None, rotate: int | None = None,
                pts_s: list[float] | None = None, gop: int | None = None, pix_fmt: str | None = None,
                seed: int = 0) -> Path:
    """Encode a real video file and return its path.

    ``frames`` (uint8 (n, h, w, 3) RGB) defaults to ``default_frames(round(fps * seconds), size)``;
    ``pts_s`` gives each frame's timestamp in seconds for variable frame rate (else frame i is at
    i / fps). ``wave`` (float (channels, n) in [-1, 1]) defaults to ``seconds`` of ``default_wave``.
    ``rotate`` stores a display rotation (degrees counter-clockwise, as PyAV's ``VideoFrame.rotation``
    reads it back); ``gop`` sets the keyframe interval. Opus accepts 8/12/16/24/48 kHz only.
    """
    path = Path(path)
    if frames is None:
        frames = default_frames(round(fps * seconds), size, seed)
    n, h, w, _ = frames.shape
    container = av.open(str(path), "w")
    try:
        vs = container.add_stream(_ENCODER[codec], rate=fps)
        vs.width, vs.height = w, h
        vs.pix_fmt = pix_fmt or _PIX_FMT[codec]
        if gop is not None:
            vs.codec_context.gop_size = gop
        if pts_s is not None:
            vs.codec_context.time_base = vs.time_base = Fraction(1, 1000)
        if rotate is not None:
            vs.set_display_rotation(rotate)
        streams = [(vs, _video_frames(frames, pts_s))]
        if audio is not None:
            if wave is None:
                wave = default_wave(channels, round(seconds * sample_rate), sample_rate, seed)
            streams.append(_audio_stream(container, audio, wave, sample_rate))
        for stream, source in streams:
            for frame in source:
                container.mux(stream.encode(frame))
            container.mux(stream.encode(None))
    finally:
        container.close()
    return path


def write_audio_only(path, *, codec: str = "aac", seconds: float = 1.0, sample_rate: int = 16000,
                     channels: int = 1, seed: int = 0) -> Path:
    """A file with an audio stream and no video stream (mp4/m4a for AAC, webm for Opus)."""
    path = Path(path)
    container = av.open(str(path), "w")
    try:
        wave = default_wave(channels, round(seconds * sample_rate), sample_rate, seed)
        stream, source = _audio_stream(container, codec, wave, sample_rate)
        for frame in source:
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    finally:
        container.close()
    return path


def write_truncated(src, dst, keep: float = 0.5) -> Path:
    """Copy the first ``keep`` fraction of ``src``'s bytes to ``dst``."""
    data = Path(src).read_bytes()
    Path(dst).write_bytes(data[: int(len(data) * keep)])
    return Path(dst)


def write_garbage(path, n_bytes: int = 4096, seed: int = 0) -> Path:
    """Random bytes under a video file name."""
    Path(path).write_bytes(np.random.default_rng(seed).integers(0, 256, n_bytes, dtype=np.uint8).tobytes())
    return Path(path)


def _video_frames(frames: np.ndarray, pts_s: list[float] | None):
    if pts_s is not None and len(pts_s) != len(frames):
        raise ValueError(f"pts_s has {len(pts_s)} entries for {len(frames)} frames")
    for i, img in enumerate(frames):
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
        frame.pts = i if pts_s is None else round(pts_s[i] * 1000)
        yield frame


def _audio_stream(container, codec: str, wave: np.ndarray, sample_rate: int):
    wave = np.ascontiguousarray(np.asarray(wave, dtype=np.float32))
    if wave.ndim != 2 or wave.shape[0] not in _LAYOUT:
        raise ValueError(f"wave must be float (channels, n) with channels in {sorted(_LAYOUT)}, got {wave.shape}")
    layout = _LAYOUT[wave.shape[0]]
    stream = container.add_stream(_ENCODER[codec], rate=sample_rate, layout=layout)

    def frames():
        for start in range(0, wave.shape[1], _AUDIO_CHUNK):
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(wave[:, start:start + _AUDIO_CHUNK]),
                                               format="fltp", layout=layout)
            frame.sample_rate = sample_rate
            frame.pts = start
            yield frame

    return stream, frames()
