"""Batched decode with DALI: video decoded and resized on the GPU, log-mel computed on the GPU.

The host does per file only what DALI cannot: demux the video stream for the frame timestamps
(``VideoProbe``, which picks the same frames as the ``pyav`` backend), decode one frame for the display
rotation, and decode + resample the audio with PyAV (DALI reads no audio from mp4), opening the file as the
``pyav`` backend does (``pyav_backend.open_container``). One pipeline run
then handles a batch: ``fn.decoders.video`` decodes exactly the sampled frame indices from the file
bytes ('mixed' backend: NVDEC), ``fn.resize`` scales them (linear, antialiased) to the shape the
``pyav`` backend uses, and ``fn.spectrogram`` -> ``fn.mel_filter_bank`` -> ``log`` make the log-mel.
Outputs reach torch through DLPack on the device DALI produced them on; the rotation, the centre
crop and the gather of STFT frames per window are torch ops on that device.

Audio layout: each file's T windows (``window_segments``, ``span`` samples each) are zero-padded to
``stride = ceil(span / hop) * hop`` samples and concatenated into one 1-D signal. Its spectrogram
without centring and with step ``hop`` has, at column ``t * stride / hop + j``, STFT frame ``j`` of
window ``t``; the columns in between straddle two windows and are dropped.

``device_id=None`` builds the same pipeline on the CPU, where DALI's decoder handles VP8, VP9 and
MJPEG only. Agreement with ``pyav``, checked in CPU mode on VP9/Opus webm and MJPEG avi by
``tests/test_decode.py``: frames within 2.5 uint8 levels of mean absolute difference (measured 0.5
on smooth content, 1.1-1.4 on noisy content: YUV->RGB rounding, chroma upsampling and the antialias
filters differ; single pixels at sharp colour edges can differ by tens of levels), log-mel within
1e-3 maximum absolute difference (measured 3e-5: float32 FFT and summation order).

Failures stay per file: a file that fails on the host (missing, over ``max_pixels``, over
``MAX_FILE_BYTES`` — the pipeline is handed whole files in memory — or anything PyAV raises) is that
file's ``DecodeError``, and a batch the pipeline rejects is run again one file at a time.

Pipelines are kept per calling thread (so decode threads never share one) and per decode
parameters, device and batch size; a pipeline that failed a batch is dropped and built again. DALI
and PyAV are imported on first use.
"""

from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass

import numpy as np
import torch

from avgn_fast.data.audio import LOG_EPS
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
from avgn_fast.data.pyav_backend import open_container
from avgn_fast.data.pyav_streams import PacketReader, probe_video

CPU_CODECS = ("vp8", "vp9", "mjpeg")  # what DALI's CPU video decoder handles
MAX_FILE_BYTES = 2 << 30  # the reader hands DALI whole files in memory: larger ones are refused


@dataclass
class _Prepared:
    """One file's host-side inputs to the pipeline."""

    path: str
    encoded: np.ndarray  # uint8 (bytes,)
    indices: np.ndarray  # int32 (T,): frame index to decode for each sampled time
    resize_to: np.ndarray  # float32 (2,): (h, w) in the stored orientation
    turns: int  # counter-clockwise quarter turns from stored to displayed
    displayed: tuple[int, int]  # (H, W) of the displayed video
    audio: np.ndarray  # float32 (T * stride,): the concatenated windows
    audio_present: bool
    probe: VideoProbe
    times: list[float]
    notes: list[str]  # what was repaired or dropped while reading the audio


def decode_batch(paths, params: DecodeParams, *, device_id: int | None,
                 batch_size: int = 8) -> list[Clip | DecodeError]:
    """Decode every path with DALI, ``batch_size`` files per run; failures give ``DecodeError`` in place.

    Clips live on ``cuda:device_id`` (or the CPU for ``device_id=None``). A batch the pipeline rejects
    is retried one file at a time so one bad file cannot fail the others.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size=}")
    results: list[Clip | DecodeError | None] = [None] * len(paths)
    ready = []
    for i, path in enumerate(paths):
        try:
            ready.append((i, _prepare(path, params, device_id)))
        except DecodeError as e:
            results[i] = e
    for start in range(0, len(ready), batch_size):
        chunk = ready[start:start + batch_size]
        for (i, _), out in zip(chunk, _run_robust([p for _, p in chunk], params, device_id, batch_size)):
            results[i] = out
    return results


def _prepare(path, params: DecodeParams, device_id: int | None) -> _Prepared:
    check_file(path)
    size = os.path.getsize(path)
    if size > MAX_FILE_BYTES:
        raise DecodeError(path, f"{size:,} bytes is over the DALI reader's limit of {MAX_FILE_BYTES:,} bytes (it "
                                "reads whole files into memory); use the pyav backend")
    stats = DecodeStats()
    with decoding(path), open_container(str(path)) as container:
        probe = probe_video(container, path)
        stream = container.streams.best("video")
        check_pixels(path, stream.codec_context.width, stream.codec_context.height, params.max_pixels)
        if device_id is None and probe.codec not in CPU_CODECS:
            raise DecodeError(path, f"DALI's CPU decoder does not handle {probe.codec} (only "
                                    f"{', '.join(CPU_CODECS)}); use the pyav backend or a GPU")
        reader = PacketReader(container, None, stats)
        key = (probe.keyframes or probe.pts)[0]
        first = next(reader.frames(stream, key, probe.key_dts[0] if probe.key_dts else None), None)
        if first is None:  # decoded for the display rotation
            raise DecodeError(path, "no video frame could be decoded")
        times, indices = probe.sample(params.num_frames, params.keyframes_only)
        segments = read_audio(container, reader, times, params, stats)
        encoded = np.fromfile(path, dtype=np.uint8)
    turns, displayed, stored_size = frame_geometry(first.rotation, first.height, first.width, params.resize_shorter)
    return _Prepared(path=str(path), encoded=encoded, indices=np.asarray(indices, dtype=np.int32),
                     resize_to=np.asarray(stored_size, dtype=np.float32), turns=turns,
                     displayed=displayed, audio=_concatenate_windows(segments, params),
                     audio_present=segments is not None, probe=probe, times=times, notes=stats.notes)


def _stride(params: DecodeParams) -> int:
    return math.ceil(params.stft.span / params.stft.hop) * params.stft.hop


def _concatenate_windows(segments: torch.Tensor | None, params: DecodeParams) -> np.ndarray:
    stride = _stride(params)
    out = np.zeros((params.num_frames, stride), dtype=np.float32)
    if segments is not None:
        out[:, :params.stft.span] = segments.numpy()
    return out.reshape(-1)


def _run_robust(items: list[_Prepared], params: DecodeParams, device_id: int | None,
                batch_size: int) -> list[Clip | DecodeError]:
    try:
        return _run(items, params, device_id, batch_size)
    except Exception as e:  # DALI reports a bad sample by failing the whole batch (and the pipeline)
        _forget_pipeline(params, device_id, batch_size)
        if len(items) == 1:
            return [DecodeError(items[0].path, f"DALI: {type(e).__name__}: {e}")]
    return [_run_robust([item], params, device_id, batch_size)[0] for item in items]


def _run(items: list[_Prepared], params: DecodeParams, device_id: int | None, batch_size: int) -> list[Clip]:
    pipe = _pipeline(params, device_id, batch_size)
    video, mel = pipe.run(encoded=[p.encoded for p in items], indices=[p.indices for p in items],
                          resize_to=[p.resize_to for p in items], audio=[p.audio for p in items])
    stft = params.stft
    device = torch.device("cpu") if device_id is None else torch.device("cuda", device_id)
    columns = (torch.arange(params.num_frames)[:, None] * (_stride(params) // stft.hop)
               + torch.arange(stft.n_steps)).to(device)
    clips = []
    for k, item in enumerate(items):
        frames = torch.from_dlpack(video[k]).permute(0, 3, 1, 2)  # (T, 3, h, w) in the stored orientation
        if item.turns:
            frames = torch.rot90(frames, item.turns, dims=(2, 3))
        frames = center_crop(frames, params.size).contiguous()
        if item.audio_present:
            spectrum = torch.from_dlpack(mel[k])  # (n_mels, windows of the concatenated signal)
            log_mel = spectrum[:, columns].permute(1, 0, 2).contiguous()
        else:
            log_mel = params.silent_mel().to(device)
        clips.append(Clip(frames=frames, mel=log_mel, audio_present=item.audio_present,
                          duration=item.probe.duration_s, fps=item.probe.fps, source_size=item.displayed,
                          resize_shorter=params.resize_shorter,
                          frame_times=torch.tensor(item.times, dtype=torch.float64) - item.probe.start_s,
                          path=item.path, notes=list(item.notes)))
    return clips


_threads = threading.local()  # each decoding thread's pipelines: a pipeline is never shared between threads


def _pipeline(params: DecodeParams, device_id: int | None, batch_size: int):
    """This thread's pipeline for these decode parameters, device and batch size, built on first use."""
    pipes = _threads.__dict__.setdefault("pipes", {})
    key = (params, device_id, batch_size)
    if key not in pipes:
        pipes[key] = _build_pipeline(params, device_id, batch_size)
    return pipes[key]


def _forget_pipeline(params: DecodeParams, device_id: int | None, batch_size: int) -> None:
    """Drop this thread's pipeline after it failed a batch (DALI leaves a failed pipeline unusable)."""
    _threads.__dict__.get("pipes", {}).pop((params, device_id, batch_size), None)


def _build_pipeline(params: DecodeParams, device_id: int | None, batch_size: int):
    """A built pipeline for these decode parameters, fed by ``run(**inputs)``."""
    import nvidia.dali.math as dmath
    from nvidia.dali import fn, pipeline_def, types

    stft = params.stft
    window = torch.hann_window(stft.win, periodic=True).tolist()  # the window ``segments_log_mel`` uses

    @pipeline_def(batch_size=batch_size, num_threads=min(4, os.cpu_count() or 1), device_id=device_id,
                  prefetch_queue_depth=1, exec_dynamic=True)
    def pipeline():
        encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
        indices = fn.external_source(name="indices", dtype=types.INT32, ndim=1)
        resize_to = fn.external_source(name="resize_to", dtype=types.FLOAT, ndim=1)
        audio = fn.external_source(name="audio", dtype=types.FLOAT, ndim=1)
        gpu = device_id is not None
        video = fn.decoders.video(encoded, device="mixed" if gpu else "cpu", frames=indices)
        video = fn.resize(video, size=resize_to, interp_type=types.INTERP_LINEAR, antialias=True)
        spectrum = fn.spectrogram(audio.gpu() if gpu else audio, nfft=stft.n_fft, window_length=stft.win,
                                  window_step=stft.hop, window_fn=window, center_windows=False, power=2)
        mel = fn.mel_filter_bank(spectrum, sample_rate=params.sample_rate, nfilter=params.n_mels, freq_low=0.0,
                                 freq_high=params.sample_rate / 2, mel_formula="htk", normalize=False)
        return video, dmath.log(mel + LOG_EPS)

    pipe = pipeline()
    pipe.build()
    return pipe
