"""Benchmark crop_patches against roi_align, grid_sample, gather indexing and a slice loop (needs a GPU).

    python benchmarks/bench_crop_patches.py [--n 512 2048] [--p 96 128 160] [--dtypes fp16 uint8]

Patches of P x P from 3 x 224 x 224 frames, centres drawn as AdaFocusV2 draws them (patch inside
the frame, sub-pixel corner), fp16 output. Prints ms, GB/s (patch read + patch written) and the %
of the device copy bandwidth measured in the same run, then the headline ratios against the target.
``gpu_check(copy_gbps)`` is the part that ``benchmarks/gpu_check.py`` runs: correctness on the GPU
(fp32/fp16/bf16/uint8, index, normalize, layouts, integral corners, the op, torch.compile) and a
benchmark subset of at most ``BENCH_BUDGET_S`` (45 s).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import itertools
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.testing

# benchmarks/ is on sys.path, run as a script or imported by gpu_check
from gpu_check import bootstrap, measure_copy_gbps, run_checks

bootstrap()  # avgn_fast.kernels from the source tree when the package is not installed
from avgn_fast.kernels.crop_patches import crop_patches, crop_patches_ref  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tolerances import tol  # noqa: E402  (the one tolerance table lives beside the tests)

try:
    from torchvision.ops import roi_align
except ImportError:  # torchvision is optional: the roi_align rows are left out without it
    roi_align = None

DEVICE = "cuda"
FRAME = (3, 224, 224)  # C, S, S: full-resolution kept frames
DTYPES = {"fp16": torch.float16, "uint8": torch.uint8}
OUT_DTYPE = torch.float16  # the local encoder runs in fp16
# ImageNet statistics, in [0, 255] for uint8 frames and in [0, 1] for float frames
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
TARGET_PCT_COPY = 80.0  # at N=2048, P=128, fp16
TARGET_VS_ROI_ALIGN = 10.0
SLICE_LOOP_MAX_N = 512  # a Python loop per patch: slow, timed on small N only
BENCH_BUDGET_S = 45.0


@dataclass(frozen=True)
class Case:
    n: int  # patches
    p: int  # patch side
    dtype: str  # input dtype name
    index: bool  # patches cut from a gathered subset of 2N frames (the top-K frames)
    normalize: bool  # (x - mean) / std fused
    channels_last: bool = False  # NHWC frames in, NHWC patches out (decoder and local-encoder layouts)

    def label(self) -> str:
        flags = [f for f, on in (("index", self.index), ("norm", self.normalize), ("nhwc", self.channels_last)) if on]
        return f"N={self.n} P={self.p} {self.dtype}" + (f" +{'+'.join(flags)}" if flags else "")


def patch_bytes(case: Case) -> int:
    """Patch read (input dtype) + patch written (fp16): the bytes a perfect crop moves."""
    c = FRAME[0]
    return case.n * c * case.p * case.p * (DTYPES[case.dtype].itemsize + OUT_DTYPE.itemsize)


@functools.lru_cache(maxsize=1)
def make_inputs(case: Case) -> dict:
    c, s, _ = FRAME
    dtype = DTYPES[case.dtype]
    g = torch.Generator(device=DEVICE).manual_seed(0)
    n_src = 2 * case.n if case.index else case.n
    if dtype == torch.uint8:
        images = torch.randint(0, 256, (n_src, c, s, s), generator=g, device=DEVICE, dtype=torch.uint8)
    else:
        images = torch.randn(n_src, c, s, s, generator=g, device=DEVICE).to(dtype)
    if case.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    index = torch.randperm(n_src, generator=g, device=DEVICE)[: case.n] if case.index else None
    # AdaFocusV2: corner = a * (S - P), a uniform in [0, 1]^2
    centers = torch.rand(case.n, 2, generator=g, device=DEVICE) * (s - case.p) + case.p / 2
    scale = 255.0 if dtype == torch.uint8 else 1.0
    mean = torch.tensor(MEAN, device=DEVICE) * scale if case.normalize else None
    std = torch.tensor(STD, device=DEVICE) * scale if case.normalize else None
    return {"images": images, "centers": centers, "size": case.p, "index": index, "mean": mean, "std": std,
            "out_dtype": OUT_DTYPE, "channels_last": case.channels_last}


def _finish(out, mean, std, out_dtype, channels_last):
    """What the baselines do after sampling: normalize, cast, lay out."""
    if mean is not None:
        out = (out - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    return out.to(out_dtype).contiguous(memory_format=memory_format)


def crop_grid_sample(images, centers, size, index, mean, std, out_dtype, channels_last):
    """AdaFocusV2's crop: gather the kept frames, affine grid from the centres, F.grid_sample."""
    src = images if index is None else images[index]
    if not src.is_floating_point():
        src = src.to(out_dtype)
    n, c, h, w = src.shape
    cy, cx = centers.unbind(1)
    theta = torch.zeros(n, 2, 3, device=src.device, dtype=torch.float32)
    theta[:, 0, 0] = size / w
    theta[:, 0, 2] = 2 * cx / w - 1
    theta[:, 1, 1] = size / h
    theta[:, 1, 2] = 2 * cy / h - 1
    grid = F.affine_grid(theta, [n, c, size, size], align_corners=False).to(src.dtype)
    out = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return _finish(out, mean, std, out_dtype, channels_last)


def crop_roi_align(images, centers, size, index, mean, std, out_dtype, channels_last):
    """torchvision roi_align, one sample per bin, aligned: bin j samples x1 + j, the same points."""
    src = images if images.is_floating_point() else images.to(out_dtype)
    batch = index if index is not None else torch.arange(centers.shape[0], device=centers.device)
    cy, cx = centers.unbind(1)
    half = size / 2
    boxes = torch.stack([batch.to(cx.dtype), cx - half, cy - half, cx + half, cy + half], dim=1).to(src.dtype)
    out = roi_align(src, boxes, (size, size), spatial_scale=1.0, sampling_ratio=1, aligned=True)
    return _finish(out, mean, std, out_dtype, channels_last)


def crop_slice_loop(images, centers, size, index, mean, std, out_dtype, channels_last):
    """A Python loop of slices at the rounded corners (kept inside the frame): nearest, not bilinear."""
    _, _, h, w = images.shape
    corner = (centers - size / 2).round().long()
    ys = corner[:, 0].clamp(0, h - size).tolist()
    xs = corner[:, 1].clamp(0, w - size).tolist()
    src = range(len(ys)) if index is None else index.tolist()
    out = torch.stack([images[i, :, y : y + size, x : x + size] for i, y, x in zip(src, ys, xs)])
    return _finish(out.float() if mean is not None else out, mean, std, out_dtype, channels_last)


PROVIDERS = {
    "ours": lambda **kw: crop_patches(kw.pop("images"), kw.pop("centers"), kw.pop("size"), **kw),
    "roi_align": lambda **kw: crop_roi_align(**kw),
    "grid_sample": lambda **kw: crop_grid_sample(**kw),
    "torch_gather": lambda **kw: crop_patches_ref(kw.pop("images"), kw.pop("centers"), kw.pop("size"), **kw),
    "slice_loop": lambda **kw: crop_slice_loop(**kw),
}


def providers_for(case: Case) -> list[str]:
    names = ["ours", "grid_sample", "torch_gather"]
    if roi_align is not None:
        names.insert(1, "roi_align")
    if case.n <= SLICE_LOOP_MAX_N:
        names.append("slice_loop")
    return names


def bench_row(case: Case, provider: str, copy_gbps: float) -> dict:
    inputs = make_inputs(case)
    fn = functools.partial(PROVIDERS[provider], **inputs)
    ms = triton.testing.do_bench(fn, return_mode="median")
    gbps = patch_bytes(case) / ms / 1e6
    return {"op": "crop_patches", "case": case.label(), "n": case.n, "p": case.p, "dtype": case.dtype,
            "index": case.index, "normalize": case.normalize, "channels_last": case.channels_last,
            "out_dtype": "fp16", "provider": provider, "ms": ms, "gbps": gbps, "pct_copy": 100.0 * gbps / copy_gbps}


HEADLINE = Case(2048, 128, "fp16", index=False, normalize=False)
PIPELINE = Case(2048, 128, "uint8", index=True, normalize=True, channels_last=True)


def headline(rows) -> list[tuple[str, str]]:
    """Ours per case, its ratio to the baselines, and the headline case against the targets."""
    by_key = {(r["case"], r["provider"]): r for r in rows}
    summary = []
    for label in dict.fromkeys(r["case"] for r in rows):
        ours = by_key.get((label, "ours"))
        if ours is None:
            continue
        ratios = ", ".join(f"{by_key[(label, p)]['ms'] / ours['ms']:.1f}x {p}" for p in PROVIDERS
                           if p != "ours" and (label, p) in by_key)
        summary.append((f"crop_patches {label}", f"{ours['ms']:.3f} ms, {ours['gbps']:.0f} GB/s, "
                        f"{ours['pct_copy']:.0f}% of copy" + (f"; {ratios}" if ratios else "")))
    ours = by_key.get((HEADLINE.label(), "ours"))
    if ours is not None:
        met = "met" if ours["pct_copy"] >= TARGET_PCT_COPY else "NOT met"
        summary.append((f"crop_patches % of copy at {HEADLINE.label()}",
                        f"{ours['pct_copy']:.0f}% (target >= {TARGET_PCT_COPY:.0f}%: {met})"))
        roi = by_key.get((HEADLINE.label(), "roi_align"))
        if roi is not None:
            speedup = roi["ms"] / ours["ms"]
            met = "met" if speedup >= TARGET_VS_ROI_ALIGN else "NOT met"
            summary.append((f"crop_patches vs roi_align at {HEADLINE.label()}",
                            f"{speedup:.1f}x (target >= {TARGET_VS_ROI_ALIGN:.0f}x: {met})"))
    return summary


# ---- correctness on the GPU


CHECK_FRAMES = (6, 3, 61, 70)  # N_src, C, H, W: odd sizes
CHECK_SIZE = (37, 53)  # ph, pw: odd, non-square, more than one tile in both directions


def _check_inputs(dtype, layout, seed=1):
    """Small frames, 2·N_src patches with centres in and beyond the borders, every third corner integral."""
    n_src, c, h, w = CHECK_FRAMES
    ph, pw = CHECK_SIZE
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    if dtype == torch.uint8:
        images = torch.randint(0, 256, (n_src, c, h, w), generator=g, device=DEVICE, dtype=torch.uint8)
    else:
        images = torch.randn(n_src, c, h, w, generator=g, device=DEVICE).to(dtype)
    if layout == "channels_last":
        images = images.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        big = torch.zeros(2 * n_src, c, h + 2, 2 * w, device=DEVICE, dtype=dtype)
        big[::2, :, 1 : h + 1, ::2] = images
        images = big[::2, :, 1 : h + 1, ::2]
    n = 2 * n_src
    low = torch.tensor([-ph / 2, -pw / 2], device=DEVICE)
    span = torch.tensor([h + ph, w + pw], device=DEVICE, dtype=torch.float32)
    centers = torch.rand(n, 2, generator=g, device=DEVICE) * span + low
    centers[::3] = centers[::3].round() + torch.tensor([ph / 2 % 1, pw / 2 % 1], device=DEVICE)
    index = torch.randint(0, n_src, (n,), generator=g, device=DEVICE)
    return images, centers, index


def _check_case(dtype, layout, use_index, normalize, channels_last, out_dtype) -> tuple[bool, str]:
    images, centers, index = _check_inputs(dtype, layout)
    if not use_index:
        centers = centers[: images.shape[0]]
    scale = 255.0 if dtype == torch.uint8 else 1.0
    kwargs = {"index": index if use_index else None, "out_dtype": out_dtype, "channels_last": channels_last,
              "mean": torch.tensor(MEAN, device=DEVICE) * scale if normalize else None,
              "std": torch.tensor(STD, device=DEVICE) * scale if normalize else None}
    resolved = out_dtype or (dtype if dtype.is_floating_point else torch.float32)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    poisoned = torch.full((centers.shape[0], images.shape[1], *CHECK_SIZE), float("nan"), device=DEVICE,
                          dtype=resolved).contiguous(memory_format=memory_format)
    out = crop_patches(images, centers, CHECK_SIZE, out=poisoned, **kwargs)
    ref = crop_patches_ref(images, centers, CHECK_SIZE, **kwargs)
    err = (out.double() - ref.double()).abs().max().item()
    ok = torch.allclose(out, ref, **tol(resolved)) and out.is_contiguous(memory_format=memory_format)
    return ok, f"max abs err vs reference {err:.2e} ({resolved} tolerance)"


def _check_integral_is_exact() -> tuple[bool, str]:
    images, _, _ = _check_inputs(torch.float16, "contiguous")
    n_src, _, h, w = images.shape
    ph, pw = CHECK_SIZE
    corners = torch.tensor([[0, 0], [h - ph, w - pw], [-3, w - 10], [h - 11, -7], [h // 3, w // 4]], device=DEVICE)
    index = torch.arange(len(corners), device=DEVICE).flip(0) % n_src
    padded = F.pad(images, (pw, pw, ph, ph))
    want = torch.stack([padded[i, :, y + ph : y + 2 * ph, x + pw : x + 2 * pw]
                        for i, (y, x) in zip(index.tolist(), corners.tolist())])
    centers = corners.float() + torch.tensor([ph / 2, pw / 2], device=DEVICE)
    got = crop_patches(images, centers, CHECK_SIZE, index=index)
    return torch.equal(got, want), "fp16, bitwise equal to the zero-padded slices"


def _op_inputs():
    images, centers, index = _check_inputs(torch.uint8, "channels_last")
    return images, centers, index, torch.tensor(MEAN, device=DEVICE) * 255, torch.tensor(STD, device=DEVICE) * 255


def _crop_op(images, centers, index, mean, std):
    ph, pw = CHECK_SIZE
    return torch.ops.avgn_fast.crop_patches(images, centers, ph, pw, index, mean, std, torch.float16, True) * 2


def _check_op_matches_launcher() -> tuple[bool, str]:
    images, centers, index, mean, std = _op_inputs()
    want = crop_patches(images, centers, CHECK_SIZE, index=index, mean=mean, std=std, out_dtype=torch.float16,
                        channels_last=True) * 2
    return torch.equal(_crop_op(images, centers, index, mean, std), want), "bitwise"


def _check_compile() -> tuple[bool, str]:
    args = _op_inputs()
    start = time.perf_counter()
    got = torch.compile(_crop_op, fullgraph=True)(*args)
    seconds = time.perf_counter() - start
    return torch.allclose(got, _crop_op(*args), **tol(torch.float16)), f"fullgraph vs eager op, {seconds:.1f} s"


def _check_bad_index_raises() -> tuple[bool, str]:
    images, centers, index = _check_inputs(torch.float16, "contiguous")
    try:
        crop_patches(images, centers, CHECK_SIZE, index=index + images.shape[0])
    except ValueError as e:
        return str(e).startswith("index"), str(e)
    return False, "no ValueError"


CHECK_CASES = [
    # (dtype, layout, index, normalize, channels_last out, out_dtype)
    (torch.float32, "contiguous", False, False, False, None),
    (torch.float16, "strided", True, False, False, None),
    (torch.bfloat16, "channels_last", False, True, True, None),
    (torch.uint8, "channels_last", True, True, True, torch.float16),
    (torch.uint8, "contiguous", False, True, False, None),
]


def correctness_checks() -> dict[str, tuple[bool, str]]:
    """Name -> (passed, detail), through ``gpu_check.run_checks``."""
    checks = {}
    for dtype, layout, use_index, normalize, channels_last, out_dtype in CHECK_CASES:
        name = (f"crop_patches {str(dtype).split('.')[-1]} {layout} index={use_index} normalize={normalize} "
                f"nhwc_out={channels_last}")
        checks[name] = functools.partial(_check_case, dtype, layout, use_index, normalize, channels_last, out_dtype)
    checks["crop_patches integral corners exact"] = _check_integral_is_exact
    checks["crop_patches bad index raises"] = _check_bad_index_raises
    checks["crop_patches op matches launcher"] = _check_op_matches_launcher
    checks["crop_patches torch.compile"] = _check_compile
    return run_checks(checks)


def gpu_check(copy_gbps: float) -> dict:
    """GPU correctness checks, then the headline and pipeline cases against every baseline (<= ``BENCH_BUDGET_S``)."""
    checks = correctness_checks()
    rows, skipped = [], []
    deadline = time.perf_counter() + BENCH_BUDGET_S
    for case in (HEADLINE, PIPELINE):
        for provider in providers_for(case):
            if time.perf_counter() > deadline:
                skipped.append(f"{case.label()} {provider}")
                continue
            rows.append(bench_row(case, provider, copy_gbps))
    make_inputs.cache_clear()
    by_key = {(r["case"], r["provider"]): r for r in rows}
    ours = by_key.get((HEADLINE.label(), "ours"))
    if ours is not None:
        checks[f"crop_patches {HEADLINE.label()} >= {TARGET_PCT_COPY:.0f}% of copy"] = (
            ours["pct_copy"] >= TARGET_PCT_COPY, f"{ours['pct_copy']:.0f}% of {copy_gbps:.0f} GB/s")
        roi = by_key.get((HEADLINE.label(), "roi_align"))
        if roi is not None:
            checks[f"crop_patches {HEADLINE.label()} >= {TARGET_VS_ROI_ALIGN:.0f}x roi_align"] = (
                roi["ms"] >= TARGET_VS_ROI_ALIGN * ours["ms"], f"{roi['ms'] / ours['ms']:.1f}x")
    summary = [(name, f"{'ok' if ok else 'FAILED'}: {detail}") for name, (ok, detail) in checks.items()]
    summary += headline(rows)
    if skipped:
        summary.append((f"crop_patches benchmark skipped ({BENCH_BUDGET_S:.0f} s budget)", ", ".join(skipped)))
    return {"checks": {name: ok for name, (ok, _) in checks.items()}, "rows": rows, "summary": summary}


def main(ns=(512, 2048), ps=(96, 128, 160), dtypes=("fp16", "uint8")) -> list[dict]:
    props = torch.cuda.get_device_properties(0)
    print(f"# {props.name}, torch {torch.__version__}, triton {triton.__version__}, {datetime.date.today()}")
    copy_gbps = measure_copy_gbps(DEVICE)
    print(f"# device copy: {copy_gbps:.0f} GB/s; frames {FRAME}; fp16 out; "
          f"bytes = N·C·P²·(in itemsize + out itemsize); roi_align: {'yes' if roi_align else 'torchvision missing'}")
    print(f"{'case':>36} {'provider':>12} {'ms':>8} {'GB/s':>7} {'% copy':>7}")
    cases = [Case(*c) for c in itertools.product(ns, ps, dtypes, (False, True), (False, True))] + [PIPELINE]
    rows = []
    for case in cases:
        for provider in providers_for(case):
            r = bench_row(case, provider, copy_gbps)
            rows.append(r)
            print(f"{r['case']:>36} {r['provider']:>12} {r['ms']:8.3f} {r['gbps']:7.0f} {r['pct_copy']:6.1f}%",
                  flush=True)
    for label, value in headline(rows):
        print(f"{label}: {value}")
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", nargs="+", type=int, default=[512, 2048], help="patch counts N to time")
    parser.add_argument("--p", nargs="+", type=int, default=[96, 128, 160], help="patch sides P to time")
    parser.add_argument("--dtypes", nargs="+", default=["fp16", "uint8"], choices=sorted(DTYPES),
                        help="frame dtypes to time")
    args = parser.parse_args()
    main(ns=args.n, ps=args.p, dtypes=args.dtypes)
