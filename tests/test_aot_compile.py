"""Every Triton kernel configuration compiles to cubin for sm_80 and sm_90 on this GPU-less machine
(``avgn_fast.kernels.aot``), and a kernel no GPU could run fails that compile.

The suite runs under ``TRITON_INTERPRET=1``, where ``@triton.jit`` yields Python functions that cannot be
compiled, so each compile runs in a subprocess without that variable (and with its own empty Triton cache, so
every kernel really goes through LLVM and ptxas).
"""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton
import triton.language as tl
from avgn_fast.kernels.aot import TARGETS, VARIANTS, AOTCompileError, Variant, compile_kernel, config_label

HERE = Path(__file__).resolve().parent


def compiler_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return {**env, "TRITON_CACHE_DIR": str(tmp_path / "triton_cache"), "PYTHONPATH": str(HERE)}


def autotune_configs(module: str, function: str) -> list[str]:
    """Labels of the configs a kernel's named config function gives on a GPU (interpreter off)."""
    make = getattr(importlib.import_module(f"avgn_fast.kernels.{module}"), function)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "0")  # _crop_configs gives the interpreter a single tile
        return [config_label(c) for c in make()]


@pytest.mark.slow
def test_every_kernel_configuration_compiles_for_sm80_and_sm90(tmp_path):
    out = tmp_path / "aot.json"
    command = [sys.executable, "-m", "avgn_fast.kernels.aot", "--arch", "80", "90", "--workers", "2",
               "--json", str(out)]
    proc = subprocess.run(command, env=compiler_env(tmp_path), capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert not [r["error"] for r in rows if r["error"]]
    compiled = {(r["kernel"], r["variant"], r["config"], r["arch"]) for r in rows}
    assert len(compiled) == len(rows)
    # the kernels' own config functions, read here, say what the autotuner would try on a GPU
    expected_configs = {"_crop_patches_kernel": autotune_configs("crop_patches", "_crop_configs"),
                        "_av_attention_kernel": autotune_configs("av_attention", "_attention_configs")}
    assert {r["kernel"] for r in rows} == set(expected_configs) == set(VARIANTS)
    for kernel, configs in expected_configs.items():
        deployed, *others = VARIANTS[kernel]
        for arch in (80, 90):
            assert {c for k, v, c, a in compiled if (k, v, a) == (kernel, deployed.name, arch)} == set(configs)
            for variant in others:
                assert (kernel, variant.name, configs[0], arch) in compiled
    for r in rows:
        # a real cubin: its function uses registers, and its shared memory fits the card
        assert 0 < r["registers"] <= 255 and r["shared_bytes"] <= TARGETS[r["arch"]].shared_bytes, r


# ---- kernels that must fail, compiled in the subprocess below through the same compile_kernel


@triton.jit
def _copy_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=offs < n), mask=offs < n)


@triton.jit
def _shape_error_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    # a (BLOCK,) plus a (2 * BLOCK,) block: no broadcast makes these one shape
    tl.store(out_ptr + offs, tl.load(x_ptr + offs) + tl.arange(0, 2 * BLOCK))


@triton.jit
def _tile_kernel(a_ptr, b_ptr, out_ptr, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr):
    m, n, k = tl.arange(0, M), tl.arange(0, N), tl.arange(0, K)
    a = tl.load(a_ptr + m[:, None] * K + k[None, :])
    b = tl.load(b_ptr + k[:, None] * N + n[None, :])
    tl.store(out_ptr + m[:, None] * N + n[None, :], tl.dot(a, b))


def compile_cases() -> dict[str, str | None]:
    """Case -> None when it compiled, else the ``AOTCompileError`` message; run without the interpreter."""
    copy = Variant("fp32", {"x_ptr": "*fp32", "out_ptr": "*fp32"}, {})
    tile = Variant("fp32", {"a_ptr": "*fp32", "b_ptr": "*fp32", "out_ptr": "*fp32"}, {})
    # fp32 operands of a 256x128 by 128x128 dot: 192 KiB of shared memory, over an A100's 163, under an H100's 227
    big_tile = triton.Config({"M": 256, "N": 128, "K": 128}, num_warps=8)
    cases = {
        "copy": (_copy_kernel, copy, triton.Config({"BLOCK": 128})),
        "shape error": (_shape_error_kernel, copy, triton.Config({"BLOCK": 128})),
        "big tile": (_tile_kernel, tile, big_tile),
        "unknown argument": (_copy_kernel, Variant("typo", {"x_pt": "*fp32"}, {}), triton.Config({"BLOCK": 128})),
    }
    results = {}
    for name, (fn, variant, config) in cases.items():
        for arch, target in TARGETS.items():
            try:
                compile_kernel(fn, variant, config, target)
                results[f"{name} sm_{arch}"] = None
            except AOTCompileError as e:
                results[f"{name} sm_{arch}"] = str(e)
    return results


def test_a_kernel_no_gpu_could_run_fails_the_compile(tmp_path):
    script = "import json, test_aot_compile; print(json.dumps(test_aot_compile.compile_cases()))"
    proc = subprocess.run([sys.executable, "-c", script], env=compiler_env(tmp_path), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["copy sm_80"] is None and got["copy sm_90"] is None
    for arch in (80, 90):
        message = got[f"shape error sm_{arch}"]
        assert message.startswith(f"_shape_error_kernel [fp32; BLOCK=128, warps=4, stages=3] for sm_{arch}: "
                                  "CompilationError"), message
        assert "incompatible dimensions" in message and "128 and 256" in message, message
        assert "names arguments the kernel lacks ['x_pt']" in got[f"unknown argument sm_{arch}"]
    assert got["big tile sm_80"].endswith("needs 196608 bytes of shared memory, the card allows 166912")
    assert got["big tile sm_90"] is None


def test_the_interpreter_is_refused_with_a_clear_error():
    """This process runs under TRITON_INTERPRET=1: its kernels are Python functions, and the compile says so."""
    from avgn_fast.kernels.aot import find_kernels

    assert triton.knobs.runtime.interpret
    with pytest.raises(AOTCompileError, match="TRITON_INTERPRET=1 .* run the AOT compile in a process without it"):
        find_kernels()
