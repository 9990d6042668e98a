"""Classify video files or folders with a trained checkpoint: labels, scores, where the model looked, GFLOPs."""

from __future__ import annotations

import contextlib
import os
import secrets
import sys
from pathlib import Path


def add_arguments(p) -> None:
    p.add_argument("paths", nargs="+", metavar="PATH_OR_DIR", help="video files, or folders searched recursively")
    p.add_argument("--checkpoint", required=True, help="checkpoint file written by `avgn-fast train`")
    p.add_argument("--jsonl", default=None,
                   help="write one JSON object per input, in input order, to this file (replaced at the end; never "
                        "one of the inputs)")
    p.add_argument("--topk", type=int, default=5, help="how many classes to list per video (default 5)")
    p.add_argument("--explain", default=None, metavar="DIR",
                   help="write one PNG per video: kept frames with their patch boxes and the saliency timeline "
                        "(refused if a PNG of the same name exists)")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:N")
    p.add_argument("--precision", default="auto", help="auto (fp16 on CUDA, fp32 on CPU), fp32, fp16, bf16")
    p.add_argument("--backend", default="eager",
                   help="eager (default), inductor (torch.compile), tensorrt, or auto (TensorRT, else inductor on "
                        "CUDA, else eager)")
    p.add_argument("--devices", default=None, metavar="LIST",
                   help="shard over one worker process per device, e.g. 0,1 or cpu,cpu (overrides --device)")
    p.add_argument("--decode", default="auto", help="decode backend: auto (DALI with a GPU), pyav, dali")
    p.add_argument("--batch-size", type=int, default=16, help="videos per model batch (default 16)")
    p.add_argument("--workers", type=int, default=None, help="background decode workers (default: one per core)")
    p.add_argument("--max-pixels", type=int, default=None, metavar="N",
                   help="refuse videos whose frames have more than N pixels, read from the header before decoding "
                        "(default 67,108,864 = 8192x8192)")
    p.add_argument("--keyframes-only", action="store_true",
                   help="fast mode for long files: show the model the keyframe nearest to each sampled time and "
                        "decode keyframes only (frames differ from the default sampling)")
    p.add_argument("--k", type=int, default=None, help="frames to look at closely (default: the checkpoint's)")
    p.add_argument("--exit-threshold", type=float, default=None,
                   help="early-exit confidence threshold (default: the checkpoint's)")


def main(paths, checkpoint, jsonl=None, topk=5, explain=None, device="auto", precision="auto", decode="auto",
         batch_size=16, workers=None, k=None, exit_threshold=None, backend="eager", devices=None,
         max_pixels=None, keyframes_only=False) -> int:
    """Classify ``paths``; returns 1 when every input failed, else 0.

    Outputs are checked before the model loads (``check_outputs``). JSONL rows go to a temporary file
    beside ``jsonl``, flushed per row and renamed onto it at the end, also when the run stops early
    (Ctrl-C, an error): ``jsonl`` then holds the whole rows written so far, never a partial one.
    """
    from tqdm import tqdm

    from avgn_fast.engine.predictor import Predictor, expand_inputs

    inputs = expand_inputs(paths)
    if not inputs:
        raise ValueError(f"no video files found in {', '.join(map(str, paths))}")
    check_outputs(inputs, jsonl, explain)
    predictor = Predictor(checkpoint, device=device, precision=precision, decode_backend=decode,
                          batch_size=batch_size, num_workers=workers, topk=topk, k=k, exit_threshold=exit_threshold,
                          backend=backend, devices=devices, max_pixels=max_pixels, keyframes_only=keyframes_only)
    done = failed = 0
    try:
        with LineWriter(jsonl) if jsonl else contextlib.nullcontext() as out:
            bar = tqdm(predictor.predict_iter(inputs, explain_dir=explain), total=len(inputs), unit="video",
                       desc="predict", file=sys.stderr)
            for pred in bar:
                if out:
                    out.write(pred.to_json())
                done += 1
                if pred.ok:
                    bar.write(f"{pred.path}\t{pred.label}\t{pred.score:.3f}\tsteps {pred.exit_step + 1}\t"
                              f"{pred.gflops:.3f} GFLOPs")
                else:
                    failed += 1
                    bar.write(f"{pred.path}\tERROR\t{pred.error}")
    finally:
        print(f"{done - failed} of {len(inputs)} videos classified, {failed} failed"
              + (f", stopped after {done}" if done < len(inputs) else "")
              + (f"; results in {jsonl}" if jsonl else "") + (f"; explanations in {explain}" if explain else ""),
              file=sys.stderr)
    return 1 if failed == len(inputs) else 0


def check_outputs(inputs: list[str], jsonl: str | None, explain: str | None) -> None:
    """Raise ValueError, before anything is written, for outputs that would overwrite an input or a file.

    ``jsonl`` may replace an existing file unless it is one of ``inputs`` (through symlinks or hard links)
    or a directory. ``explain`` must be a folder or not exist, and none of the PNGs it would get may exist
    already or name an input or ``jsonl``.
    """
    from avgn_fast.engine.explain import explanation_path

    if jsonl is not None:
        if os.path.isdir(jsonl):
            raise ValueError(f"--jsonl {jsonl} is a directory; name a file")
        clash = next((p for p in inputs if _same_file(p, jsonl)), None)
        if clash is not None:
            raise ValueError(f"--jsonl {jsonl} is the input {clash}; refusing to overwrite it")
        if not os.path.isdir(os.path.dirname(os.path.abspath(jsonl))):
            raise ValueError(f"--jsonl {jsonl}: folder {os.path.dirname(os.path.abspath(jsonl))} does not exist")
    if explain is not None:
        if os.path.lexists(explain) and not os.path.isdir(explain):
            raise ValueError(f"--explain {explain} is an existing file, not a folder")
        taken = {os.path.realpath(p) for p in [*inputs, *([jsonl] if jsonl else [])]}
        pngs = (explanation_path(explain, p, i) for i, p in enumerate(inputs))
        clash = [str(png) for png in pngs if os.path.lexists(png) or os.path.realpath(png) in taken]
        if clash:
            raise ValueError(f"--explain {explain}: {len(clash)} explanation file(s) would overwrite existing "
                             f"files, e.g. {clash[0]}; choose a new or empty folder")


def _same_file(a, b) -> bool:
    """True when ``a`` and ``b`` name one file: the same path after symlinks, or the same inode (hard links)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist
        return False


class LineWriter:
    """Lines to a temporary file beside ``path``, flushed one by one, renamed onto ``path`` on exit.

    ``path`` is untouched until the rename, which happens however the ``with`` block ends, so it only
    ever holds whole lines.
    """

    def __init__(self, path):
        self.path = Path(path)
        # a short name of its own: a long ``path`` name plus a suffix could exceed the file system's limit
        self.tmp = self.path.with_name(f".avgn-fast-{os.getpid()}-{secrets.token_hex(4)}.tmp")

    def __enter__(self) -> LineWriter:
        self.file = open(self.tmp, "x", encoding="utf-8")
        return self

    def write(self, line: str) -> None:
        self.file.write(line + "\n")
        self.file.flush()

    def __exit__(self, *exc) -> None:
        self.file.close()
        os.replace(self.tmp, self.path)
