"""End-to-end AVGN throughput on the GPU: eager vs inductor (vs TensorRT), and vs the dense baseline (needs a GPU).

    python benchmarks/bench_e2e.py [--batch 64] [--glance-sizes 112 96]

Paper configuration (random weights), fp16, decoded clips already on the GPU, ``GlanceEngine``
without an exit threshold (every video takes all K steps). Prints videos/s (median batch time of
``triton.testing.do_bench``), compile time apart, and the ratios against eager fp16 and against
the dense baseline (ResNet-50 on all 16 frames at 224, eager fp16, the issue's baseline) measured
in the same run; then AVGN at smaller glance resolutions. Targets (H100): the fastest backend
≥ 2× eager fp16 and ≥ 2,300 videos/s; some configuration ≥ 4× the dense baseline.
``gpu_check(copy_gbps)`` is what ``benchmarks/gpu_check.py`` runs (``BUDGET_S``, 120 s, compiles included:
rows that would start after it are skipped).
"""

from __future__ import annotations

import argparse
import datetime
import time

import torch
import triton
import triton.testing
from gpu_check import bootstrap  # benchmarks/ is on sys.path, run as a script or imported by gpu_check

bootstrap()  # avgn_fast.kernels from the source tree when the package is not installed
from avgn_fast.config import AVGNConfig  # noqa: E402
from avgn_fast.engine.backends import tensorrt_missing  # noqa: E402
from avgn_fast.engine.early_exit import GlanceEngine  # noqa: E402
from avgn_fast.engine.profile import dense_baseline  # noqa: E402
from avgn_fast.engine.stages import random_inputs  # noqa: E402
from avgn_fast.models.avgn import AVGN  # noqa: E402

DEVICE = torch.device("cuda")
CONFIG = "paper"
PRECISION = "fp16"
BATCH = 64
GLANCE_SIZES = (112, 96)
BUDGET_S = 120.0  # compiles included: the later rows reuse inductor's caches for the shared stages
TARGET_VS_EAGER = 2.0
TARGET_VIDEOS_PER_S = 2300.0
TARGET_VS_DENSE = 4.0


def compiled_backends() -> list[str]:
    return ["inductor"] + (["tensorrt"] if tensorrt_missing(DEVICE) is None else [])


def bench_row(model: AVGN, backend: str, label: str, inputs: tuple) -> dict:
    """Build the engine (timed: compile happens on the first calls), then the median batch time."""
    torch._dynamo.reset()
    start = time.perf_counter()
    engine = GlanceEngine(model, backend=backend, precision=PRECISION, device=DEVICE, max_batch=inputs[0].shape[0])
    result = engine(*inputs)
    engine(*inputs)
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
    warmup_s = time.perf_counter() - start
    with torch.inference_mode():
        ms = triton.testing.do_bench(lambda: engine(*inputs), return_mode="median")
    batch = inputs[0].shape[0]
    gmacs = float(result.gflops.float().mean())
    videos_per_s = batch / (ms * 1e-3)
    return {"model": label, "config": model.config.name, "glance_size": model.config.glance_size,
            "backend": engine.backend, "precision": PRECISION, "batch": batch, "ms": ms, "videos_per_s": videos_per_s,
            "gflops_per_video": gmacs, "tflops": 2 * gmacs * videos_per_s / 1e3, "warmup_s": warmup_s,
            "finite": bool(torch.isfinite(result.final_logits).all()), "final_logits": result.final_logits.float()}


def plan(glance_sizes) -> list[tuple[str, AVGNConfig | None, str]]:
    """(label, config or None for the dense baseline, backend) in the order they run; the budget cuts the tail."""
    paper = AVGNConfig.from_name(CONFIG)
    rows = [("avgn", paper, "eager"), ("dense", None, "eager")]
    rows += [("avgn", paper, backend) for backend in compiled_backends()]
    # the smaller glances compiled first: they are the candidates for the dense-baseline target if time runs out
    small = [(f"avgn-g{g}", paper.replace(name=f"{paper.name}-g{g}", glance_size=g)) for g in glance_sizes]
    rows += [(label, config, backend) for label, config in small for backend in compiled_backends()]
    rows += [(label, config, "eager") for label, config in small]
    return rows


def run(batch: int = BATCH, glance_sizes=GLANCE_SIZES, budget_s: float = BUDGET_S) -> tuple[list[dict], list[str]]:
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    paper = AVGNConfig.from_name(CONFIG)
    inputs = random_inputs(paper, batch, DEVICE)
    deadline = time.perf_counter() + budget_s
    rows, skipped, models = [], [], {}
    for label, config, backend in plan(glance_sizes):
        if time.perf_counter() > deadline:
            skipped.append(f"{label} {backend}")
            continue
        if label not in models:
            models[label] = (dense_baseline(models["avgn"]) if config is None
                             else AVGN(config).to(DEVICE).eval())
        rows.append(bench_row(models[label], backend, label, inputs))
        print(f"{label:>10} {backend:>9} {rows[-1]['ms']:8.2f} ms {rows[-1]['videos_per_s']:9,.0f} videos/s "
              f"{rows[-1]['tflops']:6.1f} TFLOP/s  warm-up {rows[-1]['warmup_s']:.1f} s", flush=True)
    return rows, skipped


def checks_of(rows: list[dict]) -> dict[str, tuple[bool, str]]:
    by_key = {(r["model"], r["backend"]): r for r in rows}
    checks = {f"{r['model']} {r['backend']} {PRECISION} logits finite": (r["finite"], "") for r in rows}
    eager, dense = by_key.get(("avgn", "eager")), by_key.get(("dense", "eager"))
    paper = [r for r in rows if r["model"] == "avgn"]
    if eager is not None and len(paper) > 1:
        fastest = max(paper, key=lambda r: r["videos_per_s"])
        ratio = fastest["videos_per_s"] / eager["videos_per_s"]
        name = (f"{CONFIG} {PRECISION} fastest >= {TARGET_VS_EAGER:.0f}x eager "
                f"and >= {TARGET_VIDEOS_PER_S:,.0f} videos/s")
        checks[name] = (
            ratio >= TARGET_VS_EAGER and fastest["videos_per_s"] >= TARGET_VIDEOS_PER_S,
            f"{fastest['backend']} {fastest['videos_per_s']:,.0f} videos/s, {ratio:.2f}x eager")
        compiled = by_key.get(("avgn", "inductor"))
        if compiled is not None:
            diff = (compiled["final_logits"] - eager["final_logits"]).abs().max().item()
            scale = eager["final_logits"].abs().max().item()
            checks[f"{CONFIG} inductor {PRECISION} logits within 5% of eager"] = (diff <= 0.05 * scale + 1e-2,
                                                                      f"max abs diff {diff:.3g} (max {scale:.3g})")
    if dense is not None:
        best = max((r for r in rows if r["model"] != "dense"), key=lambda r: r["videos_per_s"])
        ratio = best["videos_per_s"] / dense["videos_per_s"]
        checks[f"some AVGN configuration >= {TARGET_VS_DENSE:.0f}x dense ResNet-50 (eager {PRECISION})"] = (
            ratio >= TARGET_VS_DENSE, f"{best['model']} {best['backend']} {ratio:.2f}x")
    return checks


def headline(rows: list[dict]) -> list[tuple[str, str]]:
    by_key = {(r["model"], r["backend"]): r for r in rows}
    eager, dense = by_key.get(("avgn", "eager")), by_key.get(("dense", "eager"))
    out = []
    for r in rows:
        ratios = []
        if eager is not None and r["model"] != "dense":
            ratios.append(f"{r['videos_per_s'] / eager['videos_per_s']:.2f}x eager")
        if dense is not None and r is not dense:
            ratios.append(f"{r['videos_per_s'] / dense['videos_per_s']:.2f}x dense")
        out.append((f"e2e {r['model']} {r['backend']} {PRECISION} b{r['batch']}",
                    f"{r['videos_per_s']:,.0f} videos/s ({r['ms']:.2f} ms, {r['tflops']:.1f} TFLOP/s, "
                    f"{r['gflops_per_video']:.2f} GFLOPs/video; warm-up {r['warmup_s']:.0f} s)"
                    + (f"; {', '.join(ratios)}" if ratios else "")))
    return out


def gpu_check(copy_gbps: float) -> dict:
    """The end-to-end rows and their target checks, within ``BUDGET_S``."""
    rows, skipped = run(BATCH, GLANCE_SIZES, BUDGET_S)
    checks = checks_of(rows)
    summary = [(name, f"{'ok' if ok else 'FAILED'}: {detail}") for name, (ok, detail) in checks.items()]
    summary += headline(rows)
    if skipped:
        summary.append((f"e2e skipped ({BUDGET_S:.0f} s budget)", ", ".join(skipped)))
    for r in rows:
        del r["final_logits"]
    return {"checks": {name: ok for name, (ok, _) in checks.items()}, "rows": rows, "summary": summary}


def main(batch: int = BATCH, glance_sizes=GLANCE_SIZES) -> list[dict]:
    props = torch.cuda.get_device_properties(0)
    print(f"# {props.name}, torch {torch.__version__}, triton {triton.__version__}, {datetime.date.today()}; "
          f"{CONFIG} config, {PRECISION}, batch {batch}, clips on the GPU, no early exit")
    rows, _ = run(batch, glance_sizes, budget_s=float("inf"))
    for name, (ok, detail) in checks_of(rows).items():
        print(f"{'ok' if ok else 'FAILED'}: {name}: {detail}")
    for label, value in headline(rows):
        print(f"{label}: {value}")
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=BATCH, help="videos per batch (default 64)")
    parser.add_argument("--glance-sizes", nargs="+", type=int, default=list(GLANCE_SIZES),
                        help="smaller glance resolutions G to compare with the dense baseline (default 112 96)")
    args = parser.parse_args()
    main(args.batch, args.glance_sizes)
