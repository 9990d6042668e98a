"""Windows of a long video or a live source: which times each samples, and the windows a stream of samples completes.

A window of ``W`` seconds starting every ``H`` seconds is one AVGN clip: its T frames are sampled at
the midpoints of T equal segments, ``start + (i + 1/2) W / T`` (``common.VideoProbe.sample``'s rule,
so a window samples the same frames as its stretch of the file cut out as its own file; the audio
windows of its edge frames reach beyond it, where they hear the source, not a cut file's silence).
Windows share sample times when ``H`` is a multiple of ``W / T`` (hop = W/2 with T even: each window
shares half its frames with the next), and then share the frame, its log-mel and its glance features.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

from avgn_fast.data.sequential import Sample
from avgn_fast.engine.batch import Prediction

_KEY_PER_S = 1_000_000  # sample times are matched in whole microseconds


def time_key(t: float) -> int:
    """The key of a sample time: windows whose times agree to the microsecond share the sample."""
    return round(t * _KEY_PER_S)


@dataclass(frozen=True)
class WindowPlan:
    """Windows of ``window_s`` every ``hop_s`` seconds, ``num_frames`` sampled in each."""

    window_s: float
    hop_s: float
    num_frames: int

    def __post_init__(self):
        if not (self.window_s > 0 and self.hop_s > 0 and math.isfinite(self.window_s) and math.isfinite(self.hop_s)):
            raise ValueError(f"window and hop must be positive seconds, got {self.window_s=} {self.hop_s=}")
        if self.num_frames < 1:
            raise ValueError(f"num_frames must be positive, got {self.num_frames}")

    def start(self, n: int) -> float:
        return n * self.hop_s

    def times(self, n: int) -> list[float]:
        """The sample times of window ``n`` (seconds after the first frame)."""
        step = self.window_s / self.num_frames
        return [self.start(n) + (i + 0.5) * step for i in range(self.num_frames)]

    def all_times(self) -> Iterator[float]:
        """Every window's sample times, merged: ascending, each shared time once (``time_key``); endless."""
        heap: list[tuple[int, float]] = []
        opened, last = 0, None
        while True:
            while not heap or self.times(opened)[0] <= heap[0][1]:
                for t in self.times(opened):
                    heapq.heappush(heap, (time_key(t), t))
                opened += 1
            key, t = heapq.heappop(heap)
            if key != last:
                last = key
                yield t


@dataclass
class Window:
    """One complete window of a source: its span (seconds, the source's clock) and its T samples; it has audio
    when any of its samples heard some."""

    source: str
    start_s: float
    end_s: float
    samples: list[Sample]
    audio_present: bool
    fps: float
    offset_s: float = 0.0  # the source clock minus the samples' (a live source's reconnection shifts it)
    notes: list[str] = field(default_factory=list)

    @property
    def ready(self) -> float:
        """When its last sample was known (``time.monotonic()``)."""
        return max(s.ready for s in self.samples)


def assemble(samples: Iterator[Sample], plan: WindowPlan, source: str, *, offset_s: float = 0.0,
             fps=lambda: 0.0) -> Iterator[Window]:
    """The windows that ``samples`` (the answers to ``plan.all_times()``, in order) complete, in order.

    Only the samples of windows not yet complete are held: memory is bounded by the window. Times
    are shifted by ``offset_s`` (a live source's reconnection); ``fps`` is read when a window completes.
    """
    held: dict[int, Sample] = {}
    n = 0
    keys = [time_key(t) for t in plan.times(n)]
    for sample in samples:
        held[time_key(sample.time)] = sample
        while keys[-1] in held:  # samples arrive in time order: window n is complete
            start = plan.start(n)
            samples = [held[k] for k in keys]
            yield Window(source, offset_s + start, offset_s + start + plan.window_s, samples,
                         any(s.audio for s in samples), fps(), offset_s)
            n += 1
            keys = [time_key(t) for t in plan.times(n)]
            for k in [k for k in held if k < keys[0]]:
                del held[k]


@dataclass
class WindowPrediction(Prediction):
    """A ``Prediction`` for one window of a long file or a live source.

    ``start_s`` / ``end_s``: the window's span in seconds after the source's first frame (``frame_times``
    are on the same clock); ``latency_ms``: from the moment the window's last sample was decoded to the
    row's creation; ``gflops``: what this window cost, its frames' shared glance features counted once
    over all the windows that hold them.
    """

    start_s: float | None = None
    end_s: float | None = None
    latency_ms: float | None = None
