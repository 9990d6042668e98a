"""The ``pyav`` decode backend: FFmpeg on the CPU, T sampled frames and their audio windows per file.

Reading. A file up to ``IN_MEMORY_BYTES`` is demuxed once, video and audio packets kept in memory,
and decoded from there: no seek, no second read. A larger file is demuxed once for the video
timestamps and then read by seeking: per sampled frame it decodes from the keyframe before it only
when that keyframe lies beyond what it has already decoded, so a long file costs about T groups of
pictures, not the whole stream; audio is read around each window the same way. Seeks go to the
keyframe's decode timestamp (what demuxers seek on: MPEG-TS lands past a keyframe sought by its
presentation time), and a seek a container refuses (AVI below 0) falls back to its start.

Pixels. Each chosen frame is scaled and converted to RGB in one swscale pass, straight to the
resized size (``common.resized_shape``; bilinear, which widens its filter when it shrinks, so it is
antialiased), through one scaler reused across frames and files; then rotated and centre-cropped.
A decoder holds a few frames of the source size, the clip only T frames of the model's size, so
memory does not grow with the source resolution; a frame size over ``max_pixels`` is refused from
the stream header before anything is decoded (and the decoder is told the same limit).

Audio, any channel count and sample format: each decoded frame is averaged to mono in float32,
non-finite samples are zeroed and the rest clipped to [-1, 1] (both reported in ``Clip.notes``),
and libswresample resamples the mono signal to ``sample_rate``, samples placed by timestamp. An
audio stream that fails to decode leaves the video: silence, ``audio_present=False`` and a note.

Failures. A truncated or partly corrupt file decodes as the part that still demuxes; one with
nothing decodable (or missing, empty, without a video stream) raises ``DecodeError``, which names
the file. Any exception while decoding becomes that file's ``DecodeError`` (out of memory and
permission errors marked ``transient``).
"""

from __future__ import annotations

import bisect
import itertools
import math
import os
import threading

import numpy as np
import torch

from avgn_fast.data.audio import segments_log_mel, window_segments
from avgn_fast.data.clip import Clip
from avgn_fast.data.common import (
    DecodeError,
    DecodeParams,
    DecodeStats,
    VideoProbe,
    center_crop,
    check_file,
    check_pixels,
    resized_shape,
)

IN_MEMORY_BYTES = 64 << 20  # files up to this size are demuxed once into memory instead of seeked
_AUDIO_PREROLL_S = 0.5  # decoded before each audio read: codec warm-up after a seek (Opus needs 80 ms)
_AUDIO_MERGE_GAP_S = 2.0  # audio windows closer than this are read in one pass rather than two seeks
_DEFAULT_FRAME_S = 0.04  # duration of a lone frame whose container gives none
_SAMPLE_SCALE = {np.dtype(np.uint8): 1 / 128, np.dtype(np.int16): 1 / 32768, np.dtype(np.int32): 1 / 2 ** 31,
                 np.dtype(np.int64): 1 / 2 ** 63, np.dtype(np.float32): 1.0, np.dtype(np.float64): 1.0}
_local = threading.local()  # one scaler per decoding thread, reused across files


def decode_file(path, params: DecodeParams, stats: DecodeStats | None = None, *, codec_threads: int = 1) -> Clip:
    """Decode one file (see the module docstring); raises ``DecodeError`` naming the file.

    ``codec_threads`` > 1 lets the video decoder run that many threads (frame and slice threading):
    worth it when one process decodes long groups of pictures; callers that decode one file per
    core (the Predictor's workers) keep the default of 1.
    """
    import av

    stats = DecodeStats() if stats is None else stats
    check_file(path)
    try:
        with av.open(str(path), metadata_errors="ignore") as container:
            return _decode_open(container, path, params, stats, codec_threads)
    except DecodeError:
        raise
    except MemoryError as e:
        raise DecodeError(path, "out of memory while decoding", transient=True) from e
    except PermissionError as e:
        raise DecodeError(path, f"permission denied ({e})", transient=True) from e
    except Exception as e:  # any failure inside PyAV/FFmpeg or the conversion is this file's problem only
        raise DecodeError(path, f"{type(e).__name__}: {e}") from e


def _decode_open(container, path, params: DecodeParams, stats: DecodeStats, codec_threads: int) -> Clip:
    video = container.streams.best("video")
    if video is None:
        raise DecodeError(path, "no video stream")
    ctx = video.codec_context
    check_pixels(path, ctx.width, ctx.height, params.max_pixels)
    ctx.options = {**ctx.options, "max_pixels": str(params.max_pixels)}  # a size change mid-stream is refused too
    ctx.thread_type, ctx.thread_count = ("AUTO", codec_threads) if codec_threads > 1 else ("NONE", 1)
    if params.keyframes_only:
        ctx.skip_frame = "NONKEY"
    audio = container.streams.best("audio")
    if audio is None and container.streams.audio:  # FFmpeg found no decodable parameters in any of them
        stats.notes.append("audio dropped: the audio stream could not be probed (no sample rate or channels)")
    in_memory = os.path.getsize(path) <= IN_MEMORY_BYTES
    packets = _demux_all(container, [s for s in (video, audio) if s is not None]) if in_memory else None
    probe = probe_video(container, path, None if packets is None else packets[video.index])
    times, indices = probe.sample(params.num_frames, params.keyframes_only)
    reader = PacketReader(container, packets, stats)
    images = _decode_frames(reader, video, probe, indices, _Converter(params), stats)
    if not images:
        raise DecodeError(path, "no video frame could be decoded")
    segments = None
    if audio is not None:
        try:
            segments = audio_segments(reader, audio, times, params, stats)
        except MemoryError:
            raise
        except Exception as e:  # a broken audio stream costs the audio, not the video
            stats.notes.append(f"audio dropped: {type(e).__name__}: {e}")
        if segments is None and not any(n.startswith("audio dropped") for n in stats.notes):
            stats.notes.append("audio dropped: the audio stream decoded to nothing")
    shown = [_nearest(images, probe.pts, j) for j in indices]
    mel = params.silent_mel() if segments is None else segments_log_mel(
        segments, params.sample_rate, window_s=params.audio_window_s, n_mels=params.n_mels, win_ms=params.win_ms,
        hop_ms=params.hop_ms)
    first = images[shown[0]]
    return Clip(frames=torch.stack([images[j].frames for j in shown]), mel=mel, audio_present=segments is not None,
                duration=probe.duration_s, fps=probe.fps, source_size=first.source_size,
                resize_shorter=params.resize_shorter,
                frame_times=torch.tensor(times, dtype=torch.float64) - probe.start_s, path=str(path),
                notes=list(stats.notes))


def _demux_all(container, streams) -> dict[int, list]:
    """Every packet of ``streams`` in file order, by stream index; a corrupt tail ends the lists early."""
    import av

    out = {s.index: [] for s in streams}
    packets = container.demux(streams)
    while True:
        try:
            packet = next(packets)
        except StopIteration:
            break
        except av.FFmpegError:  # truncated or corrupt tail: keep what demuxed before it
            break
        out[packet.stream.index].append(packet)
    return out


def probe_video(container, path, packets: list | None = None) -> VideoProbe:
    """Timestamps and keyframes of the best video stream: from ``packets`` when given, else by demuxing it."""
    stream = container.streams.best("video")
    if stream is None:
        raise DecodeError(path, "no video stream")
    if packets is None:
        packets = _demux_all(container, [stream])[stream.index]
    stamps, keys = set(), {}
    last = 0  # duration of the last packet in decode order: the last sample's duration in mp4/mkv/webm/avi
    for packet in packets:
        ts = _ts(packet)
        if ts is None:
            continue
        stamps.add(ts)
        last = packet.duration or 0
        if packet.is_keyframe:
            keys.setdefault(ts, packet.dts if packet.dts is not None else ts)
    if not stamps or stream.time_base is None:
        raise DecodeError(path, "video stream has no frames")
    pts = sorted(stamps)
    tb = stream.time_base
    if last <= 0:
        last = pts[-1] - pts[-2] if len(pts) > 1 else max(round(_DEFAULT_FRAME_S / tb), 1)
    end = pts[-1] + last
    rate = float(stream.average_rate) if stream.average_rate else len(pts) / float((end - pts[0]) * tb)
    keyframes = sorted(keys)
    return VideoProbe(codec=stream.codec_context.name, pts=pts, keyframes=keyframes,
                      key_dts=[keys[k] for k in keyframes], time_base=tb, end=end, fps=rate,
                      has_audio=container.streams.best("audio") is not None)


class PacketReader:
    """Packets of a stream from a timestamp on: from the in-memory lists when the file was read whole,
    else by seeking the container."""

    def __init__(self, container, packets: dict[int, list] | None, stats: DecodeStats):
        self.container, self.packets, self.stats = container, packets, stats

    def packets_from(self, stream, ts: int, dts: int | None = None):
        """The stream's packets from the last keyframe at or before presentation time ``ts`` (the first if none).

        Seeking: demuxers seek on presentation (mp4, mkv) or decode (MPEG-TS) timestamps, so a seek
        that lands past ``ts`` or on a non-keyframe is done again with the keyframe's ``dts``; a seek
        the container refuses (AVI below 0) is done again from the stream's start.
        """
        stream.codec_context.flush_buffers()
        if self.packets is not None:
            packets = self.packets[stream.index]
            starts = [i for i, p in enumerate(packets) if p.is_keyframe and _ts(p) is not None and _ts(p) <= ts]
            return iter(packets[starts[-1] if starts else 0:])
        self._seek(stream, ts)
        packets = self.container.demux(stream)
        first = _next_packet(packets)
        overshot = first is not None and (not first.is_keyframe or (_ts(first) is not None and _ts(first) > ts))
        if overshot and dts is not None and dts != ts:
            self._seek(stream, dts)
            packets = self.container.demux(stream)
            first = _next_packet(packets)
        return iter(()) if first is None else itertools.chain([first], packets)

    def _seek(self, stream, ts: int) -> None:
        import av

        self.stats.seeks += 1
        start = stream.start_time if stream.start_time is not None else 0
        for target in dict.fromkeys((ts, max(ts, start), max(ts, 0), 0)):
            try:
                self.container.seek(target, stream=stream, backward=True)
                return
            except av.FFmpegError as e:  # e.g. AVI refuses a seek below 0 with EPERM
                error = e
        raise error

    def frames(self, stream, ts: int, dts: int | None = None):
        """Decoded, timestamped frames of ``stream`` from the keyframe at or before ``ts`` on (``packets_from``);
        packets the decoder rejects are skipped and the decoder is drained at the end of the stream."""
        import av

        packets = self.packets_from(stream, ts, dts)
        codec = stream.codec_context
        while True:
            try:
                packet = next(packets)
            except (StopIteration, av.FFmpegError) as e:  # the end, or a corrupt tail: drain what is buffered
                self.stats.packets_dropped += isinstance(e, av.FFmpegError)
                packet = None
            if packet is not None and packet.size == 0:  # the demuxer's end-of-stream marker
                packet = None
            try:
                frames = codec.decode(packet)
            except av.FFmpegError:
                self.stats.packets_dropped += packet is not None
                frames = []
            yield from (frame for frame in frames if _ts(frame) is not None)
            if packet is None:
                return


class _Frame:
    """One chosen frame at the model's size: uint8 (3, S, S) and the displayed size of its source."""

    __slots__ = ("frames", "source_size")

    def __init__(self, frames: torch.Tensor, source_size: tuple[int, int]):
        self.frames, self.source_size = frames, source_size


class _Converter:
    """Decoded frame -> uint8 (3, size, size): one swscale pass to the resized size, rotation, centre crop."""

    def __init__(self, params: DecodeParams):
        from av.video.reformatter import Interpolation, VideoReformatter

        if not hasattr(_local, "reformatter"):
            _local.reformatter = VideoReformatter()
        self.reformatter, self.params = _local.reformatter, params
        self.interpolation = Interpolation.BILINEAR | Interpolation.ACCURATE_RND | Interpolation.FULL_CHR_H_INT

    def __call__(self, frame) -> _Frame:
        turns = round((frame.rotation or 0) / 90) % 4  # counter-clockwise quarter turns
        stored = (frame.height, frame.width)
        displayed = stored[::-1] if turns % 2 else stored
        h, w = resized_shape(*displayed, self.params.resize_shorter)
        if turns % 2:
            h, w = w, h
        rgb = self.reformatter.reformat(frame, width=w, height=h, format="rgb24", interpolation=self.interpolation,
                                        threads=1).to_ndarray()
        img = torch.from_numpy(rgb).permute(2, 0, 1)
        if turns:
            img = torch.rot90(img, turns, dims=(1, 2))
        return _Frame(center_crop(img, self.params.size).contiguous(), displayed)


def _decode_frames(reader: PacketReader, stream, probe: VideoProbe, indices: list[int], convert: _Converter,
                   stats: DecodeStats) -> dict[int, _Frame]:
    """The frames at ``indices`` (or their nearest decodable neighbours), converted, by probe index.

    Decoding stops at the last frame needed; a restart (seek) happens only when the next needed
    frame's keyframe lies beyond the last decoded frame.
    """
    found = {}
    decoded = None
    prev = cur = None
    pos = None  # timestamp of the last decoded frame
    for j in sorted(set(indices)):
        target = probe.pts[j]
        k = bisect.bisect_right(probe.keyframes, target) - 1
        key, key_dts = (probe.keyframes[k], probe.key_dts[k]) if k >= 0 else (probe.pts[0], probe.pts[0])
        if decoded is None or (pos is not None and key > pos):
            decoded = reader.frames(stream, key, key_dts)
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
            index = _index_of(probe.pts, _ts(best))
            if index not in found:
                found[index] = convert(best)
    return found


def _ts(item) -> int | None:
    return item.pts if item.pts is not None else item.dts


def _next_packet(packets):
    """The next packet of a demux iterator, or None at its end or at a corrupt tail."""
    import av

    try:
        return next(packets)
    except (StopIteration, av.FFmpegError):
        return None


def _index_of(pts: list[int], ts: int) -> int:
    """Index of the probed frame at (or, for a timestamp the probe lacks, just before) ``ts``."""
    return max(bisect.bisect_right(pts, ts) - 1, 0)


def _nearest(images: dict[int, _Frame], pts: list[int], j: int) -> int:
    """``j`` if its frame was decoded, else the decoded frame nearest to it in time."""
    return j if j in images else min(images, key=lambda i: (abs(pts[i] - pts[j]), i))


def audio_segments(reader: PacketReader, stream, centers_s: list[float], params: DecodeParams,
                   stats: DecodeStats) -> torch.Tensor | None:
    """``window_segments`` (T, span) of ``stream`` read around each window; None if it yields nothing.

    Windows closer than ``_AUDIO_MERGE_GAP_S`` are read in one pass.
    """
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
    repaired = [0, 0]  # non-finite samples zeroed, samples clipped to [-1, 1]
    for group in groups:
        lo, hi = centers_s[group[0]] - reach, centers_s[group[-1]] + reach
        wave, t0 = _read_audio(reader, stream, lo - _AUDIO_PREROLL_S, hi, sr, stats, repaired)
        if wave is None:
            continue
        any_audio = True
        segments[group] = window_segments(wave, sr, [centers_s[i] - t0 for i in group], window_s=params.audio_window_s,
                                          win_ms=params.win_ms, hop_ms=params.hop_ms)
    if repaired[0]:
        stats.notes.append(f"audio: {repaired[0]} non-finite samples zeroed")
    if repaired[1]:
        stats.notes.append(f"audio: {repaired[1]} samples outside [-1, 1] clipped")
    return segments if any_audio else None


def _read_audio(reader: PacketReader, stream, lo: float, hi: float, sample_rate: int, stats: DecodeStats,
                repaired: list[int]):
    """Mono float32 samples at ``sample_rate`` covering [lo, hi] seconds and the time of the first one.

    ``lo`` may be negative: an AAC stream in mp4 starts with a priming packet at a negative pts, and
    a read from 0 would skip it, so the decoder's first frame (~20-60 ms of sound) came out near silent.
    The decoded frames are averaged to mono one by one and resampled together in one call.
    """
    import av

    pieces, first = [], None
    for frame in reader.frames(stream, math.floor(lo / stream.time_base)):
        stats.audio_frames_decoded += 1
        if frame.time is not None and frame.time > hi:
            break
        if first is None:
            first = frame
        pieces.append(_mono(frame))
    if first is None:
        return None, None
    mono = np.concatenate(pieces)
    bad = ~np.isfinite(mono)
    if bad.any():
        repaired[0] += int(bad.sum())
        mono[bad] = 0.0
    loud = np.abs(mono) > 1
    if loud.any():
        repaired[1] += int(loud.sum())
        np.clip(mono, -1.0, 1.0, out=mono)
    signal = av.AudioFrame.from_ndarray(mono.reshape(1, -1), format="flt", layout="mono")
    signal.sample_rate, signal.pts, signal.time_base = first.sample_rate, first.pts, first.time_base
    resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
    out = [*resampler.resample(signal), *resampler.resample(None)]
    if not out:
        return None, None
    t0 = float(out[0].time if out[0].time is not None else first.time)
    return torch.from_numpy(np.concatenate([o.to_ndarray().reshape(-1) for o in out])), t0


def _mono(frame) -> np.ndarray:
    """The channel mean of an audio frame of any layout and sample format: float32 (n,), full scale ±1."""
    data = frame.to_ndarray()  # planar: (channels, n); packed: (1, n * channels)
    channels = frame.layout.nb_channels
    samples = data if frame.format.is_planar else data.reshape(-1, channels).T
    scale = np.float32(_SAMPLE_SCALE[samples.dtype])
    if samples.dtype == np.uint8:  # unsigned 8-bit is offset binary
        samples = samples.astype(np.float32) - 128
    if channels == 1:
        return samples[0].astype(np.float32) * scale
    return samples.mean(0, dtype=np.float64).astype(np.float32) * scale
