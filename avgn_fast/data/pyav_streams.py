"""Reading one stream of an open PyAV container: demux, the video probe, packets and frames from a timestamp.

A ``PacketReader`` serves packets either from lists demuxed once into memory (small files) or by
seeking the container. Demuxers seek on presentation (mp4, mkv) or decode (MPEG-TS) timestamps, so
a seek that lands past its target or on a non-keyframe is done again on the keyframe's decode
timestamp; a seek the container refuses (AVI below 0) is done again from the stream's start.
"""

from __future__ import annotations

import itertools

from avgn_fast.data.common import DecodeError, DecodeStats, VideoProbe

_DEFAULT_FRAME_S = 0.04  # duration of a lone frame whose container gives none
_INDEX_CHECK_PACKETS = 16  # packets demuxed to check that the index places them where it says


def demux_all(container, streams) -> dict[int, list]:
    """Every packet of ``streams`` in file order, by stream index; a corrupt tail ends the lists early."""
    import av

    out = {s.index: [] for s in streams}
    packets = container.demux(streams)
    while True:
        try:
            packet = next(packets)
        except StopIteration:
            break
        except av.FFmpegError:  # truncated or corrupt tail: keep what demuxed before it
            break
        out[packet.stream.index].append(packet)
    return out


def probe_video(container, path, packets: list | None = None) -> VideoProbe:
    """Timestamps and keyframes of the best video stream: from ``packets`` when given, else by demuxing it."""
    stream = container.streams.best("video")
    if stream is None:
        raise DecodeError(path, "no video stream")
    if packets is None:
        indexed = probe_from_index(container, stream)
        if indexed is not None:
            return indexed
        packets = demux_all(container, [stream])[stream.index]
    stamps, keys = set(), {}
    last = 0  # duration of the last packet in decode order: the last sample's duration in mp4/mkv/webm/avi
    for packet in packets:
        ts = timestamp(packet)
        if ts is None:
            continue
        stamps.add(ts)
        last = packet.duration or 0
        if packet.is_keyframe:
            keys.setdefault(ts, packet.dts if packet.dts is not None else ts)
    if not stamps or stream.time_base is None:
        raise DecodeError(path, "video stream has no frames")
    pts = sorted(stamps)
    tb = stream.time_base
    if last <= 0:
        last = pts[-1] - pts[-2] if len(pts) > 1 else max(round(_DEFAULT_FRAME_S / tb), 1)
    end = pts[-1] + last
    rate = float(stream.average_rate) if stream.average_rate else len(pts) / float((end - pts[0]) * tb)
    keyframes = sorted(keys)
    return VideoProbe(codec=stream.codec_context.name, pts=pts, keyframes=keyframes,
                      key_dts=[keys[k] for k in keyframes], time_base=tb, end=end, fps=rate,
                      has_audio=container.streams.best("audio") is not None)


def probe_from_index(container, stream, check: int = _INDEX_CHECK_PACKETS) -> VideoProbe | None:
    """The probe read from the container's index instead of a demux pass over the whole file, where that
    index is exact: one entry per frame (mp4, mov, AVI), evenly spaced (constant frame rate), and the first
    ``check`` packets where it puts them; else None (mkv/webm cues list keyframes only, MPEG-TS has none).

    The index holds decode timestamps; with a constant frame rate the presentation timestamps are the
    same set shifted by the first packet's reorder delay, and so are the keyframes'.
    """
    entries = stream.index_entries
    n = len(entries)
    if n < 2 or n != stream.frames or stream.time_base is None:
        return None
    dts = [e.timestamp for e in entries]
    step = dts[1] - dts[0]
    if step <= 0 or any(b - a != step for a, b in itertools.pairwise(dts)):
        return None
    first = list(itertools.islice((p for p in container.demux(stream) if p.size), min(check, n)))
    if not first or first[0].pts is None or first[0].dts != dts[0]:
        return None
    shift = first[0].pts - first[0].dts
    pts = [d + shift for d in dts]
    if any(p.dts != d or p.pts is None or (p.pts - pts[0]) % step for p, d in zip(first, dts)):
        return None
    keys = [(d + shift, d) for d, e in zip(dts, entries) if e.is_keyframe] or [(pts[0], dts[0])]
    return VideoProbe(codec=stream.codec_context.name, pts=pts, keyframes=[k for k, _ in keys],
                      key_dts=[d for _, d in keys], time_base=stream.time_base, end=pts[-1] + step,
                      fps=float(stream.average_rate) if stream.average_rate else 1 / float(step * stream.time_base),
                      has_audio=container.streams.best("audio") is not None)


class PacketReader:
    """Packets of a stream from a timestamp on: from the in-memory lists when the file was read whole,
    else by seeking the container."""

    def __init__(self, container, packets: dict[int, list] | None, stats: DecodeStats):
        self.container, self.packets, self.stats = container, packets, stats

    def packets_from(self, stream, ts: int, dts: int | None = None):
        """The stream's packets from the last keyframe at or before presentation time ``ts`` (the first if none).

        Seeking: demuxers seek on presentation (mp4, mkv) or decode (MPEG-TS) timestamps, so a seek
        that lands past ``ts`` or on a non-keyframe is done again with the keyframe's ``dts``; a seek
        the container refuses (AVI below 0) is done again from the stream's start.
        """
        stream.codec_context.flush_buffers()
        if self.packets is not None:
            packets = self.packets[stream.index]
            starts = [i for i, p in enumerate(packets) if p.is_keyframe and (timestamp(p) or 0) <= ts
                      and timestamp(p) is not None]
            return iter(packets[starts[-1] if starts else 0:])
        self._seek(stream, ts)
        packets = self.container.demux(stream)
        first = _next_packet(packets)
        landed = None if first is None else timestamp(first)
        overshot = first is not None and (not first.is_keyframe or (landed is not None and landed > ts))
        if overshot and dts is not None and dts != ts:
            self._seek(stream, dts)
            packets = self.container.demux(stream)
            first = _next_packet(packets)
        return iter(()) if first is None else itertools.chain([first], packets)

    def _seek(self, stream, ts: int) -> None:
        import av

        self.stats.seeks += 1
        start = stream.start_time if stream.start_time is not None else 0
        for target in dict.fromkeys((ts, max(ts, start), max(ts, 0), 0)):
            try:
                self.container.seek(target, stream=stream, backward=True)
                return
            except av.FFmpegError as e:  # e.g. AVI refuses a seek below 0 with EPERM
                error = e
        raise error

    def frames(self, stream, ts: int, dts: int | None = None, keep: set[int] | None = None):
        """Decoded, timestamped frames of ``stream`` from the keyframe at or before ``ts`` on (``packets_from``);
        packets the decoder rejects are skipped and the decoder is drained at the end of the stream.

        With ``keep`` (timestamps, as ``timestamp`` reads them), a packet whose frame is not kept is decoded
        only if other frames refer to it: the decoder skips non-reference frames there (H.264's and
        MPEG-4's B-frames), which never change another frame, so the kept frames come out the same.
        """
        import av

        packets = self.packets_from(stream, ts, dts)
        codec = stream.codec_context
        skipping = False
        if keep is not None:
            codec.skip_frame = "DEFAULT"  # a restart may find it skipping
        while True:
            try:
                packet = next(packets)
            except (StopIteration, av.FFmpegError) as e:  # the end, or a corrupt tail: drain what is buffered
                self.stats.packets_dropped += isinstance(e, av.FFmpegError)
                packet = None
            if packet is not None and packet.size == 0:  # the demuxer's end-of-stream marker
                packet = None
            stamp = None if packet is None else timestamp(packet)
            # a packet without a timestamp (a picture's second field) keeps the state of the one before it
            if keep is not None and stamp is not None and (stamp not in keep) != skipping:
                skipping = not skipping
                codec.skip_frame = "NONREF" if skipping else "DEFAULT"
            try:
                frames = codec.decode(packet)
            except av.FFmpegError:
                self.stats.packets_dropped += packet is not None
                frames = []
            yield from (frame for frame in frames if timestamp(frame) is not None)
            if packet is None:
                return


def timestamp(item) -> int | None:
    return item.pts if item.pts is not None else item.dts


def _next_packet(packets):
    """The next packet of a demux iterator, or None at its end or at a corrupt tail."""
    import av

    try:
        return next(packets)
    except (StopIteration, av.FFmpegError):
        return None
