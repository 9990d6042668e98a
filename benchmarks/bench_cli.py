"""Wall and CPU time of ``avgn-fast --help`` and of every ``avgn-fast COMMAND --help``, each in a fresh process.

    python benchmarks/bench_cli.py [--runs 5] [--exe PATH]

Help must be instant (target: under 1 s here), so it may import neither torch nor the training stack;
``tests/test_api.py`` checks the imports, this measures the time. Each row is the median of ``--runs``
fresh processes of the installed console script (``--exe`` to time another one), with the time of a bare
``python -c pass`` and of ``python -c "import torch"`` on the same machine, for scale.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

TARGET_S = 1.0


def console_script() -> str:
    """The installed ``avgn-fast``: beside this interpreter (no shell shim in the timing), else on PATH."""
    beside = Path(sys.executable).parent / "avgn-fast"
    found = str(beside) if beside.exists() else shutil.which("avgn-fast")
    if found is None:
        raise SystemExit("bench_cli: no avgn-fast console script; install the package (pip install -e .)")
    return found


def median_s(argv: list[str], runs: int) -> tuple[float, float] | str:
    """Median (wall, CPU) seconds of ``argv`` run ``runs`` times, each a fresh process, or why a run failed.

    CPU is the child's user + system time: on shared cores it moves less with the load than wall time.
    """
    wall, cpu = [], []
    for _ in range(runs):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        done = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        wall.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or [""])[-1]
            return f"failed (exit {done.returncode}): {last}"
    return statistics.median(wall), statistics.median(cpu)


def commands() -> list[str]:
    """The sub-command names, read from the parser module without running any command."""
    from avgn_fast.cli import COMMANDS

    return list(COMMANDS)


def main(runs: int = 5, exe: str | None = None) -> int:
    exe = exe or console_script()
    rows = [("python -c pass", median_s([sys.executable, "-c", "pass"], runs)),
            ("python -c 'import torch'", median_s([sys.executable, "-c", "import torch"], runs)),
            ("avgn-fast --help", median_s([exe, "--help"], runs))]
    rows += [(f"avgn-fast {name} --help", median_s([exe, name, "--help"], runs)) for name in commands()]
    width = max(len(name) for name, _ in rows)
    print(f"{exe}, median of {runs} fresh processes, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} "
          f"cores; target for help: < {TARGET_S:g} s wall")
    print(f"{'command':<{width}}  {'wall s':>7}  {'CPU s':>7}")
    for name, result in rows:
        if isinstance(result, str):
            print(f"{name:<{width}}  {result}")
            continue
        wall, cpu = result
        flag = "  over target" if name.startswith("avgn-fast") and wall >= TARGET_S else ""
        print(f"{name:<{width}}  {wall:7.3f}  {cpu:7.3f}{flag}")
    return int(any(isinstance(result, str) for _, result in rows))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="fresh processes per row; the median is printed")
    parser.add_argument("--exe", default=None, help="console script to time (default: the installed avgn-fast)")
    sys.exit(main(**vars(parser.parse_args())))
