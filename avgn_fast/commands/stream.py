"""Classify a live source as it plays: one row per hop, as soon as its window is complete.

SOURCE is anything FFmpeg opens live: a FIFO, rtsp://, udp://, http://, /dev/video0, or a file still
being written, with --option follow=1 (several sources are classified together, their windows batched on
one model). Each row is printed (and appended to --jsonl) with its window's start and end on the
source's clock and its latency_ms, from the window's last decoded sample to the row. A stall or a
dropped connection is an error row, then the source is opened again (up to --reconnects failures in a
row); the command ends when every source has ended, or cleanly on Ctrl-C.
"""

from __future__ import annotations

from avgn_fast.commands.options import add_engine_arguments, add_inference_arguments


def add_arguments(p) -> None:
    p.add_argument("sources", nargs="+", metavar="SOURCE", help="live sources: FIFO, file (being written: add "
                                                               "--option follow=1), rtsp://, udp://, http://, "
                                                               "/dev/video0 (several are batched together)")
    p.add_argument("--checkpoint", required=True,
                   help="checkpoint file written by `avgn-fast train`, or a folder written by `avgn-fast export`")
    p.add_argument("--window", type=float, required=True, metavar="SECONDS", help="window length in seconds")
    p.add_argument("--hop", type=float, default=None, metavar="SECONDS",
                   help="seconds between window starts (default: the window, no overlap)")
    p.add_argument("--jsonl", default=None, help="append one JSON object per row to this file as rows come")
    p.add_argument("--topk", type=int, default=5, help="how many classes to list per window (default 5)")
    p.add_argument("--batch-size", type=int, default=8, help="most windows per model batch, across sources (default 8)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="an FFmpeg input option for every source, e.g. rtsp_transport=tcp, analyzeduration=500000; "
                        "repeatable")
    p.add_argument("--format", dest="input_format", default=None,
                   help="force the demuxer, e.g. mpegts, v4l2 (default: probed)")
    p.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS",
                   help="longest wait for data before a source counts as stalled: a network source is then "
                        "reopened, a FIFO or device gets an error row and is read on (default 10)")
    p.add_argument("--reconnects", type=int, default=3,
                   help="failures in a row after which a source is given up; a window read starts the count afresh")
    add_engine_arguments(p)
    add_inference_arguments(p)


def main(sources, checkpoint, window, hop=None, jsonl=None, topk=5, batch_size=8, option=(), input_format=None,
         timeout=10.0, reconnects=3, device="auto", precision="auto", backend="eager", k=None,
         exit_threshold="checkpoint") -> int:
    """Follow ``sources`` until they end; returns 1 when every row was an error, else 0."""
    from avgn_fast.commands.predict import write_rows
    from avgn_fast.config import parse_exit_threshold
    from avgn_fast.engine.live import stream

    if isinstance(exit_threshold, str):
        exit_threshold = parse_exit_threshold(exit_threshold, "--exit-threshold")
    options = parse_options(option)
    rows = stream(sources, checkpoint, window_s=window, hop_s=hop, device=device, precision=precision,
                  batch_size=batch_size, topk=topk, k=k, exit_threshold=exit_threshold, backend=backend,
                  options=options, timeout=timeout, reconnects=reconnects, input_format=input_format)
    return write_rows(rows, jsonl, append=True)


def parse_options(pairs) -> dict[str, str]:
    """``["k=v", ...]`` → ``{"k": "v"}``; ValueError for a pair without ``=``."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--option {pair!r}: expected KEY=VALUE")
        out[key] = value
    return out
