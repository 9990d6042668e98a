"""The sound track of an AVSynth scene: coloured noise, maybe a hum, the class sound and the sound distractor."""

from __future__ import annotations

import math

import numpy as np

from avgn_fast.config import AVGNConfig
from avgn_fast.data.synth.scene import SEGMENT_S, SOUNDS, Scene

EVENT_DB = (-20.0, -8.0)  # RMS level of class and distractor sounds, dBFS
NOISE_DB = (-42.0, -28.0)  # RMS level of the background noise, dBFS


def _sound(kind: str, n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    """Unit-RMS float64 (n,) waveform of one sound kind, pitch jittered by +-10 %, 10 ms fades."""
    t = np.arange(n) / sr
    dur = n / sr
    p = rng.uniform(0.9, 1.1)
    nyq = 0.45 * sr
    if kind in ("chirp-up", "chirp-down"):
        f0, f1 = (300 * p, min(2000 * p, nyq)) if kind == "chirp-up" else (min(2000 * p, nyq), 300 * p)
        k = math.log(f1 / f0)
        x = np.sin(2 * math.pi * f0 * dur / k * (np.exp(k * t / dur) - 1))
    elif kind == "two-tone":
        freq = np.where(np.floor(t * 16) % 2 == 0, 500 * p, 1000 * p)
        x = np.sin(2 * math.pi * np.cumsum(freq) / sr)
    elif kind == "clicks":
        period = 1 / (25 * p)
        x = np.exp(-(t % period) / 0.004) * rng.normal(size=n)
    elif kind == "buzz":
        f0 = 140 * p
        harmonics = np.arange(1, int(nyq // f0) + 1)
        x = (np.sin(2 * math.pi * f0 * harmonics[:, None] * t) / harmonics[:, None]).sum(0)
    elif kind == "hiss":
        x = _band_noise(rng, n, sr, 2000 * p, min(3500 * p, nyq))
    elif kind == "warble":
        x = np.sin(2 * math.pi * 900 * p * t - (250 / 10) * np.cos(2 * math.pi * 10 * t))
    else:
        raise ValueError(f"unknown sound {kind!r}; known: {', '.join(SOUNDS)}")
    fade = min(n // 2, round(0.01 * sr))
    ramp = 0.5 - 0.5 * np.cos(np.pi * np.arange(fade) / fade)
    x[:fade] *= ramp
    x[n - fade:] *= ramp[::-1]
    return x / max(np.sqrt(np.mean(x**2)), 1e-12)


def _band_noise(rng: np.random.Generator, n: int, sr: int, lo: float, hi: float) -> np.ndarray:
    spec = np.fft.rfft(rng.normal(size=n))
    freqs = np.fft.rfftfreq(n, 1 / sr)
    return np.fft.irfft(spec * ((freqs >= lo) & (freqs <= hi)), n)


def render_wave(scene: Scene, config: AVGNConfig) -> np.ndarray:
    """float32 (T * SEGMENT_S * sample_rate,): coloured background noise, maybe hum, event and distractor sounds."""
    sr = config.sample_rate
    n = round(config.num_frames * SEGMENT_S * sr)
    rng = np.random.default_rng([scene.appearance_seed, 1])

    def db(lo_hi: tuple[float, float]) -> float:
        return 10 ** (rng.uniform(*lo_hi) / 20)

    slope = rng.uniform(0.0, 2.0)  # noise power ~ 1 / f^slope: white to brown
    spec = np.fft.rfft(rng.normal(size=n))
    freqs = np.fft.rfftfreq(n, 1 / sr)
    spec[1:] *= freqs[1:] ** (-slope / 2)
    spec[0] = 0
    noise = np.fft.irfft(spec, n)
    wave = noise / np.sqrt(np.mean(noise**2)) * db(NOISE_DB)
    if rng.uniform() < 0.5:
        hum, t = rng.uniform(50, 150), np.arange(n) / sr
        wave += db((-40.0, -30.0)) * sum(np.sin(2 * math.pi * k * hum * t + rng.uniform(0, 6.3)) / k for k in (1, 2, 3))

    placed = [(scene.sound, scene.event.start, scene.event.stop)]
    if scene.sound_distractor is not None:
        kind, start, stop = scene.sound_distractor
        placed.append((SOUNDS[kind], start, stop))
    for kind, start, stop in placed:
        a, b = round(start * SEGMENT_S * sr), round(stop * SEGMENT_S * sr)
        wave[a:b] += db(EVENT_DB) * _sound(kind, b - a, sr, rng)
    return np.clip(wave, -1.0, 1.0).astype(np.float32)
