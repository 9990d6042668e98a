"""Decode video files into ``Clip``s: T frames uniform over the duration, per-frame log-mel windows.

This module only dispatches: the sampling rule, geometry and errors shared by every backend are in
``avgn_fast.data.common``; ``pyav`` (``avgn_fast.data.pyav_backend``) decodes on the CPU, ``dali``
(``avgn_fast.data.dali_backend``) decodes batches on the GPU. A frame that fails to decode is
replaced by the nearest decoded one (by timestamp); a video with fewer than T frames repeats frames.
The audio window of frame ``i`` is centred on its sampling time (``avgn_fast.data.audio``); no audio
stream, or one that fails to decode, gives silence (``log(LOG_EPS)`` everywhere) and
``audio_present=False``. A file with nothing decodable (or missing, empty, without a video stream,
larger than ``max_pixels``) gives a ``DecodeError`` naming it, and ``decode_many`` returns that
error in the file's place: one bad file never costs the others. PyAV and DALI are imported only
when a file is decoded, so this module imports with torch alone.
"""

from __future__ import annotations

import functools
import importlib.util

import torch

from avgn_fast.config import AVGNConfig
from avgn_fast.data.clip import Clip
from avgn_fast.data.common import (
    MAX_PIXELS,
    DecodeError,
    DecodeParams,
    DecodeStats,
    VideoProbe,
    center_crop,
    resize_crop,
    resized_shape,
)

__all__ = ["BACKENDS", "MAX_PIXELS", "DecodeError", "DecodeParams", "DecodeStats", "VideoProbe", "available_backends",
           "center_crop", "decode_clip", "decode_clip_for", "decode_many", "resize_crop", "resized_shape",
           "resolve_backend"]

BACKENDS = ("pyav", "dali")


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
                max_pixels: int = MAX_PIXELS, keyframes_only: bool = False, backend: str = "pyav", device=None,
                stats: DecodeStats | None = None, codec_threads: int = 1) -> Clip:
    """Decode one file (see the module docstring); raises ``DecodeError`` for a file that cannot be decoded.

    ``resize_shorter`` defaults to ``size``. ``device`` matters to ``dali`` only (its clips live there;
    None = CUDA when available); ``pyav`` clips are on the CPU and fill ``stats`` when given, and
    decode with ``codec_threads`` threads (``pyav_backend.decode_file``).
    """
    params = DecodeParams(num_frames=num_frames, size=size, resize_shorter=size if resize_shorter is None
                          else resize_shorter, sample_rate=sample_rate, audio_window_s=audio_window_s,
                          n_mels=n_mels, win_ms=win_ms, hop_ms=hop_ms, max_pixels=max_pixels,
                          keyframes_only=keyframes_only)
    name = resolve_backend(backend, device)
    if name == "dali":
        result = _decode_dali([path], params, device, 1)[0]
    else:
        result = _decode_pyav(path, params, stats, codec_threads)
    if isinstance(result, DecodeError):
        raise result
    return result


def decode_clip_for(path, config: AVGNConfig, backend: str = "auto", *, device=None, **options) -> Clip:
    """``decode_clip`` with every decode parameter taken from ``config`` (``options``: max_pixels, keyframes_only)."""
    result = decode_many([path], config, backend, device=device, **options)[0]
    if isinstance(result, DecodeError):
        raise result
    return result


def decode_many(paths, config: AVGNConfig, backend: str = "auto", *, device=None, batch_size: int = 8,
                **options) -> list[Clip | DecodeError]:
    """Decode every path; a file that fails gives its ``DecodeError`` in its place (same order and length).

    ``dali`` decodes ``batch_size`` files per pipeline run; ``pyav`` decodes one at a time. ``options``
    are ``DecodeParams``' ``max_pixels`` and ``keyframes_only``.
    """
    paths = list(paths)
    params = DecodeParams.from_config(config, **options)
    if resolve_backend(backend, device) == "dali":
        return _decode_dali(paths, params, device, batch_size)
    return [_decode_pyav(path, params, None, 1) for path in paths]


def _decode_pyav(path, params: DecodeParams, stats: DecodeStats | None, codec_threads: int) -> Clip | DecodeError:
    from avgn_fast.data.pyav_backend import decode_file

    try:
        return decode_file(path, params, stats, codec_threads=codec_threads)
    except DecodeError as e:
        return e


def _decode_dali(paths, params: DecodeParams, device, batch_size: int) -> list[Clip | DecodeError]:
    from avgn_fast.data import dali_backend

    return dali_backend.decode_batch(paths, params, device_id=_cuda_index(device), batch_size=batch_size)


@functools.cache  # looked up for every file decoded: the import system's search costs about 30 µs a module
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
