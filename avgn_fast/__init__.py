"""avgn_fast: Triton-accelerated inference for the Audio-Visual Glance Network."""

from avgn_fast.config import AVGNConfig, use_triton

__version__ = "0.1.0"
__all__ = ["AVGN", "AVGNConfig", "load", "use_triton", "__version__"]


def __getattr__(name):
    # the model is imported on first use, so `import avgn_fast` (and the CLI) stays light
    if name == "AVGN":
        from avgn_fast.models.avgn import AVGN

        return AVGN
    if name == "load":
        from avgn_fast.checkpoint import load

        return load
    raise AttributeError(f"module 'avgn_fast' has no attribute {name!r}")
