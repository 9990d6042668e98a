"""1×1 convs on small CPU maps: oneDNN's conv against ``PointwiseConv2d``'s matrix product, one thread.

    python benchmarks/bench_pointwise.py [--repeat 40]

Shapes from the tiny and paper backbones' last stages and beyond the ``SMALL_MAP`` limit, channels-last
input. Prints a Markdown table: ms of each (best of ``repeat``) and conv / product; the limit is where the
ratio falls below 1.
"""

from __future__ import annotations

import argparse
import time

import torch

from avgn_fast.models.backbones import PointwiseConv2d

# (N, C_in, H, W, C_out): N = 16 videos × 16 frames, as one glance batch
SHAPES = ((256, 160, 1, 1, 1280), (256, 80, 1, 1, 480), (256, 480, 1, 1, 160), (256, 48, 2, 2, 16),
          (256, 96, 2, 4, 576), (256, 48, 4, 4, 16), (256, 16, 5, 5, 96), (256, 16, 4, 7, 96), (64, 16, 6, 6, 96),
          (256, 8, 16, 16, 48))


def best_ms(fn, repeat: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


class _AlwaysProduct(PointwiseConv2d):
    SMALL_MAP = 1 << 30  # the product on every map, to time it where the limit would run the conv


def compare(n: int, c_in: int, h: int, w: int, c_out: int, repeat: int) -> tuple[float, float]:
    torch.manual_seed(0)
    x = torch.randn(n, c_in, h, w).contiguous(memory_format=torch.channels_last)
    conv = torch.nn.Conv2d(c_in, c_out, 1)
    product = _AlwaysProduct(c_in, c_out, 1)
    product.load_state_dict(conv.state_dict())
    with torch.inference_mode():
        torch.testing.assert_close(product(x), conv(x), atol=1e-4, rtol=1e-4)
        return best_ms(lambda: conv(x), repeat), best_ms(lambda: product(x), repeat)


def main(repeat: int = 40) -> list[tuple]:
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, one thread, best of {repeat}, limit {PointwiseConv2d.SMALL_MAP} pixels\n")
    print("| input (N, C, H, W) → C_out | pixels | conv ms | product ms | conv / product |")
    print("|---|---:|---:|---:|---:|")
    rows = []
    for n, c_in, h, w, c_out in SHAPES:
        conv_ms, product_ms = compare(n, c_in, h, w, c_out, repeat)
        rows.append((n, c_in, h, w, c_out, conv_ms, product_ms))
        print(f"| ({n}, {c_in}, {h}, {w}) → {c_out} | {h * w} | {conv_ms:.3f} | {product_ms:.3f} | "
              f"{conv_ms / product_ms:.2f}× |")
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=40, help="timed calls per shape; the best counts")
    main(**vars(parser.parse_args()))
