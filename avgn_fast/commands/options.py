"""Options spelled the same way by every command that runs a model: ``predict``, ``eval``, ``calibrate``."""

from __future__ import annotations


def add_inference_arguments(parser) -> None:
    """``--k`` and ``--exit-threshold``, spelled as ``predict`` spells them."""
    parser.add_argument("--k", type=int, default=None, help="frames to look at closely (default: the checkpoint's)")
    parser.add_argument("--exit-threshold", default="checkpoint", metavar="TAU",
                        help="early-exit confidence threshold in [0, 1], 'never' (every video takes every step) or "
                             "'checkpoint' (default: the checkpoint's, set by avgn-fast calibrate)")


def add_engine_arguments(parser) -> None:
    """``--device``, ``--backend`` and ``--precision``, spelled as ``predict`` spells them."""
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:N")
    parser.add_argument("--backend", default="eager",
                        help="eager (default), inductor (torch.compile), tensorrt, or auto (TensorRT, else inductor on "
                             "CUDA, else eager)")
    parser.add_argument("--precision", default="auto", help="auto (fp16 on CUDA, fp32 on CPU), fp32, fp16, bf16")
