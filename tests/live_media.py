"""A live source for tests: MPEG-TS written at real-time pace
(``python tests/live_media.py OUT SECONDS [FORMAT [PAUSE_AT_S PAUSE_S]]``).

Each frame and its audio are muxed and flushed when their time comes, so a reader of ``OUT`` (a FIFO,
a growing file) sees the stream arrive as a camera's would; the number of frames written so far is
printed after each one, so a test can tell what the reader could have seen. Video: a gradient with a moving square at
10 fps in MPEG-4 Part 2 (no B-frames, no look-ahead, so a frame leaves the encoder at once); audio: two
tones in MP2 at 16 kHz. Only PyAV and numpy are imported, so the writer starts within a second.
"""

from __future__ import annotations

import sys
import time
from fractions import Fraction

import av
import numpy as np

FPS, SAMPLE_RATE, SIZE = 10, 16000, (48, 64)


def write_live(path: str, seconds: float, *, real_time: bool = True, on_frame=None, fmt: str = "mpegts",
               pause: tuple[float, float] | None = None) -> None:
    """Encode ``seconds`` of video and audio into ``path`` as MPEG-TS (or ``fmt``, e.g. ``"rtsp"``: published to
    an RTSP listener), each frame muxed at its wall-clock time (``real_time``), or all at once; ``on_frame(n)``
    after the n-th frame and its sound are written; ``pause`` = (at_s, for_s): the writer goes quiet for
    ``for_s`` seconds of wall time after the frames of the first ``at_s`` seconds, as a stalled camera would."""
    n = round(seconds * FPS)
    h, w = SIZE
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([255 * yy / (h - 1), 255 * xx / (w - 1), np.full((h, w), 128.0)], -1).astype(np.uint8)
    t = np.arange(round(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    wave = (0.25 * np.sin(2 * np.pi * 440 * t) + 0.15 * np.sin(2 * np.pi * 1250 * t)).astype(np.float32)
    per_frame = SAMPLE_RATE // FPS
    container = av.open(path, "w", format=fmt, container_options={"flush_packets": "1"} if fmt == "mpegts" else {})
    try:
        video = container.add_stream("mpeg4", rate=FPS)
        video.width, video.height, video.pix_fmt = SIZE[1], SIZE[0], "yuv420p"
        video.codec_context.gop_size = FPS
        audio = container.add_stream("mp2", rate=SAMPLE_RATE, layout="mono")
        start = time.monotonic()
        for i in range(n):
            if pause is not None and i == round(pause[0] * FPS):
                time.sleep(pause[1])
                start += pause[1]
            if real_time:
                time.sleep(max(start + i / FPS - time.monotonic(), 0))
            image = base.copy()
            image[(3 * i) % (h - 12):(3 * i) % (h - 12) + 12, (5 * i) % (w - 12):(5 * i) % (w - 12) + 12] = 250
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, FPS)
            chunk = av.AudioFrame.from_ndarray(wave[i * per_frame:(i + 1) * per_frame].reshape(1, -1), format="flt",
                                               layout="mono")
            chunk.sample_rate, chunk.pts = SAMPLE_RATE, i * per_frame
            container.mux(video.encode(frame))
            container.mux(audio.encode(chunk))
            if on_frame is not None:
                on_frame(i + 1)
        container.mux(video.encode(None))
        container.mux(audio.encode(None))
    finally:
        container.close()


if __name__ == "__main__":
    write_live(sys.argv[1], float(sys.argv[2]), on_frame=lambda n: print(n, flush=True),
               fmt=sys.argv[3] if len(sys.argv) > 3 else "mpegts",
               pause=(float(sys.argv[4]), float(sys.argv[5])) if len(sys.argv) > 5 else None)
