"""The audio front end against plain float64 references written out loop by loop."""

import importlib.util
import math

import numpy as np
import pytest
import torch
from tolerances import tol

from avgn_fast.data.audio import (
    LOG_EPS,
    frame_params,
    log_mel_windows,
    mel_filterbank,
    segments_log_mel,
    to_mono_resampled,
    window_segments,
)


def mel_filterbank_loop(n_freqs, n_mels, sample_rate, f_min=0.0, f_max=None):
    """HTK triangles in Hz, written with 2595 log10 and one filter at a time."""
    f_max = sample_rate / 2 if f_max is None else f_max
    to_mel = lambda f: 2595.0 * math.log10(1.0 + f / 700.0)
    to_hz = lambda m: 700.0 * (10 ** (m / 2595.0) - 1.0)
    lo, hi = to_mel(f_min), to_mel(f_max)
    edges = [to_hz(lo + (hi - lo) * i / (n_mels + 1)) for i in range(n_mels + 2)]
    fb = np.zeros((n_freqs, n_mels))
    for m in range(n_mels):
        left, centre, right = edges[m], edges[m + 1], edges[m + 2]
        for k in range(n_freqs):
            f = k * sample_rate / (2 * (n_freqs - 1))
            if left < f <= centre:
                fb[k, m] = (f - left) / (centre - left)
            elif centre < f < right:
                fb[k, m] = (right - f) / (right - centre)
    return fb


def log_mel_loop(wave, sample_rate, centers, *, window_s, n_mels, win_ms, hop_ms):
    """Each STFT frame gathered sample by sample from the documented placement, float64 numpy FFT."""
    win = round(win_ms * sample_rate / 1000)
    hop = round(hop_ms * sample_rate / 1000)
    n_steps = round(window_s * 1000 / hop_ms)
    n_fft = 2 ** math.ceil(math.log2(win))
    fb = mel_filterbank_loop(n_fft // 2 + 1, n_mels, sample_rate)
    hann = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(win) / win)
    out = np.zeros((len(centers), n_mels, n_steps))
    for t, c in enumerate(centers):
        for j in range(n_steps):
            first = round(c * sample_rate) - (n_steps * hop) // 2 + j * hop + (hop - win) // 2
            frame = np.array([wave[k] if 0 <= k < len(wave) else 0.0 for k in range(first, first + win)])
            power = np.abs(np.fft.rfft(frame * hann, n_fft)) ** 2
            out[t, :, j] = np.log(power @ fb + LOG_EPS)
    return out


@pytest.mark.parametrize("n_freqs, n_mels, sample_rate, f_min, f_max", [
    (257, 64, 16000, 0.0, None),
    (129, 32, 8000, 0.0, None),
    (513, 40, 44100, 50.0, 8000.0),
    (2, 1, 1000, 0.0, None),
    (17, 7, 11025, 100.0, 5000.0),
])
def test_mel_filterbank_matches_loop(n_freqs, n_mels, sample_rate, f_min, f_max):
    fb = mel_filterbank(n_freqs, n_mels, sample_rate, f_min, f_max)
    assert fb.shape == (n_freqs, n_mels) and fb.dtype == torch.float32
    ref = torch.from_numpy(mel_filterbank_loop(n_freqs, n_mels, sample_rate, f_min, f_max)).float()
    torch.testing.assert_close(fb, ref, **tol(torch.float32))


@pytest.mark.skipif(importlib.util.find_spec("nvidia.dali") is None, reason="DALI not installed")
def test_mel_filterbank_is_dalis_htk_unnormalised():
    from nvidia.dali import fn, pipeline_def, types

    n_freqs, n_mels, sr = 257, 64, 16000
    power = np.random.default_rng(0).uniform(0.1, 2.0, (n_freqs, 50)).astype(np.float32)

    @pipeline_def(batch_size=1, num_threads=1, device_id=None, prefetch_queue_depth=1)
    def pipe():
        spec = fn.external_source(name="spec", dtype=types.FLOAT, ndim=2, layout="ft")
        return fn.mel_filter_bank(spec, sample_rate=sr, nfilter=n_mels, mel_formula="htk", normalize=False)

    p = pipe()
    p.build()
    (out,) = p.run(spec=[power])
    dali_mel = torch.from_numpy(np.array(out[0]))
    ours = mel_filterbank(n_freqs, n_mels, sr).T @ torch.from_numpy(power)
    torch.testing.assert_close(dali_mel, ours, **tol(torch.float32))


@pytest.mark.parametrize("sample_rate, win_ms, hop_ms, window_s, n_mels", [
    (16000, 25.0, 10.0, 1.0, 64),
    (8000, 25.0, 10.0, 0.5, 32),
    (11025, 23.0, 7.0, 0.3, 20),  # odd sample counts: win 254, hop 77, n_steps 43
])
def test_log_mel_windows_matches_loop(sample_rate, win_ms, hop_ms, window_s, n_mels):
    rng = np.random.default_rng(1)
    n = int(1.7 * sample_rate) + 3
    wave = rng.uniform(-0.8, 0.8, n).astype(np.float32)
    centers = [0.0, 0.41, 1.7, 1.9, 0.05]  # both edges, beyond the end, unsorted
    got = log_mel_windows(torch.from_numpy(wave), sample_rate, centers, window_s=window_s, n_mels=n_mels,
                          win_ms=win_ms, hop_ms=hop_ms)
    p = frame_params(sample_rate, window_s=window_s, win_ms=win_ms, hop_ms=hop_ms)
    assert got.shape == (len(centers), n_mels, p.n_steps) and got.dtype == torch.float32
    ref = log_mel_loop(wave.astype(np.float64), sample_rate, centers, window_s=window_s, n_mels=n_mels,
                       win_ms=win_ms, hop_ms=hop_ms)
    torch.testing.assert_close(got, torch.from_numpy(ref).float(), **tol(torch.float32))


def test_window_is_centred_and_has_round_steps():
    p = frame_params(16000, window_s=1.0, win_ms=25.0, hop_ms=10.0)
    assert (p.win, p.hop, p.n_fft, p.n_steps) == (400, 160, 512, 100)
    wave = torch.zeros(48000)
    wave[16000:16160] = 1.0  # one hop of signal at [1.0, 1.01) s
    seg = window_segments(wave, 16000, [1.0], window_s=1.0, win_ms=25.0, hop_ms=10.0)
    # frame j covers [c - 0.5 + j * hop - 120, + 400): the pulse sits at the centre of frame 50
    frames = seg.unfold(-1, p.win, p.hop)[0]
    assert frames[50, 120:280].eq(1).all() and frames[50].sum() == 160
    mel = log_mel_windows(wave, 16000, [1.0], window_s=1.0, n_mels=64, win_ms=25.0, hop_ms=10.0)[0]
    energy = mel.mean(0)
    assert energy.argmax() == 50 and torch.equal(mel[:, :47], torch.full((64, 47), math.log(LOG_EPS)))


def test_silence_is_log_eps_and_batching_matches_single_calls():
    silent = log_mel_windows(torch.zeros(8000), 8000, [0.2, 0.7], window_s=1.0, n_mels=32, win_ms=25.0, hop_ms=10.0)
    assert torch.equal(silent, torch.full_like(silent, math.log(LOG_EPS)))
    wave = torch.from_numpy(np.random.default_rng(2).uniform(-1, 1, 24000).astype(np.float32))
    kw = dict(window_s=1.0, n_mels=32, win_ms=25.0, hop_ms=10.0)
    batched = log_mel_windows(wave, 8000, [0.3, 1.1, 2.9], **kw)
    singles = torch.cat([log_mel_windows(wave, 8000, [c], **kw) for c in (0.3, 1.1, 2.9)])
    torch.testing.assert_close(batched, singles, **tol(torch.float32))
    segments = window_segments(wave, 8000, [0.3, 1.1, 2.9], window_s=1.0, win_ms=25.0, hop_ms=10.0)
    torch.testing.assert_close(segments_log_mel(segments, 8000, **kw), batched, **tol(torch.float32))


@pytest.mark.parametrize("src, dst", [(44100, 16000), (8000, 16000), (48000, 8000), (22050, 16000), (16000, 11025)])
@pytest.mark.parametrize("fraction, bound", [(0.25, 1e-3), (0.8, 5e-3), (0.9, 3e-2)])
def test_resample_sine_within_documented_bound(src, dst, fraction, bound):
    freq = fraction * min(src, dst) / 2
    n = src  # one second
    sine = np.sin(2 * np.pi * freq * np.arange(n) / src)
    out = to_mono_resampled(torch.from_numpy(np.stack([sine, sine])).float(), src, dst)
    assert out.shape == (math.ceil(n * dst / src),) and out.dtype == torch.float32
    ref = np.sin(2 * np.pi * freq * np.arange(out.shape[0]) / dst)
    edge = dst // 20  # the ends see the zero padding beyond the signal
    assert np.abs(out.numpy()[edge:-edge] - ref[edge:-edge]).max() < bound


@pytest.mark.parametrize("src, dst", [(44100, 16000), (48000, 8000)])
def test_resample_attenuates_instead_of_aliasing(src, dst):
    tone = np.sin(2 * np.pi * 1.1 * dst / 2 * np.arange(src) / src)
    out = to_mono_resampled(torch.from_numpy(tone)[None].float(), src, dst).numpy()
    assert np.abs(out[dst // 20:-dst // 20]).max() < 1e-2


def test_downmix_and_identity():
    rng = np.random.default_rng(3)
    x = torch.from_numpy(rng.uniform(-1, 1, (6, 1000)).astype(np.float32))
    torch.testing.assert_close(to_mono_resampled(x, 16000, 16000), x.mean(0), **tol(torch.float32))
    opposite = torch.stack([x[0], -x[0]])
    assert to_mono_resampled(opposite, 44100, 16000).abs().max() < 1e-6
    with pytest.raises(ValueError, match="samples"):
        to_mono_resampled(x[0], 16000, 8000)
    with pytest.raises(ValueError, match="degenerate"):
        frame_params(16000, window_s=0.001, win_ms=25.0, hop_ms=10.0)
