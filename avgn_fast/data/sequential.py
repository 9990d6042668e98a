"""Front-to-back reading of a long file or a live source: the frame and the audio window at each asked time.

``decode`` opens a file, finds every frame's timestamp and seeks to T chosen frames. A long recording
cut into windows, or a live feed, is read once instead, front to back, in one demux loop over the
video and audio streams: ``SequentialReader.samples(times)`` takes an ascending iterator of sample
times (seconds after the first video frame) and yields one ``Sample`` per time as soon as its frame
and its audio window are known. The rules are ``decode``'s, so a window of a long file gets the frames
that ``decode`` gives for that window cut out as its own file; the audio windows of its edge frames
reach beyond the window, where they hear the source (a cut file has silence there):

- the frame at time t is the last one shown at or before t (known once a later frame arrives, or
  at the end of the stream), converted to the model's size by ``pyav_backend.FrameConverter``;
- the audio is averaged to mono (``pyav_audio.mono_samples``), non-finite samples zeroed and the rest
  clipped to [-1, 1] (``pyav_audio.repair``), frames placed by timestamp (a gap over 1 ms is silence),
  resampled to the model's rate by one streaming libswresample context, and the window around t is
  framed and turned into a log-mel by ``data.audio`` (``window_segments``, ``segments_log_mel``).

Memory is bounded by the asked times, not by the source: the reader keeps the frame on screen, the
answered samples waiting for their sound (at most ``_AUDIO_LAG_S`` of video), and the audio from the
earliest time still asked for on, at most ``_AUDIO_LAG_S`` of it past the last video frame (a source
whose video stops or thins out loses the older sound instead of piling it up). ``stop`` (an event)
ends the reading at the next packet.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from avgn_fast.data.audio import segments_log_mel, window_segments
from avgn_fast.data.common import DecodeError, DecodeParams, DecodeStats, check_pixels, stalled
from avgn_fast.data.pyav_audio import misplaced, mono_samples, repair, repair_notes
from avgn_fast.data.pyav_backend import FrameConverter

# a sample waits for its sound at most this long after its frame (video time); a source whose audio stops or
# lags more goes on with silence, so the frames held stay bounded; the sound held past the last video frame is
# bounded by the same span
_AUDIO_LAG_S = 10.0


@dataclass
class Sample:
    """One asked time: the frame shown then and the log-mel of the audio window centred on it.

    ``time`` is in seconds after the source's first video frame; ``frame`` uint8 (3, S, S); ``mel``
    float32 (n_mels, n_steps), silence without audio; ``ready`` the ``time.monotonic()`` at which both
    were known (what a live row's latency counts from); ``audio`` whether decoded sound overlapped its
    audio window (a window none of whose samples had any is one without audio, as its cut-out file would
    be). ``features`` holds what a consumer computed from the sample once (the stream engine's glance
    features), so windows that share it share them.
    """

    time: float
    frame: torch.Tensor
    mel: torch.Tensor
    source_size: tuple[int, int]
    ready: float
    audio: bool = False
    features: dict | None = None


@dataclass
class SourceInfo:
    """What the reader learnt of its source: ``fps``, ``audio_present`` (an audio stream; at the end: one that
    decoded to something), and ``end_s`` (the last frame's end, seconds) once it has ended."""

    fps: float = 0.0
    audio_present: bool = False
    end_s: float | None = None


class SequentialReader:
    """Reads ``source`` (a path, or any URL or device FFmpeg opens: FIFO, rtsp://, udp://, http://, /dev/video0) once.

    ``options`` go to FFmpeg (e.g. ``{"rtsp_transport": "tcp"}``); ``timeout`` (seconds) bounds the
    wait for data on network sources, after which reading fails with a ``DecodeError``; ``codec_threads``
    as in ``pyav_backend.decode_file``; ``stop`` (a ``threading.Event``), once set, ends the reading at the
    next packet, as the end of the source would (a live source never ends by itself). One reader reads once.
    """

    def __init__(self, source, params: DecodeParams, *, options: dict | None = None, timeout: float | None = None,
                 codec_threads: int = 1, input_format: str | None = None, stop=None):
        self.source, self.params, self.stop = source, params, stop
        self.options, self.timeout, self.input_format = options, timeout, input_format
        self.codec_threads = codec_threads
        self.info = SourceInfo()
        self.stats = DecodeStats()
        self.last_data = time.monotonic()  # when the last packet came (a live source's stall shows here)
        stft = params.stft
        # seconds a window reads either side of its centre (``window_segments``), with a hop to spare
        self.reach = stft.span / params.sample_rate / 2 + stft.hop / params.sample_rate

    def samples(self, times: Iterable[float]) -> Iterator[Sample]:
        """One Sample per time of ``times`` (ascending, ≥ 0), in order; stops at the end of the source or at
        the first time past its last frame. Any failure is raised as this source's ``DecodeError``."""
        import av

        times = iter(times)
        try:
            container = av.open(self.source, format=self.input_format, options=self.options or {},
                                timeout=self.timeout, metadata_errors="ignore")
        except av.ExitError as e:  # PyAV's timeout interrupts FFmpeg's wait
            raise DecodeError(self.source, f"cannot open: no answer within {self.timeout} s") from e
        except Exception as e:
            raise DecodeError(self.source, f"cannot open: {_problem(e)}") from e
        try:
            yield from self._read(container, times)
        except DecodeError:
            raise
        except av.ExitError as e:
            raise stalled(self.source, self.timeout) from e
        except MemoryError as e:
            raise DecodeError(self.source, "out of memory while decoding", transient=True) from e
        except Exception as e:
            raise DecodeError(self.source, _problem(e)) from e
        finally:
            container.close()

    def _read(self, container, times: Iterator[float]) -> Iterator[Sample]:
        import av

        video = container.streams.best("video")
        if video is None:
            raise DecodeError(self.source, "no video stream")
        ctx = video.codec_context
        if ctx.width and ctx.height:
            check_pixels(self.source, ctx.width, ctx.height, self.params.max_pixels)
        ctx.thread_type, ctx.thread_count = ("AUTO", self.codec_threads) if self.codec_threads > 1 else ("NONE", 1)
        audio = container.streams.best("audio")
        self.info.fps = float(video.average_rate or video.guessed_rate or 0.0)
        self.info.audio_present = audio is not None
        self._audio = _AudioBuffer(self.params.sample_rate) if audio is not None else None
        self._video = _VideoState(FrameConverter(self.params), times, video.time_base)
        self._pending: deque = deque()  # (time, converted frame) waiting for their audio
        self._audio_late = False
        streams = [s for s in (video, audio) if s is not None]
        for packet in container.demux(streams):
            self.last_data = time.monotonic()
            if self.stop is not None and self.stop.is_set():
                return
            is_video = packet.stream.index == video.index
            try:
                frames = packet.stream.codec_context.decode(None if packet.size == 0 else packet)
            except av.FFmpegError:
                self.stats.packets_dropped += 1
                continue
            for frame in frames:
                if is_video:
                    self.stats.video_frames_decoded += 1
                    self._pending.extend(self._video.push(frame, seconds(frame, video)))
                elif self._audio is not None:
                    self.stats.audio_frames_decoded += 1
                    self._push_audio(frame, seconds(frame, audio))
            yield from self._flush(final=False)
            if self._video.exhausted and not self._pending:  # every asked time answered
                return
        for stream in streams:  # drain the decoders (a demuxer that ended without its end marker left them full)
            try:
                frames = stream.codec_context.decode(None)
            except av.EOFError:  # drained already, at the end marker
                frames = []
            for frame in frames:
                if stream.index == video.index:
                    self.stats.video_frames_decoded += 1
                    self._pending.extend(self._video.push(frame, seconds(frame, video)))
                elif self._audio is not None:
                    self.stats.audio_frames_decoded += 1
                    self._push_audio(frame, seconds(frame, audio))
        self._pending.extend(self._video.end())
        self.info.end_s = self._video.end_s
        if self._video.first is None:
            raise DecodeError(self.source, "no video frame could be decoded")
        if self._audio is not None:
            self._audio.note(self.stats)
        self.info.audio_present = self._audio is not None and self._audio.started
        yield from self._flush(final=True)

    def _push_audio(self, frame, time_s: float | None) -> None:
        """Keep ``frame``'s sound, then forget what no asked time needs any more and what lies over
        ``_AUDIO_LAG_S`` past the last video frame (or before the first, while none has come)."""
        buffer = self._audio
        buffer.push(frame, time_s)
        if not buffer.started:
            return
        video, origin = self._video, self._video.first
        end = buffer.t0 + buffer.length / buffer.rate
        latest = -math.inf if origin is None else origin + (video.shown[0] if video.shown is not None else 0.0)
        if origin is not None:
            needed = self._pending[0][0] if self._pending else video.next_time
            buffer.drop_before(math.inf if needed is None else origin + needed - self.reach)
        if end - latest > _AUDIO_LAG_S + self.reach:  # the video stopped or thinned out: keep the newest sound
            if not buffer.dropped_ahead and origin is not None:
                buffer.dropped_ahead = True
                self.stats.notes.append(f"audio: over {_AUDIO_LAG_S:g} s ahead of the video at "
                                        f"{latest - origin:.1f} s; older sound dropped")
            buffer.drop_before(end - _AUDIO_LAG_S - self.reach)

    def _flush(self, *, final: bool) -> Iterator[Sample]:
        """Samples whose audio has arrived (all of them at the end, or without an audio stream), in order."""
        origin = self._video.first
        latest = self._video.shown[0] if self._video.shown is not None else 0.0
        ready = []
        while self._pending:
            t, image = self._pending[0]
            if self._audio is not None and not final and not self._audio.covers(origin + t + self.reach):
                if latest - t < _AUDIO_LAG_S:
                    break
                if not self._audio_late:  # the sound stopped or fell far behind: go on without it
                    self._audio_late = True
                    self.stats.notes.append(f"audio: over {_AUDIO_LAG_S:g} s behind the video at {t:.1f} s; "
                                            "windows go on with what has arrived (silence after it)")
            ready.append(self._pending.popleft())
        if not ready:
            return
        p = self.params
        heard = [False] * len(ready)
        if self._audio is not None and self._audio.started:
            heard = [self._audio.overlaps(origin + t - self.reach, origin + t + self.reach) for t, _ in ready]
            segments = self._audio.segments([origin + t for t, _ in ready], p)
            mel = segments_log_mel(segments, p.sample_rate, window_s=p.audio_window_s, n_mels=p.n_mels,
                                   win_ms=p.win_ms, hop_ms=p.hop_ms)
            keep_from = origin + (self._pending[0][0] if self._pending else ready[-1][0]) - self.reach
            self._audio.drop_before(keep_from)
        else:
            mel = p.silent_mel()[:1].expand(len(ready), -1, -1)
        now = time.monotonic()
        for (t, image), m, a in zip(ready, mel, heard):
            yield Sample(t, image.frames, m, image.source_size, now, audio=a)


def _problem(e: Exception) -> str:
    """``e`` in one line, without the source's name that FFmpeg's errors repeat (the DecodeError names it)."""
    import av

    if isinstance(e, av.FFmpegError) and e.strerror:
        return f"{type(e).__name__}: {e.strerror}"
    return f"{type(e).__name__}: {e}"


def seconds(frame, stream) -> float | None:
    """A decoded frame's time in seconds; frames drained from a decoder at the end carry no time base of their
    own, so the stream's is used."""
    ts = frame.pts if frame.pts is not None else frame.dts
    base = frame.time_base or stream.time_base
    return None if ts is None or base is None else float(ts * base)


class _VideoState:
    """The frame on screen and the asked times it answers: each video frame in, (time, converted frame) out."""

    def __init__(self, convert: FrameConverter, times: Iterator[float], time_base):
        self.convert, self.times, self.time_base = convert, times, time_base
        self.first = None  # time (s) of the first frame: the origin of the asked times
        self.shown = None  # (frame time relative to the origin, the av frame) on screen
        self.converted = None  # the shown frame, converted, once asked for
        self.next_time = None  # the earliest asked time not answered yet
        self.exhausted = False
        self.end_s = None
        self.last_duration = None

    def _advance(self) -> None:
        self.next_time = next(self.times, None)
        if self.next_time is None:
            self.exhausted = True

    def push(self, frame, time_s: float | None) -> list:
        """Times answered now that ``frame`` (shown from ``time_s``) has arrived: those before it show the previous
        frame."""
        if time_s is None:
            return []
        if self.first is None:
            self.first = time_s
            self._advance()
        t = time_s - self.first
        out = []
        if self.shown is not None:
            if t <= self.shown[0]:  # a timestamp that does not advance: a repeat, not a new frame
                return []
            self.last_duration = t - self.shown[0]
            out = self._answer(until=t)
        self.shown, self.converted = (t, frame), None
        if frame.duration and self.time_base:
            self.last_duration = float(frame.duration * self.time_base)
        return out

    def _answer(self, until: float) -> list:
        out = []
        while self.next_time is not None and self.next_time < until:
            if self.converted is None:
                self.converted = self.convert(self.shown[1])
            out.append((self.next_time, self.converted))
            self._advance()
        return out

    def end(self) -> list:
        """At the end of the stream: the times up to the last frame's end show it; the rest cannot be answered."""
        if self.shown is None:
            return []
        duration = self.last_duration or 0.04
        self.end_s = self.shown[0] + duration
        return self._answer(until=self.end_s)


class _AudioBuffer:
    """Mono samples at ``rate`` from the first audio frame on, placed by timestamp, with the old ones dropped."""

    def __init__(self, rate: int):
        import av

        self.rate = rate
        self.chunks: list[np.ndarray] = []
        self.t0 = None  # time (s) of the first kept sample (the first frame's at the start)
        self.length = 0  # samples kept
        self.first = None  # the first input frame's (time, sample rate)
        self.placed = 0  # input samples placed since the first frame
        self.resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
        self.repaired = [0, 0, 0]  # non-finite samples zeroed, samples clipped to [-1, 1], samples read
        self.gaps = 0  # frames whose timestamp did not follow the samples before them
        self.dropped_ahead = False  # sound over ``_AUDIO_LAG_S`` past the video was dropped (noted once)

    @property
    def started(self) -> bool:
        return self.t0 is not None

    def covers(self, t: float) -> bool:
        return self.t0 is not None and self.t0 + self.length / self.rate >= t

    def overlaps(self, lo: float, hi: float) -> bool:
        """Whether the kept samples reach into [lo, hi) (seconds)."""
        return self.length > 0 and self.t0 < hi and self.t0 + self.length / self.rate > lo

    def note(self, stats: DecodeStats) -> None:
        """The repairs made, as ``pyav_audio`` notes them: one note per kind, with counts."""
        if self.gaps:
            stats.notes.append(f"audio: {self.gaps} gaps or overlaps in the timestamps, samples placed by time")
        stats.notes.extend(repair_notes(*self.repaired))

    def push(self, frame, time_s: float | None) -> None:
        """Place ``frame``'s mono samples by its timestamp ``time_s`` (``pyav_audio``'s rule), repair, resample,
        keep."""
        import av

        if time_s is None or frame.samples == 0:
            return
        samples = mono_samples([frame])
        if self.first is None:
            self.first = (time_s, frame.sample_rate)
            self.t0 = time_s
        t_first, rate = self.first
        start = round((time_s - t_first) * rate)
        if misplaced(start, self.placed, rate):  # a dropped packet or a discontinuity
            self.gaps += 1
            if start > self.placed:
                samples = np.concatenate([np.zeros(start - self.placed, dtype=np.float32), samples])
            else:
                samples = samples[self.placed - start:]
        self.placed += len(samples)
        zeroed, clipped = repair(samples)  # in place: ``mono_samples`` gave a new array
        self.repaired[0] += zeroed
        self.repaired[1] += clipped
        self.repaired[2] += len(samples)
        if rate != self.rate:  # one streaming resampler: no edge effects between frames
            signal = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples.reshape(1, -1)), format="flt",
                                                layout="mono")
            signal.sample_rate = rate
            samples = np.concatenate([o.to_ndarray().reshape(-1) for o in self.resampler.resample(signal)] +
                                     [np.zeros(0, np.float32)])
        if len(samples):
            self.chunks.append(samples)
            self.length += len(samples)

    def segments(self, centers: list[float], params: DecodeParams) -> torch.Tensor:
        """``window_segments`` of the kept samples around each centre (seconds, the source's clock)."""
        wave = torch.from_numpy(np.concatenate(self.chunks)) if self.chunks else torch.zeros(0)
        self.chunks = [wave.numpy()]
        return window_segments(wave, self.rate, [c - self.t0 for c in centers], window_s=params.audio_window_s,
                               win_ms=params.win_ms, hop_ms=params.hop_ms)

    def drop_before(self, t: float) -> None:
        """Forget the samples before ``t`` (seconds): no later window reads them. Whole chunks go first, so
        a drop costs no copy of what is kept."""
        if self.t0 is None or not self.chunks:
            return
        n = min(math.floor((t - self.t0) * self.rate), self.length) if t < math.inf else self.length
        if n <= 0:
            return
        self.length -= n
        self.t0 += n / self.rate
        while n and n >= len(self.chunks[0]):
            n -= len(self.chunks.pop(0))
        if n:
            self.chunks[0] = self.chunks[0][n:]
