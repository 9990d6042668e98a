"""Whole-factor downsampling against libswresample itself (``av.AudioResampler``), the reference it replaces."""

import fractions
import math

import numpy as np
import pytest
import torch
from media import write_video
from tolerances import tol

import avgn_fast.data.pyav_audio as pyav_audio
from avgn_fast.config import AVGNConfig
from avgn_fast.data.decimate import decimate
from avgn_fast.data.decode import decode_clip_for


def swr(signal: np.ndarray, src: int, dst: int) -> np.ndarray:
    """libswresample's mono float output for the whole signal, flushed."""
    import av

    frame = av.AudioFrame.from_ndarray(signal.reshape(1, -1), format="flt", layout="mono")
    frame.sample_rate, frame.pts, frame.time_base = src, 0, fractions.Fraction(1, src)
    resampler = av.AudioResampler(format="flt", layout="mono", rate=dst)
    out = [*resampler.resample(frame), *resampler.resample(None)]
    return np.concatenate([o.to_ndarray().reshape(-1) for o in out])


RATIOS = [(48000, 8000), (48000, 16000), (16000, 8000), (44100, 11025), (96000, 16000), (24000, 8000), (80000, 8000)]


def filter_taps(src: int, dst: int) -> int:
    """libswresample's tap count: ceil(filter size 32 / (dst / src · cutoff 0.97)), made even."""
    taps = math.ceil(32 / (dst * 0.97 / src))
    return taps + taps % 2


# lengths just past the filter's, every remainder modulo the factor q twice (how many samples libswresample gives
# depends on it, and its mirrored ends reach far in), and long ones
CASES = [(src, dst, n) for src, dst in RATIOS
         for n in [4801, 48007, *range(filter_taps(src, dst) + 1, filter_taps(src, dst) + 1 + 2 * (src // dst))]]


@pytest.mark.parametrize("src,dst,n", CASES)
def test_whole_ratios_give_libswresamples_samples(src, dst, n):
    """Random noise (every frequency, so a wrong filter shows) at the lengths of ``CASES``."""
    rng = np.random.default_rng(n + src // dst)
    signal = (rng.standard_normal(n) * 0.3).astype(np.float32)
    out = decimate(signal, src, dst)
    ref = swr(signal, src, dst)
    assert out is not None and out.dtype == np.float32 and out.shape == ref.shape
    torch.testing.assert_close(torch.from_numpy(out), torch.from_numpy(ref), **tol(torch.float32))


@pytest.mark.parametrize("src,dst,n", [(44100, 16000, 48000), (8000, 16000, 48000), (16000, 16000, 4800),
                                       (48000, 8000, 198), (48000, 0, 4800)])
def test_other_ratios_and_signals_within_the_filter_are_left_to_libswresample(src, dst, n):
    signal = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    assert decimate(signal, src, dst) is None


def test_an_opus_clip_decodes_to_the_audio_libswresample_gives(tmp_path, monkeypatch):
    """48 kHz Opus to the tiny config's 8 kHz: the windows cut from the decimated signal equal those cut from
    libswresample's, at the same times."""
    path = write_video(tmp_path / "opus.webm", codec="vp9", audio="opus", sample_rate=48000, channels=2,
                       seconds=2.0)
    config = AVGNConfig.from_name("tiny")
    seen = {}

    def record(mode):
        def window_segments(wave, sr, centers, **kw):
            seen[mode] = (wave.clone(), list(centers))
            return real_windows(wave, sr, centers, **kw)
        return window_segments

    real_windows, real_decimate = pyav_audio.window_segments, pyav_audio.decimate
    calls = []
    monkeypatch.setattr(pyav_audio, "decimate", lambda *a: calls.append(a[1:]) or real_decimate(*a))
    monkeypatch.setattr(pyav_audio, "window_segments", record("fast"))
    fast = decode_clip_for(path, config, "pyav")
    monkeypatch.setattr(pyav_audio, "decimate", lambda *a: None)
    monkeypatch.setattr(pyav_audio, "window_segments", record("swr"))
    slow = decode_clip_for(path, config, "pyav")
    assert calls == [(48000, 8000)] and fast.audio_present and slow.audio_present
    assert seen["fast"][1] == seen["swr"][1]
    torch.testing.assert_close(seen["fast"][0], seen["swr"][0], **tol(torch.float32))
