"""Live sources as they play: FIFOs (one that stalls), UDP, RTSP (published to us, or read from a server), a file
being written, HTTP servers that end or stall."""

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from media import write_video
from random_models import random_model

import avgn_fast
from avgn_fast.config import AVGNConfig

CONFIG = AVGNConfig.from_name("tiny")
FPS, RATE = 10, CONFIG.sample_rate


@pytest.fixture(scope="module")
def model():
    return random_model(CONFIG, seed=3)


def _live_writer(path, seconds: float, fmt: str = "mpegts", pause: tuple[float, float] | None = None
                 ) -> tuple[subprocess.Popen, list[int]]:
    """``live_media.py`` writing ``path`` in real time (quiet for ``pause[1]`` s after ``pause[0]`` s of it), and a list
    whose last item is how many frames it has written."""
    writer = subprocess.Popen([sys.executable, str(Path(__file__).with_name("live_media.py")), str(path), str(seconds),
                               fmt, *(str(x) for x in pause or ())], stdout=subprocess.PIPE, text=True)
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


def test_a_stalled_fifo_gives_an_error_row_and_its_windows_go_on(model, tmp_path):
    fifo = tmp_path / "stalling.ts"
    os.mkfifo(fifo)
    writer, written = _live_writer(fifo, 5, pause=(2.5, 2.5))  # quiet for 2.5 s after 2.5 s of stream
    rows, seen = [], []
    for row in avgn_fast.stream(str(fifo), model, window_s=2.0, hop_s=1.0, device="cpu", timeout=1.0, reconnects=0,
                                options=FAST_PROBE):
        rows.append(row)
        seen.append(written[-1])
    assert writer.wait(timeout=30) == 0
    errors = [i for i, r in enumerate(rows) if not r.ok]
    assert len(errors) == 1, [r.error for r in rows]  # one row for the one stall
    stall = rows[errors[0]]
    assert "stalled: no data for 1.0 s" in stall.error and stall.path == str(fifo)
    assert 25 <= seen[errors[0]] <= 30  # reported while the writer was quiet, after its first 2.5 s
    # the same reading goes on: every window of the 5 s of stream, in stream time, none lost or repeated
    assert [(r.start_s, r.end_s) for r in rows if r.ok] == [(0, 2), (1, 3), (2, 4), (3, 5)]


def _free_port(kind: int) -> int:
    """A local port free for ``kind`` (socket.SOCK_DGRAM or SOCK_STREAM) when asked."""
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_udp_feed_gives_rows_as_it_plays_and_its_silence_ends_it(model):
    url = f"udp://127.0.0.1:{_free_port(socket.SOCK_DGRAM)}"
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


def _listening(port: int) -> bool:
    """Whether a TCP socket listens on ``port`` (Linux: /proc/net/tcp, state 0A), without connecting to it."""
    with open("/proc/net/tcp") as f:
        return any(line.split()[1].endswith(f":{port:04X}") and line.split()[3] == "0A" for line in list(f)[1:])


def test_an_rtsp_feed_gives_rows_as_it_plays_and_its_end_is_a_row(model):
    port = _free_port(socket.SOCK_STREAM)
    url = f"rtsp://127.0.0.1:{port}/live"
    writers = []

    def publish():  # a camera publishing to us: FFmpeg's RTSP demuxer listens (rtsp_flags=listen), the writer connects
        deadline = time.monotonic() + 30
        while not _listening(port) and time.monotonic() < deadline:
            time.sleep(0.05)
        writers.append(_live_writer(url, 6, fmt="rtsp"))

    threading.Thread(target=publish, daemon=True).start()
    rows, seen = [], []
    deadline = time.monotonic() + 60
    try:
        for row in avgn_fast.stream(url, model, window_s=2.0, hop_s=1.0, device="cpu", reconnects=0, timeout=10.0,
                                    options={"rtsp_flags": "listen", "listen_timeout": "30", **FAST_PROBE}):
            rows.append(row)
            seen.append(writers[0][1][-1] if writers else 0)
            assert time.monotonic() < deadline, "the stream did not end with its publisher"
        assert writers and writers[0][0].wait(timeout=30) == 0
    finally:
        for writer, _ in writers:
            writer.kill()
    _assert_rtsp_rows(rows, seen, url)


def _assert_rtsp_rows(rows, seen, url) -> None:
    """A 6-s RTSP camera read with W = 2 s, H = 1 s: rows (0,2)…(3,5) with latencies, the first while the camera
    was still playing (``seen``: frames written when each row came), and its end one error row."""
    ok = [r for r in rows if r.ok]
    assert [(r.start_s, r.end_s) for r in ok[:4]] == [(0, 2), (1, 3), (2, 4), (3, 5)], [(r.start_s, r.error)
                                                                                      for r in rows]
    assert all(r.latency_ms is not None and r.latency_ms >= 0 for r in ok)
    assert seen[0] < 6 * FPS  # the first row came while the camera was still playing
    # the camera's end closes the session: for a network source that is one error row (then, here, the end)
    assert not rows[-1].ok and "the stream ended" in rows[-1].error and rows[-1].path == url


def test_an_rtsp_server_gives_rows_as_it_plays_and_its_end_is_a_row(model, tmp_path):
    # a camera serving RTSP (``rtsp_server.py``: DESCRIBE, SETUP over TCP, PLAY of MPEG-TS over RTP), read as a client
    fifo = tmp_path / "camera.ts"
    os.mkfifo(fifo)
    server = subprocess.Popen([sys.executable, str(Path(__file__).with_name("rtsp_server.py")), str(fifo)],
                              stdout=subprocess.PIPE, text=True)
    writer, written = _live_writer(fifo, 6)
    try:
        url = f"rtsp://127.0.0.1:{server.stdout.readline().strip()}/live"
        rows, seen = [], []
        for row in avgn_fast.stream(url, model, window_s=2.0, hop_s=1.0, device="cpu", reconnects=0, timeout=10.0,
                                    options={"rtsp_transport": "tcp", **FAST_PROBE}):
            rows.append(row)
            seen.append(written[-1])
        assert writer.wait(timeout=30) == 0 and server.wait(timeout=30) == 0
    finally:
        writer.kill()
        server.kill()
    _assert_rtsp_rows(rows, seen, url)
    assert all(n >= r.end_s * FPS - 2 for n, r in zip(seen, rows) if r.ok)  # a row once its window had played


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
