"""Sparse decode vs the codec's floor on the CPU: our ``decode_clip``, PyAV decoding every frame, DALI's CPU reader.

    python benchmarks/bench_decode.py [--repeat 3] [--batch 16] [--workdir DIR] [--json OUT] [--one-core]

Media are written at run time into a temporary folder (``--workdir`` keeps them there for the next run):

- ``avsynth_tiny.mp4`` / ``avsynth_tiny.webm``: AVSynth video 0 (seed 0) of the tiny configuration, as
  ``avgn-fast synth`` writes it: 96 x 96, 48 frames at 12 fps, 4 s; H.264 + AAC, and VP9 + Opus;
- ``h264_1080p_2s.mp4``: 1920 x 1080, 2 s at 30 fps, H.264 + AAC;
- ``h264_360p_20s.mp4``: 640 x 360, 20 s at 30 fps, H.264 + AAC;
- ``h264_360p_20s_bframes.mp4``: the same size and length with smooth content (``tests/media.py``'s ramps),
  for which libx264 makes 279 of the 600 frames B-frames that no other frame refers to;

the 1080p and the first 20-s file with ``tests/media.py``'s content (gradient, moving square, noise), for which
libx264 chooses no B-frames; all three with libx264's default GOP.

Per file, in one process and run: (a) ours, ``decode_clip`` with every decode parameter of the
configuration named in the table (tiny for AVSynth, paper for the others): 16 frames resized and cropped,
plus the audio windows and their log-mel; (b) the codec's floor, PyAV decoding every video frame of the
file with no conversion and one codec thread; (d) the floor of a decoder that returns the sound too: (b)
plus every frame of the audio stream, demuxed together; (e) what a decoder that decodes every frame and
returns the model's input cannot avoid, as parts timed apart and summed (``BoundParts``: (d) opened from the
headers, the sampled frames converted by swscale's cheapest bilinear, the resampling, the log-mel); (c) DALI's
CPU reader (``decode_clip(backend="dali", device="cpu")``) where its decoder reads the codec (VP8/VP9/MJPEG),
else n/a. Each time is the best of ``--repeat`` rounds after one warm-up call; every measure (and each part of
(e)) takes its turn within each round, so load from
other processes falls on all of them alike. Each also gets its CPU time (the least of the rounds, every
thread of the process counted; the CPU ratios hold best on a loaded machine), and (a) its videos per
CPU-second, which threads cannot flatter. Then the
model's rate for comparison: tiny ``AVGN`` (random weights, eager fp32) ``glance`` on a batch of the
decoded AVSynth clips, best of ``--repeat``.

One thread: torch uses one thread, and (b) one codec thread; (a) and (c) thread as their code chooses,
as they would in the Predictor. ``--one-core`` also pins the process to one core, so FFmpeg's automatic
thread counts (codec and swscale) drop to one and every videos/s is per core; that also hides what
threads cost (FFmpeg starts a thread per core for each new swscale context, slow on a busy machine), so
the two modes differ. On a shared machine read the ratios, not the times.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # tests/media.py writes the synthetic files

REPEAT = 3
BATCH = 16
SYNTH_FPS = 30


@dataclass(frozen=True)
class Media:
    """One benchmark file: its name, the configuration whose decode parameters (a) and (c) use, its video
    frame count, and how it is made."""

    name: str
    config: str
    frames: int
    write: Callable[[Path], None]


def write_avsynth(path: Path) -> None:
    """AVSynth video 0 of the tiny configuration, in the container ``path``'s suffix names (mp4 or webm)."""
    from avgn_fast.config import AVGNConfig
    from avgn_fast.data import synth

    synth.write_video(synth.render_video(0, seed=0, config=AVGNConfig.from_name("tiny")), path)


def synthetic_writer(height: int, width: int, seconds: float, smooth: bool = False) -> Callable[[Path], None]:
    """A writer of an H.264 + AAC mp4 of ``tests/media.py`` content at ``SYNTH_FPS``: its default frames (gradient,
    moving square, noise: libx264 chooses no B-frames), or with ``smooth`` its ramps (about half the frames
    become B-frames that no other frame refers to, as in most camera and web video)."""

    def write(path: Path) -> None:
        import media

        tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")  # the suffix picks the container
        frames = media.ramp_frames(round(seconds * SYNTH_FPS), (height, width)) if smooth else None
        media.write_video(tmp, size=(height, width), fps=SYNTH_FPS, seconds=seconds, frames=frames)
        os.replace(tmp, path)

    return write


MEDIA = (
    Media("avsynth_tiny.mp4", "tiny", 48, write_avsynth),
    Media("avsynth_tiny.webm", "tiny", 48, write_avsynth),
    Media("h264_1080p_2s.mp4", "paper", 2 * SYNTH_FPS, synthetic_writer(1080, 1920, 2.0)),
    Media("h264_360p_20s.mp4", "paper", 20 * SYNTH_FPS, synthetic_writer(360, 640, 20.0)),
    Media("h264_360p_20s_bframes.mp4", "paper", 20 * SYNTH_FPS, synthetic_writer(360, 640, 20.0, smooth=True)),
)


def write_media(workdir: Path) -> dict[str, Path]:
    """Every file of ``MEDIA`` under ``workdir`` (kept when already there: the content is deterministic)."""
    workdir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for m in MEDIA:
        paths[m.name] = workdir / m.name
        if not paths[m.name].is_file():
            print(f"writing {paths[m.name]}", file=sys.stderr)
            m.write(paths[m.name])
    return paths


def decode_kwargs(config_name: str) -> dict:
    """Every decode parameter of ``decode_clip`` as the named configuration sets it."""
    from avgn_fast.config import AVGNConfig

    c = AVGNConfig.from_name(config_name)
    return dict(num_frames=c.num_frames, size=c.frame_size, resize_shorter=c.resize_shorter,
                sample_rate=c.sample_rate, audio_window_s=c.audio_window_s, n_mels=c.n_mels, win_ms=c.win_ms,
                hop_ms=c.hop_ms)


def decode_ours(path: Path, config_name: str):
    """(a): our PyAV decode of one file, returning its ``Clip``."""
    from avgn_fast.data.decode import decode_clip

    return decode_clip(path, **decode_kwargs(config_name), backend="pyav")


def decode_floor(path: Path) -> int:
    """(b): PyAV decodes every video frame with one codec thread and converts none; returns the frame count."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_count = 1
        return sum(1 for _ in container.decode(stream))


def decode_floor_av(path: Path, headers_only: bool = False) -> tuple[int, int]:
    """(d): (b) plus every frame of the first audio stream, one codec thread each and no conversion: the
    least a decoder that returns the sound too must spend; returns the (video, audio) frame counts. With
    ``headers_only`` the file is opened as our decoder opens it (``open_container``), else with a plain ``av.open``."""
    import av

    from avgn_fast.data.pyav_backend import open_container

    with (open_container if headers_only else av.open)(str(path)) as container:
        video, audio = container.streams.video[0], container.streams.audio[0]
        video.thread_count = audio.thread_count = 1
        counts = {video.index: 0, audio.index: 0}
        for packet in container.demux(video, audio):  # the last packet of each stream is empty: it flushes
            counts[packet.stream.index] += len(packet.decode())
        return counts[video.index], counts[audio.index]


class BoundParts:
    """(e): the least any decoder returning the model's input spends, as parts timed apart and summed: (d), the file
    opened from its headers (``open_container``); then, on inputs decoded beforehand, the frames ``VideoProbe``
    samples converted by swscale's cheapest bilinear (no accurate rounding), the mono audio resampled to the
    model's rate (``decimate``: every file of ``MEDIA`` is at the model's rate or a whole multiple of it) and its
    windows' log-mel. No bookkeeping and no Python per frame beyond PyAV's loop: a floor for this stack (PyAV,
    numpy, torch), not a design."""

    def __init__(self, path: Path, config_name: str):
        import av
        from av.video.reformatter import VideoReformatter

        from avgn_fast.data.pyav_audio import mono_samples
        from avgn_fast.data.pyav_streams import probe_video

        self.path, self.kw = path, decode_kwargs(config_name)
        with av.open(str(path)) as container:
            probe = probe_video(container, path)
            times, indices = probe.sample(self.kw["num_frames"])
            container.seek(0)
            chosen = set(indices)
            self.frames = [f for i, f in enumerate(container.decode(video=0)) if i in chosen]
            container.seek(0)
            audio = list(container.decode(audio=0))
        self.centers = [t - probe.start_s for t in times]
        self.rate, self.mono = audio[0].sample_rate, mono_samples(audio)
        self.reformatter = VideoReformatter()
        self.wave = self.resample()

    def floor(self) -> None:
        decode_floor_av(self.path, headers_only=True)

    def convert(self) -> None:
        from av.video.reformatter import Interpolation

        from avgn_fast.data.common import frame_geometry

        for frame in self.frames:
            _, _, (h, w) = frame_geometry(frame.rotation, frame.height, frame.width, self.kw["resize_shorter"])
            self.reformatter.reformat(frame, width=w, height=h, format="gbrp", interpolation=Interpolation.BILINEAR,
                                      threads=1)

    def resample(self) -> torch.Tensor:
        from avgn_fast.data.decimate import decimate

        sr = self.kw["sample_rate"]
        out = self.mono if self.rate == sr else decimate(self.mono, self.rate, sr)
        if out is None:
            raise ValueError(f"{self.path}: {self.rate} Hz is not a whole multiple of the model's {sr} Hz")
        return torch.from_numpy(out)

    def log_mel(self) -> None:
        from avgn_fast.data.audio import segments_log_mel, window_segments

        kw = {k: self.kw[k] for k in ("win_ms", "hop_ms")}
        sr, window_s = self.kw["sample_rate"], self.kw["audio_window_s"]
        segments = window_segments(self.wave, sr, self.centers, window_s=window_s, **kw)
        segments_log_mel(segments, sr, window_s=window_s, n_mels=self.kw["n_mels"], **kw)

    def run(self) -> None:
        for fn in self.fns().values():
            fn()

    def fns(self) -> dict[str, Callable[[], object]]:
        return {"bound_floor": self.floor, "bound_convert": self.convert, "bound_resample": self.resample,
                "bound_log_mel": self.log_mel}


def decode_dali(path: Path, config_name: str):
    """(c): DALI's CPU pipeline on one file, returning its ``Clip``."""
    from avgn_fast.data.decode import decode_clip

    return decode_clip(path, **decode_kwargs(config_name), backend="dali", device="cpu")


def dali_unavailable(path: Path, config_name: str) -> str | None:
    """Why DALI's CPU reader cannot decode ``path`` (not installed, or a codec its CPU decoder lacks), else None."""
    from avgn_fast.data.decode import DecodeError, available_backends

    if "dali" not in available_backends():
        return "DALI is not installed"
    try:
        decode_dali(path, config_name)
    except DecodeError as e:
        return e.problem
    return None


def best_ms(fns: dict[str, Callable[[], object]], repeat: int) -> dict[str, tuple[float, float]]:
    """Per function, the fastest wall time and the least CPU time (this process, all its threads) of
    ``repeat`` calls, in milliseconds, after one warm-up call of each.

    Every round calls each function once, so load from other processes falls on all of them alike and
    the ratios between them hold on a busy machine better than the times do.
    """
    for fn in fns.values():
        fn()  # warm-up: imports, pipeline builds, first allocations
    wall = {name: [] for name in fns}
    cpu = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    return {name: (1000 * min(wall[name]), 1000 * min(cpu[name])) for name in fns}


def source_info(path: Path) -> dict:
    """Codec, size, frame and keyframe counts of the file's video stream (demuxed, not decoded)."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        keys = frames = 0
        for packet in container.demux(stream):
            if packet.size:
                frames += 1
                keys += packet.is_keyframe
        return dict(codec=stream.codec_context.name, width=stream.codec_context.width,
                    height=stream.codec_context.height, frames=frames, keyframes=keys)


def bench_file(m: Media, path: Path, repeat: int) -> dict:
    """One table row: (a), (b) and (c) on one file, in ms, with the ratios to the floor."""
    dali_na = dali_unavailable(path, m.config)
    fns = {"ours": lambda: decode_ours(path, m.config), "floor": lambda: decode_floor(path),
           "floor_av": lambda: decode_floor_av(path)}
    if dali_na is None:
        fns["dali"] = lambda: decode_dali(path, m.config)
    bound = BoundParts(path, m.config)
    fns.update(bound.fns())
    (ours, ours_cpu), (floor, floor_cpu) = (ms := best_ms(fns, repeat))["ours"], ms["floor"]
    parts = {name.removeprefix("bound_"): ms[name][0] for name in bound.fns()}
    dali, dali_cpu = ms.get("dali", (None, None))
    floor_av, floor_av_cpu = ms["floor_av"]
    kw = decode_kwargs(m.config)
    return dict(file=m.name, **source_info(path), config=m.config, num_frames=kw["num_frames"], size=kw["size"],
                resize_shorter=kw["resize_shorter"], ours_ms=ours, ours_cpu_ms=ours_cpu, floor_ms=floor,
                floor_cpu_ms=floor_cpu, ours_vs_floor=ours / floor, ours_cpu_vs_floor_cpu=ours_cpu / floor_cpu,
                floor_av_ms=floor_av, floor_av_cpu_ms=floor_av_cpu, ours_vs_floor_av=ours / floor_av,
                ours_cpu_vs_floor_av_cpu=ours_cpu / floor_av_cpu, dali_ms=dali, dali_cpu_ms=dali_cpu,
                dali_vs_floor=None if dali is None else dali / floor, dali_na=dali_na, bound_parts_ms=parts,
                bound_ms=sum(parts.values()), bound_vs_floor=sum(parts.values()) / floor,
                ours_videos_per_s=1000 / ours, ours_videos_per_cpu_s=1000 / ours_cpu)


def model_rate(clips: list, batch: int, repeat: int) -> dict:
    """Tiny ``AVGN`` (random weights, eager fp32) ``glance`` on ``batch`` of the given clips, best of ``repeat``."""
    from avgn_fast.config import AVGNConfig
    from avgn_fast.models.avgn import AVGN

    torch.manual_seed(0)
    model = AVGN(AVGNConfig.from_name("tiny")).eval()
    chosen = [clips[i % len(clips)] for i in range(batch)]
    frames = torch.stack([c.frames for c in chosen])
    mel = torch.stack([c.mel for c in chosen])
    present = torch.tensor([c.audio_present for c in chosen])
    with torch.inference_mode():
        ms, cpu_ms = best_ms({"glance": lambda: model.glance(frames, mel, audio_present=present)}, repeat)["glance"]
    return dict(config="tiny", batch=batch, precision="fp32", batch_ms=ms, batch_cpu_ms=cpu_ms,
                videos_per_s=1000 * batch / ms, videos_per_cpu_s=1000 * batch / cpu_ms)


@contextlib.contextmanager
def single_thread(pin: bool = False):
    """One torch thread and, with ``pin``, this thread (and those it starts) on one core; restored on exit."""
    threads = torch.get_num_threads()
    cores = os.sched_getaffinity(0)
    torch.set_num_threads(1)
    if pin:
        os.sched_setaffinity(0, {min(cores)})
    try:
        yield
    finally:
        os.sched_setaffinity(0, cores)
        torch.set_num_threads(threads)


def machine(pinned: bool) -> dict:
    """CPU model, cores, load and library versions, for the record beside the figures."""
    import av

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or platform.machine())
    info = dict(date=datetime.date.today().isoformat(), cpu=cpu, cores=os.cpu_count(),
                pinned_to_one_core=pinned, torch_threads=torch.get_num_threads(),
                load_average=" ".join(f"{x:.2f}" for x in os.getloadavg()), python=platform.python_version(),
                torch=torch.__version__, av=av.__version__, ffmpeg=av.ffmpeg_version_info)
    with contextlib.suppress(ImportError):
        import nvidia.dali

        info["dali"] = nvidia.dali.__version__
    return info


def print_table(info: dict, rows: list[dict], model: dict, repeat: int) -> None:
    print(", ".join(f"{k}={v}" for k, v in info.items()))
    print(f"best of {repeat} interleaved rounds after one warm-up; (a) ours, (b) PyAV decodes every video frame, "
          "(c) DALI CPU, (d) PyAV decodes every video and audio frame; CPU: least process time of the rounds\n")
    head = ("file", "source", "config (T, S/shorter)", "ms (a)", "ms (b)", "a/b", "CPU a/b", "ms (d)", "a/d",
            "CPU a/d", "ms (c)", "c/b", "videos/s (a)", "CPU ms (a)", "videos/CPU-s (a)")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * 3 + "---:|" * (len(head) - 3))
    for r in rows:
        source = f"{r['codec']} {r['width']}x{r['height']}, {r['frames']} frames, {r['keyframes']} key"
        config = f"{r['config']} ({r['num_frames']}, {r['size']}/{r['resize_shorter']})"
        dali = ("n/a", "n/a") if r["dali_ms"] is None else (f"{r['dali_ms']:.1f}", f"{r['dali_vs_floor']:.2f}x")
        cells = (r["file"], source, config, f"{r['ours_ms']:.1f}", f"{r['floor_ms']:.1f}",
                 f"{r['ours_vs_floor']:.2f}x", f"{r['ours_cpu_vs_floor_cpu']:.2f}x", f"{r['floor_av_ms']:.1f}",
                 f"{r['ours_vs_floor_av']:.2f}x", f"{r['ours_cpu_vs_floor_av_cpu']:.2f}x", *dali,
                 f"{r['ours_videos_per_s']:.1f}", f"{r['ours_cpu_ms']:.1f}",
                 f"{r['ours_videos_per_cpu_s']:.1f}")
        print("| " + " | ".join(cells) + " |")
    print("\n(e) the least a decoder that decodes every frame and returns the model's input spends (parts timed "
          "apart, summed): (d) opened from the headers + the sampled frames converted by swscale's cheapest bilinear "
          "+ resampling + windows and log-mel; a sparse decoder spends less only where it skips frames (B-frames, "
          "frames after the last sampled one)\n")
    print("| file | ms (e) | e/b | a/e | parts: " + ", ".join(rows[0]["bound_parts_ms"]) + " (ms) |")
    print("|---|---:|---:|---:|---|")
    for r in rows:
        parts = ", ".join(f"{v:.2f}" for v in r["bound_parts_ms"].values())
        print(f"| {r['file']} | {r['bound_ms']:.1f} | {r['bound_vs_floor']:.2f}x | {r['ours_ms'] / r['bound_ms']:.2f}x "
              f"| {parts} |")
    for r in rows:
        if r["dali_na"]:
            print(f"(c) n/a for {r['file']}: {r['dali_na']}")
    print(f"\nmodel: {model['config']} AVGN glance, eager {model['precision']}, batch {model['batch']}: "
          f"{model['batch_ms']:.1f} ms per batch, {model['videos_per_s']:.1f} videos/s, "
          f"{model['videos_per_cpu_s']:.1f} videos/CPU-s")
    for r in rows:
        if r["config"] == model["config"]:
            print(f"model / (a) on {r['file']}: {model['videos_per_s'] / r['ours_videos_per_s']:.1f}x wall, "
                  f"{model['videos_per_cpu_s'] / r['ours_videos_per_cpu_s']:.1f}x CPU")


def main(repeat=REPEAT, batch=BATCH, workdir=None, json_out=None, one_core=False) -> dict:
    with contextlib.ExitStack() as stack:
        folder = Path(workdir) if workdir else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        paths = write_media(folder)
        stack.enter_context(single_thread(pin=one_core))
        rows = [bench_file(m, paths[m.name], repeat) for m in MEDIA]
        clips = [decode_ours(paths[m.name], m.config) for m in MEDIA if m.config == "tiny"]
        model = model_rate(clips, batch, repeat)
        info = machine(pinned=one_core)
    print_table(info, rows, model, repeat)
    result = dict(machine=info, repeat=repeat, rows=rows, model=model)
    if json_out:
        Path(json_out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=REPEAT, help=f"timed calls per measure, best kept (default {REPEAT})")
    ap.add_argument("--batch", type=int, default=BATCH, help=f"clips per model batch (default {BATCH})")
    ap.add_argument("--workdir", help="write the media here and keep them (default: a temporary folder)")
    ap.add_argument("--json", dest="json_out", metavar="OUT", help="also write the results as JSON to OUT")
    ap.add_argument("--one-core", action="store_true", help="pin the process to one core (FFmpeg then starts no "
                    "threads)")
    main(**vars(ap.parse_args()))
