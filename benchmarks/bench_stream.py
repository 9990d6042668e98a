"""Windowed and live AVGN on CPU: shared-glance saving, real-time sources per core, per-hop latency, window accuracy.

    python benchmarks/bench_stream.py --avsynth AVSYNTH_DIR --checkpoint CK [--clips 60] [--window 4]
                                      [--live-seconds 40] [--sources 8,16,32,48] [--sources-seconds 30]
                                      [--workdir /tmp/avgn_bench_stream]

AVSynth test clips (``avgn-fast synth``; written into the workdir when ``--avsynth`` is left out) are
concatenated into one long file, segment by segment, re-encoded (H.264 + AAC, the clips' own fps and
sample rate). On it:

1. cost: GMACs per second of video with hop = W and hop = W/2, as the windows spent them (each
   frame's visual glance features computed once) and as recomputing every window from scratch would
   (``WindowRunner.gmacs_saved`` added back); wall time of each run;
2. real-time sources per core: the whole windowed path (front-to-back decode + model, hop = W/2) on
   one core (process pinned to it, one torch thread): seconds of video classified per second of wall
   time, which is how many real-time sources that core keeps up with;
3. latency: the long file remuxed into a FIFO as MPEG-TS at real-time pace by a writer process;
   ``avgn_fast.stream`` on the FIFO; p50 / p95 of the rows' ``latency_ms``;
4. accuracy (with a trained ``--checkpoint``): the fraction of windows lying inside one segment whose
   label is that segment's class;
5. live sources on one core, run live: ``--sources-seconds`` of the file played at real-time pace into N
   FIFOs at once by one writer process on the last core, ``avgn_fast.stream`` on all N in one process
   pinned to the first core with one torch thread; per N, the rows against those expected, and the lag
   from the moment a window's last second was played to its row (bounded when the core keeps up, growing
   when it does not; the second half of the run shows it).

Prints one table and writes ``bench_stream.json`` into the workdir.
"""

from __future__ import annotations

import argparse
import collections
import csv
import json
import os
import platform
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch


def test_clips(avsynth: Path, count: int) -> list[tuple[Path, str]]:
    """The first ``count`` test-split clips of an AVSynth folder with their labels."""
    with open(avsynth / "labels.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == "test"]
    return [(avsynth / r["path"], r["label"]) for r in rows[:count]]


def concat_clips(clips: list[tuple[Path, str]], out: Path) -> list[tuple[float, float, str]]:
    """Write the clips one after another into ``out`` (H.264 + AAC); returns each segment's (start, end, label)."""
    import av

    with av.open(str(clips[0][0])) as first:
        fps = first.streams.video[0].average_rate
        rate = first.streams.audio[0].sample_rate
        width, height = first.streams.video[0].width, first.streams.video[0].height
    segments, frame_index, sample_index = [], 0, 0
    with av.open(str(out), "w") as container:
        video = container.add_stream("libx264", rate=fps)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        audio = container.add_stream("aac", rate=rate, layout="mono")
        for path, label in clips:
            start = frame_index / float(fps)
            with av.open(str(path)) as clip:
                images = [f.to_ndarray(format="rgb24") for f in clip.decode(video=0)]
            with av.open(str(path)) as clip:
                resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
                wave = np.concatenate([r.to_ndarray().reshape(-1) for f in clip.decode(audio=0)
                                       for r in resampler.resample(f)])
            n_samples = round(len(images) / float(fps) * rate)  # the segment's sound, exactly its frames' span
            wave = np.pad(wave[:n_samples], (0, max(n_samples - len(wave), 0)))
            for img in images:
                frame = av.VideoFrame.from_ndarray(img, format="rgb24")
                frame.pts, frame.time_base = frame_index, Fraction(1) / fps
                container.mux(video.encode(frame))
                frame_index += 1
            for i in range(0, n_samples, 1024):
                chunk = av.AudioFrame.from_ndarray(np.ascontiguousarray(wave[None, i:i + 1024]), format="flt",
                                                   layout="mono")
                chunk.sample_rate, chunk.pts = rate, sample_index + i
                container.mux(audio.encode(chunk))
            sample_index += n_samples
            segments.append((start, frame_index / float(fps), label))
        container.mux(video.encode(None))
        container.mux(audio.encode(None))
    return segments


def decode_floor(path: Path) -> float:
    """Seconds to decode every video and audio frame of ``path`` once, front to back, converting nothing: the
    floor of any pass over the file."""
    import av

    start = time.perf_counter()
    with av.open(str(path)) as container:
        collections.deque(container.decode(*container.streams.video, *container.streams.audio), maxlen=0)
    return time.perf_counter() - start


def windowed_run(checkpoint, path: Path, window: float, hop: float) -> dict:
    """Every window of ``path``: rows, wall time, GMACs spent and what recomputing each window would have spent."""
    from avgn_fast.engine.predictor import Predictor
    from avgn_fast.engine.stream import WindowRunner, predict_windows

    predictor = Predictor(checkpoint, device="cpu", batch_size=16, num_workers=1)
    runner = WindowRunner(predictor.batch)
    start = time.perf_counter()
    rows = list(predict_windows(predictor.batch, [str(path)], window, hop, runner=runner))
    wall = time.perf_counter() - start
    errors = [r.error for r in rows if not r.ok]
    if errors:
        raise RuntimeError(f"{len(errors)} windows failed, first: {errors[0]}")
    return {"rows": rows, "wall_s": wall, "gmacs_spent": runner.gmacs_spent,
            "gmacs_recomputed": runner.gmacs_spent + runner.gmacs_saved}


def one_core(checkpoint, path: Path, window: float, hop: float, duration: float) -> dict:
    """Seconds of video classified per wall second with the process pinned to one core and one torch thread."""
    code = f"""
import json, os, sys, time, torch
os.sched_setaffinity(0, {{min(os.sched_getaffinity(0))}})
torch.set_num_threads(1)
sys.path.insert(0, {str(Path(__file__).parent)!r})
from bench_stream import windowed_run
windowed_run({str(checkpoint)!r}, __import__("pathlib").Path({str(path)!r}), {window}, {hop})  # warm-up
run = windowed_run({str(checkpoint)!r}, __import__("pathlib").Path({str(path)!r}), {window}, {hop})
print(json.dumps({{"wall_s": run["wall_s"], "windows": len(run["rows"])}}))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.splitlines()[-1])
    result["video_s_per_s"] = duration / result["wall_s"]
    return result


def live_latency(checkpoint, path: Path, workdir: Path, window: float, hop: float, seconds: float) -> dict:
    """p50 / p95 latency of ``avgn_fast.stream`` on ``seconds`` of ``path`` played into a FIFO at real-time pace."""
    import avgn_fast

    clip = workdir / "live_source.mp4"
    _cut(path, clip, seconds)
    fifo = workdir / "live.ts"
    if fifo.exists():
        fifo.unlink()
    os.mkfifo(fifo)
    writer = subprocess.Popen([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r});"
                               f" from bench_stream import remux_live; remux_live({str(clip)!r}, [{str(fifo)!r}])"],
                              stdout=subprocess.DEVNULL)
    rows = list(avgn_fast.stream(str(fifo), checkpoint, window_s=window, hop_s=hop, device="cpu", reconnects=0,
                                 options={"analyzeduration": "500000", "probesize": "32768"}))
    writer.wait()
    latency = np.array([r.latency_ms for r in rows if r.ok])
    return {"rows": len(rows), "errors": sum(not r.ok for r in rows),
            "p50_ms": float(np.percentile(latency, 50)), "p95_ms": float(np.percentile(latency, 95))}


def remux_live(src: str, dsts: list[str]) -> None:
    """Copy ``src``'s packets into every one of ``dsts`` as MPEG-TS, each at its own time on the wall clock (a
    camera's pace; several outputs: N cameras playing the same recording); prints the monotonic clock at which
    the first packet went out, once every output is open."""
    import av

    with av.open(src) as inp:
        outs = [av.open(d, "w", format="mpegts", container_options={"flush_packets": "1"}) for d in dsts]
        streams = [{s.index: out.add_stream_from_template(s) for s in (inp.streams.video[0], inp.streams.audio[0])}
                   for out in outs]
        for out in outs:
            out.start_encoding()  # opens the FIFO (waiting for its reader) and writes the header
        start = time.monotonic()
        print(start, flush=True)
        for packet in inp.demux(*inp.streams.video, *inp.streams.audio):
            if packet.dts is None:
                continue
            time.sleep(max(start + float(packet.dts * packet.time_base) - time.monotonic(), 0))
            index = packet.stream_index  # re-pointing the packet at an output stream changes it
            for out, mapping in zip(outs, streams):
                packet.stream = mapping[index]
                out.mux(packet)
        for out in outs:
            out.close()


def live_sources(checkpoint, path: Path, workdir: Path, window: float, hop: float, seconds: float,
                 counts: list[int]) -> list[dict]:
    """N live sources on one core: ``seconds`` of ``path`` played into N FIFOs at real-time pace by one writer
    (on the other core), ``avgn_fast.stream`` on all N in one process pinned to one core with one torch thread.

    A row's lag is the wall time from the moment its window's last second was played to the row; the core
    keeps up with N sources when the lag stays bounded (no growth over the run) and no row is an error.
    """
    clip = workdir / f"live_{seconds:g}s.mp4"
    _cut(path, clip, seconds)
    cores = sorted(os.sched_getaffinity(0))
    results = []
    for n in counts:
        fifos = [workdir / f"live_{i}.ts" for i in range(n)]
        for f in fifos:
            if f.exists():
                f.unlink()
            os.mkfifo(f)
        reader_code = f"""
import json, os, sys, time, torch
os.sched_setaffinity(0, {{{cores[0]}}})
torch.set_num_threads(1)
import avgn_fast
rows = []
for r in avgn_fast.stream({[str(f) for f in fifos]!r}, {str(checkpoint)!r}, window_s={window}, hop_s={hop},
                          device="cpu", reconnects=0, batch_size=16,
                          options={{"analyzeduration": "500000", "probesize": "32768"}}):
    rows.append((time.monotonic(), r.end_s, r.ok, r.latency_ms))
print(json.dumps(rows))
"""
        writer_code = (f"import os, sys; os.sched_setaffinity(0, {{{cores[-1]}}}); "
                       f"sys.path.insert(0, {str(Path(__file__).parent)!r}); from bench_stream import remux_live; "
                       f"remux_live({str(clip)!r}, {[str(f) for f in fifos]!r})")
        reader = subprocess.Popen([sys.executable, "-c", reader_code], stdout=subprocess.PIPE, text=True)
        writer = subprocess.Popen([sys.executable, "-c", writer_code], stdout=subprocess.PIPE, text=True)
        try:
            # the writer's outputs open once the reader has opened every FIFO: a reader that dies first would
            # leave the writer blocked on its next FIFO, so both are watched
            line = _first_line(writer, reader)
            if not line:
                raise RuntimeError(f"{n} live sources: the reader (exit {reader.poll()}) or the writer "
                                   f"(exit {writer.poll()}) ended before the sources opened")
            start = float(line)
            if writer.wait(timeout=seconds + 120) != 0:
                raise RuntimeError(f"{n} live sources: the writer failed (exit {writer.returncode})")
            out = reader.communicate(timeout=120)[0]
            if reader.returncode != 0 or not out.strip():
                raise RuntimeError(f"{n} live sources: the reader failed (exit {reader.returncode})")
        finally:
            for proc in (reader, writer):
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            for f in fifos:
                f.unlink(missing_ok=True)
        rows = json.loads(out.splitlines()[-1])
        ok = [(t, end, latency) for t, end, good, latency in rows if good]
        result = {"sources": n, "rows": len(ok), "errors": len(rows) - len(ok),
                  "expected_rows": n * int((seconds - window) // hop + 1)}
        if ok:
            lag = np.array([t - (start + end) for t, end, _ in ok])
            late = lag[len(lag) // 2:]  # the second half of the run: a reader falling behind shows here
            result.update(lag_p50_s=float(np.percentile(lag, 50)), lag_p95_s=float(np.percentile(lag, 95)),
                          lag_p95_second_half_s=float(np.percentile(late, 95)), lag_max_s=float(lag.max()),
                          latency_p95_ms=float(np.percentile([x[2] for x in ok], 95)))
        results.append(result)
    return results


def _first_line(writer: subprocess.Popen, reader: subprocess.Popen) -> str:
    """The writer's first line, or "" once either process has ended without it."""
    import select

    while reader.poll() is None and writer.poll() is None:
        if select.select([writer.stdout], [], [], 0.5)[0]:
            return writer.stdout.readline()
    return writer.stdout.readline() if select.select([writer.stdout], [], [], 0)[0] else ""


def _cut(path: Path, out: Path, seconds: float) -> None:
    """The first ``seconds`` of ``path``'s video and audio packets, copied into ``out``."""
    import av

    with av.open(str(path)) as inp, av.open(str(out), "w") as dst:
        streams = {s.index: dst.add_stream_from_template(s) for s in (inp.streams.video[0], inp.streams.audio[0])}
        for packet in inp.demux(*inp.streams.video, *inp.streams.audio):
            if packet.dts is not None and float(packet.dts * packet.time_base) < seconds:
                packet.stream = streams[packet.stream_index]
                dst.mux(packet)


def accuracy(rows, segments) -> tuple[int, int]:
    """(windows inside one segment whose label is the segment's class, windows inside one segment)."""
    hits = total = 0
    for r in rows:
        inside = [label for start, end, label in segments if start - 1e-6 <= r.start_s and r.end_s <= end + 1e-6]
        if inside:
            total += 1
            hits += r.label == inside[0]
    return hits, total


def cpu_name() -> str:
    """The CPU's model name (Linux), else the machine type."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--avsynth", type=Path, default=None, help="AVSynth folder (default: written to the workdir)")
    parser.add_argument("--checkpoint", default=None, help="trained tiny checkpoint (default: random weights, no "
                                                            "accuracy)")
    parser.add_argument("--clips", type=int, default=60, help="test clips concatenated")
    parser.add_argument("--repeat", type=int, default=1, help="concatenate the clips this many times")
    parser.add_argument("--window", type=float, default=4.0, help="window seconds (default: one AVSynth clip)")
    parser.add_argument("--live-seconds", type=float, default=40.0, help="seconds played into the FIFO")
    parser.add_argument("--sources", default="8,16,32,48",
                        help="numbers of simultaneous live sources tried on one core (comma-separated; '' skips)")
    parser.add_argument("--sources-seconds", type=float, default=30.0, help="seconds each of those sources plays")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/avgn_bench_stream"),
                        help="folder for the dataset, the concatenated file, the FIFO and bench_stream.json "
                             "(default: /tmp/avgn_bench_stream)")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    checkpoint = args.checkpoint
    if args.avsynth is None:
        from avgn_fast.data.synth import write_dataset

        args.avsynth = write_dataset(args.workdir / "avsynth", max(args.clips * 5, 100), seed=0)
    if checkpoint is None:
        from avgn_fast.checkpoint import save_checkpoint
        from avgn_fast.config import AVGNConfig
        from avgn_fast.data.synth import CLASS_NAMES
        from avgn_fast.models.avgn import AVGN

        torch.manual_seed(0)
        checkpoint = args.workdir / "random_tiny.pt"
        save_checkpoint(checkpoint, AVGN(AVGNConfig.from_name("tiny")).eval(), class_names=CLASS_NAMES)
    long = args.workdir / f"concat_{args.clips}x{args.repeat}.mp4"
    listing = long.with_suffix(".json")  # the segments of a concatenation written before, reused
    if long.exists() and listing.exists():
        segments = [tuple(x) for x in json.loads(listing.read_text())]
    else:
        segments = concat_clips(test_clips(args.avsynth, args.clips) * args.repeat, long)
        listing.write_text(json.dumps(segments))
    duration = segments[-1][1]
    floor = decode_floor(long)
    w = args.window
    load = os.getloadavg()[0]
    report = {"machine": cpu_name(), "cores": os.cpu_count(),
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "load_before": load,
              "video_s": duration, "window_s": w, "decode_floor_s": floor, "runs": {}}
    print(f"{len(segments)} clips, {duration:.0f} s of video, window {w:g} s; load average {load:.1f}; decoding every "
          f"frame once, nothing else: {floor:.1f} s")
    print("| hop | windows | GMACs / s of video (shared glance) | recomputing each window | saving | wall s | "
          "windows in one segment with its label |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    warm = args.workdir / "warmup.mp4"  # the first run in a process pays for counting GMACs and oneDNN's set-up
    concat_clips(test_clips(args.avsynth, 3), warm)
    windowed_run(checkpoint, warm, w, w / 2)
    for hop in (w, w / 2):
        run = windowed_run(checkpoint, long, w, hop)
        hits, total = accuracy(run["rows"], segments)
        spent, full = run["gmacs_spent"] / duration, run["gmacs_recomputed"] / duration
        report["runs"][f"hop={hop:g}"] = {"windows": len(run["rows"]), "gmacs_per_s": spent,
                                          "gmacs_per_s_recomputed": full, "wall_s": run["wall_s"],
                                          "label_matches": [hits, total]}
        print(f"| {hop:g} s | {len(run['rows'])} | {spent:.4f} | {full:.4f} | {1 - spent / full:.1%} | "
              f"{run['wall_s']:.1f} | {hits}/{total} = {hits / max(total, 1):.1%} |")
    core = one_core(checkpoint, long, w, w / 2, duration)
    report["one_core"] = core
    print(f"one core, hop {w / 2:g} s: {core['video_s_per_s']:.1f} s of video per s "
          f"({core['windows']} windows in {core['wall_s']:.1f} s): keeps up with {int(core['video_s_per_s'])} "
          "real-time sources")
    live = live_latency(checkpoint, long, args.workdir, w, w / 2, args.live_seconds)
    report["live"] = live
    print(f"live FIFO, {args.live_seconds:g} s at real-time pace, hop {w / 2:g} s: {live['rows']} rows "
          f"({live['errors']} errors), latency p50 {live['p50_ms']:.0f} ms, p95 {live['p95_ms']:.0f} ms")
    counts = [int(x) for x in args.sources.split(",") if x.strip()]
    if counts and len(os.sched_getaffinity(0)) < 2:
        print("live sources on one core: skipped (needs a second core for the writer)")
        counts = []
    if counts:
        print("| live sources on one core | rows (expected) | errors | lag p50 s | lag p95 s | lag p95, 2nd half, s | "
              "lag max s | latency p95 ms |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    report["live_sources"] = []
    for r in live_sources(checkpoint, long, args.workdir, w, w / 2, args.sources_seconds, counts):
        report["live_sources"].append(r)
        lags = " | ".join(f"{r[k]:.2f}" if k in r else "-" for k in ("lag_p50_s", "lag_p95_s", "lag_p95_second_half_s",
                                                                     "lag_max_s"))
        print(f"| {r['sources']} | {r['rows']} ({r['expected_rows']}) | {r['errors']} | {lags} | "
              f"{r.get('latency_p95_ms', float('nan')):.0f} |")
    report["load_after"] = os.getloadavg()[0]
    (args.workdir / "bench_stream.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
