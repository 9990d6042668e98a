"""Windowed AVGN over long files and live sources: the cut file's frames and rows, in order, flat memory, live."""

import dataclasses
import itertools
import json
import os
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from media import default_frames, default_wave, write_tone_chunks, write_video
from random_models import random_model

import avgn_fast
from avgn_fast.checkpoint import save_checkpoint
from avgn_fast.cli import main as cli_main
from avgn_fast.config import AVGNConfig
from avgn_fast.data.common import DecodeParams
from avgn_fast.data.sequential import SequentialReader
from avgn_fast.engine.batch import BatchPredictor
from avgn_fast.engine.predictor import Predictor
from avgn_fast.engine.stream import WindowRunner, source_windows
from avgn_fast.engine.windows import WindowPlan

CONFIG = AVGNConfig.from_name("tiny")
FPS, RATE = 10, CONFIG.sample_rate
# lossless, intra-only video and PCM audio: a cut-out stretch decodes to exactly the same frames and samples
LOSSLESS = dict(codec="ffv1", audio="pcm_s16le", fps=FPS, sample_rate=RATE, size=(48, 64))


@pytest.fixture(scope="module")
def model():
    return random_model(CONFIG, seed=3)


@pytest.fixture(scope="module")
def long_file(tmp_path_factory):
    """10 s whose sound is silent within 30 ms of every whole second, so a stretch cut there hears the same
    as the whole file (the STFT frames at a window's edges read a few ms beyond it)."""
    seconds = 10
    frames = default_frames(FPS * seconds, (48, 64), seed=1)
    t = np.arange(RATE * seconds) / RATE
    wave = default_wave(1, RATE * seconds, RATE, seed=1) * np.clip(np.abs(t - np.round(t)) / 0.03 - 0.5, 0, 1)
    folder = tmp_path_factory.mktemp("long")
    path = write_video(folder / "long.mkv", frames=frames, wave=wave.astype(np.float32), seconds=seconds, **LOSSLESS)
    return path, frames, wave.astype(np.float32)


def test_window_plan_merges_shared_times_and_checks_its_arguments():
    plan = WindowPlan(4.0, 2.0, 16)
    times = [t for _, t in zip(range(40), plan.all_times())]
    assert times == sorted(times) and len(set(times)) == 40
    assert times[:16] == plan.times(0) and times[16:24] == plan.times(1)[8:]  # hop W/2: half of each window shared
    for bad in [(0, 1, 16), (4, -1, 16), (4, 1, 0), (float("nan"), 1, 16)]:
        with pytest.raises(ValueError):
            WindowPlan(*bad)


def test_window_equals_predict_on_that_window_cut_out(model, long_file, tmp_path):
    path, frames, wave = long_file
    predictor = Predictor(model, device="cpu", batch_size=4, num_workers=0, exit_threshold=None)
    rows = predictor.predict([path], window_s=4.0, hop_s=2.0)
    assert [(r.start_s, r.end_s) for r in rows] == [(0, 4), (2, 6), (4, 8), (6, 10)]
    assert all(r.ok and r.latency_ms >= 0 for r in rows)
    cost = model.cost().total(CONFIG.k)
    glance = next(r.gmacs for r in model.flops_table() if r.name == "visual glance encoder")
    assert rows[0].gflops == pytest.approx(cost)  # the first window computes all its frames' features
    assert rows[1].gflops == pytest.approx(cost - glance * CONFIG.num_frames / 2)  # later ones half
    # the window from 4 to 8 s, cut out (its sound is silent near the cut, where the window's edge frames hear beyond)
    cut = write_video(tmp_path / "cut4.mkv", frames=frames[4 * FPS:8 * FPS], wave=wave[:, 4 * RATE:8 * RATE],
                      seconds=4, **LOSSLESS)
    ref, row = predictor.predict([cut])[0], rows[2]
    assert row.label == ref.label and row.kept_frames == ref.kept_frames
    assert row.score == pytest.approx(ref.score, abs=1e-4)
    torch.testing.assert_close(torch.tensor(row.saliency), torch.tensor(ref.saliency), atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.tensor(row.patch_boxes), torch.tensor(ref.patch_boxes), atol=0.05, rtol=0)
    assert row.frame_times == pytest.approx([t + 4 for t in ref.frame_times], abs=1e-6)


def test_windows_end_inside_the_file_and_one_just_short_of_a_window_is_one_row(model, long_file, tmp_path):
    path, frames, wave = long_file
    predictor = Predictor(model, device="cpu", batch_size=4, num_workers=0, exit_threshold=None)
    # 3.9 s: every sample time of the window 0-4 lies before the last frame's end, yet the window is not in the file
    short = write_video(tmp_path / "short.mkv", frames=frames[:39], wave=wave[:, :39 * RATE // 10], seconds=3.9,
                        **LOSSLESS)
    (whole,) = predictor.predict([short], window_s=4.0)
    assert whole.ok and (whole.start_s, whole.end_s) == (0, 3.9)
    midpoints = [(i + 0.5) * 3.9 / CONFIG.num_frames for i in range(CONFIG.num_frames)]  # predict's sampling
    assert all(min(abs(t - m) for m in midpoints) < 1e-4 for t in whole.frame_times), whole.frame_times
    longer = np.concatenate([frames, frames[:19]])  # 11.9 s: windows 0-4 and 4-8; 8-12 would end past the file
    tail = write_video(tmp_path / "tail.mkv", frames=longer, wave=np.concatenate([wave, wave[:, :19 * RATE // 10]], 1),
                       seconds=11.9, **LOSSLESS)
    assert [(r.start_s, r.end_s) for r in predictor.predict([tail], window_s=4.0)] == [(0, 4), (4, 8)]


def test_segments_with_known_content_are_covered_in_order(tmp_path):
    # five 2-s segments of flat grey, each its own level: every sample shows its segment's level
    levels = [30, 80, 130, 180, 230]
    frames = np.concatenate([np.full((2 * FPS, 48, 64, 3), v, np.uint8) for v in levels])
    path = write_video(tmp_path / "segments.mp4", codec="h264", audio="aac", frames=frames, fps=FPS, seconds=10)
    plan = WindowPlan(2.0, 1.0, CONFIG.num_frames)
    reader = SequentialReader(str(path), DecodeParams.from_config(CONFIG))
    samples = list(reader.samples(plan.all_times()))
    assert reader.info.end_s == pytest.approx(10.0) and reader.info.audio_present
    assert [s.time for s in samples] == sorted(s.time for s in samples) and samples[-1].time < 10
    for s in samples:
        assert abs(float(s.frame.float().mean()) - levels[int(s.time // 2)]) < 4, s.time
    assert reader.stats.video_frames_decoded == 10 * FPS  # one pass, every frame once


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def test_memory_stays_flat_when_the_file_is_ten_times_longer(model, tmp_path):
    # a 2-s file, then the same video 10x longer: the resident memory, read at every row, must not grow with it
    short = write_video(tmp_path / "short.mp4", size=(96, 128), fps=FPS, seconds=2, sample_rate=RATE)
    long = write_video(tmp_path / "long.mp4", size=(96, 128), fps=FPS, seconds=20, sample_rate=RATE)
    predictor = Predictor(model, device="cpu", batch_size=1, num_workers=0)  # every run in batches of one window
    peaks = []
    for path in (short, short, long):  # the first run pays for the one-time set-up
        rss = [_rss_mb() for row in predictor.predict_iter([path], window_s=2.0, hop_s=2.0) if row.ok]
        peaks.append((len(rss), max(rss)))
    (n_short, rss_short), (n_long, rss_long) = peaks[1:]
    assert (n_short, n_long) == (1, 10)
    assert rss_long < rss_short + 10, peaks


def test_predict_cli_writes_window_rows_and_a_timeline(model, long_file, tmp_path, capsys):
    checkpoint = tmp_path / "random.pt"
    save_checkpoint(checkpoint, model, class_names=[f"c{i}" for i in range(CONFIG.num_classes)])
    out, explain = tmp_path / "rows.jsonl", tmp_path / "explain"
    missing = tmp_path / "missing.mp4"
    code = cli_main(["predict", str(long_file[0]), str(missing), "--checkpoint", str(checkpoint), "--device", "cpu",
                     "--window", "4", "--hop", "4", "--jsonl", str(out), "--explain", str(explain)])
    assert code == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["start_s"], r["end_s"]) for r in rows[:2]] == [(0, 4), (4, 8)]
    assert rows[2]["path"] == str(missing) and "file not found" in rows[2]["error"]
    assert {"label", "score", "topk", "frame_times", "patch_boxes", "gflops", "latency_ms"} <= set(rows[0])
    assert [p.name for p in explain.iterdir()] == ["00000_long_timeline.png"]
    assert "0.00s-4.00s" in capsys.readouterr().out
    assert cli_main(["predict", str(long_file[0]), "--checkpoint", str(checkpoint), "--hop", "2"]) == 2
    for ignored in (["--workers", "2"], ["--decode", "dali"]):  # a usage error, not an option silently left unused
        assert cli_main(["predict", str(long_file[0]), "--checkpoint", str(checkpoint), "--device", "cpu",
                         "--window", "4", *ignored]) == 2
    assert "--window does not take --decode dali" in capsys.readouterr().err
    live = tmp_path / "live.jsonl"  # a file is a live source too; rows are appended as they come
    live.write_text('{"earlier": "row"}\n')
    assert cli_main(["stream", str(long_file[0]), "--checkpoint", str(checkpoint), "--device", "cpu", "--window", "5",
                     "--jsonl", str(live), "--option", "probesize=32768"]) == 0
    lines = live.read_text().splitlines()
    assert lines[0] == '{"earlier": "row"}' and [json.loads(x)["end_s"] for x in lines[1:]] == [5, 10]
    assert cli_main(["stream", "x.ts", "--checkpoint", str(checkpoint), "--window", "2", "--option", "bad"]) == 2


def _live_writer(path, seconds: float) -> tuple[subprocess.Popen, list[int]]:
    """``live_media.py`` writing ``path`` in real time, and a list whose last item is how many frames it has written."""
    writer = subprocess.Popen([sys.executable, str(Path(__file__).with_name("live_media.py")), str(path), str(seconds)],
                              stdout=subprocess.PIPE, text=True)
    written = [0]
    threading.Thread(target=lambda: written.extend(int(line) for line in writer.stdout), daemon=True).start()
    return writer, written


FAST_PROBE = {"analyzeduration": "200000", "probesize": "4096"}


def test_live_fifo_gives_a_row_per_hop_while_it_is_written(model, tmp_path):
    fifo = tmp_path / "live.ts"
    os.mkfifo(fifo)
    writer, written = _live_writer(fifo, 4)
    rows, seen = [], []
    for row in avgn_fast.stream(str(fifo), model, window_s=2.0, hop_s=1.0, device="cpu", reconnects=0,
                                options=FAST_PROBE):
        rows.append(row)
        seen.append(written[-1])  # frames written when the row came
    assert writer.wait(timeout=30) == 0
    assert [(r.start_s, r.end_s) for r in rows] == [(0, 2), (1, 3), (2, 4)]
    assert all(r.ok and r.latency_ms is not None and r.latency_ms >= 0 for r in rows)
    assert seen[0] < 4 * FPS  # the first row comes while the writer is still writing
    assert all(n >= r.end_s * FPS - 2 for n, r in zip(seen, rows)), seen  # a row once its window was written


def _free_udp_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_udp_feed_gives_rows_as_it_plays_and_its_silence_ends_it(model):
    url = f"udp://127.0.0.1:{_free_udp_port()}"
    # the reader binds the port as soon as the iteration starts, well within the writer's start-up; what a UDP
    # sender sends before anyone listens is lost, as on a network, so the rows start at its next keyframe
    writer, written = _live_writer(f"{url}?pkt_size=1316", 8)
    rows, seen = [], []
    deadline = time.monotonic() + 60
    try:
        for row in avgn_fast.stream(url, model, window_s=2.0, hop_s=1.0, device="cpu", reconnects=0, timeout=2.0,
                                    input_format="mpegts", options={**FAST_PROBE, "overrun_nonfatal": "1"}):
            rows.append(row)
            seen.append(written[-1])
            assert time.monotonic() < deadline, "the stream did not end when its sender went quiet"
        assert writer.wait(timeout=30) == 0
    finally:
        writer.kill()
    ok = [r for r in rows if r.ok]
    assert len(ok) >= 3 and [r.end_s - r.start_s for r in ok] == [2] * len(ok), [(r.start_s, r.error) for r in rows]
    assert [r.start_s for r in ok] == [ok[0].start_s + i for i in range(len(ok))]  # one row per hop, in order
    assert all(r.latency_ms is not None and r.latency_ms >= 0 for r in ok)
    assert seen[0] < 8 * FPS  # the first row came while the feed was still playing
    # a UDP feed has no end of file: the sender's silence is a stall, the last row, with no reconnect allowed
    assert not rows[-1].ok and "stalled: no data for 2.0 s" in rows[-1].error and rows[-1].path == url


def test_stream_reports_a_failed_source_and_ends(model, tmp_path):
    rows = list(avgn_fast.stream(str(tmp_path / "nothing.ts"), model, window_s=2.0, device="cpu", reconnects=1,
                                 retry_s=0.0))
    assert len(rows) == 2 and all(not r.ok and "cannot open" in r.error for r in rows)


def test_stream_batches_the_windows_of_several_sources(model, tmp_path):
    paths = [str(write_video(tmp_path / f"cam{i}.mp4", fps=FPS, seconds=4, sample_rate=RATE, seed=i)) for i in range(3)]
    rows = list(avgn_fast.stream(paths, model, window_s=2.0, hop_s=2.0, device="cpu", batch_size=6))
    for path in paths:
        assert [(r.start_s, r.end_s) for r in rows if r.path == path] == [(0, 2), (2, 4)]
    assert all(r.ok for r in rows) and len(rows) == 6


def test_a_file_still_being_written_is_followed_with_the_follow_option(model, tmp_path):
    path = tmp_path / "recording.ts"
    path.touch()
    writer, written = _live_writer(path, 3)
    try:
        deadline = time.monotonic() + 20
        while written[-1] < 1 and time.monotonic() < deadline:  # the writer has started
            time.sleep(0.05)
        rows = list(avgn_fast.stream(str(path), model, window_s=1.0, device="cpu", timeout=2.0, reconnects=0,
                                     options={"follow": "1", **FAST_PROBE}))
    finally:
        writer.kill()
        writer.wait()
    assert [(r.start_s, r.end_s) for r in rows if r.ok] == [(0, 1), (1, 2)]  # 2-3 s needs a frame after 2.97 s
    assert "stalled" in rows[-1].error  # FFmpeg waits at the end for more: the writer's silence ends it


def test_closing_the_iteration_stops_a_reader_between_windows(model, tmp_path):
    # a 30-s live source read in 60-s windows never reaches a window, so only the reader itself can notice the stop
    fifo = tmp_path / "long.ts"
    os.mkfifo(fifo)
    writer, written = _live_writer(fifo, 30)
    try:
        rows = avgn_fast.stream([str(tmp_path / "missing.ts"), str(fifo)], model, window_s=60.0, device="cpu",
                                reconnects=0, options=FAST_PROBE)
        assert "cannot open" in next(rows).error
        deadline = time.monotonic() + 20
        while written[-1] < 10 and time.monotonic() < deadline:  # the reader is reading the live source
            time.sleep(0.05)
        rows.close()  # what Ctrl-C does to the loop: the readers stop too
        deadline = time.monotonic() + 5
        while any(t.name.startswith("avgn-live") for t in threading.enumerate()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(t.name.startswith("avgn-live") for t in threading.enumerate())
        assert written[-1] < 20 * FPS  # stopped long before the source's end
    finally:
        writer.kill()
        writer.wait()


_STALLING_SERVER = """
import socket, sys, time
data = open(sys.argv[1], "rb").read()
server = socket.create_server(("127.0.0.1", 0))
print(server.getsockname()[1], flush=True)
for attempt in range(2):  # the first answer stops halfway for 1.5 s, then drops; the second sends it all
    conn, _ = server.accept()
    conn.recv(65536)
    conn.sendall(b"HTTP/1.0 200 OK\\r\\nContent-Type: video/mp2t\\r\\n\\r\\n")
    conn.sendall(data if attempt else data[:len(data) // 376 * 188])
    time.sleep(0 if attempt else 1.5)
    conn.close()
"""


_ENDING_SERVER = """
import socket, sys
data = open(sys.argv[1], "rb").read()
server = socket.create_server(("127.0.0.1", 0))
print(server.getsockname()[1], flush=True)
for attempt in range(int(sys.argv[2])):  # each answer is the whole stream, then the connection closes
    conn, _ = server.accept()
    conn.recv(65536)
    head = f"HTTP/1.0 200 OK\\r\\nContent-Type: video/mp2t\\r\\nContent-Length: {len(data)}\\r\\n\\r\\n"
    conn.sendall(head.encode() + data)  # with its length: a clean end, not a connection cut short
    conn.close()
"""


def test_a_network_source_that_ends_is_reopened_and_windows_renew_the_budget(model, tmp_path):
    import live_media

    source = tmp_path / "source.ts"
    live_media.write_live(str(source), 4, real_time=False)
    server = subprocess.Popen([sys.executable, "-c", _ENDING_SERVER, str(source), "3"], stdout=subprocess.PIPE,
                              text=True)
    try:
        url = f"http://127.0.0.1:{server.stdout.readline().strip()}/live.ts"
        rows = list(avgn_fast.stream(url, model, window_s=2.0, device="cpu", timeout=2.0, reconnects=1, retry_s=0.2))
    finally:
        server.kill()
        server.wait()
    # three connections of two windows, each ended by the server; a fourth is refused, the second failure in a row
    assert [r.ok for r in rows] == [True, True, False] * 3 + [False], [r.error for r in rows]
    assert all("the stream ended" in r.error for r in rows[2:9:3]) and "cannot open" in rows[-1].error


def test_a_stalled_http_source_gives_an_error_row_and_the_stream_goes_on(model, tmp_path):
    import live_media

    source = tmp_path / "source.ts"
    live_media.write_live(str(source), 6, real_time=False)
    server = subprocess.Popen([sys.executable, "-c", _STALLING_SERVER, str(source)], stdout=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{server.stdout.readline().strip()}/live.ts"
        rows = list(avgn_fast.stream(url, model, window_s=2.0, hop_s=1.0, device="cpu", timeout=1.0, reconnects=1,
                                     retry_s=1.0))
    finally:
        server.kill()
    stall = next(i for i, r in enumerate(rows) if not r.ok)
    assert "stalled: no data for 1.0 s" in rows[stall].error and rows[stall].path == url
    assert stall >= 1 and all(r.ok for r in rows[:stall])  # windows before the stall
    after = [r for r in rows[stall + 1:] if r.ok]
    assert len(after) >= 3 and after[0].start_s > rows[stall].start_s  # reconnected; its clock goes on


def test_audio_gaps_are_one_counted_note_and_each_row_gets_only_its_own_notes(model, tmp_path):
    starts = range(0, 12 * RATE, 2400)  # 0.1 s of sound, then 0.05 s of none, for 12 s
    path = write_tone_chunks(tmp_path / "gappy.mkv", 12, starts, rate=RATE, fps=FPS)
    rows = Predictor(model, device="cpu", num_workers=0).predict([path], window_s=4.0)
    assert len(rows) == 3 and all(r.ok for r in rows)
    notes = [n for r in rows for n in r.notes]
    assert notes == [f"audio: {len(starts) - 1} gaps or overlaps in the timestamps, samples placed by time"]


def _peak_bytes(reader: SequentialReader, plan: WindowPlan) -> tuple[int, int]:
    """How many samples ``reader`` gives for ``plan`` and the most bytes held at once meanwhile (numpy's
    allocations, where the sound is kept, are traced)."""
    tracemalloc.start()
    try:
        count = sum(1 for _ in reader.samples(plan.all_times()))
        return count, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_sound_is_not_piled_up_when_the_video_stops_or_no_time_is_asked(tmp_path):
    params = DecodeParams.from_config(CONFIG)
    # 1 s of video, 120 s of sound (7.7 MB at 16 kHz in float32): at most _AUDIO_LAG_S of it is held
    path = write_tone_chunks(tmp_path / "long_sound.mkv", 1, range(0, 120 * RATE, 1600), rate=RATE, fps=FPS)
    reader = SequentialReader(str(path), params)
    count, peak = _peak_bytes(reader, WindowPlan(1.0, 1.0, CONFIG.num_frames))
    assert count == CONFIG.num_frames and peak < 4e6, peak
    assert any("ahead of the video" in n for n in reader.stats.notes)
    # 121 s of both, one 1-s window a minute: the 59 s of sound between windows (3.8 MB) is not kept
    path = write_tone_chunks(tmp_path / "sparse.mkv", 121, range(0, 121 * RATE, 1600), rate=RATE, fps=FPS)
    count, peak = _peak_bytes(SequentialReader(str(path), params), WindowPlan(1.0, 60.0, CONFIG.num_frames))
    assert count == 3 * CONFIG.num_frames and peak < 1.5e6, peak


def test_a_window_that_breaks_the_shared_glance_gets_its_own_row_and_the_others_go_on(model, long_file):
    batch = BatchPredictor(model, device="cpu", exit_threshold=None)
    plan, params = WindowPlan(2.0, 2.0, CONFIG.num_frames), DecodeParams.from_config(CONFIG)

    def first_windows():
        return list(itertools.islice(source_windows(SequentialReader(str(long_file[0]), params), plan), 2))

    good, bad = first_windows()
    # log-mels one step longer than the other window's: the two windows' audio cannot be encoded as one batch
    bad.samples = [dataclasses.replace(s, mel=torch.cat([s.mel, s.mel[:, -1:]], 1)) for s in bad.samples]
    rows = WindowRunner(batch)([good, bad])
    (alone,) = WindowRunner(batch)(first_windows()[:1])
    assert len(rows) == 2 and rows[0].ok and alone.ok
    assert rows[0].label == alone.label and rows[0].score == pytest.approx(alone.score, abs=1e-5)


def test_a_source_whose_sound_stops_goes_on_with_silence(model, tmp_path):
    # 2 s of sound in a 16-s video: samples beyond it are not held back waiting for audio that never comes
    path = write_video(tmp_path / "mute_tail.mp4", fps=FPS, seconds=16, sample_rate=RATE,
                       wave=default_wave(1, 2 * RATE, RATE))
    reader = SequentialReader(str(path), DecodeParams.from_config(CONFIG))
    samples = list(reader.samples(WindowPlan(4.0, 4.0, CONFIG.num_frames).all_times()))
    assert len(samples) == 4 * CONFIG.num_frames and reader.info.audio_present
    assert any("behind the video" in note for note in reader.stats.notes)
    silent = samples[-1].mel
    assert torch.equal(silent, torch.full_like(silent, silent.min().item()))  # log(LOG_EPS) everywhere
    assert samples[0].audio and not samples[-1].audio
    rows = Predictor(model, device="cpu", num_workers=0).predict([path], window_s=4.0)
    assert [r.audio_present for r in rows] == [True, False, False, False]  # as the windows cut out would have
    assert sum("behind the video" in n for r in rows for n in r.notes) == 1  # noted once, on the row it came with
