"""Decode video files into ``Clip``s: T frames uniform over the duration, per-frame log-mel windows.

Sampling, the same for every backend. Demuxing the video stream (no decoding) gives every frame's
presentation time ``p_0 < ... < p_{n-1}`` and the end ``e`` (last time + its duration), so variable
frame rate needs nothing special. With ``D = e - p_0``, frame ``i`` of T is sampled at
``t_i = p_0 + (i + 1/2) D / T`` (midpoints of T equal segments) and is the frame on screen then: the
last one with ``p_j <= t_i``. A video with fewer than T frames repeats frames; a frame that fails
to decode is replaced by the nearest decoded one (by timestamp). The audio window of frame ``i`` is
centred on ``t_i`` (see ``avgn_fast.data.audio``); no audio stream gives silence,
``log(LOG_EPS)`` everywhere, and ``audio_present=False``. A truncated or partly corrupt file decodes
as the part that still demuxes; one with nothing decodable (or missing, empty, without a video
stream) raises ``DecodeError``, and ``decode_many`` returns that error in the file's place.

Pixels: the display rotation stored in the file is applied, then the shorter side is resized to
``resize_shorter`` (the longer to ``round(long * scale)``) with antialiased bilinear
``F.interpolate``, then the centre ``size x size`` is cropped at offset ``(resized - size) // 2``.

The ``pyav`` backend decodes on the CPU and seeks: per sampled frame it decodes from the keyframe
before it only when that keyframe lies beyond what it has already decoded, so a long file costs
about T groups of pictures, not the whole stream; audio is read around each window the same way.
The ``dali`` backend (``avgn_fast.data.dali_backend``) decodes batches on the GPU. PyAV is
imported only when a file is decoded, so this module imports with torch alone.
"""

from __future__ import annotations

import bisect
import importlib.util
import math
import os
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import torch
import torch.nn.functional as F

from avgn_fast.config import AVGNConfig
from avgn_fast.data.audio import LOG_EPS, FrameParams, frame_params, segments_log_mel, window_segments
from avgn_fast.data.clip import Clip

BACKENDS = ("pyav", "dali")
_AUDIO_PREROLL_S = 0.5  # decoded before each audio read: codec warm-up after a seek (Opus needs 80 ms)
_AUDIO_MERGE_GAP_S = 2.0  # audio windows closer than this are read in one pass rather than two seeks
_DEFAULT_FRAME_S = 0.04  # duration of a lone frame whose container gives none


class DecodeError(ValueError):
    """A file that cannot be decoded; ``str(e)`` names the file and the problem."""

    def __init__(self, path, problem: str):
        super().__init__(str(path), problem)
        self.path = str(path)
        self.problem = problem

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}"


@dataclass
class DecodeStats:
    """Work done by the ``pyav`` backend, for checking that long files are not decoded whole."""

    video_frames_decoded: int = 0
    audio_frames_decoded: int = 0
    seeks: int = 0
    packets_dropped: int = 0  # packets the decoder rejected (corrupt data), skipped


@dataclass(frozen=True)
class DecodeParams:
    """What a decode produces; identical for every backend and part of the decoded-clip cache key."""

    num_frames: int
    size: int
    resize_shorter: int
    sample_rate: int = 16000
    audio_window_s: float = 1.0
    n_mels: int = 64
    win_ms: float = 25.0
    hop_ms: float = 10.0

    def __post_init__(self):
        if self.num_frames < 1 or self.size < 1:
            raise ValueError(f"num_frames and size must be positive, got {self.num_frames=} {self.size=}")
        if self.resize_shorter < self.size:
            raise ValueError(f"resize_shorter={self.resize_shorter} is smaller than the crop size={self.size}")
        if self.n_mels < 1:
            raise ValueError(f"n_mels must be positive, got {self.n_mels=}")
        frame_params(self.sample_rate, window_s=self.audio_window_s, win_ms=self.win_ms, hop_ms=self.hop_ms)

    @classmethod
    def from_config(cls, config: AVGNConfig) -> DecodeParams:
        return cls(num_frames=config.num_frames, size=config.frame_size, resize_shorter=config.resize_shorter,
                   sample_rate=config.sample_rate, audio_window_s=config.audio_window_s, n_mels=config.n_mels,
                   win_ms=config.win_ms, hop_ms=config.hop_ms)

    @property
    def stft(self) -> FrameParams:
        return frame_params(self.sample_rate, window_s=self.audio_window_s, win_ms=self.win_ms, hop_ms=self.hop_ms)

    def silent_mel(self) -> torch.Tensor:
        return torch.full((self.num_frames, self.n_mels, self.stft.n_steps), math.log(LOG_EPS))


@dataclass
class VideoProbe:
    """What demuxing the video stream tells: every frame's timestamp, the keyframes, the codec."""

    codec: str
    pts: list[int]  # presentation timestamp of every frame, ascending, in time_base units
    keyframes: list[int]  # ascending
    time_base: Fraction
    end: int  # one frame duration past the last timestamp
    fps: float
    has_audio: bool

    @property
    def start_s(self) -> float:
        return float(self.pts[0] * self.time_base)

    @property
    def duration_s(self) -> float:
        return float((self.end - self.pts[0]) * self.time_base)

    def sample(self, num_frames: int) -> tuple[list[float], list[int]]:
        """The T sampling times (seconds, the file's clock) and the index of the frame shown at each."""
        times = [self.start_s + (i + 0.5) * self.duration_s / num_frames for i in range(num_frames)]
        seconds = [float(p * self.time_base) for p in self.pts]
        return times, [max(bisect.bisect_right(seconds, t) - 1, 0) for t in times]


def available_backends() -> list[str]:
    """Backends usable in this environment: ``pyav`` when PyAV imports, ``dali`` when DALI does."""
    return [name for name, module in (("pyav", "av"), ("dali", "nvidia.dali")) if _importable(module)]


def resolve_backend(backend: str, device=None) -> str:
    """``"auto"`` picks ``dali`` when DALI is installed and ``device`` is a CUDA device, else ``pyav``."""
    if backend not in ("auto", *BACKENDS):
        raise ValueError(f"unknown decode backend {backend!r}; expected 'auto', 'pyav' or 'dali'")
    available = available_backends()
    if backend == "auto":
        backend = "dali" if "dali" in available and _device(device).type == "cuda" else "pyav"
    if backend not in available:
        raise ValueError(f"decode backend {backend!r} is not installed here; available: {available}")
    return backend


def decode_clip(path, *, num_frames: int, size: int, resize_shorter: int | None = None, sample_rate: int = 16000,
                audio_window_s: float = 1.0, n_mels: int = 64, win_ms: float = 25.0, hop_ms: float = 10.0,
                backend: str = "pyav", device=None, stats: DecodeStats | None = None) -> Clip:
    """Decode one file (see the module docstring); raises ``DecodeError`` for a file that cannot be decoded.

    ``resize_shorter`` defaults to ``size``. ``device`` matters to ``dali`` only (its clips live there;
    None = CUDA when available); ``pyav`` clips are on the CPU and fill ``stats`` when given.
    """
    params = DecodeParams(num_frames=num_frames, size=size, resize_shorter=size if resize_shorter is None
                          else resize_shorter, sample_rate=sample_rate, audio_window_s=audio_window_s,
                          n_mels=n_mels, win_ms=win_ms, hop_ms=hop_ms)
    return _raise_or_return(_decode(path, params, resolve_backend(backend, device), device, stats))


def decode_clip_for(path, config: AVGNConfig, backend: str = "auto", *, device=None) -> Clip:
    """``decode_clip`` with every decode parameter taken from ``config``."""
    return _raise_or_return(decode_many([path], config, backend, device=device)[0])


def decode_many(paths, config: AVGNConfig, backend: str = "auto", *, device=None,
                batch_size: int = 8) -> list[Clip | DecodeError]:
    """Decode every path; a file that fails gives its ``DecodeError`` in its place (same order and length).

    ``dali`` decodes ``batch_size`` files per pipeline run; ``pyav`` decodes one at a time.
    """
    paths = list(paths)
    params = DecodeParams.from_config(config)
    name = resolve_backend(backend, device)
    if name == "dali":
        from avgn_fast.data import dali_backend

        return dali_backend.decode_batch(paths, params, device_id=_cuda_index(device), batch_size=batch_size)
    return [_decode(path, params, name, device, None) for path in paths]


def _decode(path, params: DecodeParams, backend: str, device, stats: DecodeStats | None) -> Clip | DecodeError:
    if backend == "dali":
        from avgn_fast.data import dali_backend

        return dali_backend.decode_batch([path], params, device_id=_cuda_index(device), batch_size=1)[0]
    try:
        return _decode_pyav(path, params, DecodeStats() if stats is None else stats)
    except DecodeError as e:
        return e


def _raise_or_return(result: Clip | DecodeError) -> Clip:
    if isinstance(result, DecodeError):
        raise result
    return result


def _decode_pyav(path, params: DecodeParams, stats: DecodeStats) -> Clip:
    import av

    check_file(path)
    try:
        with av.open(str(path), metadata_errors="ignore") as container:
            probe = probe_video(container, path)
            times, indices = probe.sample(params.num_frames)
            images = _decode_frames(container, probe, indices, stats)
            segments = audio_segments(container, times, params, stats) if probe.has_audio else None
    except DecodeError:
        raise
    except Exception as e:  # any failure inside PyAV/FFmpeg is this file's problem, not the caller's
        raise DecodeError(path, f"{type(e).__name__}: {e}") from e
    if not images:
        raise DecodeError(path, "no video frame could be decoded")
    shown = [_nearest(images, probe.pts, j) for j in indices]
    unique = sorted(set(shown))
    frames = resize_crop([images[j] for j in unique], params.resize_shorter, params.size)[
        torch.tensor([unique.index(j) for j in shown])]
    mel = params.silent_mel() if segments is None else segments_log_mel(
        segments, params.sample_rate, window_s=params.audio_window_s, n_mels=params.n_mels, win_ms=params.win_ms,
        hop_ms=params.hop_ms)
    return Clip(frames=frames, mel=mel, audio_present=segments is not None, duration=probe.duration_s,
                fps=probe.fps, source_size=tuple(images[shown[0]].shape[-2:]), resize_shorter=params.resize_shorter,
                frame_times=torch.tensor(times, dtype=torch.float64) - probe.start_s, path=str(path))


def check_file(path) -> None:
    """Raise ``DecodeError`` for a missing path, a non-file or an empty file."""
    if not os.path.exists(path):
        raise DecodeError(path, "file not found")
    if not os.path.isfile(path):
        raise DecodeError(path, "not a regular file")
    if os.path.getsize(path) == 0:
        raise DecodeError(path, "empty file (0 bytes)")


def probe_video(container, path) -> VideoProbe:
    """Demux (without decoding) the best video stream of an open PyAV container."""
    import av

    stream = container.streams.best("video")
    if stream is None:
        raise DecodeError(path, "no video stream")
    stamps = set()
    keyframes = set()
    last = 0  # duration of the last packet in decode order: the last sample's duration in mp4/mkv/webm/avi
    packets = container.demux(stream)
    while True:
        try:
            packet = next(packets)
        except StopIteration:
            break
        except av.FFmpegError:  # truncated or corrupt tail: keep what demuxed before it
            break
        ts = packet.pts if packet.pts is not None else packet.dts
        if ts is None:
            continue
        stamps.add(ts)
        last = packet.duration or 0
        if packet.is_keyframe:
            keyframes.add(ts)
    if not stamps or stream.time_base is None:
        raise DecodeError(path, "video stream has no frames")
    pts = sorted(stamps)
    tb = stream.time_base
    if last <= 0:
        last = pts[-1] - pts[-2] if len(pts) > 1 else max(round(_DEFAULT_FRAME_S / tb), 1)
    end = pts[-1] + last
    rate = float(stream.average_rate) if stream.average_rate else len(pts) / float((end - pts[0]) * tb)
    return VideoProbe(codec=stream.codec_context.name, pts=pts, keyframes=sorted(keyframes), time_base=tb, end=end,
                      fps=rate, has_audio=container.streams.best("audio") is not None)


def _decode_frames(container, probe: VideoProbe, indices: list[int], stats: DecodeStats) -> dict[int, torch.Tensor]:
    """Decode the frames at ``indices`` (or their nearest decodable neighbours) as displayed uint8 (3, H, W)."""
    stream = container.streams.best("video")
    found = {}
    decoded = None
    prev = cur = None
    pos = None  # timestamp of the last decoded frame
    for j in sorted(set(indices)):
        target = probe.pts[j]
        k = bisect.bisect_right(probe.keyframes, target) - 1
        key = probe.keyframes[k] if k >= 0 else probe.pts[0]
        if decoded is None or (pos is not None and key > pos):
            container.seek(key, stream=stream, backward=True)
            stats.seeks += 1
            decoded = decoded_frames(container, stream, stats)
            prev = cur = None
        while cur is None or _ts(cur) < target:
            nxt = next(decoded, None)
            if nxt is None:
                break
            stats.video_frames_decoded += 1
            prev, cur = cur, nxt
            pos = _ts(cur)
        candidates = [f for f in (prev, cur) if f is not None]
        if candidates:
            best = min(candidates, key=lambda f: abs(_ts(f) - target))
            found[_index_of(probe.pts, _ts(best))] = _displayed(best)
    return found


def decoded_frames(container, stream, stats: DecodeStats):
    """Timestamped frames of ``stream`` from the container's position; packets the decoder rejects are skipped."""
    import av

    packets = container.demux(stream)
    while True:
        try:
            packet = next(packets)
        except StopIteration:
            return
        except av.FFmpegError:
            stats.packets_dropped += 1
            return
        try:
            frames = packet.decode()
        except av.FFmpegError:
            stats.packets_dropped += 1
            continue
        yield from (frame for frame in frames if frame.pts is not None or frame.dts is not None)


def _ts(frame) -> int:
    return frame.pts if frame.pts is not None else frame.dts


def _index_of(pts: list[int], ts: int) -> int:
    """Index of the probed frame at (or, for a timestamp the probe lacks, just before) ``ts``."""
    return max(bisect.bisect_right(pts, ts) - 1, 0)


def _nearest(images: dict[int, torch.Tensor], pts: list[int], j: int) -> int:
    """``j`` if its frame was decoded, else the decoded frame nearest to it in time."""
    return j if j in images else min(images, key=lambda i: (abs(pts[i] - pts[j]), i))


def _displayed(frame) -> torch.Tensor:
    """RGB uint8 (3, H, W) of a decoded frame, rotated as its display matrix says."""
    img = torch.from_numpy(frame.to_ndarray(format="rgb24")).permute(2, 0, 1)
    turns = round((frame.rotation or 0) / 90) % 4  # counter-clockwise quarter turns
    return torch.rot90(img, turns, dims=(1, 2)).contiguous() if turns else img


def resized_shape(height: int, width: int, resize_shorter: int) -> tuple[int, int]:
    """Size after scaling the shorter side to ``resize_shorter`` (the one ``Clip.to_source`` inverts)."""
    scale = resize_shorter / min(height, width)
    return max(round(height * scale), resize_shorter), max(round(width * scale), resize_shorter)


def center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """The centre ``size x size`` of (..., H, W) at offset ``(H - size) // 2, (W - size) // 2``."""
    h, w = images.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    return images[..., top:top + size, left:left + size]


def resize_crop(images: list[torch.Tensor], resize_shorter: int, size: int) -> torch.Tensor:
    """uint8 (3, H, W) images of any sizes -> uint8 (T, 3, size, size): shorter side, then centre crop."""
    out = torch.empty((len(images), 3, size, size), dtype=torch.uint8)
    by_shape: dict[tuple[int, int], list[int]] = {}
    for i, img in enumerate(images):
        by_shape.setdefault(tuple(img.shape[-2:]), []).append(i)
    for (h, w), idx in by_shape.items():
        batch = torch.stack([images[i] for i in idx]).float()
        resized = F.interpolate(batch, size=resized_shape(h, w, resize_shorter), mode="bilinear",
                                align_corners=False, antialias=True)
        out[idx] = center_crop(resized, size).round().clamp(0, 255).to(torch.uint8)
    return out


def audio_segments(container, centers_s: list[float], params: DecodeParams,
                   stats: DecodeStats) -> torch.Tensor | None:
    """``window_segments`` (T, span) for the best audio stream, read around each window; None if it yields nothing.

    Windows closer than ``_AUDIO_MERGE_GAP_S`` are read in one pass; each pass seeks, decodes and
    downmixes/resamples to mono ``params.sample_rate`` with ``av.AudioResampler`` (libswresample),
    placing samples by the resampled frames' timestamps.
    """
    stream = container.streams.best("audio")
    sr = params.sample_rate
    reach = params.stft.span / sr / 2 + params.stft.hop / sr  # seconds a window reads either side of its centre
    order = sorted(range(len(centers_s)), key=lambda i: centers_s[i])
    groups = [[order[0]]]
    for i in order[1:]:
        if centers_s[i] - centers_s[groups[-1][-1]] > 2 * reach + _AUDIO_MERGE_GAP_S:
            groups.append([i])
        else:
            groups[-1].append(i)
    segments = torch.zeros((len(centers_s), params.stft.span), dtype=torch.float32)
    any_audio = False
    for group in groups:
        lo, hi = centers_s[group[0]] - reach, centers_s[group[-1]] + reach
        wave, t0 = _read_audio(container, stream, lo - _AUDIO_PREROLL_S, hi, sr, stats)
        if wave is None:
            continue
        any_audio = True
        segments[group] = window_segments(wave, sr, [centers_s[i] - t0 for i in group], window_s=params.audio_window_s,
                                          win_ms=params.win_ms, hop_ms=params.hop_ms)
    return segments if any_audio else None


def _read_audio(container, stream, lo: float, hi: float, sample_rate: int, stats: DecodeStats):
    """Mono float32 samples at ``sample_rate`` covering [lo, hi] seconds and the time of the first one."""
    import av

    # not clamped at 0: an AAC stream in mp4 starts with a priming packet at a negative pts, and a seek to 0
    # skips it, so the decoder's first frame (the first ~20-60 ms of sound) comes out near silent
    container.seek(math.floor(lo / stream.time_base), stream=stream, backward=True)
    stats.seeks += 1
    resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
    chunks, t0 = [], None
    for frame in decoded_frames(container, stream, stats):
        stats.audio_frames_decoded += 1
        if frame.time is not None and frame.time > hi:
            break
        for out in resampler.resample(frame):
            if t0 is None:
                t0 = float(out.time if out.time is not None else frame.time)
            chunks.append(out.to_ndarray().reshape(-1))
    else:
        chunks.extend(out.to_ndarray().reshape(-1) for out in resampler.resample(None))
    if t0 is None:
        return None, None
    return torch.from_numpy(np.concatenate(chunks)), t0


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # a parent package is missing
        return False


def _device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _cuda_index(device) -> int | None:
    """DALI's device_id: the CUDA device index, or None (CPU-only pipeline) for a CPU device."""
    dev = _device(device)
    if dev.type != "cuda":
        return None
    return dev.index if dev.index is not None else torch.cuda.current_device()
