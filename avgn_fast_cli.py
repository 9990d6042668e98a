"""The ``avgn-fast`` console script: parses arguments and prints help without importing torch.

``import avgn_fast`` imports torch and registers the package's ops (about 4 s of CPU on the 2-core
development machine: torch 2 s, the ``triton_op`` registration another 2 s), and every module of the
package, the light command modules included, is imported through the package's ``__init__``. This
module sits outside the package so that it can put the package into ``sys.modules`` before running its
``__init__``: the command modules import, ``avgn_fast.cli`` builds the parser and prints help or a
usage error, and the ``__init__`` runs only once the arguments parse, just before the command. Help
then takes about 0.1 s of CPU (``benchmarks/bench_cli.py``).

The simpler alternative, the entry point in ``avgn_fast.cli`` with ``__init__`` importing torch only on
demand, would leave ``torch.ops.avgn_fast.*`` unregistered after ``import avgn_fast``, so exported graphs
holding them would not load.
"""

from __future__ import annotations

import importlib.util
import sys


def main(argv: list[str] | None = None) -> int:
    """``avgn_fast.cli.main(argv)`` with the package's ``__init__`` deferred until a command runs."""
    if "avgn_fast" in sys.modules:  # imported already: nothing left to defer
        from avgn_fast.cli import main as cli_main

        return cli_main(argv)
    spec = importlib.util.find_spec("avgn_fast")
    package = importlib.util.module_from_spec(spec)
    sys.modules["avgn_fast"] = package  # importable, its __init__ not yet run
    initialised = []

    def initialise():
        spec.loader.exec_module(package)
        initialised.append(True)

    try:
        from avgn_fast import cli

        return cli.main(argv, before_run=initialise)
    finally:
        if not initialised:  # help, a usage error or a failed __init__: a later import must start afresh
            for name in [m for m in sys.modules if m == "avgn_fast" or m.startswith("avgn_fast.")]:
                del sys.modules[name]


if __name__ == "__main__":
    sys.exit(main())
