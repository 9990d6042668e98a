"""Audio of one PyAV stream as the log-mel front end needs it: mono windows around the sampled times.

Any channel count and sample format: each decoded frame is averaged to mono in float32, non-finite
samples are zeroed (noted) and the rest clipped to [-1, 1] (noted when over 1 % of them: lossy codecs
overshoot a little on clean files), frames are placed by timestamp (a gap is silence, noted), and
libswresample resamples the mono signal to ``sample_rate``. Windows closer than
``_AUDIO_MERGE_GAP_S`` are read in one pass. An audio stream that fails to decode costs the audio,
not the video: ``read_audio`` returns None with a note.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from avgn_fast.data.audio import window_segments
from avgn_fast.data.common import DecodeParams, DecodeStats
from avgn_fast.data.pyav_streams import PacketReader

_AUDIO_PREROLL_S = 0.5  # decoded before each audio read: codec warm-up after a seek (Opus needs 80 ms)
_AUDIO_MERGE_GAP_S = 2.0  # audio windows closer than this are read in one pass rather than two seeks
_CLIP_NOTE_FRACTION = 0.01  # clipping is noted when more samples than this fraction were outside [-1, 1]
_SAMPLE_SCALE = {np.dtype(np.uint8): 1 / 128, np.dtype(np.int16): 1 / 32768, np.dtype(np.int32): 1 / 2 ** 31,
                 np.dtype(np.int64): 1 / 2 ** 63, np.dtype(np.float32): 1.0, np.dtype(np.float64): 1.0}


def read_audio(container, reader: PacketReader, centers_s: list[float], params: DecodeParams,
               stats: DecodeStats) -> torch.Tensor | None:
    """``audio_segments`` of the container's best audio stream, or None (silence) with a note in ``stats`` when
    the stream can't be probed, fails to decode or decodes to nothing; None without a note when there is none."""
    stream = container.streams.best("audio")
    if stream is None:
        if container.streams.audio:  # FFmpeg found no decodable parameters in any of them
            stats.notes.append("audio dropped: the audio stream could not be probed (no sample rate or channels)")
        return None
    try:
        segments = audio_segments(reader, stream, centers_s, params, stats)
    except MemoryError:
        raise
    except Exception as e:  # a broken audio stream costs the audio, not the video
        stats.notes.append(f"audio dropped: {type(e).__name__}: {e}")
        return None
    if segments is None:
        stats.notes.append("audio dropped: the audio stream decoded to nothing")
    return segments


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
    repaired = [0, 0, 0]  # non-finite samples zeroed, samples clipped to [-1, 1], samples read
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
    if repaired[1] > _CLIP_NOTE_FRACTION * repaired[2]:  # a lossy codec's few overshooting samples go unnoted
        stats.notes.append(f"audio: {repaired[1]} of {repaired[2]} samples outside [-1, 1] clipped")
    return segments if any_audio else None


def _read_audio(reader: PacketReader, stream, lo: float, hi: float, sample_rate: int, stats: DecodeStats,
                repaired: list[int]):
    """Mono float32 samples at ``sample_rate`` covering [lo, hi] seconds and the time of the first one.

    ``lo`` may be negative: an AAC stream in mp4 starts with a priming packet at a negative pts, and
    a read from 0 would skip it, so the decoder's first frame (~20-60 ms of sound) came out near silent.
    The decoded frames are averaged to mono one by one, placed by their timestamps (a gap over 1 ms
    becomes silence, an overlap is cut, both noted) and resampled together in one call.
    """
    import av

    pieces, first, placed, gaps = [], None, 0, 0
    for frame in reader.frames(stream, math.floor(lo / stream.time_base)):
        stats.audio_frames_decoded += 1
        if frame.time is not None and frame.time > hi:
            break
        if first is None:
            first = frame
        samples = mono_samples(frame)
        if frame.time is not None and first.time is not None:
            # placed by timestamp: a gap (a dropped packet, a discontinuity) is silence, an overlap is cut
            start = round((frame.time - first.time) * first.sample_rate)
            if abs(start - placed) > first.sample_rate // 1000:  # over 1 ms off: not rounding
                gaps += 1
                if start > placed:
                    pieces.append(np.zeros(start - placed, dtype=np.float32))
                else:
                    samples = samples[placed - start:]
                placed = start
        pieces.append(samples)
        placed += len(samples)
    if first is None:
        return None, None
    if gaps:
        stats.notes.append(f"audio: {gaps} gaps or overlaps in the timestamps, samples placed by time")
    mono = np.concatenate(pieces)
    repaired[2] += mono.size
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


def mono_samples(frame) -> np.ndarray:
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
