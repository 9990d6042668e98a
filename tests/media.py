"""Real encoded test media written with PyAV, with known content, for any test to reuse.

``write_video`` writes any pairing of the video codecs in ``VIDEO`` with the audio codecs in ``AUDIO``
into the container the path's suffix names (mp4, webm, avi, mkv, ts, mov), with any channel count,
a display rotation, a pixel format, or audio packets replaced by garbage (``garble_audio``);
``indexed_frames`` makes frames whose flat grey level identifies their index after a lossy round
trip, ``ramp_frames`` cheap smooth frames of any size; ``write_huge_frame`` writes one PNG frame of
any size in a few kilobytes; ``write_audio_only``, ``write_truncated`` and ``write_garbage`` make the
broken inputs decode paths must survive. ``reference_frames`` is the decode every frame test compares
against: full-resolution RGB from PyAV, rotated, resized with antialiased ``F.interpolate``, cropped.
"""

from __future__ import annotations

import itertools
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
import torch.nn.functional as F

SUFFIX = {"h264": ".mp4", "vp9": ".webm", "mjpeg": ".avi", "ffv1": ".mkv", "mpeg4": ".mov", "png": ".mov"}
VIDEO = {  # codec -> (PyAV encoder, default pixel format)
    "h264": ("libx264", "yuv420p"), "vp9": ("libvpx-vp9", "yuv420p"), "mjpeg": ("mjpeg", "yuvj420p"),
    "ffv1": ("ffv1", "yuv420p"), "mpeg4": ("mpeg4", "yuv420p"), "png": ("png", "rgb24"),
}
AUDIO = {  # codec -> PyAV encoder; the encoder converts the float input to its own sample format
    "aac": "aac", "opus": "libopus", "mp2": "mp2", "flac": "flac", "pcm_s16le": "pcm_s16le", "pcm_f32le": "pcm_f32le",
}
_LAYOUT = {1: "mono", 2: "stereo", 6: "5.1"}  # other channel counts get FFmpeg's unordered "<n> channels"
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


def ramp_frames(n: int, size: tuple[int, int]) -> np.ndarray:
    """Smooth uint8 (n, h, w, 3) frames, cheap at any size: red ramps down the rows, green across the
    columns (each by 1 level per 16 pixels, wrapping), blue is ``40 * i`` in frame ``i``."""
    h, w = size
    out = np.empty((n, h, w, 3), dtype=np.uint8)
    out[..., 0] = (np.arange(h) // 16).astype(np.uint8)[:, None]
    out[..., 1] = (np.arange(w) // 16).astype(np.uint8)[None, :]
    out[..., 2] = (40 * np.arange(n) % 256).astype(np.uint8)[:, None, None]
    return out


def write_video(path, *, codec: str = "h264", audio: str | None = "aac", size: tuple[int, int] = (48, 64),
                fps: int = 10, seconds: float = 2.0, sample_rate: int = 16000, channels: int = 1,
                frames: np.ndarray | None = None, wave: np.ndarray | None = None, rotate: int | None = None,
                pts_s: list[float] | None = None, gop: int | None = None, pix_fmt: str | None = None,
                garble_audio: bool = False, seed: int = 0) -> Path:
    """Encode a real video file and return its path; the container is the one the suffix names.

    ``codec`` is a key of ``VIDEO``, ``audio`` one of ``AUDIO`` or None. ``frames`` (uint8 (n, h, w, 3)
    RGB) defaults to ``default_frames(round(fps * seconds), size)``; ``pts_s`` gives each frame's
    timestamp in seconds for variable frame rate (else frame i is at i / fps). ``wave`` (float
    (channels, n), in [-1, 1] or anything a float codec stores, NaN included) defaults to ``seconds``
    of ``default_wave``; any channel count works (1, 2 and 6 get named layouts). ``rotate`` stores a
    display rotation (degrees counter-clockwise, as PyAV's ``VideoFrame.rotation`` reads it back);
    ``gop`` sets the keyframe interval; ``pix_fmt`` overrides the codec's default pixel format.
    ``garble_audio`` replaces every audio packet's payload with random bytes of the same length and
    keeps its timing: with ``flac`` (sync code and CRC in every frame header) or ``mp2`` (sync word)
    the decoder rejects every packet; AAC and Opus decode some random packets as sound. Opus accepts
    8/12/16/24/48 kHz only, MP2 16/22.05/24/32/44.1/48 kHz.
    """
    path = Path(path)
    if frames is None:
        frames = default_frames(round(fps * seconds), size, seed)
    n, h, w, _ = frames.shape
    encoder, default_pix_fmt = VIDEO[codec]
    container = av.open(str(path), "w")
    try:
        vs = container.add_stream(encoder, rate=fps)
        vs.width, vs.height = w, h
        vs.pix_fmt = pix_fmt or default_pix_fmt
        if gop is not None:
            vs.codec_context.gop_size = gop
        if pts_s is not None:
            vs.codec_context.time_base = vs.time_base = Fraction(1, 1000)
        if rotate is not None:
            vs.set_display_rotation(rotate)
        streams = [(vs, _video_frames(frames, pts_s), False)]
        if audio is not None:
            if wave is None:
                wave = default_wave(channels, round(seconds * sample_rate), sample_rate, seed)
            streams.append((*_audio_stream(container, audio, wave, sample_rate), garble_audio))
        rng = np.random.default_rng(seed)
        for stream, source, garble in streams:
            for frame in itertools.chain(source, [None]):
                for packet in stream.encode(frame):
                    container.mux(_garbled(packet, stream, rng) if garble else packet)
    finally:
        container.close()
    return path


def write_tone_chunks(path, video_s: float, starts, *, rate: int = 16000, chunk: int = 1600, fps: int = 10) -> Path:
    """FFV1 video of ``video_s`` seconds (``indexed_frames`` at ``fps``) and PCM chunks of a 440 Hz tone, ``chunk``
    samples each, stamped at the sample offsets ``starts``: silence between chunks that do not meet, an overlap
    where a chunk starts before the last one ends (the tone follows each chunk's own time)."""
    with av.open(str(path), "w") as c:
        video = c.add_stream("ffv1", rate=fps)
        video.width, video.height, video.pix_fmt = 32, 32, "yuv420p"
        audio = c.add_stream("pcm_s16le", rate=rate, layout="mono")
        for i, img in enumerate(indexed_frames(round(video_s * fps), (32, 32))):
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts = i
            c.mux(video.encode(frame))
        c.mux(video.encode(None))
        t = np.arange(chunk) / rate
        for start in starts:
            tone = (0.4 * np.sin(2 * np.pi * 440 * (t + start / rate)) * 32767).astype(np.int16)
            frame = av.AudioFrame.from_ndarray(tone[None], format="s16", layout="mono")
            frame.sample_rate, frame.pts = rate, start
            c.mux(audio.encode(frame))
        c.mux(audio.encode(None))
    return Path(path)


def write_huge_frame(path, side: int = 16000) -> Path:
    """One ``side x side`` PNG frame (1-bit: vertical stripes 4 pixels wide) in a mov file of a few kilobytes.

    Written from a 1-bit frame (``side**2 / 8`` bytes), so even 16000 x 16000 takes ~0.2 s and 32 MB;
    decoding it to RGB needs ``3 * side**2`` bytes (768 MB at 16000).
    """
    path = Path(path)
    container = av.open(str(path), "w")
    try:
        stream = container.add_stream("png", rate=1)
        stream.width = stream.height = side
        stream.pix_fmt = "monob"
        frame = av.VideoFrame(side, side, "monob")
        frame.planes[0].update(np.full(frame.planes[0].buffer_size, 0x0F, dtype=np.uint8))
        frame.pts = 0
        for source in (frame, None):
            for packet in stream.encode(source):
                container.mux(packet)
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
        for frame in itertools.chain(source, [None]):
            container.mux(stream.encode(frame))
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
    wave = np.asarray(wave, dtype=np.float32)
    if wave.ndim != 2 or wave.shape[0] < 1:
        raise ValueError(f"wave must be float (channels, n) with channels >= 1, got {wave.shape}")
    layout = _LAYOUT.get(wave.shape[0], f"{wave.shape[0]} channels")
    stream = container.add_stream(AUDIO[codec], rate=sample_rate, layout=layout)
    interleaved = np.ascontiguousarray(wave.T)  # packed "flt": PyAV builds planar frames of at most 8 planes

    def frames():
        for start in range(0, interleaved.shape[0], _AUDIO_CHUNK):
            frame = av.AudioFrame.from_ndarray(interleaved[start:start + _AUDIO_CHUNK].reshape(1, -1), format="flt",
                                               layout=layout)
            frame.sample_rate = sample_rate
            frame.pts = start
            yield frame

    return stream, frames()


def _garbled(packet, stream, rng: np.random.Generator):
    """``packet`` with random bytes of the same length as payload, same timing and stream."""
    junk = rng.integers(0, 256, packet.size, dtype=np.uint8)
    junk[:2] = 0  # no codec's sync word can survive at the start
    out = av.Packet(junk.tobytes())
    out.pts, out.dts, out.duration, out.time_base = packet.pts, packet.dts, packet.duration, packet.time_base
    out.stream = stream
    return out


def reference_frames(path, times, size: int, resize_shorter: int) -> torch.Tensor:
    """Frames a decode should give at ``times`` (seconds after the first frame): uint8 (T, 3, size, size).

    Decodes every frame in order with PyAV at full resolution, shows the last one at or before each
    time, applies its display rotation, resizes the shorter side to ``resize_shorter`` with antialiased
    bilinear ``F.interpolate`` (the longer to ``round(long * scale)``) and crops the centre at offset
    ``(resized - size) // 2``.
    """
    with av.open(str(path)) as c:
        decoded = [(f.time, f.to_ndarray(format="rgb24"), f.rotation) for f in c.decode(video=0)]
    start = min(t for t, _, _ in decoded)
    shown = [max(i for i, d in enumerate(decoded) if d[0] <= start + t) for t in times]
    resized = {i: _reference_resize(*decoded[i][1:], size, resize_shorter) for i in set(shown)}
    return torch.stack([resized[i] for i in shown])


def _reference_resize(img: np.ndarray, rotation: int, size: int, resize_shorter: int) -> torch.Tensor:
    x = torch.from_numpy(np.rot90(img, round(rotation / 90) % 4).copy()).permute(2, 0, 1)[None].float()
    h, w = x.shape[-2:]
    scale = resize_shorter / min(h, w)
    x = F.interpolate(x, size=(round(h * scale), round(w * scale)), mode="bilinear", antialias=True)
    top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    return x[0, :, top:top + size, left:left + size].round().clamp(0, 255).to(torch.uint8)
