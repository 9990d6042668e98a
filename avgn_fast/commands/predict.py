"""Classify video files or folders with a trained checkpoint: labels, scores, where the model looked, GFLOPs."""

from __future__ import annotations

import sys


def add_arguments(p) -> None:
    p.add_argument("paths", nargs="+", metavar="PATH_OR_DIR", help="video files, or folders searched recursively")
    p.add_argument("--checkpoint", required=True, help="checkpoint file written by `avgn-fast train`")
    p.add_argument("--jsonl", default=None, help="write one JSON object per input, in input order, to this file")
    p.add_argument("--topk", type=int, default=5, help="how many classes to list per video (default 5)")
    p.add_argument("--explain", default=None, metavar="DIR",
                   help="write one PNG per video: kept frames with their patch boxes and the saliency timeline")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:N")
    p.add_argument("--precision", default="auto", help="auto (fp16 on CUDA, fp32 on CPU), fp32, fp16, bf16")
    p.add_argument("--backend", default="eager",
                   help="eager (default), inductor (torch.compile), tensorrt, or auto (TensorRT, else inductor on "
                        "CUDA, else eager)")
    p.add_argument("--devices", default=None, metavar="LIST",
                   help="shard over one worker process per device, e.g. 0,1 or cpu,cpu (overrides --device)")
    p.add_argument("--decode", default="auto", help="decode backend: auto (DALI with a GPU), pyav, dali")
    p.add_argument("--batch-size", type=int, default=16, help="videos per model batch (default 16)")
    p.add_argument("--workers", type=int, default=2, help="background decode workers (default 2)")
    p.add_argument("--k", type=int, default=None, help="frames to look at closely (default: the checkpoint's)")
    p.add_argument("--exit-threshold", type=float, default=None,
                   help="early-exit confidence threshold (default: the checkpoint's)")


def main(paths, checkpoint, jsonl=None, topk=5, explain=None, device="auto", precision="auto", decode="auto",
         batch_size=16, workers=2, k=None, exit_threshold=None, backend="eager", devices=None) -> int:
    from tqdm import tqdm

    from avgn_fast.engine.predictor import Predictor, expand_inputs

    inputs = expand_inputs(paths)
    if not inputs:
        raise ValueError(f"no video files found in {', '.join(map(str, paths))}")
    predictor = Predictor(checkpoint, device=device, precision=precision, decode_backend=decode,
                          batch_size=batch_size, num_workers=workers, topk=topk, k=k, exit_threshold=exit_threshold,
                          backend=backend, devices=devices)
    out = open(jsonl, "w") if jsonl else None
    failed = 0
    try:
        bar = tqdm(predictor.predict_iter(inputs, explain_dir=explain), total=len(inputs), unit="video",
                   desc="predict", file=sys.stderr)
        for pred in bar:
            if out:
                out.write(pred.to_json() + "\n")
            if pred.ok:
                bar.write(f"{pred.path}\t{pred.label}\t{pred.score:.3f}\tsteps {pred.exit_step + 1}\t"
                          f"{pred.gflops:.3f} GFLOPs")
            else:
                failed += 1
                bar.write(f"{pred.path}\tERROR\t{pred.error}")
    finally:
        if out:
            out.close()
    print(f"{len(inputs) - failed} of {len(inputs)} videos classified, {failed} failed"
          + (f"; results in {jsonl}" if jsonl else "") + (f"; explanations in {explain}" if explain else ""),
          file=sys.stderr)
    return 1 if failed == len(inputs) else 0
