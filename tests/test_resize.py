"""The glance's area resize: block means of uint8 frames against a float64 reference built with numpy."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tolerances import tol

from avgn_fast.models.resize import area_resize


def block_means(frames: torch.Tensor, size: int) -> torch.Tensor:
    """float64 mean of each (S/size)² block, by numpy reshape (size divides S)."""
    n, c, s, _ = frames.shape
    f = s // size
    x = frames.numpy().astype(np.float64).reshape(n, c, size, f, size, f)
    return torch.from_numpy(x.mean(axis=(3, 5)))


@pytest.mark.parametrize("s,size", [(96, 32), (96, 48), (64, 16), (90, 30), (56, 8), (12, 1)])
def test_integer_factors_are_the_block_means(s, size):
    g = torch.Generator().manual_seed(s * 1000 + size)
    frames = torch.randint(0, 256, (4, 3, s, s), dtype=torch.uint8, generator=g)
    out = area_resize(frames, size)
    ref = block_means(frames, size)
    assert out.dtype == torch.float32 and out.shape == (4, 3, size, size)
    torch.testing.assert_close(out.double(), ref, **tol(torch.float32))
    f = s // size
    if f & (f - 1) == 0:  # a power-of-two block: the mean is exact in float32
        assert torch.equal(out.double(), ref)
    # never further from the exact means than F.interpolate's "area" on the same frames
    area = F.interpolate(frames.float(), size=(size, size), mode="area")
    assert (out.double() - ref).abs().max() <= (area.double() - ref).abs().max()


@pytest.mark.parametrize("shape,size", [((2, 3, 96, 96), 40), ((2, 3, 96, 64), 32)])
def test_other_sizes_run_area(shape, size):
    g = torch.Generator().manual_seed(7)
    frames = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
    area = F.interpolate(frames.float(), size=(size, size), mode="area")
    assert torch.equal(area_resize(frames, size), area)


def test_non_contiguous_frames():
    g = torch.Generator().manual_seed(3)
    frames = torch.randint(0, 256, (3, 96, 96, 2), dtype=torch.uint8, generator=g)[..., 1].unsqueeze(0)
    frames = frames.expand(2, 3, 96, 96)
    torch.testing.assert_close(area_resize(frames, 32).double(), block_means(frames.contiguous(), 32),
                               **tol(torch.float32))


@pytest.mark.parametrize("f", [11, 12, 16])
def test_full_scale_blocks_do_not_overflow_the_integer_sums(f):
    """f = 11 is the largest block whose sum of 255s fits int16; 12 and 16 need int32."""
    g = torch.Generator().manual_seed(f)
    frames = torch.randint(250, 256, (2, 3, 2 * f, 2 * f), dtype=torch.uint8, generator=g)
    frames[0] = 255
    out = area_resize(frames, 2)
    assert torch.equal(out[0], torch.full((3, 2, 2), 255.0))
    torch.testing.assert_close(out.double(), block_means(frames, 2), **tol(torch.float32))
