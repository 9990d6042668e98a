"""Ahead-of-time compile of every Triton kernel configuration for real GPUs, on a machine without one.

``triton.compile(ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", arch, 32))`` runs the
toolchain a GPU runs at a kernel's first launch (Triton IR, LLVM, PTX, and the ptxas that ships in the triton
wheel) and yields cubin with no driver and no device. Run in CI it catches what the CPU interpreter cannot: a
type or shape error on a path the tests never take, a tile that needs more shared memory than the card has.

What is compiled, for each target: every autotune config of every kernel (``kernel.configs``, exactly what the
autotuner tries on a GPU) with the specialization AVGN deploys, and every other specialization the launcher
produces (each dtype, the head dims, the online-softmax path) with the first config. Kernels are found in the
modules of ``avgn_fast.kernels``; one without variants in ``VARIANTS`` is an error, so no kernel skips this.

    python -m avgn_fast.kernels.aot [--arch 80 90] [--workers 2] [--json results.json]

The interpreter (``TRITON_INTERPRET=1``) turns ``@triton.jit`` kernels into Python functions, which cannot be
compiled: run this in a process without it (the tests start one).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import importlib
import json
import multiprocessing
import pkgutil
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.autotuner import Autotuner, Heuristics
from triton.runtime.jit import JITFunction

PACKAGE = "avgn_fast.kernels"
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


class AOTCompileError(RuntimeError):
    """A kernel configuration that does not compile (or does not fit) for a target; the message names all three."""


@dataclass(frozen=True)
class Target:
    arch: int  # compute capability as Triton writes it: 90 for sm_90
    shared_bytes: int  # the most shared memory one block may opt into on that card

    @property
    def gpu(self) -> GPUTarget:
        return GPUTarget("cuda", self.arch, 32)


# A100 (163 KiB) and H100/H200 (227 KiB): the cards this toolkit is measured on
TARGETS = {80: Target(80, 166912), 90: Target(90, 232448)}


@dataclass(frozen=True)
class Variant:
    """One specialization of a kernel, as its launcher produces it.

    ``types`` gives the Triton type of runtime arguments ("*fp16", "fp32"); any other runtime argument is an
    "i32" (the launcher's sizes and strides), and every pointer is taken 16-byte aligned, as torch allocates.
    ``constexprs`` sets the meta-parameters the autotune configs do not. ``every_config`` compiles the variant
    with every autotune config instead of the first only.
    """

    name: str
    types: dict[str, str]
    constexprs: dict[str, object]
    every_config: bool = False


def _crop_variant(name, image, out, *, index, normalize, every_config=False) -> Variant:
    # absent optional inputs arrive as the fp32 ``centers`` placeholder (see the launcher)
    return Variant(name, {"images_ptr": f"*{image}", "centers_ptr": "*fp32", "index_ptr": "*i64" if index else "*fp32",
                          "mean_ptr": "*fp32", "std_ptr": "*fp32", "out_ptr": f"*{out}"},
                   {"HAS_INDEX": index, "HAS_MEAN": normalize, "HAS_STD": normalize}, every_config)


def _attention_variant(name, dtype, head_dim, block_k, *, keys_fit=True, every_config=False) -> Variant:
    # the launcher's rules: the key block is Lk's power of two in [16, 128], one pass when every key fits in it,
    # fp32 dots in full precision
    return Variant(name, {"q_ptr": f"*{dtype}", "k_ptr": f"*{dtype}", "v_ptr": f"*{dtype}", "mask_ptr": "*i1",
                          "out_ptr": f"*{dtype}", "w_ptr": f"*{dtype}", "scale_log2e": "fp32"},
                   {"D": head_dim, "HAS_MASK": True, "RETURN_WEIGHTS": True, "KEYS_FIT": keys_fit,
                    "DOT_PRECISION": "ieee" if dtype == "fp32" else "tf32", "BLOCK_K": block_k}, every_config)


# kernel name -> its variants; the first is what AVGN deploys (the paper config: 64-dim heads, uint8 frames to
# fp16 patches) and runs with every config. Masks and weights on: the flags only add code.
VARIANTS = {
    "_crop_patches_kernel": [
        _crop_variant("uint8->fp16 index normalize", "u8", "fp16", index=True, normalize=True, every_config=True),
        _crop_variant("fp16", "fp16", "fp16", index=False, normalize=False),
        _crop_variant("bf16 normalize", "bf16", "bf16", index=False, normalize=True),
        _crop_variant("fp32 index", "fp32", "fp32", index=True, normalize=False),
    ],
    "_av_attention_kernel": [
        _attention_variant("fp16 D64 Lk<=64", "fp16", 64, 64, every_config=True),
        _attention_variant("bf16 D64 Lk<=16", "bf16", 64, 16),
        _attention_variant("fp32 D32 Lk<=32", "fp32", 32, 32),
        _attention_variant("fp16 D16 Lk<=16", "fp16", 16, 16),
        _attention_variant("fp16 D128 Lk>128 online softmax", "fp16", 128, 128, keys_fit=False),
    ],
}


@dataclass(frozen=True)
class Job:
    kernel: str
    variant: int  # index into VARIANTS[kernel]
    config: int  # index into the kernel's autotune configs
    arch: int


@dataclass
class Compiled:
    """One compile: what it was, how long it took, and the cubin's resources (or the error)."""

    kernel: str
    variant: str
    config: str
    arch: int
    seconds: float
    shared_bytes: int = 0
    registers: int = 0
    stack_bytes: int = 0  # per-thread stack: register spills land here
    error: str | None = None


def config_label(config: triton.Config) -> str:
    meta = ", ".join(f"{k}={v}" for k, v in config.kwargs.items())
    return f"{meta}, warps={config.num_warps}, stages={config.num_stages}"


def _entry(obj) -> tuple[JITFunction, list[triton.Config]] | None:
    """(jit function, autotune configs) of a kernel object; a bare ``@triton.jit`` function gets the default."""
    configs = None
    while isinstance(obj, (Autotuner, Heuristics)):
        configs = obj.configs if configs is None and isinstance(obj, Autotuner) else configs
        obj = obj.fn
    if not isinstance(obj, JITFunction):
        return None
    return obj, configs or [triton.Config({})]


@functools.cache
def find_kernels(package: str = PACKAGE) -> dict[str, tuple[JITFunction, list[triton.Config]]]:
    """Kernel name -> (jit function, autotune configs) for every entry point in the package's modules.

    A ``@triton.jit`` function that another kernel calls is a helper, compiled inside its caller.
    """
    if triton.knobs.runtime.interpret:
        raise AOTCompileError("TRITON_INTERPRET=1 makes @triton.jit kernels Python functions that cannot be "
                              "compiled; run the AOT compile in a process without it")
    root = importlib.import_module(package)
    found = {}
    for info in pkgutil.iter_modules(root.__path__):
        module = importlib.import_module(f"{package}.{info.name}")
        for obj in vars(module).values():
            entry = _entry(obj)
            if entry is not None:
                found.setdefault(entry[0].__name__, entry)
    sources = {name: fn.src for name, (fn, _) in found.items()}
    return {name: entry for name, entry in sorted(found.items())
            if not any(re.search(rf"\b{name}\s*\(", src) for other, src in sources.items() if other != name)}


def specialize(fn: JITFunction, variant: Variant, config: triton.Config):
    """(signature, constexprs, attrs) for ``ASTSource``; a clear error for a variant that does not fit ``fn``."""
    constexprs = {**variant.constexprs, **config.kwargs}
    unknown = sorted((set(variant.types) | set(constexprs)) - set(fn.arg_names))
    unset = [p.name for p in fn.params if p.is_constexpr and p.name not in constexprs]
    if unknown or unset:
        raise AOTCompileError(f"{fn.__name__} [{variant.name}]: the variant names arguments the kernel lacks "
                              f"{unknown} or leaves meta-parameters unset {unset}; update VARIANTS in {__name__}")
    signature, attrs = {}, {}
    for i, param in enumerate(fn.params):
        if param.is_constexpr or param.name in constexprs:
            signature[param.name] = "constexpr"
            continue
        signature[param.name] = variant.types.get(param.name, "i32")
        if signature[param.name].startswith("*"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs


def resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers per thread, stack bytes per thread) of the cubin's one function, read by the wheel's cuobjdump."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(CUOBJDUMP), "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    usage = re.search(r"REG:(\d+) STACK:(\d+)", out)
    if usage is None:
        raise AOTCompileError(f"no resource usage in cuobjdump's output: {out[-300:]!r}")
    return int(usage[1]), int(usage[2])


def compile_kernel(fn: JITFunction, variant: Variant, config: triton.Config, target: Target) -> Compiled:
    """Compile one configuration to cubin for ``target``.

    Raises:
        AOTCompileError naming the kernel, variant, config and target, with the compiler's message, when the
        kernel does not compile or needs more shared memory than the target allows.
    """
    label = f"{fn.__name__} [{variant.name}; {config_label(config)}] for sm_{target.arch}"
    signature, constexprs, attrs = specialize(fn, variant, config)
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages, "num_ctas": config.num_ctas}
    if config.maxnreg is not None:
        options["maxnreg"] = config.maxnreg
    start = time.perf_counter()
    try:
        kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target.gpu, options=options)
    except Exception as e:  # the compiler raises several types; the first and last lines say where and what
        lines = [line for line in str(e).splitlines() if line.strip()] or [""]
        where = f" {lines[0].strip()}" if len(lines) > 1 else ""
        raise AOTCompileError(f"{label}: {type(e).__name__}{where} {lines[-1].strip()}") from e
    seconds = time.perf_counter() - start
    shared = kernel.metadata.shared
    if shared > target.shared_bytes:
        raise AOTCompileError(f"{label}: needs {shared} bytes of shared memory, the card allows {target.shared_bytes}")
    registers, stack = resource_usage(kernel.asm["cubin"])
    return Compiled(fn.__name__, variant.name, config_label(config), target.arch, round(seconds, 2), shared,
                    registers, stack)


def jobs(archs=tuple(TARGETS)) -> list[Job]:
    """Every (kernel, variant, config, target) to compile; a kernel without variants is an error."""
    kernels = find_kernels()
    missing = sorted(set(kernels) - set(VARIANTS))
    if missing:
        raise AOTCompileError(f"kernels without AOT variants: {missing}; add them to VARIANTS in {__name__}")
    stale = sorted(set(VARIANTS) - set(kernels))
    if stale:
        raise AOTCompileError(f"VARIANTS names kernels that do not exist in {PACKAGE}: {stale}")
    return [Job(name, v, c, arch)
            for name, (_, configs) in kernels.items()
            for v, variant in enumerate(VARIANTS[name])
            for c in range(len(configs) if variant.every_config else 1)
            for arch in archs]


def run_job(job: Job) -> Compiled:
    """One job, its failure kept as the row's error so that one broken configuration hides no other."""
    fn, configs = find_kernels()[job.kernel]
    variant, config = VARIANTS[job.kernel][job.variant], configs[job.config]
    try:
        return compile_kernel(fn, variant, config, TARGETS[job.arch])
    except AOTCompileError as e:
        return Compiled(job.kernel, variant.name, config_label(config), job.arch, 0.0, error=str(e))


def compile_all(archs=tuple(TARGETS), workers: int = 1) -> list[Compiled]:
    """Every job, in ``workers`` processes (each imports the kernels once), in ``jobs()`` order."""
    todo = jobs(archs)
    if workers <= 1:
        return [run_job(job) for job in todo]
    # fork: the workers inherit the imported kernels (a spawned worker spends seconds importing torch again);
    # this process has compiled nothing yet, so there is no compiler state to share
    context = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        return list(pool.map(run_job, todo))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(TARGETS), choices=sorted(TARGETS),
                        help="compute capabilities to compile for (80: A100, 90: H100/H200)")
    parser.add_argument("--workers", type=int, default=1, help="compile in this many processes")
    parser.add_argument("--json", type=Path, help="also write every row (with errors) to this file")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    rows = compile_all(tuple(args.arch), args.workers)
    wall = time.perf_counter() - start
    for r in rows:
        status = f"FAILED: {r.error}" if r.error else (f"{r.seconds:6.2f} s  shared {r.shared_bytes:6d} B  "
                                                       f"{r.registers:3d} regs  stack {r.stack_bytes} B")
        print(f"sm_{r.arch}  {r.kernel:<22} {r.variant:<34} {r.config:<40} {status}")
    failed = [r for r in rows if r.error]
    print(f"{len(rows) - len(failed)}/{len(rows)} compiled in {wall:.0f} s "
          f"({sum(r.seconds for r in rows):.0f} s of compiles, {args.workers} worker(s))")
    if args.json:
        args.json.write_text(json.dumps({"wall_s": wall, "rows": [asdict(r) for r in rows]}, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
