"""Accuracy-vs-GFLOPs Pareto sweep of a checkpoint and its baselines on a folder dataset.

Runs every inference knob for real (K steps, early-exit thresholds calibrated on the validation
split, other patch / glance sizes where the weights run them) and writes pareto.csv, pareto.json,
pareto.md (frontier marked) and pareto.png to --out.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

# avgn_fast.pareto's defaults, spelled here so that --help does not import torch (tests/test_api.py checks
# that they agree)
KS = (1, 2, 4, 8, 16)
THRESHOLDS = 4
QUICK_THRESHOLDS = 2


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _sizes(text: str):
    if text == "auto":
        return "auto"
    return [] if text == "none" else _ints(text)


def add_arguments(parser) -> None:
    parser.add_argument("--checkpoint", required=True, help="the model's checkpoint (e.g. RUN/best.pt)")
    parser.add_argument("--baseline", action="append", default=[], metavar="CKPT",
                        help="a baseline's checkpoint, swept the same way (repeatable); its method name comes from "
                        "its config switches")
    parser.add_argument("--data", required=True, help="dataset folder holding labels.csv")
    parser.add_argument("--out", required=True, type=Path, help="folder for pareto.csv/.json/.md/.png")
    parser.add_argument("--split", default="test", help="split measured; default: test")
    parser.add_argument("--val-split", default="val",
                        help="split the early-exit thresholds are calibrated on ('none': no thresholds); default: val")
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK_THRESHOLDS} thresholds per checkpoint and no patch / glance sizes")
    parser.add_argument("--ks", default=",".join(map(str, KS)),
                        help="steps K swept (those above a checkpoint's own K are left out); default: 1,2,4,8,16")
    parser.add_argument("--thresholds", type=int, default=THRESHOLDS,
                        help=f"early-exit thresholds per checkpoint; default: {THRESHOLDS}")
    parser.add_argument("--patch-sizes", default="auto",
                        help="patch sizes P swept, e.g. 96,160; 'auto' = P·3/4 and P·5/4, 'none'; default: auto")
    parser.add_argument("--glance-sizes", default="auto",
                        help="glance sizes G swept, e.g. 112; 'auto' = G/2 and G·3/4, 'none'; default: auto")
    parser.add_argument("--batch-size", type=int, default=32, help="videos per batch; default: 32")
    parser.add_argument("--cache-dir", default=None,
                        help="decoded-clip cache; default: the --checkpoint's folder/cache (where train put it), or "
                        "$XDG_CACHE_HOME/avgn_fast/clips when that folder is not writable")
    parser.add_argument("--allow-outside", action="store_true",
                        help="accept labels.csv paths that are absolute or lead outside the dataset folder")
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:N")
    parser.add_argument("--backend", default="eager",
                        help="engine backend: eager, inductor, tensorrt or auto (compiles one engine per setting); "
                        "default: eager")
    parser.add_argument("--precision", default="auto", help="auto (fp16 on CUDA, fp32 on CPU), fp32, fp16, bf16")


def main(checkpoint, data, out, baseline: Sequence[str] = (), split: str = "test", val_split: str | None = "val",
         quick: bool = False, ks: str = ",".join(map(str, KS)), thresholds: int = THRESHOLDS,
         patch_sizes: str = "auto", glance_sizes: str = "auto", batch_size: int = 32, cache_dir=None,
         device: str = "auto", backend: str = "eager", precision: str = "auto", allow_outside: bool = False,
         progress: bool = True) -> int:
    from avgn_fast import pareto

    if batch_size < 1 or thresholds < 0:
        raise ValueError(f"need batch_size ≥ 1 and thresholds ≥ 0; got {batch_size=} {thresholds=}")
    if quick:
        thresholds, patch_sizes, glance_sizes = min(thresholds, pareto.QUICK_THRESHOLDS), "none", "none"
    if cache_dir is None:
        from avgn_fast.data.folder import default_cache_dir

        cache_dir = default_cache_dir(Path(checkpoint).parent / "cache", log=lambda line: print(f"pareto: {line}"))
    result = pareto.sweep([checkpoint, *baseline], data, split=split,
                          val_split=None if val_split == "none" else val_split, cache_dir=cache_dir, ks=_ints(ks),
                          thresholds=thresholds, patch_sizes=_sizes(patch_sizes), glance_sizes=_sizes(glance_sizes),
                          batch_size=batch_size, device=device, backend=backend, precision=precision,
                          allow_outside=allow_outside, progress=progress)
    paths = pareto.write_all(result, out)
    print(pareto.markdown_table(result))
    for note in result.notes:
        print(f"note: {note}")
    print(f"{result.device}, {result.backend} {result.precision}; warm-up {result.warmup_s:.1f} s (not in videos/s)")
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
