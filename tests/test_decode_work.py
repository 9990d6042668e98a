"""The pyav decoder does only the work a clip needs, and the shortcuts keep its output exact.

Short gaps between needed frames are read through rather than restarted from a keyframe (a restart
decodes the decoder's reorder delay again); audio frames are collected and downmixed in runs, placed
by integer timestamps, with an overlap cut once and the timeline kept.
"""

import math

import av
import numpy as np
import pytest
import torch
from media import frame_level, indexed_frames, write_tone_chunks, write_video

from avgn_fast.data import pyav_backend, pyav_streams
from avgn_fast.data.audio import LOG_EPS
from avgn_fast.data.decode import DecodeStats, decode_clip
from avgn_fast.data.pyav_audio import mono_samples
from avgn_fast.data.pyav_streams import demux_all, probe_from_index, probe_video

SILENCE = math.log(LOG_EPS)


@pytest.fixture(params=["memory", "seek"])
def read_mode(request, monkeypatch):
    """Both ways the pyav backend reads: small files demuxed once into memory, large ones by seeking."""
    if request.param == "seek":
        monkeypatch.setattr(pyav_backend, "IN_MEMORY_BYTES", 0)
    return request.param


def test_short_gaps_are_read_through_not_restarted(tmp_path, read_mode):
    # 48 frames, a keyframe every 4, T=16 needs frames 1, 4, 7, ..., 46: every keyframe after the first lies
    # within RESTART_GAP of the last decoded frame, so one pass decodes frames 0..46 and nothing twice
    path = write_video(tmp_path / "gop4.mp4", frames=indexed_frames(48, (32, 32)), fps=12, seconds=4.0, gop=4,
                       audio=None)
    stats = DecodeStats()
    clip = decode_clip(path, num_frames=16, size=32, stats=stats)
    expected = [math.floor(12 * (i + 0.5) * 0.25) for i in range(16)]
    torch.testing.assert_close(clip.frames.float().mean(dim=(1, 2, 3)),
                               torch.tensor([float(frame_level(j)) for j in expected]), atol=3.0, rtol=0)
    assert stats.video_frames_decoded == expected[-1] + 1
    assert stats.seeks <= 1  # the seek path seeks once, to the start


def test_long_gaps_still_restart_from_the_keyframe(tmp_path, read_mode):
    # 240 frames, a keyframe every 30, T=4 needs frames 30, 90, 150, 210: each lies on a keyframe far past the last
    path = write_video(tmp_path / "gop30.mp4", frames=indexed_frames(240, (32, 32)), fps=12, seconds=20.0, gop=30,
                       audio=None)
    stats = DecodeStats()
    clip = decode_clip(path, num_frames=4, size=32, stats=stats)
    expected = [math.floor(12 * (i + 0.5) * 5) for i in range(4)]
    torch.testing.assert_close(clip.frames.float().mean(dim=(1, 2, 3)),
                               torch.tensor([float(frame_level(j)) for j in expected]), atol=3.0, rtol=0)
    assert pyav_backend.RESTART_GAP < 30
    assert stats.video_frames_decoded <= 4 * (pyav_backend.RESTART_GAP + 8)  # not the 211 of one pass


def test_frames_nothing_refers_to_are_skipped_unless_sampled(tmp_path, read_mode, monkeypatch):
    # libx264's B-frames on flat grey content: 20 of the 48 frames are non-reference. T=16 needs frames
    # 1, 4, 7, ..., 46; the decoder skips every non-reference frame it is not asked for, and the needed
    # frames come out as they do when every frame is decoded
    path = write_video(tmp_path / "bframes.mp4", frames=indexed_frames(48, (48, 64)), fps=12, seconds=4.0,
                       audio=None)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.codec_context.skip_frame = "NONREF"
        referenced = {frame.pts for frame in container.decode(stream)}
    with av.open(str(path)) as container:
        every = [frame.pts for frame in container.decode(container.streams.video[0])]
    expected = [math.floor(12 * (i + 0.5) * 0.25) for i in range(16)]
    kept = {every[j] for j in expected}
    assert len(every) == 48 and 10 <= len(set(every) - referenced) < 48  # the file has skippable frames

    stats = DecodeStats()
    clip = decode_clip(path, num_frames=16, size=32, stats=stats)
    torch.testing.assert_close(clip.frames.float().mean(dim=(1, 2, 3)),
                               torch.tensor([float(frame_level(j)) for j in expected]), atol=3.0, rtol=0)
    assert stats.video_frames_decoded == sum(p in referenced or p in kept for p in every[:expected[-1] + 1])

    real = pyav_streams.PacketReader.frames
    monkeypatch.setattr(pyav_streams.PacketReader, "frames", lambda self, *a, keep=None: real(self, *a))
    every_stats = DecodeStats()
    assert torch.equal(decode_clip(path, num_frames=16, size=32, stats=every_stats).frames, clip.frames)
    assert every_stats.video_frames_decoded == expected[-1] + 1


def test_overlapping_audio_is_cut_once_and_later_audio_keeps_its_time(tmp_path):
    """A 0.1-s chunk that starts 50 ms before the previous one ends: the overlap is cut and the audio after it
    stays where its timestamps put it, with no hole (a tone from 0 to 2 s, so every window is loud)."""
    rate, chunk = 16000, 1600
    starts = [0, 1600, 2400, *range(4000, 2 * rate, chunk)]  # [2400, 4000) overlaps [1600, 3200) by 800 samples
    path = write_tone_chunks(tmp_path / "overlap.mkv", 2.0, starts, rate=rate, chunk=chunk)
    # windows of 0.2 s at 0.25, 0.75, 1.25, 1.75 s: the first holds the overlap's end (0.25 s), where a wrong
    # running position would have put 50 ms of silence and pushed everything after it 50 ms late
    clip = decode_clip(path, num_frames=4, size=32, audio_window_s=0.2)
    loudest_bin = clip.mel.amax(dim=1)  # (T, steps): every 10-ms step of every window holds the tone
    assert clip.audio_present and any("overlaps" in note for note in clip.notes), clip.notes
    assert (loudest_bin > SILENCE + 8).all(), loudest_bin.min(dim=1)


def frames_of(fmt: str, layout: str, lengths: list[int], seed: int) -> tuple[list, list[np.ndarray]]:
    """Audio frames of random samples in one sample format and layout, and each frame's samples as
    float64 (channels, n) at full scale ±1 (offset binary for u8), built from the arrays given to PyAV."""
    rng = np.random.default_rng(seed)
    channels = av.AudioLayout(layout).nb_channels
    dtype = {"s16": np.int16, "s16p": np.int16, "u8": np.uint8, "fltp": np.float32, "flt": np.float32,
             "dbl": np.float64, "s32p": np.int32}[fmt]
    planar = fmt.endswith("p")
    frames, truth = [], []
    for n in lengths:
        if np.issubdtype(dtype, np.floating):
            data = rng.uniform(-1, 1, (channels, n)).astype(dtype)
            value = data.astype(np.float64)
        else:
            info = np.iinfo(dtype)
            data = rng.integers(info.min, info.max, (channels, n), endpoint=True).astype(dtype)
            offset = 128 if dtype == np.uint8 else 0
            value = (data.astype(np.float64) - offset) / (2.0 ** (8 * data.itemsize - 1))
        array = data if planar else data.T.reshape(1, -1)  # packed: channels interleaved in one plane
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(array), format=fmt, layout=layout)
        frame.sample_rate = 16000
        frames.append(frame)
        truth.append(value)
    return frames, truth


@pytest.mark.parametrize("fmt,layout", [("fltp", "stereo"), ("s16", "stereo"), ("s16p", "5.1"), ("u8", "mono"),
                                        ("dbl", "mono"), ("s32p", "stereo"), ("flt", "quad")])
def test_mono_samples_of_a_run_is_the_channel_mean_end_to_end(fmt, layout):
    frames, truth = frames_of(fmt, layout, [960, 1, 333, 1024], seed=len(fmt) + len(layout))
    expected = np.concatenate(truth, axis=1).mean(0)
    got = mono_samples(frames)
    assert got.dtype == np.float32 and got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(mono_samples(frames[2:3]), truth[2].mean(0), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name,indexed", [("cfr.mp4", True), ("cfr.mov", True), ("mjpeg.avi", True),
                                          ("vfr.mp4", False), ("cfr.mkv", False), ("cfr.webm", False)])
def test_large_files_probe_from_the_index_where_it_is_exact(tmp_path, monkeypatch, name, indexed):
    """A file read by seeking skips the demux pass when the container's index gives every frame's time
    (mp4, mov, AVI at a constant rate); the probe, and so the clip, are those of the demux pass."""
    codec = {"avi": "mjpeg", "webm": "vp9", "mkv": "h264"}.get(name.rsplit(".", 1)[1], "h264")
    pts_s = [0.1 * i + (0.05 if i % 3 == 0 else 0) for i in range(30)] if name == "vfr.mp4" else None
    audio = {"avi": "pcm_s16le", "webm": "opus", "mkv": "flac"}.get(name.rsplit(".", 1)[1], "aac")
    path = write_video(tmp_path / name, codec=codec, frames=indexed_frames(30, (32, 32)), seconds=3.0, gop=7,
                       audio=audio, pts_s=pts_s)
    with av.open(str(path)) as c:
        from_index = probe_from_index(c, c.streams.best("video"))
    with av.open(str(path)) as c:
        demuxed = probe_video(c, path)  # no packets given: the index where it is exact, else a demux pass
    with av.open(str(path)) as c:
        stream = c.streams.best("video")
        reference = probe_video(c, path, demux_all(c, [stream])[stream.index])
    assert (from_index is not None) == indexed
    assert demuxed == reference and (from_index is None or from_index == reference)
    in_memory = decode_clip(path, num_frames=8, size=32)
    monkeypatch.setattr(pyav_backend, "IN_MEMORY_BYTES", 0)
    seeking = decode_clip(path, num_frames=8, size=32)
    assert torch.equal(seeking.frames, in_memory.frames) and torch.equal(seeking.frame_times, in_memory.frame_times)
    torch.testing.assert_close(seeking.mel, in_memory.mel, rtol=0, atol=1e-4)
