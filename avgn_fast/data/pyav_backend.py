"""The ``pyav`` decode backend: FFmpeg on the CPU, T sampled frames and their audio windows per file.

Reading. mp4/mov and Matroska/WebM files are opened without the decoders FFmpeg's probe would open and run
(their headers describe the streams: ``open_container``); other containers are probed as usual. A file up to
``IN_MEMORY_BYTES`` is demuxed once, video and audio packets kept in memory,
and decoded from there: no seek, no second read. A larger file takes its video timestamps from the
container's index where that is exact (mp4, mov, AVI at a constant frame rate:
``pyav_streams.probe_from_index``), else from one demux pass, and is then read by seeking
(``pyav_streams.PacketReader``): per sampled frame it decodes from the keyframe before it only when
that keyframe lies more than ``RESTART_GAP`` frames beyond what it has already decoded, so a long
file costs about T groups of pictures, not the whole stream; decoding stops at the last frame needed,
and audio is read only around the windows (``pyav_audio``).

Pixels. Each chosen frame is scaled and converted to RGB in one swscale pass, straight to the
resized size (``common.resized_shape``; bilinear, which widens its filter when it shrinks, so it is
antialiased), through one scaler reused across frames and files; then rotated and centre-cropped.
A decoder holds a few frames of the source size, the clip only T frames of the model's size, so
memory does not grow with the source resolution; a frame size over ``max_pixels`` is refused from
the stream header before anything is decoded (and the decoder is told the same limit).

Audio: any channel count and sample format, averaged to mono; non-finite samples zeroed; a broken
audio stream leaves the video (silence, ``audio_present=False``); each reported in ``Clip.notes``
(``pyav_audio``).

Failures. A truncated or partly corrupt file decodes as the part that still demuxes; one with
nothing decodable (or missing, empty, without a video stream) raises ``DecodeError``, which names
the file. Any exception while decoding becomes that file's ``DecodeError`` (out of memory and
permission errors marked ``transient``).
"""

from __future__ import annotations

import bisect
import contextlib
import io
import os
import threading

import numpy as np
import torch

from avgn_fast.data.audio import segments_log_mel
from avgn_fast.data.clip import Clip
from avgn_fast.data.common import (
    DecodeError,
    DecodeParams,
    DecodeStats,
    VideoProbe,
    center_crop,
    check_file,
    check_pixels,
    decoding,
    frame_geometry,
)
from avgn_fast.data.pyav_audio import read_audio
from avgn_fast.data.pyav_streams import PacketReader, demux_all, probe_video, timestamp

IN_MEMORY_BYTES = 64 << 20  # files up to this size are demuxed once into memory instead of seeked
RESTART_GAP = 8  # frames between the last decoded one and the next keyframe that are read through, not skipped
_local = threading.local()  # one scaler per decoding thread, reused across files
HEADER_FORMATS = {"mov", "matroska"}  # FFmpeg's mov,mp4,m4a,… and matroska,webm: their headers describe the streams
# names of files tried with a header-only open first: any other is opened once, the usual way (a second open
# would cost an MPEG-TS or AVI file 0.1–0.6 ms); a misnamed file is still read right either way
HEADER_SUFFIXES = (".mp4", ".m4v", ".mov", ".3gp", ".mkv", ".webm")
_HEADERS_ONLY = {"codec_whitelist": "none"}  # no decoder may open while FFmpeg probes (``open_container``)
GBRP_CHANNELS = (1, 2, 0)  # the RGB channel of each plane of swscale's planar RGB, stored G, B, R


def decode_file(path, params: DecodeParams, stats: DecodeStats | None = None, *, codec_threads: int = 1) -> Clip:
    """Decode one file (see the module docstring); raises ``DecodeError`` naming the file.

    ``codec_threads`` > 1 lets the video decoder run that many threads (frame and slice threading):
    worth it when one process decodes long groups of pictures; callers that decode one file per
    core (the Predictor's workers) keep the default of 1.
    """
    with decoding(path):  # a path of the wrong type is this file's error too
        check_file(path)
        size = os.path.getsize(path)
    return _decode(str(path), path, size, params, stats, codec_threads)


def decode_fileobj(name: str, file, params: DecodeParams, stats: DecodeStats | None = None, *,
                   size: int | None = None, codec_threads: int = 1) -> Clip:
    """Decode a video from an open binary file object exactly as ``decode_file`` decodes a path.

    ``file`` needs ``read`` and ``seek`` (``io.BytesIO``, an open file, a ``pyarrow`` input file from
    any filesystem: local, S3, GCS). ``name`` stands for the path: in the Clip, in every error, and
    as the name FFmpeg probes and reports, so a file gives the same Clip and the same error text
    through either entry point. ``size`` in bytes (default: found by seeking to the end) chooses
    between demuxing in memory and seeking, as the file size does for a path.
    """
    if size is None:
        size = file.seek(0, io.SEEK_END)
        file.seek(0)
    if size == 0:
        raise DecodeError(name, "empty file (0 bytes)")
    return _decode(_NamedFile(file, name), name, size, params, stats, codec_threads)


class _NamedFile:
    """``file`` under ``name``: PyAV takes a file object's name as the input's name (else ``'<none>'``)."""

    def __init__(self, file, name: str):
        self.file, self.name = file, str(name)

    def read(self, n: int = -1) -> bytes:
        return self.file.read(n)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self.file.seek(offset, whence)

    def tell(self) -> int:
        return self.file.tell()


def _decode(source, path, size: int, params: DecodeParams, stats: DecodeStats | None, codec_threads: int) -> Clip:
    """Open ``source`` (a path or a named file object) and decode it; every failure is ``path``'s DecodeError."""
    stats = DecodeStats() if stats is None else stats
    with decoding(path), open_container(source) as container:
        return _decode_open(container, path, params, stats, codec_threads, size)


def open_container(source):
    """``av.open(source)``, probing without decoders where the container's headers say all we need.

    While it opens a file, FFmpeg opens a decoder for each stream and decodes its first frames, to learn
    what mov/mp4 and Matroska/WebM headers already state for the streams we read; our own decoders then
    open again. Forbidding every decoder to the probe (``codec_whitelist``) cuts ``av.open`` of an AVSynth
    clip from 0.9 to 0.2 ms, and of a 1080p H.264 file from 8.7 to 0.2 ms; the streams read the same. Any
    other container, or a file whose headers leave the one video stream without a size or an audio stream
    without a rate or channel count (or hold several of either), is opened again the usual way, as is one
    the header-only open refuses. A file whose name does not end in one of ``HEADER_SUFFIXES`` is opened
    the usual way at once.
    """
    import av

    container = None
    if str(getattr(source, "name", source)).lower().endswith(HEADER_SUFFIXES):
        with contextlib.suppress(av.FFmpegError):  # refused header-only: opened the usual way below
            container = av.open(source, metadata_errors="ignore", options=_HEADERS_ONLY)
    if container is not None and _headers_suffice(container):
        return container
    if container is not None:
        container.close()
    if not isinstance(source, str):
        source.seek(0)
    return av.open(source, metadata_errors="ignore")


def _headers_suffice(container) -> bool:
    formats = set(container.format.name.split(","))
    video, audio = container.streams.video, container.streams.audio
    return bool(formats & HEADER_FORMATS) and len(video) == 1 and len(audio) <= 1 \
        and video[0].codec_context is not None and video[0].codec_context.width > 0 \
        and video[0].codec_context.height > 0 and all(a.codec_context is not None and a.sample_rate and a.channels
                                                      for a in audio)


def _decode_open(container, path, params: DecodeParams, stats: DecodeStats, codec_threads: int,
                 size: int) -> Clip:
    first_note = len(stats.notes)  # a reused stats object keeps earlier files' notes: this clip takes its own
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
    in_memory = size <= IN_MEMORY_BYTES
    packets = demux_all(container, [s for s in (video, audio) if s is not None]) if in_memory else None
    probe = probe_video(container, path, None if packets is None else packets[video.index])
    times, indices = probe.sample(params.num_frames, params.keyframes_only)
    reader = PacketReader(container, packets, stats)
    images = _decode_frames(reader, video, probe, indices, FrameConverter(params), stats)
    if not images:
        raise DecodeError(path, "no video frame could be decoded")
    segments = read_audio(container, reader, times, params, stats)
    shown = [_nearest(images, probe.pts, j) for j in indices]
    mel = params.silent_mel() if segments is None else segments_log_mel(
        segments, params.sample_rate, window_s=params.audio_window_s, n_mels=params.n_mels, win_ms=params.win_ms,
        hop_ms=params.hop_ms)
    first = images[shown[0]]
    return Clip(frames=torch.stack([images[j].frames for j in shown]), mel=mel, audio_present=segments is not None,
                duration=probe.duration_s, fps=probe.fps, source_size=first.source_size,
                resize_shorter=params.resize_shorter,
                frame_times=torch.tensor(times, dtype=torch.float64) - probe.start_s, path=str(path),
                notes=stats.notes[first_note:])


class _Frame:
    """One chosen frame at the model's size: uint8 (3, S, S) and the displayed size of its source."""

    __slots__ = ("frames", "source_size")

    def __init__(self, frames: torch.Tensor, source_size: tuple[int, int]):
        self.frames, self.source_size = frames, source_size


class FrameConverter:
    """Decoded frame -> uint8 (3, size, size): one swscale pass to the resized size, rotation, centre crop."""

    def __init__(self, params: DecodeParams):
        from av.video.reformatter import Interpolation, VideoReformatter

        if not hasattr(_local, "reformatter"):
            _local.reformatter = VideoReformatter()
        self.reformatter, self.params = _local.reformatter, params
        self.interpolation = Interpolation.BILINEAR | Interpolation.ACCURATE_RND | Interpolation.FULL_CHR_H_INT

    def __call__(self, frame) -> _Frame:
        turns, displayed, (h, w) = frame_geometry(frame.rotation, frame.height, frame.width,
                                                  self.params.resize_shorter)
        # planar RGB straight from swscale: each plane turned and cropped in numpy, one copy into the channels
        # (packed rgb24 and a transpose cost more than the conversion; the same pixels, but for one level on some
        # pixels of a 4:2:0 frame of odd height kept at its size)
        planes = self.reformatter.reformat(frame, width=w, height=h, format="gbrp", interpolation=self.interpolation,
                                           threads=1).planes
        size = self.params.size
        out = np.empty((3, size, size), np.uint8)
        for channel, plane in zip(GBRP_CHANNELS, planes):
            pixels = np.frombuffer(plane, np.uint8, plane.line_size * plane.height).reshape(plane.height, -1)
            pixels = pixels[:, :plane.width]
            if turns:
                pixels = np.rot90(pixels, turns)  # as torch.rot90 over (H, W): first axis towards the second
            out[channel] = center_crop(pixels, size)
        return _Frame(torch.from_numpy(out), displayed)


def _decode_frames(reader: PacketReader, stream, probe: VideoProbe, indices: list[int], convert: FrameConverter,
                   stats: DecodeStats) -> dict[int, _Frame]:
    """The frames at ``indices`` (or their nearest decodable neighbours), converted, by probe index.

    Decoding stops at the last frame needed; a restart (seek) happens only when the next needed
    frame's keyframe lies more than ``RESTART_GAP`` frames beyond the last decoded frame: a restart
    throws away what the decoder holds (its reorder delay) and decodes it again, which costs more
    than reading on through a short gap.
    """
    found = {}
    keep = None if stream.codec_context.skip_frame != "DEFAULT" else {probe.pts[j] for j in indices}
    decoded = None
    prev = cur = None
    pos = None  # timestamp of the last decoded frame
    for j in sorted(set(indices)):
        target = probe.pts[j]
        k = bisect.bisect_right(probe.keyframes, target) - 1
        key, key_dts = (probe.keyframes[k], probe.key_dts[k]) if k >= 0 else (probe.pts[0], probe.pts[0])
        gap = None if pos is None else bisect.bisect_left(probe.pts, key) - bisect.bisect_right(probe.pts, pos)
        if decoded is None or (gap is not None and gap > RESTART_GAP):
            decoded = reader.frames(stream, key, key_dts, keep=keep)
            prev = cur = None
        while cur is None or timestamp(cur) < target:
            nxt = next(decoded, None)
            if nxt is None:
                break
            stats.video_frames_decoded += 1
            prev, cur = cur, nxt
            pos = timestamp(cur)
        candidates = [f for f in (prev, cur) if f is not None]
        if candidates:
            best = min(candidates, key=lambda f: abs(timestamp(f) - target))
            index = _index_of(probe.pts, timestamp(best))
            if index not in found:
                found[index] = convert(best)
    return found


def _index_of(pts: list[int], ts: int) -> int:
    """Index of the probed frame at (or, for a timestamp the probe lacks, just before) ``ts``."""
    return max(bisect.bisect_right(pts, ts) - 1, 0)


def _nearest(images: dict[int, _Frame], pts: list[int], j: int) -> int:
    """``j`` if its frame was decoded, else the decoded frame nearest to it in time."""
    return j if j in images else min(images, key=lambda i: (abs(pts[i] - pts[j]), i))


