"""avgn_fast: Triton-accelerated inference for the Audio-Visual Glance Network."""

from avgn_fast.config import AVGNConfig, use_triton

__version__ = "0.1.0"
__all__ = ["AVGNConfig", "use_triton", "__version__"]
