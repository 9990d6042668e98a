"""A live source for tests: MPEG-TS written at real-time pace (``python tests/live_media.py OUT SECONDS``).

Each frame and its audio are muxed and flushed when their time comes, so a reader of ``OUT`` (a FIFO,
a growing file) sees the stream arrive as a camera's would. Video: ``media.default_frames`` at 10 fps
in MPEG-4 Part 2 (no B-frames, no look-ahead, so a frame leaves the encoder at once); audio: MP2 at 16 kHz.
"""

from __future__ import annotations

import sys
import time
from fractions import Fraction

import av
from media import default_frames, default_wave

FPS, SAMPLE_RATE, SIZE = 10, 16000, (48, 64)


def write_live(path: str, seconds: float, *, real_time: bool = True) -> None:
    """Encode ``seconds`` of video and audio into ``path`` as MPEG-TS, each frame muxed at its wall-clock time
    (``real_time``), or all at once."""
    n = round(seconds * FPS)
    frames = default_frames(n, SIZE)
    wave = default_wave(1, round(seconds * SAMPLE_RATE), SAMPLE_RATE)[0]
    per_frame = SAMPLE_RATE // FPS
    container = av.open(path, "w", format="mpegts", container_options={"flush_packets": "1"})
    try:
        video = container.add_stream("mpeg4", rate=FPS)
        video.width, video.height, video.pix_fmt = SIZE[1], SIZE[0], "yuv420p"
        video.codec_context.gop_size = FPS
        audio = container.add_stream("mp2", rate=SAMPLE_RATE, layout="mono")
        start = time.monotonic()
        for i in range(n):
            if real_time:
                time.sleep(max(start + i / FPS - time.monotonic(), 0))
            frame = av.VideoFrame.from_ndarray(frames[i], format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, FPS)
            chunk = av.AudioFrame.from_ndarray(wave[i * per_frame:(i + 1) * per_frame].reshape(1, -1), format="flt",
                                               layout="mono")
            chunk.sample_rate, chunk.pts = SAMPLE_RATE, i * per_frame
            container.mux(video.encode(frame))
            container.mux(audio.encode(chunk))
        container.mux(video.encode(None))
        container.mux(audio.encode(None))
    finally:
        container.close()


if __name__ == "__main__":
    write_live(sys.argv[1], float(sys.argv[2]))
