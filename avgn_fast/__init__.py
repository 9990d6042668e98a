"""avgn_fast: Triton-accelerated inference for the Audio-Visual Glance Network.

``import avgn_fast`` registers the package's ops (``torch.ops.avgn_fast.crop_patches`` and
``torch.ops.avgn_fast.av_attention``, from ``avgn_fast.kernels``), so a compiled or exported graph that
holds them loads in any process that imports the package. The model, the loader and the engines are
imported on first use (``avgn_fast.AVGN``): most scripts need one of them, not all.
"""

import importlib

from avgn_fast.config import AVGNConfig, use_triton

__version__ = "0.1.0"
__all__ = ["AVGN", "AVGNConfig", "GlanceEngine", "Predictor", "load", "stream", "use_triton", "__version__"]

# public name -> the module that defines it, imported by __getattr__ on first use
_LAZY = {
    "AVGN": "avgn_fast.models.avgn",
    "GlanceEngine": "avgn_fast.engine.early_exit",
    "Predictor": "avgn_fast.engine.predictor",
    "load": "avgn_fast.checkpoint",
    "stream": "avgn_fast.engine.live",
}


def _import_kernels():
    """``avgn_fast.kernels``, whose import registers the ops.

    setup.py installs the checkout's ``kernels/`` folder under that name. A checkout used without
    installing (``PYTHONPATH=CHECKOUT``, as on a machine where nothing can be installed) has no such
    package on the path, so the same folder is loaded under the same name.
    """
    import importlib.util
    import sys
    from pathlib import Path

    name = f"{__name__}.kernels"
    folder = Path(__file__).resolve().parent.parent / "kernels"
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name != name or not (folder / "__init__.py").is_file():
            raise
    spec = importlib.util.spec_from_file_location(name, folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


kernels = _import_kernels()


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip __getattr__
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
