"""Real-world and hostile media through the public decode API: each case decodes to its stated outcome.

The corpus is written by PyAV at test time (``tests/media.py``): the containers and codecs users
bring (mp4, webm, camera AVI with 8 kHz PCM, MKV with FFV1/FLAC, broadcast MPEG-TS with MP2, MOV),
odd sizes and pixel formats, and hostile files (64-channel audio, non-finite float samples, an audio
stream of garbage, a 4096 x 4096 clip, a 16000 x 16000 frame). Frames are compared with an
independent decode (``reference_frames``: full-resolution RGB, antialiased ``F.interpolate``);
audio written losslessly is compared with the log-mel of the written wave.
"""

import json
import math
import resource
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from media import default_wave, ramp_frames, reference_frames, write_huge_frame, write_video

from avgn_fast.config import AVGNConfig
from avgn_fast.data import pyav_backend
from avgn_fast.data.audio import LOG_EPS, log_mel_windows
from avgn_fast.data.clip import Clip
from avgn_fast.data.common import DecodeParams
from avgn_fast.data.decode import decode_clip, decode_many
from avgn_fast.data.pyav_backend import decode_file, decode_fileobj, open_container

SILENCE = math.log(LOG_EPS)
# 48 x 64 sources at 10 fps for 2 s: shorter side 40, centre 32 x 32; 8 samples at 0.125 + 0.25 i s, never on a
# frame time, so the shown frame is unambiguous
T, SIZE, SHORTER = 8, 32, 40
# uint8 levels between a decode and the reference, per frame: scalers differ (swscale's bilinear vs antialiased
# F.interpolate, chroma placement), single pixels at sharp colour edges by tens of levels; a neighbouring frame is
# typically 5-10 levels off on average
FRAME_MEAN_TOL, FRAME_P99_TOL, FRAME_MAX_TOL = 3.0, 16, 80
MEL_ATOL = 0.05  # log-mel of losslessly stored audio vs the written wave: float32 rounding only
MEMORY_GROWTH_MB = 300  # peak RSS of a 4096 x 4096 decode over a 64 x 64 one of the same length
HUGE_SIDE = 16000  # 256 Mpixels: over the default pixel limit, and 768 MB as RGB
DATA_CAP = 3 << 30  # data-segment cap for the huge-frame process: an RGB decode (768 MB + 3 GB float) cannot fit

MATRIX = {  # case -> (file name, write_video keywords); every one has audio
    "mp4-h264-aac": ("h264_aac.mp4", {}),
    "webm-vp9-opus": ("vp9_opus.webm", dict(codec="vp9", audio="opus", sample_rate=48000, channels=2)),
    "avi-mjpeg-pcm8k": ("mjpeg_pcm.avi", dict(codec="mjpeg", audio="pcm_s16le", sample_rate=8000)),
    "mkv-ffv1-flac": ("ffv1_flac.mkv", dict(codec="ffv1", audio="flac")),
    "ts-h264-mp2": ("h264_mp2.ts", dict(audio="mp2", sample_rate=48000, channels=2)),
    "mov-h264-aac": ("h264_aac.mov", dict(audio="aac", sample_rate=44100, channels=2)),
    "mov-mpeg4-pcm": ("mpeg4_pcm.mov", dict(codec="mpeg4", audio="pcm_s16le")),
}
PIXELS = {  # case -> (file name, write_video keywords, displayed size)
    "odd-ffv1": ("odd.mkv", dict(codec="ffv1", size=(33, 47)), (33, 47)),
    "odd-mjpeg": ("odd.avi", dict(codec="mjpeg", size=(33, 47)), (33, 47)),
    "yuv444p-h264": ("yuv444.mp4", dict(pix_fmt="yuv444p"), (48, 64)),
    "10bit-h264": ("10bit.mp4", dict(pix_fmt="yuv420p10le"), (48, 64)),
    "10bit-ffv1-odd": ("10bit.mkv", dict(codec="ffv1", pix_fmt="yuv420p10le", size=(33, 47)), (33, 47)),
    "rotated-mov": ("rotated.mov", dict(size=(48, 72), rotate=90), (72, 48)),
}
LOSSLESS = {  # case -> 16 kHz audio stored exactly (after s16 rounding)
    "mkv-ffv1-flac": 1, "mov-mpeg4-pcm": 1, "mkv-pcm-64ch": 64,
}
BROKEN_AUDIO = {  # case -> (file name, write_video keywords): codecs whose decoders check every frame header
    "mkv-flac-garbage": ("flac_garbage.mkv", dict(codec="ffv1", audio="flac")),
    "ts-mp2-garbage": ("mp2_garbage.ts", dict(audio="mp2", sample_rate=48000, channels=2)),
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("matrix")
    files = {name: write_video(d / file, **kw) for name, (file, kw) in MATRIX.items()}
    files.update({name: write_video(d / file, audio=None, **kw) for name, (file, kw, _) in PIXELS.items()})
    files["mkv-pcm-64ch"] = write_video(d / "pcm_64ch.mkv", audio="pcm_s16le", channels=64)
    files.update({name: write_video(d / file, garble_audio=True, **kw) for name, (file, kw) in BROKEN_AUDIO.items()})
    return files


@pytest.fixture(scope="module")
def large(tmp_path_factory):
    """A 4096 x 4096 MJPEG clip and a 64 x 64 one of the same length (3 frames at 10 fps), no audio."""
    d = tmp_path_factory.mktemp("large")
    return {side: write_video(d / f"mjpeg_{side}.avi", codec="mjpeg", frames=ramp_frames(3, (side, side)), audio=None)
            for side in (4096, 64)}


@pytest.fixture(scope="module")
def huge(tmp_path_factory):
    return write_huge_frame(tmp_path_factory.mktemp("huge") / "png_16000.mov", side=HUGE_SIDE)


def decode(path) -> Clip:
    return decode_clip(path, num_frames=T, size=SIZE, resize_shorter=SHORTER)


def assert_frames_match_reference(clip: Clip, path):
    ref = reference_frames(path, clip.frame_times.tolist(), SIZE, SHORTER)
    diff = (clip.frames.int() - ref.int()).abs().float()
    per_frame = diff.mean(dim=(1, 2, 3))
    assert per_frame.max() <= FRAME_MEAN_TOL, per_frame
    assert diff.flatten().quantile(0.99) <= FRAME_P99_TOL and diff.max() <= FRAME_MAX_TOL, (diff.quantile(0.99),
                                                                                           diff.max())


def s16_mono(wave: np.ndarray) -> torch.Tensor:
    """What a pcm_s16le / FLAC file stores of float ``wave`` (channels, n), averaged over channels."""
    stored = np.clip(np.round(wave.astype(np.float64) * 32768), -32768, 32767) / 32768
    return torch.from_numpy(stored.mean(0)).float()


@pytest.mark.parametrize("name", list(MATRIX))
def test_every_container_decodes_to_a_clip_with_audio(corpus, name):
    clip = decode(corpus[name])
    assert isinstance(clip, Clip) and clip.frames.shape == (T, 3, SIZE, SIZE) and clip.mel.shape == (T, 64, 100)
    assert clip.audio_present and clip.source_size == (48, 64)
    assert clip.duration == pytest.approx(2.0, abs=0.05)
    torch.testing.assert_close(clip.frame_times, (torch.arange(T, dtype=torch.float64) + 0.5) * clip.duration / T)
    assert_frames_match_reference(clip, corpus[name])
    assert torch.isfinite(clip.mel).all()
    assert (clip.mel.amax(dim=(1, 2)) > SILENCE + 8).all()  # every window hears the two tones


@pytest.mark.parametrize("name", list(PIXELS))
def test_sizes_pixel_formats_and_rotation_match_the_reference(corpus, name):
    clip = decode(corpus[name])
    assert clip.source_size == PIXELS[name][2] and not clip.audio_present
    assert_frames_match_reference(clip, corpus[name])


# cases whose container headers describe the streams, so FFmpeg may probe them without opening a decoder
HEADER_ONLY = {"mp4-h264-aac", "webm-vp9-opus", "mkv-ffv1-flac", "mov-h264-aac", "odd-ffv1", "yuv444p-h264",
               "10bit-h264", "10bit-ffv1-odd", "rotated-mov", "mkv-pcm-64ch", "mkv-flac-garbage"}


@pytest.mark.parametrize("name", [*MATRIX, *PIXELS, "mkv-pcm-64ch", *BROKEN_AUDIO])
def test_a_header_only_open_decodes_what_a_probing_open_does(corpus, name, monkeypatch):
    """``open_container`` forbids the probe its decoders for mp4/mov and Matroska/WebM headers, and opens every
    other container as FFmpeg usually does. Either way the clip (pixels, sound, times, notes) is the one decoded
    after FFmpeg's usual probing open, from a path and from a file object (read again from its start when the
    first open does not suffice)."""
    import av

    path = corpus[name]
    params = DecodeParams(num_frames=T, size=SIZE, resize_shorter=SHORTER)
    with open_container(str(path)) as container:
        assert (container.options == {"codec_whitelist": "none"}) == (name in HEADER_ONLY), container.options
    with open(path, "rb") as f:
        clips = [decode_file(path, params), decode_fileobj(str(path), f, params)]
    # the reference: the same decode after FFmpeg's own probing open, decoders and all
    monkeypatch.setattr(pyav_backend, "open_container", lambda source: av.open(source, metadata_errors="ignore"))
    want = decode_file(path, params)
    for got in clips:
        assert torch.equal(got.frames, want.frames) and torch.equal(got.mel, want.mel)
        assert torch.equal(got.frame_times, want.frame_times) and got.notes == want.notes
        assert (got.audio_present, got.source_size, got.fps, got.duration) == \
            (want.audio_present, want.source_size, want.fps, want.duration)


@pytest.mark.parametrize("name, suffix, header_only", [("mp4-h264-aac", ".avi", False), ("ts-h264-mp2", ".mp4", False),
                                                       ("mkv-ffv1-flac", ".webm", True)])
def test_a_misnamed_file_is_opened_by_what_it_holds(corpus, tmp_path, name, suffix, header_only):
    """The header-only open is tried on names like mp4/mov/mkv/webm only; what decides is the container inside: an mp4
    named .avi is opened the usual way at once, an MPEG-TS named .mp4 again after its header-only open. Either
    way the clip is the one decoded from the file under its own name."""
    misnamed = tmp_path / f"{name}{suffix}"
    misnamed.write_bytes(corpus[name].read_bytes())
    with open_container(str(misnamed)) as container:
        assert (container.options == {"codec_whitelist": "none"}) == header_only, container.options
    params = DecodeParams(num_frames=T, size=SIZE, resize_shorter=SHORTER)
    got, want = decode_file(misnamed, params), decode_file(corpus[name], params)
    assert torch.equal(got.frames, want.frames) and torch.equal(got.mel, want.mel)
    assert torch.equal(got.frame_times, want.frame_times) and got.notes == want.notes


@pytest.mark.parametrize("name", list(LOSSLESS))
def test_lossless_audio_is_the_written_wave_downmixed(corpus, name):
    """64 unordered channels are averaged like mono or any other layout (each channel has its own tones, so
    keeping one channel or summing them is far off)."""
    clip = decode(corpus[name])
    wave = default_wave(LOSSLESS[name], 32000, 16000)  # what write_video wrote: 2 s at 16 kHz, seed 0
    expected = log_mel_windows(s16_mono(wave), 16000, clip.frame_times.tolist(), window_s=1.0, n_mels=64,
                               win_ms=25.0, hop_ms=10.0)
    assert clip.audio_present
    torch.testing.assert_close(clip.mel, expected, atol=MEL_ATOL, rtol=0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_audio_samples_are_zeroed(tmp_path, bad):
    """float32 PCM, first second ``bad``, then a tone: the bad samples become silence, the tone stays."""
    wave = np.zeros((1, 32000), dtype=np.float32)
    wave[0, :16000] = bad
    wave[0, 16000:] = 0.3 * np.sin(2 * np.pi * 440 * np.arange(16000) / 16000)
    path = write_video(tmp_path / "float.mkv", audio="pcm_f32le", wave=wave)
    clip = decode_clip(path, num_frames=2, size=SIZE, resize_shorter=SHORTER)
    assert torch.isfinite(clip.mel).all() and clip.audio_present
    expected = log_mel_windows(torch.from_numpy(np.nan_to_num(wave[0], nan=0.0, posinf=0.0, neginf=0.0)), 16000,
                               clip.frame_times.tolist(), window_s=1.0, n_mels=64, win_ms=25.0, hop_ms=10.0)
    torch.testing.assert_close(clip.mel, expected, atol=MEL_ATOL, rtol=0)
    assert any("non-finite" in note for note in clip.notes), clip.notes


@pytest.mark.parametrize("name", list(BROKEN_AUDIO))
def test_broken_audio_stream_leaves_the_video(corpus, name):
    clip = decode(corpus[name])
    assert not clip.audio_present and torch.equal(clip.mel, torch.full((T, 64, 100), SILENCE))
    assert_frames_match_reference(clip, corpus[name])
    assert any("audio" in note for note in clip.notes), clip.notes


def test_decode_many_gives_each_file_what_decode_clip_gives(corpus):
    """One call over the whole corpus (sizes, formats and broken files mixed, one scaler and resampler reused)
    matches file-by-file decoding."""
    config = AVGNConfig.from_name("tiny").replace(num_frames=T, frame_size=SIZE, resize_shorter=SHORTER,
                                                  patch_size=16, n_mels=64)
    names = list(corpus)
    many = decode_many([corpus[n] for n in names], config, backend="pyav")
    for name, clip in zip(names, many):
        single = decode_clip(corpus[name], num_frames=T, size=SIZE, resize_shorter=SHORTER,
                             sample_rate=config.sample_rate, audio_window_s=config.audio_window_s, n_mels=64,
                             win_ms=config.win_ms, hop_ms=config.hop_ms)
        assert isinstance(clip, Clip), (name, clip)
        assert torch.equal(clip.frames, single.frames) and torch.equal(clip.mel, single.mel), name
        assert clip.audio_present == single.audio_present, name


def test_4096_mjpeg_decodes(large):
    clip = decode(large[4096])
    assert clip.source_size == (4096, 4096) and clip.frames.shape == (T, 3, SIZE, SIZE)
    assert_frames_match_reference(clip, large[4096])


def run_python(code: str, *args, cap_bytes: int | None = None) -> dict:
    """Run ``code`` in a fresh interpreter (its last stdout line is JSON) and return that JSON; ``cap_bytes``
    caps its data segment (heap and anonymous mappings), so a decode that tries to hold gigabytes fails fast."""
    def limit():
        resource.setrlimit(resource.RLIMIT_DATA, (cap_bytes, cap_bytes))

    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *map(str, args)], capture_output=True,
                          text=True, timeout=300, preexec_fn=None if cap_bytes is None else limit)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


PEAK_RSS = """
    import json, re, sys
    from avgn_fast.data.decode import decode_clip
    def peak_mb():  # VmHWM, not getrusage's ru_maxrss: that one survives exec and starts at the parent's peak
        with open("/proc/self/status") as f:
            return int(re.search(r"VmHWM:\\s+(\\d+) kB", f.read()).group(1)) / 1024
    out = []
    for path in sys.argv[1:]:
        clip = decode_clip(path, num_frames=8, size=32, resize_shorter=40)
        out.append({"source_size": clip.source_size, "peak_mb": peak_mb()})
    print(json.dumps(out))
"""


def test_peak_memory_does_not_grow_with_source_resolution(large):
    """A 4096 x 4096 MJPEG frame is 50 MB as RGB: holding the sampled frames at full resolution, or resizing them
    in float, costs hundreds of MB more than a 64 x 64 file of the same length. One fresh process decodes the small
    file, then the large one: the peak RSS after the first (imports, codec and scaler set up) is the baseline.
    Linux only (``/proc/self/status``), like the CI machines."""
    small, big = run_python(PEAK_RSS, large[64], large[4096])
    assert small["source_size"] == [64, 64] and big["source_size"] == [4096, 4096]
    assert big["peak_mb"] - small["peak_mb"] < MEMORY_GROWTH_MB, (small, big)


HUGE = """
    import json, sys
    from avgn_fast.config import AVGNConfig
    from avgn_fast.data.decode import DecodeStats, decode_clip, decode_many
    huge, small, limit = sys.argv[1], sys.argv[2], int(sys.argv[3])
    def outcome(run):
        try:
            return run()
        except Exception as e:  # reported, so one part failing leaves the others checked
            return {"raised": type(e).__name__, "message": str(e)}
    stats = DecodeStats()
    out = {"default": outcome(lambda: decode_clip(huge, num_frames=8, size=32, resize_shorter=40, stats=stats).path)}
    out["frames_decoded"] = stats.video_frames_decoded
    out["many"] = outcome(lambda: [type(r).__name__ for r in decode_many([huge, small], AVGNConfig.from_name("tiny"),
                                                                       backend="pyav")])
    def raised_limit():
        clip = decode_clip(huge, num_frames=2, size=32, resize_shorter=40, max_pixels=limit)
        return {"source_size": clip.source_size, "mean_level": clip.frames.float().mean().item()}
    out["raised_limit"] = outcome(raised_limit)
    print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def huge_outcome(huge, corpus):
    """The huge-frame cases, run in a process whose data segment is capped at ``DATA_CAP``."""
    return run_python(HUGE, huge, corpus["mp4-h264-aac"], HUGE_SIDE ** 2, cap_bytes=DATA_CAP)


def test_huge_frame_is_refused_from_the_header(huge, huge_outcome):
    refused = huge_outcome["default"]
    assert refused.get("raised") == "DecodeError", huge_outcome
    assert str(huge) in refused["message"] and "pixels" in refused["message"], refused
    assert huge_outcome["frames_decoded"] == 0
    assert huge_outcome["many"] == ["DecodeError", "Clip"]  # the refused file costs the next one nothing


def test_huge_frame_under_a_raised_limit_decodes_in_bounded_memory(huge_outcome):
    """With the limit raised, the 256-Mpixel frame still decodes under the cap: it is never held as RGB. Its
    1-bit stripes, 4 pixels black and 4 white, average to mid grey."""
    decoded = huge_outcome["raised_limit"]
    assert decoded.get("source_size") == [HUGE_SIDE, HUGE_SIDE], decoded
    assert decoded["mean_level"] == pytest.approx(127.5, abs=4)
