"""Audio of one PyAV stream as the log-mel front end needs it: mono windows around the sampled times.

Any channel count and sample format: each decoded frame is averaged to mono in float32, non-finite
samples are zeroed (noted) and the rest clipped to [-1, 1] (noted when over 1 % of them: lossy codecs
overshoot a little on clean files), frames are placed by timestamp (a gap is silence, noted), and
the mono signal is resampled to ``sample_rate`` (``decimate`` where the ratio is whole, else libswresample:
the same samples either way). Windows closer than
``_AUDIO_MERGE_GAP_S`` are read in one pass. An audio stream that fails to decode costs the audio,
not the video: ``read_audio`` returns None with a note.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from avgn_fast.data.audio import window_segments
from avgn_fast.data.common import DecodeParams, DecodeStats
from avgn_fast.data.decimate import decimate
from avgn_fast.data.pyav_streams import PacketReader

_AUDIO_PREROLL_S = 0.5  # decoded before each audio read: codec warm-up after a seek (Opus needs 80 ms)
_AUDIO_MERGE_GAP_S = 2.0  # audio windows closer than this are read in one pass rather than two seeks
_CLIP_NOTE_FRACTION = 0.01  # clipping is noted when more samples than this fraction were outside [-1, 1]
_SAMPLE_DTYPE = {"u8": np.uint8, "s16": np.int16, "s32": np.int32, "s64": np.int64, "flt": np.float32,
                 "dbl": np.float64}  # by sample format, planar or packed
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
    stats.notes.extend(repair_notes(*repaired))
    return segments if any_audio else None


def _read_audio(reader: PacketReader, stream, lo: float, hi: float, sample_rate: int, stats: DecodeStats,
                repaired: list[int]):
    """Mono float32 samples at ``sample_rate`` covering [lo, hi] seconds and the time of the first one.

    ``lo`` may be negative: an AAC stream in mp4 starts with a priming packet at a negative pts, and
    a read from 0 would skip it, so the decoder's first frame (~20-60 ms of sound) came out near silent.
    The decoded frames are placed by their timestamps (a gap over 1 ms becomes silence, an overlap is
    cut, both noted), averaged to mono and resampled together: the loop over frames (20 ms each for
    Opus) does no more than collect them, all timestamp arithmetic is on integer pts.
    """
    import av

    time_base = stream.time_base
    end = math.floor(hi / time_base)  # a frame starting after this pts lies past the window
    frames = []
    for frame in reader.frames(stream, math.floor(lo / time_base)):
        stats.audio_frames_decoded += 1
        if frame.pts is not None and frame.pts > end:
            break
        frames.append(frame)
    if not frames:
        return None, None
    first = frames[0]
    pieces = _placed(frames, first.sample_rate, stats)
    mono = pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
    repaired[2] += mono.size
    zeroed, clipped = repair(mono)
    repaired[0] += zeroed
    repaired[1] += clipped
    # the same rate needs nothing; a whole-number ratio gets libswresample's samples in about half the time
    same = mono if first.sample_rate == sample_rate else decimate(mono, first.sample_rate, sample_rate)
    if same is not None and first.time is not None:
        return torch.from_numpy(same), float(first.time)
    signal = av.AudioFrame.from_ndarray(mono.reshape(1, -1), format="flt", layout="mono")
    signal.sample_rate, signal.pts, signal.time_base = first.sample_rate, first.pts, first.time_base
    resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
    out = [*resampler.resample(signal), *resampler.resample(None)]
    if not out:
        return None, None
    t0 = float(out[0].time if out[0].time is not None else first.time)
    return torch.from_numpy(np.concatenate([o.to_ndarray().reshape(-1) for o in out])), t0


def repair(samples: np.ndarray) -> tuple[int, int]:
    """Zero the non-finite values of float32 ``samples`` and clip the rest to [-1, 1], in place, so a decoder's NaN
    or overshoot never reaches the log-mel; returns how many were zeroed and how many clipped."""
    bad = ~np.isfinite(samples)
    zeroed = int(bad.sum())
    if zeroed:
        samples[bad] = 0.0
    loud = np.abs(samples) > 1
    clipped = int(loud.sum())
    if clipped:
        np.clip(samples, -1.0, 1.0, out=samples)
    return zeroed, clipped


def repair_notes(zeroed: int, clipped: int, total: int) -> list[str]:
    """The notes for ``repair``'s counts over ``total`` samples: clipping only when over ``_CLIP_NOTE_FRACTION`` of
    them, since a lossy codec overshoots a little on clean files."""
    notes = [f"audio: {zeroed} non-finite samples zeroed"] if zeroed else []
    if clipped > _CLIP_NOTE_FRACTION * total:
        notes.append(f"audio: {clipped} of {total} samples outside [-1, 1] clipped")
    return notes


def misplaced(start: int, placed: int, rate: int) -> bool:
    """Whether a frame whose timestamp puts it at sample ``start`` (of ``rate`` per second) does not follow the
    ``placed`` samples laid before it: over 1 ms off is a gap or an overlap, not rounding."""
    return abs(start - placed) > rate // 1000


def _placed(frames: list, rate: int, stats: DecodeStats) -> list[np.ndarray]:
    """The frames' samples as mono float32 pieces laid end to end by timestamp: silence fills a gap, an
    overlap is cut (both noted). Runs of frames of one layout and format are downmixed in one call."""
    first = frames[0]
    num, den = first.time_base.numerator, first.time_base.denominator  # integer arithmetic: no Fraction per frame
    pieces, placed, gaps = [], 0, 0
    run, run_key = [], None  # consecutive frames of one layout and format, downmixed together
    for frame in frames:
        key = (frame.format.name, frame.layout.nb_channels)
        if key != run_key and run:
            pieces.append(mono_samples(run))
            run = []
        run_key = key
        n = frame.samples
        if frame.pts is not None and first.pts is not None:
            start = round((frame.pts - first.pts) * num * rate / den)
            if misplaced(start, placed, rate):
                gaps += 1
                if run:
                    pieces.append(mono_samples(run))
                    run = []
                if start > placed:
                    pieces.append(np.zeros(start - placed, dtype=np.float32))
                else:
                    pieces.append(mono_samples([frame])[placed - start:])
                    placed = max(placed, start + n)
                    continue
                placed = start
        run.append(frame)
        placed += n
    if run:
        pieces.append(mono_samples(run))
    if gaps:
        stats.notes.append(f"audio: {gaps} gaps or overlaps in the timestamps, samples placed by time")
    return pieces


def mono_samples(frames: list) -> np.ndarray:
    """The channel mean of audio frames of one layout and sample format, end to end: float32 (n,), full scale ±1.

    Samples are read from the frames' planes as they lie (one view per plane, no per-frame array
    building): a 20-ms Opus frame would otherwise cost more to convert than to decode.
    """
    first = frames[0]
    dtype, channels = _SAMPLE_DTYPE[first.format.name.removesuffix("p")], first.layout.nb_channels
    if first.format.is_planar:  # one plane per channel
        views = [[np.frombuffer(p, dtype, f.samples) for p in f.planes[:channels]] for f in frames]
        samples = np.stack([np.concatenate([v[c] for v in views]) for c in range(channels)])
    else:  # one plane of interleaved samples
        views = [np.frombuffer(f.planes[0], dtype, f.samples * channels) for f in frames]
        samples = (views[0] if len(views) == 1 else np.concatenate(views)).reshape(-1, channels).T
    scale = np.float32(_SAMPLE_SCALE[samples.dtype])
    if samples.dtype == np.uint8:  # unsigned 8-bit is offset binary
        samples = samples.astype(np.float32) - 128
    if channels == 1:
        return samples[0].astype(np.float32) * scale
    return samples.mean(0, dtype=np.float64).astype(np.float32) * scale
