"""The one script a lent GPU session runs (at most 5 minutes, straight from the source tree):

    python benchmarks/gpu_check.py

Sections, each timed and isolated (an exception becomes a failed check and the script goes on):
environment (GPU, versions), device copy bandwidth, MobileNetV2/ResNet-50 throughput (fp16,
channels_last) at the glance and patch resolutions, torchvision weights compatibility, then every
``benchmarks/<name>.py`` in ``SECTIONS`` that exists, through its ``gpu_check(copy_gbps) -> dict``
returning ``{"checks": {name: bool}, "rows": [dict], "summary": [(label, value_str)]}``. A section
that must fit the session keeps a wall-clock budget in a module constant named ``*BUDGET_S`` and
reports the rows it had no time for as a summary line with "skipped" in its label; ``lift_budgets()``
sets every such budget to infinity (the CPU dry run does, so its rows never depend on machine load).
Results go to ``$OUT/gpu_check.json`` (default ``./gpu_check_out``), rewritten after every
section so a run cut short keeps what it measured, the summary with them; the summary table is
printed last. Exit code 1 when any check failed.
"""

from __future__ import annotations

import datetime
import importlib
import importlib.util
import json
import math
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.testing
from torch.utils.flop_counter import FlopCounterMode
from triton.testing import do_bench

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ["bench_crop_patches", "bench_av_attention", "bench_e2e"]
DEVICE = "cuda"
BATCH = 256
# (backbone, input size): glance resolutions for MobileNetV2, patch sizes and the full frame for ResNet-50
THROUGHPUT = [("mobilenet_v2", 224), ("mobilenet_v2", 112), ("resnet50", 96), ("resnet50", 128), ("resnet50", 160),
              ("resnet50", 224)]
COPY_BYTES = 1 << 30
PROFILE_CONFIG, PROFILE_PRECISION, PROFILE_BATCH = "paper", "fp16", 64  # stage_profile: random weights
WEIGHTS_REL_TOL = 1e-5  # fp32 without TF32: same kernels on the same weights


def bootstrap() -> None:
    """Make ``avgn_fast`` and ``avgn_fast.kernels`` importable from the source tree, installed or not."""
    for path in (ROOT, ROOT / "benchmarks"):
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))
    try:
        importlib.import_module("avgn_fast.kernels")
    except ModuleNotFoundError as e:
        if e.name != "avgn_fast.kernels":
            raise
        import avgn_fast

        spec = importlib.util.spec_from_file_location(
            "avgn_fast.kernels", ROOT / "kernels" / "__init__.py", submodule_search_locations=[str(ROOT / "kernels")])
        module = importlib.util.module_from_spec(spec)
        sys.modules["avgn_fast.kernels"] = module
        spec.loader.exec_module(module)
        avgn_fast.kernels = module


def results_dir() -> Path:
    """Where results go: ``$OUT`` (the GPU machine hands that folder back), else ``./gpu_check_out``."""
    return Path(os.environ.get("OUT", "gpu_check_out"))


def _bench_ms(fn) -> float:
    return do_bench(fn, return_mode="median")


def measure_copy_gbps(device, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth, bytes read + written, median of ``triton.testing.do_bench`` (the
    benchmarks' own ``__main__`` runs; ``gpu_check`` hands them its ``copy_bandwidth`` figure)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * nbytes / ms / 1e6


def run_checks(checks: dict) -> dict[str, tuple[bool, str]]:
    """Name -> check() -> (passed, detail); an exception fails that check only, with its message as the detail
    (report and go on: device time is scarce)."""
    results = {}
    for name, check in checks.items():
        try:
            results[name] = check()
        except Exception as e:  # noqa: BLE001
            results[name] = (False, f"{type(e).__name__}: {e}")
    return results


def environment(copy_gbps: float) -> dict:
    try:
        import torchvision

        tv_version = torchvision.__version__
    except ImportError:
        tv_version = "not installed"
    if torch.device(DEVICE).type == "cuda":
        props = torch.cuda.get_device_properties(0)
        device = {"gpu": props.name, "capability": f"{props.major}.{props.minor}",
                  "memory_gib": round(props.total_memory / 2**30, 1)}
    else:  # the CPU dry run (tests/test_gpu_check.py)
        device = {"gpu": f"none ({DEVICE})", "capability": "-", "memory_gib": math.nan}
    row = {**device, "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__,
           "torchvision": tv_version, "python": platform.python_version(),
           "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")}
    summary = [("GPU", f"{row['gpu']} (sm {row['capability']}, {row['memory_gib']} GiB)"),
               ("versions", f"torch {row['torch']} (CUDA {row['cuda']}), triton {row['triton']}, "
                            f"torchvision {row['torchvision']}, Python {row['python']}")]
    return {"checks": {f"{DEVICE} available": True}, "rows": [row], "summary": summary}


def copy_bandwidth(copy_gbps: float) -> dict:
    """Large-tensor clone: every byte read once and written once."""
    x = torch.empty(COPY_BYTES // 4, dtype=torch.float32, device=DEVICE).uniform_()
    ms = _bench_ms(lambda: x.clone())
    nbytes = 2 * x.numel() * x.element_size()
    gbps = nbytes / (ms * 1e-3) / 1e9
    row = {"bytes": nbytes, "ms": ms, "gbps": gbps}
    return {"checks": {"copy bandwidth measured": gbps > 0}, "rows": [row],
            "summary": [("device copy bandwidth", f"{gbps:.0f} GB/s (clone of {COPY_BYTES >> 20} MiB)")]}


def backbone_throughput(copy_gbps: float) -> dict:
    """Eager fp16 channels_last inference, images/s at batch ``BATCH``; TFLOP/s from torch's own conv count."""
    from avgn_fast.models.backbones import mobilenet_v2, resnet50

    torch.backends.cudnn.benchmark = True
    factories = {"mobilenet_v2": mobilenet_v2, "resnet50": resnet50}
    rows, summary, checks = [], [], {}
    for name, size in THROUGHPUT:
        model = factories[name](num_classes=0).to(DEVICE, torch.float16, memory_format=torch.channels_last).eval()
        x = torch.randn(BATCH, 3, size, size, device=DEVICE, dtype=torch.float16)
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            with FlopCounterMode(display=False) as counter:
                model(x[:1])
            gmacs = counter.get_total_flops() / 2 / 1e9
            fmap, pooled = model(x)
            ms = _bench_ms(lambda m=model, x=x: m(x))
        images_per_s = BATCH / (ms * 1e-3)
        label = f"{name}@{size}"
        checks[f"{label} fp16 output finite"] = bool(torch.isfinite(pooled).all())
        rows.append({"model": name, "size": size, "batch": BATCH, "dtype": "float16",
                     "memory_format": "channels_last", "ms": ms, "images_per_s": images_per_s,
                     "gmacs_per_image": gmacs, "tflops": 2 * gmacs * images_per_s / 1e3})
        summary.append((f"{label} fp16 CL b{BATCH}", f"{images_per_s:,.0f} img/s ({rows[-1]['tflops']:.0f} TFLOP/s)"))
        del model, x, fmap, pooled
    return {"checks": checks, "rows": rows, "summary": summary}


def _randomize_bn(model) -> None:
    """Non-trivial BN statistics and affine terms, so every buffer takes part in the comparison."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)


def _max_err(got, want) -> tuple[float, float]:
    """(max abs error, max abs error relative to the reference's largest magnitude)."""
    err = (got.float() - want.float()).abs().max().item()
    return err, err / max(want.abs().max().item(), 1e-30)


def weights_compat(copy_gbps: float) -> dict:
    """torchvision's random-init models loaded into ours with ``load_pretrained``: fp32 outputs must agree."""
    import torchvision

    from avgn_fast.models.backbones import load_pretrained, mobilenet_v2, resnet50

    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    rows, summary, checks = [], [], {}
    try:
        for name, tv_factory, ours_factory, fmap_module in (
            ("mobilenet_v2", torchvision.models.mobilenet_v2, mobilenet_v2, "features"),
            ("resnet50", torchvision.models.resnet50, resnet50, "layer4"),
        ):
            torch.manual_seed(0)
            tv = tv_factory(weights=None)
            _randomize_bn(tv)
            tv = tv.to(DEVICE).eval()
            ours = load_pretrained(ours_factory(), tv.state_dict()).to(DEVICE).eval()
            head = ours.classifier if name == "mobilenet_v2" else ours.fc
            captured = {}
            getattr(tv, fmap_module).register_forward_hook(lambda mod, inp, out, store=captured: store.update(fmap=out))
            if name == "resnet50":
                tv.avgpool.register_forward_hook(
                    lambda mod, inp, out, store=captured: store.update(pooled=torch.flatten(out, 1)))
            x = torch.randn(4, 3, 224, 224, device=DEVICE)
            with torch.inference_mode():
                tv_logits = tv(x)
                # torchvision's MobileNetV2 pools functionally (no avgpool module to hook)
                tv_pooled = captured.get("pooled")
                if tv_pooled is None:
                    tv_pooled = torch.flatten(F.adaptive_avg_pool2d(captured["fmap"], 1), 1)
                fmap, pooled = ours(x)
                logits = head(pooled)
            errs = {"fmap": _max_err(fmap, captured["fmap"]), "pooled": _max_err(pooled, tv_pooled),
                    "logits": _max_err(logits, tv_logits)}
            ok = all(rel <= WEIGHTS_REL_TOL for _, rel in errs.values())
            checks[f"{name} torchvision weights load and match"] = ok
            rows.append({"model": name, "dtype": "float32", "tf32": False,
                         "pooled_max_abs": tv_pooled.abs().max().item(),
                         **{f"{k}_max_abs_err": a for k, (a, _) in errs.items()},
                         **{f"{k}_max_rel_err": r for k, (_, r) in errs.items()}})
            summary.append((f"{name} vs torchvision (fp32)", f"{'ok' if ok else 'FAILED'}: pooled max abs err "
                            f"{errs['pooled'][0]:.2e}, logits {errs['logits'][0]:.2e}, fmap {errs['fmap'][0]:.2e}"))
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    return {"checks": checks, "rows": rows, "summary": summary}


def stage_profile(copy_gbps: float) -> dict:
    """``avgn-fast profile``'s measurement on the GPU: where an eager batch spends its time, stage by stage."""
    from avgn_fast.config import AVGNConfig
    from avgn_fast.engine.profile import STAGES, profile, write_plot
    from avgn_fast.models.avgn import AVGN

    torch.manual_seed(0)
    model = AVGN(AVGNConfig.from_name(PROFILE_CONFIG))
    rows = profile(model, backends=("eager",), precisions=(PROFILE_PRECISION,), batch_sizes=(PROFILE_BATCH,),
                   device=DEVICE, compare=True)
    summary, checks = [], {}
    for r in rows:
        stages = ", ".join(f"{s} {getattr(r, f'{s}_ms'):.1f}" for s in STAGES if not math.isnan(getattr(r, f"{s}_ms")))
        summary.append((f"profile {r.model} {r.backend} {r.precision} b{r.batch}",
                        f"{r.videos_per_s:,.0f} videos/s, p50 {r.latency_p50_ms:.2f} ms; stages ms: {stages}; "
                        f"peak {r.peak_mem_mib:.0f} MiB"))
        checks[f"profile {r.model} {r.backend} {r.precision} measured"] = r.videos_per_s > 0
    chart = results_dir() / "stage_profile.png"
    write_plot(rows, chart)
    summary.append(("profile chart", str(chart)))
    return {"checks": checks, "rows": [vars(r) for r in rows], "summary": summary}


def lift_budgets() -> list[str]:
    """Set every section module's ``*BUDGET_S`` to infinity, so every row runs however slow the machine is;
    returns the constants lifted (``module.NAME``)."""
    lifted = []
    for name in SECTIONS:
        if not (ROOT / "benchmarks" / f"{name}.py").exists():
            continue
        module = importlib.import_module(name)
        for constant in dir(module):
            if constant.endswith("BUDGET_S"):
                setattr(module, constant, math.inf)
                lifted.append(f"{name}.{constant}")
    return lifted


def _external(name: str):
    def run(copy_gbps: float) -> dict:
        return importlib.import_module(name).gpu_check(copy_gbps)

    return run


def sections() -> list[tuple[str, object]]:
    """(name, function) in the order they run: the built-in sections, then the benchmark files that exist."""
    found = [("environment", environment), ("copy_bandwidth", copy_bandwidth),
             ("backbone_throughput", backbone_throughput), ("weights_compat", weights_compat),
             ("stage_profile", stage_profile)]
    for name in SECTIONS:
        if (ROOT / "benchmarks" / f"{name}.py").exists():
            found.append((name, _external(name)))
        else:
            print(f"[gpu_check] {name}: benchmarks/{name}.py not found, skipped", flush=True)
    return found


def run_sections(sections, out_dir: Path) -> dict:
    """Run each section, isolated and timed; rewrite ``out_dir/gpu_check.json`` after each; print the summary."""
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {"sections": {}, "checks": {}, "rows": {}, "summary": []}
    summary: list[tuple[str, str]] = []
    copy_gbps = math.nan
    start = time.perf_counter()
    for name, fn in sections:
        print(f"[gpu_check] {name} ...", flush=True)
        t0 = time.perf_counter()
        try:
            result = fn(copy_gbps)
            error = None
        except Exception as e:  # a broken section is a failed check; the others still run
            traceback.print_exc()
            first_line = (str(e).splitlines() or [""])[0][:160]
            result = {"checks": {f"{name} ran": False}, "rows": [],
                      "summary": [(name, f"FAILED: {type(e).__name__}: {first_line}")]}
            error = repr(e)
        seconds = time.perf_counter() - t0
        if name == "copy_bandwidth" and result["rows"]:
            copy_gbps = result["rows"][0]["gbps"]
        report["sections"][name] = {"seconds": round(seconds, 2), "error": error}
        report["checks"].update({f"{name}: {k}": bool(v) for k, v in result["checks"].items()})
        report["rows"][name] = result["rows"]
        summary += [(str(label), str(value)) for label, value in result["summary"]]
        report["summary"] = summary
        (out_dir / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
        print(f"[gpu_check] {name} done in {seconds:.1f} s", flush=True)

    failed = [k for k, ok in report["checks"].items() if not ok]
    width = max(len(label) for label, _ in summary)
    print(f"\n== gpu_check summary ({time.perf_counter() - start:.0f} s; JSON in {out_dir / 'gpu_check.json'}) ==")
    for label, value in summary:
        print(f"{label:<{width}}  {value}")
    print(f"{'sections':<{width}}  " + ", ".join(f"{n} {s['seconds']:.0f}s" for n, s in report["sections"].items()))
    print(f"{'checks':<{width}}  {len(report['checks']) - len(failed)}/{len(report['checks'])} passed"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return report


def main() -> int:
    bootstrap()
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible; nothing to check", file=sys.stderr)
        return 1
    report = run_sections(sections(), results_dir())
    return 1 if any(not ok for ok in report["checks"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
