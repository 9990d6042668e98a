"""``benchmarks/gpu_check.py`` gets one run per lent GPU session, with little time to fix it there. Every section
runs here first: on the CPU (Triton kernels in the interpreter), at tiny shapes, with a wall-clock timer in place of
``do_bench``, in a Python that cannot import what the GPU machine lacks (PyAV, DALI; fvcore travels there as wheels
from ``benchmarks/gpu_wheels.sh``; torchvision is missing here, so ``weights_compat`` is left out). Every correctness
check must pass and every row must be measured; the speed targets (checks named ``... >= ...``) are GPU figures and
only have to be present. The sections' wall-clock budgets are lifted (``gpu_check.lift_budgets``): on a loaded machine
a budget would drop rows, and no outcome here may depend on the machine's speed."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

DRY_RUN = r"""
import importlib.abc, json, statistics, sys, time
from pathlib import Path

class Missing(importlib.abc.MetaPathFinder):
    '''What the GPU machine does not have: importing it fails as it would there.'''
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "av" or name.startswith("nvidia.dali"):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked: absent on the GPU machine)", name=name)
        return None

sys.meta_path.insert(0, Missing())
import torch
import triton.testing

def timer(fn, return_mode="median"):
    fn()
    times = []
    for _ in range(2):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)

import gpu_check
gpu_check.bootstrap()
gpu_check.DEVICE, gpu_check.do_bench = "cpu", timer
gpu_check.COPY_BYTES, gpu_check.BATCH = 1 << 20, 2
gpu_check.THROUGHPUT = [("mobilenet_v2", 32), ("resnet50", 32)]
gpu_check.PROFILE_CONFIG, gpu_check.PROFILE_PRECISION, gpu_check.PROFILE_BATCH = "tiny", "fp32", 2
triton.testing.do_bench = timer

import bench_crop_patches as crop
crop.DEVICE = "cpu"
crop.HEADLINE = crop.Case(4, 16, "fp16", index=False, normalize=False)
crop.PIPELINE = crop.Case(4, 16, "uint8", index=True, normalize=True, channels_last=True)
crop.FRAME, crop.CHECK_FRAMES, crop.CHECK_SIZE = (3, 40, 40), (2, 3, 21, 26), (13, 19)
crop.CHECK_CASES = crop.CHECK_CASES[1:4]

import bench_av_attention as attn
attn.DEVICE, attn.BENCH_DTYPES = "cpu", ("fp16",)  # the interpreter has no bf16
attn.SHAPES = [(2, 2, 7, 3, 16), (2, 2, 3, 7, 16)]
attn.CHECK_CASES = [((2, 2, 7, 3, 16), torch.float16, "random", True),
                    ((2, 1, 5, 9, 16), torch.float32, "prefix", False)]

import bench_e2e as e2e
e2e.DEVICE, e2e.CONFIG, e2e.PRECISION = torch.device("cpu"), "tiny", "fp32"  # fp16 needs CUDA
e2e.BATCH, e2e.GLANCE_SIZES = 2, (24,)

(Path(sys.argv[1]) / "lifted.json").write_text(json.dumps(gpu_check.lift_budgets()))
sections = [s for s in gpu_check.sections() if s[0] != "weights_compat"]
gpu_check.run_sections(sections, Path(sys.argv[1]))
"""


@pytest.mark.slow
def test_gpu_check_sections_run_on_cpu(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT / "benchmarks"), "OMP_NUM_THREADS": "1",
           "OUT": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", DRY_RUN, str(tmp_path)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    # every benchmark section's budget was found and lifted, so nothing was skipped for time
    lifted = json.loads((tmp_path / "lifted.json").read_text())
    assert {name.split(".")[0] for name in lifted} == {"bench_crop_patches", "bench_av_attention", "bench_e2e"}, lifted
    assert not [label for label, _ in report["summary"] if "skipped" in label], report["summary"]
    assert list(report["sections"]) == ["environment", "copy_bandwidth", "backbone_throughput", "stage_profile",
                                        "bench_crop_patches", "bench_av_attention", "bench_e2e"]
    errors = {name: s["error"] for name, s in report["sections"].items() if s["error"]}
    assert not errors, f"{errors}\n{proc.stdout[-4000:]}"
    failed = [name for name, ok in report["checks"].items() if not ok and ">=" not in name]
    assert not failed, proc.stdout[-4000:]
    targets = [name for name in report["checks"] if ">=" in name]
    # crop % of copy (vs roi_align needs torchvision); attention vs eager/SDPA and % of floor; e2e vs eager and dense
    assert len(targets) == 5, targets
    # every benchmark row measured: crop providers on both cases, three attention providers per shape,
    # and the e2e plan in its order (the smaller glance compiled before eager)
    rows = report["rows"]
    assert {r["provider"] for r in rows["bench_crop_patches"]} >= {"ours", "grid_sample", "torch_gather"}
    assert len(rows["bench_av_attention"]) == 2 * 3
    assert [(r["model"], r["backend"]) for r in rows["bench_e2e"]] == [
        ("avgn", "eager"), ("dense", "eager"), ("avgn", "inductor"), ("avgn-g24", "inductor"), ("avgn-g24", "eager")]
    for section in ("bench_crop_patches", "bench_av_attention", "bench_e2e", "backbone_throughput"):
        assert all(r["ms"] > 0 for r in rows[section]), section
    # the stage profile: AVGN and the dense baseline, each stage AVGN runs timed
    profiled = {r["model"]: r for r in rows["stage_profile"]}
    assert set(profiled) == {"avgn", "dense"} and (tmp_path / "stage_profile.png").stat().st_size > 0
    assert all(profiled["avgn"][f"{s}_ms"] > 0 for s in ("glance", "avtest", "aespa", "crop", "local", "head"))
    assert "== gpu_check summary" in proc.stdout
