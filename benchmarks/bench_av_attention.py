"""Benchmark av_attention against eager matmul-softmax-matmul and SDPA on the AESPA shapes (needs a GPU).

    python benchmarks/bench_av_attention.py [--dtypes fp16 bf16] [--shapes 4096x4x49x8x64 ...]

Prints ms, GB/s, TFLOP/s and the % of the bytes floor (q, k, v read and out written once, at the
device copy bandwidth measured in the same run), then the headline ratios against the targets.
``gpu_check(copy_gbps)`` is the part that ``benchmarks/gpu_check.py`` runs: correctness on the GPU
(fp32/fp16/bf16, masks, strides, the op, torch.compile) and a benchmark subset of at most ``BENCH_BUDGET_S`` (45 s).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.testing

# benchmarks/ is on sys.path, run as a script or imported by gpu_check
from gpu_check import bootstrap, measure_copy_gbps, run_checks

bootstrap()  # avgn_fast.kernels from the source tree when the package is not installed
from avgn_fast.kernels.av_attention import av_attention, av_attention_ref  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tolerances import tol  # noqa: E402  (the one tolerance table lives beside the tests)

# (B, H, Lq, Lk, D): AESPA visual->audio, its reverse (the spatial map), square, and a longer query
SHAPES = [(4096, 4, 49, 8, 64), (4096, 4, 8, 49, 64), (4096, 4, 49, 49, 64), (1024, 8, 196, 16, 64)]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PROVIDERS = ("ours", "eager", "sdpa")
TARGET_SPEEDUP = 1.5  # over the faster of eager and SDPA, every shape
TARGET_FLOOR_PCT = 70.0  # of the bytes floor, first shape
BENCH_BUDGET_S = 45.0
BENCH_DTYPES = ("fp16", "bf16")  # gpu_check's order: fp16 on every shape first
DEVICE = "cuda"


def eager_attention(q, k, v, scale):
    """What a user writes, all in the input dtype (the fp32-upcasting reference would flatter the kernel)."""
    return torch.matmul(torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * scale, dim=-1), v)


def sdpa_attention(q, k, v, scale):
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def attention_bytes(b, h, lq, lk, d, dtype) -> int:
    """The floor: q, k, v read once and out written once."""
    return (2 * b * h * lq * d + 2 * b * h * lk * d) * dtype.itemsize


def attention_flops(b, h, lq, lk, d) -> int:
    """Two matmuls of B·H·Lq·Lk·D multiply-adds each."""
    return 2 * 2 * b * h * lq * lk * d


def _inputs(shape, dtype, seed=0):
    b, h, lq, lk, d = shape
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    return tuple(torch.randn(b, h, n, d, device=DEVICE, dtype=dtype, generator=g) for n in (lq, lk, lk))


def bench_row(shape, dtype_name, provider, copy_gbps) -> dict:
    dtype = DTYPES[dtype_name]
    q, k, v = _inputs(shape, dtype)
    scale = shape[-1] ** -0.5
    fn = {
        "ours": lambda: av_attention(q, k, v, scale=scale),
        "eager": lambda: eager_attention(q, k, v, scale),
        "sdpa": lambda: sdpa_attention(q, k, v, scale),
    }[provider]
    ms = triton.testing.do_bench(fn, return_mode="median")
    gbps = attention_bytes(*shape, dtype) / ms / 1e6
    return {
        "op": "av_attention",
        "shape": "x".join(map(str, shape)),
        "dtype": dtype_name,
        "provider": provider,
        "ms": ms,
        "gbps": gbps,
        "tflops": attention_flops(*shape) / ms / 1e9,
        "pct_floor": 100.0 * gbps / copy_gbps,
    }


def headline(rows) -> list[tuple[str, str]]:
    """Per (shape, dtype): ours against the faster baseline, and the first shape's % of the bytes floor."""
    by_key = {(r["shape"], r["dtype"], r["provider"]): r for r in rows}
    summary, speedups = [], []
    for shape, dtype_name in dict.fromkeys((r["shape"], r["dtype"]) for r in rows):
        ours = by_key.get((shape, dtype_name, "ours"))
        base = [by_key[(shape, dtype_name, p)]["ms"] for p in ("eager", "sdpa") if (shape, dtype_name, p) in by_key]
        if ours is None or not base:
            continue
        speedup = min(base) / ours["ms"]
        speedups.append(speedup)
        summary.append((f"av_attention {shape} {dtype_name}",
                        f"{ours['ms']:.4f} ms, {ours['gbps']:.0f} GB/s, {ours['pct_floor']:.0f}% of floor, "
                        f"{speedup:.2f}x the faster of eager/SDPA ({min(base):.4f} ms)"))
    if speedups:
        met = "met" if min(speedups) >= TARGET_SPEEDUP else "NOT met"
        summary.append(("av_attention min speedup vs faster of eager/SDPA",
                        f"{min(speedups):.2f}x (target >= {TARGET_SPEEDUP}x: {met})"))
    first = by_key.get(("x".join(map(str, SHAPES[0])), "fp16", "ours"))
    if first is not None:
        met = "met" if first["pct_floor"] >= TARGET_FLOOR_PCT else "NOT met"
        summary.append((f"av_attention % of bytes floor at {first['shape']} fp16",
                        f"{first['pct_floor']:.0f}% (target >= {TARGET_FLOOR_PCT:.0f}%: {met})"))
    return summary


def target_checks(rows) -> dict[str, tuple[bool, str]]:
    """The issue's targets as checks: every timed (shape, dtype) >= 1.5x the faster baseline; the first shape's
    fp16 row >= 70 % of the bytes floor."""
    by_key = {(r["shape"], r["dtype"], r["provider"]): r for r in rows}
    speedups = {}
    for shape, dtype_name in dict.fromkeys((r["shape"], r["dtype"]) for r in rows):
        base = [by_key[(shape, dtype_name, p)]["ms"] for p in ("eager", "sdpa") if (shape, dtype_name, p) in by_key]
        if (shape, dtype_name, "ours") in by_key and base:
            speedups[f"{shape} {dtype_name}"] = min(base) / by_key[(shape, dtype_name, "ours")]["ms"]
    checks = {}
    if speedups:
        worst = min(speedups, key=speedups.get)
        checks[f"av_attention >= {TARGET_SPEEDUP}x the faster of eager/SDPA on every timed shape"] = (
            speedups[worst] >= TARGET_SPEEDUP, f"lowest {speedups[worst]:.2f}x at {worst}")
    first = by_key.get(("x".join(map(str, SHAPES[0])), "fp16", "ours"))
    if first is not None:
        checks[f"av_attention {first['shape']} fp16 >= {TARGET_FLOOR_PCT:.0f}% of the bytes floor"] = (
            first["pct_floor"] >= TARGET_FLOOR_PCT, f"{first['pct_floor']:.0f}%")
    return checks


# ---- correctness on the GPU


def _eager_masked(q, k, v, mask, scale):
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if mask is not None:
        s = s.masked_fill(mask[:, None, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return torch.matmul(p, v), p


def _within_torch_error(got, ref64, eager, dtype) -> tuple[bool, str]:
    """STYLE 7: error vs fp64 at most twice PyTorch's own same-dtype error, plus the table's atol."""
    err = (got.double() - ref64).abs().max().item()
    bound = 2 * (eager.double() - ref64).abs().max().item() + tol(dtype)["atol"]
    return err <= bound and not got.isnan().any().item(), f"err {err:.2e} <= {bound:.2e}"


def _check_case(shape, dtype, mask_mode, strided) -> tuple[bool, str]:
    b, h, lq, lk, d = shape
    g = torch.Generator(device=DEVICE).manual_seed(1)
    if strided:  # head-transposed views of (B, L, H, D) projections
        q, k, v = (torch.randn(b, n, h, d, device=DEVICE, dtype=dtype, generator=g).transpose(1, 2)
                   for n in (lq, lk, lk))
    else:
        q, k, v = _inputs(shape, dtype, seed=1)
    mask = None
    if mask_mode is not None:
        mask = torch.rand(b, lk, device=DEVICE, generator=g) < 0.4
        if mask_mode == "prefix":  # all but the last 3 keys: with Lk > 128 the first key block is empty
            mask[:] = True
            mask[:, -3:] = False
        mask[0] = True  # fully masked rows
    out, w = av_attention(q, k, v, key_padding_mask=mask, return_weights=True)
    ref, ref_w = av_attention_ref(q.double(), k.double(), v.double(), key_padding_mask=mask, return_weights=True)
    eager, eager_w = _eager_masked(q, k, v, mask, d**-0.5)
    ok_out, msg_out = _within_torch_error(out, ref, eager, dtype)
    ok_w, msg_w = _within_torch_error(w, ref_w, eager_w, dtype)
    empty_ok = mask is None or bool((out[0] == 0).all() and (w[0] == 0).all())
    return ok_out and ok_w and empty_ok, f"out {msg_out}; weights {msg_w}; empty rows zero: {empty_ok}"


CHECK_CASES = [
    # (shape, dtype, mask mode, strided)
    ((64, 4, 49, 8, 64), torch.float16, "random", False),
    ((64, 4, 8, 49, 64), torch.bfloat16, "random", True),
    ((32, 4, 49, 49, 64), torch.float32, None, True),
    ((16, 8, 196, 16, 32), torch.bfloat16, None, False),
    ((8, 2, 33, 150, 128), torch.float32, "prefix", False),
    ((4, 2, 1024, 256, 16), torch.float16, "random", True),
    ((3, 1, 1, 1, 128), torch.bfloat16, None, False),
]


def _op_inputs():
    q, k, v = _inputs((8, 4, 49, 8, 64), torch.float16, seed=2)
    mask = torch.rand(8, 8, device=DEVICE) < 0.3
    mask[0] = True
    return q, k, v, mask


def _attend(q, k, v, mask):
    out, w = torch.ops.avgn_fast.av_attention(q, k, v, mask, None, True)
    return out + 1, w


def _check_op_matches_launcher() -> tuple[bool, str]:
    q, k, v, mask = _op_inputs()
    want = av_attention(q, k, v, key_padding_mask=mask, return_weights=True)
    got = torch.ops.avgn_fast.av_attention(q, k, v, mask, None, True)
    return all(torch.allclose(a, b, **tol(torch.float16)) for a, b in zip(got, want)), "fp16 tol"


def _check_opcheck() -> tuple[bool, str]:
    torch.library.opcheck(torch.ops.avgn_fast.av_attention.default, (*_op_inputs(), None, True))
    return True, "schema, autograd registration, fake tensor, aot dispatch"


def _check_compile() -> tuple[bool, str]:
    args = _op_inputs()
    start = time.perf_counter()
    got = torch.compile(_attend, fullgraph=True)(*args)
    seconds = time.perf_counter() - start
    ok = all(torch.allclose(a, b, **tol(torch.float16)) for a, b in zip(got, _attend(*args)))
    return ok, f"fullgraph vs eager op, fp16 tol, compiled in {seconds:.1f} s"


def correctness_checks() -> dict[str, tuple[bool, str]]:
    """Name -> (passed, detail), through ``gpu_check.run_checks``."""
    checks = {}
    for shape, dtype, mask_mode, strided in CHECK_CASES:
        checks[f"av_attention {'x'.join(map(str, shape))} {str(dtype).split('.')[-1]} mask={mask_mode} "
               f"strided={strided}"] = functools.partial(_check_case, shape, dtype, mask_mode, strided)
    checks["av_attention op matches launcher"] = _check_op_matches_launcher
    checks["av_attention opcheck on CUDA"] = _check_opcheck
    checks["av_attention torch.compile"] = _check_compile
    return run_checks(checks)


def gpu_check(copy_gbps: float) -> dict:
    """GPU correctness checks, then the benchmark subset (fp16 on every shape first, then bf16) for at most
    ``BENCH_BUDGET_S``."""
    checks = correctness_checks()
    rows, skipped = [], []
    deadline = time.perf_counter() + BENCH_BUDGET_S
    for dtype_name in BENCH_DTYPES:
        for shape in SHAPES:
            if time.perf_counter() > deadline:
                skipped.append(f"{'x'.join(map(str, shape))} {dtype_name}")
                continue
            rows += [bench_row(shape, dtype_name, p, copy_gbps) for p in PROVIDERS]
    checks.update(target_checks(rows))
    summary = [(name, f"{'ok' if ok else 'FAILED'}: {detail}") for name, (ok, detail) in checks.items()]
    summary += headline(rows)
    if skipped:
        summary.append((f"av_attention benchmark skipped ({BENCH_BUDGET_S:.0f} s budget)", ", ".join(skipped)))
    return {"checks": {name: ok for name, (ok, _) in checks.items()}, "rows": rows, "summary": summary}


def main(dtypes=("fp16", "bf16"), shapes=tuple(SHAPES)) -> list[dict]:
    props = torch.cuda.get_device_properties(0)
    print(f"# {props.name}, torch {torch.__version__}, triton {triton.__version__}, {datetime.date.today()}")
    copy_gbps = measure_copy_gbps(DEVICE)
    print(f"# device copy: {copy_gbps:.0f} GB/s; bytes = (2·B·H·Lq·D + 2·B·H·Lk·D)·itemsize")
    print(f"{'shape':>20} {'dtype':>5} {'provider':>8} {'ms':>8} {'GB/s':>7} {'TFLOP/s':>8} {'% floor':>8}")
    rows = []
    for dtype_name in dtypes:
        for shape in shapes:
            for provider in PROVIDERS:
                r = bench_row(shape, dtype_name, provider, copy_gbps)
                rows.append(r)
                print(f"{r['shape']:>20} {r['dtype']:>5} {r['provider']:>8} {r['ms']:8.4f} {r['gbps']:7.0f} "
                      f"{r['tflops']:8.2f} {r['pct_floor']:7.1f}%")
    for label, value in headline(rows):
        print(f"{label}: {value}")
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", nargs="+", default=["fp16", "bf16"], choices=sorted(DTYPES),
                        help="input dtypes to time")
    parser.add_argument("--shapes", nargs="+", default=None, metavar="BxHxLqxLkxD",
                        help="shapes to time (default: the AESPA set)")
    args = parser.parse_args()
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes] if args.shapes else SHAPES
    main(dtypes=args.dtypes, shapes=shapes)
