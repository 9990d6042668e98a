"""Decode paths on real encoded files: frame choice, seeking, rotation, audio, bad inputs, PyAV vs DALI."""

import importlib.util
import math

import av
import numpy as np
import pytest
import torch
from media import (
    frame_level,
    indexed_frames,
    reference_frames,
    write_audio_only,
    write_garbage,
    write_tone_chunks,
    write_truncated,
    write_video,
)

from avgn_fast.config import AVGNConfig
from avgn_fast.data import pyav_backend
from avgn_fast.data.audio import LOG_EPS
from avgn_fast.data.clip import Clip
from avgn_fast.data.common import DecodeParams
from avgn_fast.data.decode import (
    DecodeError,
    DecodeStats,
    available_backends,
    decode_clip,
    decode_clip_for,
    decode_many,
    resolve_backend,
)

HAS_DALI = importlib.util.find_spec("nvidia.dali") is not None
SILENCE = math.log(LOG_EPS)
# The decoder scales and converts YUV in one swscale pass; the reference converts at full resolution and
# scales RGB with antialiased F.interpolate. Measured on these files: mean |diff| 0.2-1.6 levels, 99th
# percentile <= 9 (chroma placement at sharp colour edges, single pixels up to ~40).
FRAME_MEAN_TOL, FRAME_P99_TOL = 2.0, 12.0


def assert_frames_close(frames, reference):
    assert frames.shape == reference.shape and frames.dtype == reference.dtype == torch.uint8
    diff = (frames.float() - reference.float()).abs()
    assert diff.mean() <= FRAME_MEAN_TOL and diff.flatten().quantile(0.99) <= FRAME_P99_TOL, (
        diff.mean(), diff.flatten().quantile(0.99))


@pytest.fixture(params=["memory", "seek"])
def read_mode(request, monkeypatch):
    """Both ways the pyav backend reads: small files demuxed once into memory, large ones by seeking."""
    if request.param == "seek":
        monkeypatch.setattr(pyav_backend, "IN_MEMORY_BYTES", 0)
    return request.param


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    files = {
        "mp4": write_video(d / "h264_aac.mp4", codec="h264", audio="aac"),
        "webm": write_video(d / "vp9_opus.webm", codec="vp9", audio="opus", sample_rate=48000, channels=2),
        "avi": write_video(d / "mjpeg.avi", codec="mjpeg", audio=None),
        "indexed": write_video(d / "indexed.mp4", frames=indexed_frames(20, (48, 64)), audio=None),
        "short": write_video(d / "short.webm", codec="vp9", frames=indexed_frames(3, (48, 64)), audio="opus",
                             sample_rate=16000, seconds=0.3),
        "odd": write_video(d / "odd.webm", codec="vp9", size=(33, 47), audio="opus", sample_rate=24000),
        "rot_webm": write_video(d / "rotated.webm", codec="vp9", size=(48, 72), rotate=90, audio="opus",
                                sample_rate=48000),
        "mjpeg_mono": write_video(d / "mjpeg_pcm.avi", codec="mjpeg", size=(40, 56), audio=None, seconds=1.0),
    }
    files["truncated"] = write_truncated(files["mp4"], d / "truncated.mp4", keep=0.5)
    files["garbage"] = write_garbage(d / "garbage.mp4")
    files["empty"] = d / "empty.mp4"
    files["empty"].write_bytes(b"")
    files["audio_only"] = write_audio_only(d / "audio_only.m4a")
    return files


@pytest.mark.parametrize("name, audio", [("mp4", True), ("webm", True), ("avi", False)])
def test_formats_decode_to_a_clip(media, name, audio, read_mode):
    clip = decode_clip(media[name], num_frames=6, size=32, resize_shorter=40)
    assert isinstance(clip, Clip) and clip.frames.shape == (6, 3, 32, 32) and clip.mel.shape == (6, 64, 100)
    assert clip.audio_present is audio and clip.source_size == (48, 64) and clip.resize_shorter == 40
    assert clip.duration == pytest.approx(2.0) and clip.fps == pytest.approx(10.0)
    torch.testing.assert_close(clip.frame_times, (torch.arange(6, dtype=torch.float64) + 0.5) / 3)
    times = clip.frame_times.tolist()
    assert_frames_close(clip.frames, reference_frames(media[name], times, 32, 40))
    assert bool((clip.mel > SILENCE + 1).any()) is audio


def test_sampled_frames_are_segment_midpoints(media, read_mode):
    # 20 frames at 10 fps, T=8: t_i = (i + 1/2) * 0.25 s shows frame floor(10 t_i)
    clip = decode_clip(media["indexed"], num_frames=8, size=32)
    expected = [math.floor(10 * (i + 0.5) * 0.25) for i in range(8)]
    levels = clip.frames.float().mean(dim=(1, 2, 3))
    torch.testing.assert_close(levels, torch.tensor([float(frame_level(j)) for j in expected]), atol=3.0, rtol=0)


def test_long_file_is_not_decoded_whole(tmp_path, read_mode):
    n, gop = 600, 10  # 60 s at 10 fps
    path = write_video(tmp_path / "long.mp4", frames=indexed_frames(n, (32, 32)), gop=gop, audio="aac",
                       seconds=60.0, sample_rate=8000)
    stats = DecodeStats()
    clip = decode_clip(path, num_frames=4, size=32, sample_rate=8000, n_mels=32, stats=stats)
    expected = [math.floor(10 * (i + 0.5) * 15) for i in range(4)]
    torch.testing.assert_close(clip.frames.float().mean(dim=(1, 2, 3)),
                               torch.tensor([float(frame_level(j)) for j in expected]), atol=3.0, rtol=0)
    assert stats.video_frames_decoded <= 4 * (gop + 4)
    total_audio_frames = 60 * 8000 / 1024
    assert 0 < stats.audio_frames_decoded < total_audio_frames / 4
    assert clip.audio_present and bool((clip.mel > SILENCE + 1).all(dim=(1, 2)).any())


def test_variable_frame_rate(tmp_path, read_mode):
    pts = [0.0, 0.05, 0.1, 0.4, 0.45, 1.0, 1.6, 1.65]
    path = write_video(tmp_path / "vfr.mp4", frames=indexed_frames(8, (48, 64)), pts_s=pts, fps=10, audio=None)
    clip = decode_clip(path, num_frames=6, size=32)
    end = pts[-1] + 0.1  # the muxer gives the last frame 1 / fps
    times = [(i + 0.5) * end / 6 for i in range(6)]
    expected = [max(j for j, p in enumerate(pts) if p <= t) for t in times]
    assert clip.duration == pytest.approx(end, abs=1e-3)
    torch.testing.assert_close(clip.frames.float().mean(dim=(1, 2, 3)),
                               torch.tensor([float(frame_level(j)) for j in expected]), atol=3.0, rtol=0)


@pytest.mark.parametrize("rotate", [90, 180, -90])
def test_rotation_metadata_is_applied(tmp_path, rotate, read_mode):
    frames = np.zeros((4, 48, 72, 3), dtype=np.uint8)
    frames[:, :24, :36] = 230  # a bright top-left quadrant
    plain = decode_clip(write_video(tmp_path / "plain.mp4", frames=frames, audio=None), num_frames=2, size=32)
    turned = decode_clip(write_video(tmp_path / "turned.mp4", frames=frames, audio=None, rotate=rotate),
                         num_frames=2, size=32)
    k = round(rotate / 90) % 4
    assert turned.source_size == ((72, 48) if k % 2 else (48, 72))
    diff = turned.frames.int() - torch.rot90(plain.frames, k, dims=(2, 3)).int()
    assert diff.abs().max() <= 1


@pytest.mark.parametrize("rotate, pix_fmt, size", [(None, None, (38, 54)), (90, None, (38, 54)),
                                                   (-90, "yuv444p", (37, 51)), (180, "yuvj420p", (54, 38))])
def test_planar_conversion_equals_packed_rgb_turned_and_cropped(tmp_path, rotate, pix_fmt, size):
    """The converter reads swscale's planar RGB (G, B, R planes): its frames are the packed rgb24 conversion with
    the same flags, turned by the display rotation and centre-cropped, bit for bit (odd sizes, 4:4:4, full range)."""
    from av.video.reformatter import VideoReformatter

    path = write_video(tmp_path / "odd.mp4", size=size, audio=None, rotate=rotate, pix_fmt=pix_fmt, seconds=0.5)
    params = DecodeParams(num_frames=4, size=24, resize_shorter=29)
    convert = pyav_backend.FrameConverter(params)
    packed = VideoReformatter()
    with av.open(str(path)) as c:
        frames = list(c.decode(video=0))
    assert frames[0].format.name == (pix_fmt or "yuv420p")
    for frame in frames:
        turns = round((frame.rotation or 0) / 90) % 4
        got = convert(frame)
        short = 29 * max(frame.width, frame.height) / min(frame.width, frame.height)
        h, w = (29, round(short)) if frame.height <= frame.width else (round(short), 29)
        rgb = packed.reformat(frame, width=w, height=h, format="rgb24", interpolation=convert.interpolation,
                              threads=1).to_ndarray()
        want = torch.from_numpy(np.rot90(rgb, turns, axes=(0, 1)).copy()).permute(2, 0, 1)
        top, left = (want.shape[1] - 24) // 2, (want.shape[2] - 24) // 2
        assert torch.equal(got.frames, want[:, top:top + 24, left:left + 24])
        assert got.source_size == ((frame.width, frame.height) if turns % 2 else (frame.height, frame.width))


def test_fewer_frames_than_t_repeat_nearest(media, read_mode):
    clip = decode_clip(media["short"], num_frames=8, size=32)
    times = [(i + 0.5) * 0.3 / 8 for i in range(8)]
    expected = [math.floor(10 * t) for t in times]
    torch.testing.assert_close(clip.frames.float().mean(dim=(1, 2, 3)),
                               torch.tensor([float(frame_level(j)) for j in expected]), atol=3.0, rtol=0)
    assert clip.audio_present


@pytest.mark.parametrize("size, seconds", [((33, 47), 1.0), ((1080, 1920), 0.2)])
def test_odd_and_large_resolutions(tmp_path, size, seconds):
    path = write_video(tmp_path / "res.mp4" if size[0] % 2 == 0 else tmp_path / "res.webm",
                       codec="h264" if size[0] % 2 == 0 else "vp9", size=size, seconds=seconds, audio=None)
    clip = decode_clip(path, num_frames=2, size=32, resize_shorter=36)
    assert clip.source_size == size and clip.frames.shape == (2, 3, 32, 32)
    assert_frames_close(clip.frames, reference_frames(path, clip.frame_times.tolist(), 32, 36))


def burst_wave(sample_rate, channels, seconds=2.0, start=1.0, stop=1.3):
    wave = np.zeros((channels, round(seconds * sample_rate)), dtype=np.float32)
    span = slice(round(start * sample_rate), round(stop * sample_rate))
    wave[:, span] = np.random.default_rng(0).uniform(-0.5, 0.5, (channels, span.stop - span.start))
    return wave


@pytest.mark.parametrize("codec, sample_rate, channels", [
    ("aac", 8000, 1), ("aac", 22050, 2), ("aac", 44100, 6), ("aac", 48000, 1), ("opus", 48000, 2),
    ("opus", 12000, 1),
])
def test_audio_windows_are_aligned_for_any_rate_and_layout(tmp_path, codec, sample_rate, channels, read_mode):
    suffix = ".webm" if codec == "opus" else ".mp4"
    path = write_video(tmp_path / f"burst{suffix}", codec="vp9" if codec == "opus" else "h264", audio=codec,
                       sample_rate=sample_rate, channels=channels, wave=burst_wave(sample_rate, channels))
    # T=2 over 2 s: windows [0, 1) s (silent but for its end: AAC pre-echo reaches ~50 ms back) and
    # [1, 2) s (noise in its first 0.3 s)
    clip = decode_clip(path, num_frames=2, size=32, sample_rate=16000)
    energy = clip.mel.mean(dim=1)  # (2, 100): mean log-mel per 10 ms step
    assert clip.audio_present
    assert (energy[1, 1:29] > SILENCE + 8).all() and (energy[1, 33:] < SILENCE + 2).all()
    assert (energy[0, :90] < SILENCE + 2).all() and energy[0, -1] > SILENCE + 8


@pytest.mark.parametrize("codec, sample_rate", [("aac", 44100), ("aac", 16000), ("opus", 48000)])
def test_sound_at_the_very_start_is_kept(tmp_path, codec, sample_rate, read_mode):
    """AAC in mp4 starts with a priming packet at a negative pts: a seek clamped to 0 skipped it and the first
    decoded frame (~20-60 ms) came out near silent."""
    suffix = ".webm" if codec == "opus" else ".mp4"
    path = write_video(tmp_path / f"start{suffix}", codec="vp9" if codec == "opus" else "h264", audio=codec,
                       sample_rate=sample_rate, channels=1, wave=burst_wave(sample_rate, 1, start=0.0, stop=0.04))
    clip = decode_clip(path, num_frames=2, size=32, sample_rate=16000)
    energy = clip.mel.mean(dim=1)  # (2, 100): the first window covers [0, 1) s
    assert (energy[0, :4] > SILENCE + 8).all(), energy[0, :6]
    assert (energy[0, 12:] < SILENCE + 2).all()


def test_no_audio_stream_gives_silence(media):
    clip = decode_clip(media["avi"], num_frames=4, size=32, n_mels=16)
    assert not clip.audio_present and torch.equal(clip.mel, torch.full((4, 16, 100), SILENCE))


@pytest.mark.parametrize("name, problem", [
    ("truncated", "Invalid data"), ("garbage", "Invalid data"), ("empty", "empty file"),
    ("audio_only", "no video stream"), ("missing", "file not found"),
])
def test_bad_files_raise_decode_error_naming_the_file(media, tmp_path, name, problem):
    path = media.get(name, tmp_path / "missing.mp4")
    with pytest.raises(DecodeError, match=problem) as info:
        decode_clip(path, num_frames=4, size=32)
    assert str(path) in str(info.value) and isinstance(info.value, ValueError)


def test_corrupt_middle_gives_a_result_or_an_error(media, tmp_path, read_mode):
    for name in ("mp4", "webm"):
        data = bytearray(media[name].read_bytes())
        mid = len(data) // 3
        data[mid:mid + 2000] = np.random.default_rng(1).integers(0, 256, 2000, dtype=np.uint8).tobytes()
        path = tmp_path / f"corrupt_{media[name].name}"
        path.write_bytes(bytes(data))
        try:
            clip = decode_clip(path, num_frames=4, size=32)
        except DecodeError as e:
            assert str(path) in str(e)
        else:
            assert clip.frames.shape == (4, 3, 32, 32)


def test_decode_many_keeps_order_and_reports_errors(media, tmp_path):
    config = AVGNConfig.from_name("tiny")
    paths = [media["webm"], tmp_path / "missing.webm", media["garbage"], media["mp4"]]
    out = decode_many(paths, config, backend="pyav")
    assert [type(r) for r in out] == [Clip, DecodeError, DecodeError, Clip]
    assert [r.path for r in out] == [str(p) for p in paths]
    clip = decode_clip_for(media["webm"], config, backend="pyav")
    steps = round(config.audio_window_s * 1000 / config.hop_ms)
    assert clip.frames.shape == (config.num_frames, 3, config.frame_size, config.frame_size)
    assert clip.mel.shape == (config.num_frames, config.n_mels, steps)
    assert torch.equal(clip.frames, out[0].frames) and torch.equal(clip.mel, out[0].mel)
    with pytest.raises(DecodeError, match="not found"):
        decode_clip_for(paths[1], config, backend="pyav")


def test_backend_resolution():
    assert "pyav" in available_backends()
    assert resolve_backend("pyav") == "pyav"
    assert resolve_backend("auto", "cpu") == "pyav"
    with pytest.raises(ValueError, match="unknown decode backend"):
        resolve_backend("ffmpeg")
    with pytest.raises(ValueError, match="resize_shorter"):
        decode_clip("x.mp4", num_frames=4, size=32, resize_shorter=16)


@pytest.mark.skipif(not HAS_DALI, reason="DALI not installed")
def test_dali_cpu_agrees_with_pyav(media):
    """Documented bound: frames mean |diff| <= 2.5 uint8 levels, log-mel max |diff| <= 1e-3."""
    config = AVGNConfig.from_name("tiny").replace(num_frames=5, frame_size=32, resize_shorter=40, patch_size=16,
                                                  sample_rate=16000)
    names = ["webm", "odd", "rot_webm", "short", "mjpeg_mono", "mp4", "garbage"]
    dali = decode_many([media[n] for n in names], config, backend="dali", device="cpu", batch_size=2)
    pyav = decode_many([media[n] for n in names], config, backend="pyav")
    for name, d, p in zip(names[:5], dali, pyav):
        assert isinstance(d, Clip) and d.frames.device.type == "cpu", name
        assert d.frames.shape == p.frames.shape and d.mel.shape == p.mel.shape, name
        assert (d.frames.float() - p.frames.float()).abs().mean() <= 2.5, name
        assert (d.mel - p.mel).abs().max() <= 1e-3, name
        assert d.audio_present == p.audio_present and d.source_size == p.source_size, name
        assert torch.equal(d.frame_times, p.frame_times), name
    assert isinstance(dali[5], DecodeError) and "h264" in str(dali[5])  # CPU DALI decodes VP8/VP9/MJPEG only
    assert isinstance(dali[6], DecodeError) and str(media["garbage"]) in str(dali[6])


def test_keyframes_only_shows_the_nearest_keyframes(tmp_path, read_mode):
    n = 60  # 6 s at 10 fps
    path = write_video(tmp_path / "gop.mp4", frames=indexed_frames(n, (32, 32)), gop=10, audio=None, seconds=6.0)
    with av.open(str(path)) as c:
        keys = sorted(round(float(p.pts * p.time_base) * 10) for p in c.demux(video=0) if p.is_keyframe)
    assert 4 <= len(keys) < n // 4  # a few keyframes, far apart
    stats = DecodeStats()
    clip = decode_clip(path, num_frames=5, size=32, keyframes_only=True, stats=stats)
    times = [(i + 0.5) * 6.0 / 5 for i in range(5)]
    expected = [min(keys, key=lambda k: (abs(k / 10 - t), k)) for t in times]
    torch.testing.assert_close(clip.frames.float().mean(dim=(1, 2, 3)),
                               torch.tensor([float(frame_level(j)) for j in expected]), atol=3.0, rtol=0)
    assert stats.video_frames_decoded <= len(keys)  # the decoder skipped every frame between keyframes
    torch.testing.assert_close(clip.frame_times, torch.tensor(times, dtype=torch.float64))


def test_codec_threads_give_the_same_clip(media, read_mode):
    one = decode_clip(media["mp4"], num_frames=6, size=32, resize_shorter=40)
    four = decode_clip(media["mp4"], num_frames=6, size=32, resize_shorter=40, codec_threads=4)
    assert torch.equal(one.frames, four.frames) and torch.equal(one.mel, four.mel)


def test_frame_size_over_the_pixel_limit_is_refused_before_decoding(media):
    stats = DecodeStats()
    with pytest.raises(DecodeError, match=r"64x48 = 3,072 pixels exceeds the limit of 3,000 pixels") as info:
        decode_clip(media["mp4"], num_frames=4, size=32, max_pixels=3000, stats=stats)
    assert str(media["mp4"]) in str(info.value) and stats.video_frames_decoded == 0
    assert decode_clip(media["mp4"], num_frames=4, size=32, max_pixels=48 * 64).frames.shape == (4, 3, 32, 32)


@pytest.mark.skipif(not HAS_DALI, reason="DALI not installed")
def test_dali_isolates_files_it_cannot_read(media, monkeypatch):
    """The DALI reader hands whole files to the pipeline: a file over its size bound, one over the pixel limit
    and a missing one fail alone; the others in the batch decode."""
    from avgn_fast.data import dali_backend

    config = AVGNConfig.from_name("tiny").replace(num_frames=3, k=2, frame_size=32, resize_shorter=40, patch_size=16)
    big, small = media["webm"], media["odd"]
    assert big.stat().st_size > small.stat().st_size
    monkeypatch.setattr(dali_backend, "MAX_FILE_BYTES", small.stat().st_size)
    out = decode_many([big, small, big.with_name("gone.webm")], config, backend="dali", device="cpu", batch_size=4)
    assert isinstance(out[0], DecodeError) and str(big) in str(out[0]) and "over the DALI reader's limit" in str(out[0])
    assert isinstance(out[1], Clip) and out[1].frames.shape == (3, 3, 32, 32)
    assert isinstance(out[2], DecodeError) and "file not found" in str(out[2])
    monkeypatch.undo()
    out = decode_many([media["mjpeg_mono"], small], config, backend="dali", device="cpu", max_pixels=40 * 56 - 1)
    assert isinstance(out[0], DecodeError) and "56x40 = 2,240 pixels exceeds the limit" in str(out[0])
    assert isinstance(out[1], Clip)


def test_a_reused_stats_object_gives_each_clip_its_own_notes(tmp_path):
    wave = np.full((1, 16000), np.nan, dtype=np.float32)
    wave[:, ::2] = 0.25
    noisy = write_video(tmp_path / "nan.mkv", codec="ffv1", audio="pcm_f32le", wave=wave, seconds=1.0)
    clean = write_video(tmp_path / "clean.mp4", seconds=1.0)
    stats = DecodeStats()
    first = decode_clip(noisy, num_frames=2, size=32, stats=stats)
    second = decode_clip(clean, num_frames=2, size=32, stats=stats)
    assert any("non-finite" in note for note in first.notes) and second.notes == []
    assert stats.notes == first.notes


def test_a_path_of_the_wrong_type_is_that_files_error(media):
    out = decode_many([None, media["mp4"]], AVGNConfig.from_name("tiny"), backend="pyav")
    assert isinstance(out[0], DecodeError) and out[0].path == "None" and isinstance(out[1], Clip)


def test_clean_lossy_audio_carries_no_notes(media):
    for name in ("mp4", "webm", "short", "odd"):
        assert decode_clip(media[name], num_frames=4, size=32).notes == [], name


def test_audio_after_a_timestamp_gap_is_placed_by_time(tmp_path, read_mode):
    """1 s of tone, no packets for 0.5 s, 0.5 s of tone: the gap must stay silent, not pull the later tone early."""
    rate, chunk = 16000, 1600
    starts = [*range(0, rate, chunk), *range(3 * rate // 2, 2 * rate, chunk)]
    path = write_tone_chunks(tmp_path / "gap.mkv", 2.0, starts)
    clip = decode_clip(path, num_frames=4, size=32, audio_window_s=0.2)  # windows at 0.25, 0.75, 1.25, 1.75 s
    energy = clip.mel.amax(dim=(1, 2))  # the tone's loudest mel bin per window
    assert clip.audio_present and any("gaps" in note for note in clip.notes), clip.notes
    assert energy[2] < SILENCE + 2 and (energy[[0, 1, 3]] > SILENCE + 8).all(), energy
