"""crop_patches: the Triton kernel (interpreter) vs the reference vs an independent grid_sample formulation."""

import pytest
import torch
import torch.nn.functional as F
from avgn_fast.kernels.crop_patches import crop_patches, crop_patches_ref
from tolerances import tol

# (n_src, C, H, W, size): odd sizes, a patch larger than the image, non-square, a single source, size 1
SHAPES = [(5, 3, 17, 23, 8), (6, 1, 5, 6, (7, 9)), (4, 3, 12, 19, (13, 6)), (1, 2, 9, 10, 1)]
DTYPES = [torch.uint8, torch.float16, torch.float32]
VARIANTS = {
    "plain": {},
    "channels_last-index-normalize": {"layout": "channels_last", "index": torch.int64, "normalize": True,
                                      "channels_last": True},
    "strided-index32-fp16out": {"layout": "strided", "index": torch.int32, "out_dtype": torch.float16},
    "normalize-nhwc_out": {"normalize": True, "channels_last": True},
}


def _pair(size):
    return (size, size) if isinstance(size, int) else size


def _images(n_src, c, h, w, dtype, layout, gen):
    if dtype == torch.uint8:
        base = torch.randint(0, 256, (n_src, c, h, w), generator=gen, dtype=torch.uint8)
    else:
        base = (torch.randn(n_src, c, h, w, generator=gen) * 2).to(dtype)
    if layout == "channels_last":
        return base.contiguous(memory_format=torch.channels_last)
    if layout == "strided":  # every stride non-trivial: every other source, a row offset, every other column
        big = torch.zeros(2 * n_src, c, h + 3, 2 * w, dtype=dtype)
        view = big[::2, :, 1 : h + 1, ::2]
        view.copy_(base)
        return view
    return base


def _centers(n, h, w, ph, pw, gen):
    """Cycle through centres whose last row/column straddles the bottom/right border, an integral
    corner, a first row/column straddling the top/left border, a random centre in or beyond the
    borders, a centre on the image corner, and a patch entirely outside. All are dyadic, so the
    corners are exact in fp32 and the float64 formulation is the exact answer."""
    rows = []
    for i in range(n):
        kind = i % 6
        if kind == 0:
            cy, cx = h - ph / 2 + 0.375, w - pw / 2 + 0.6875
        elif kind == 1:
            cy = torch.randint(-ph // 2, h, (), generator=gen).item() + ph / 2
            cx = torch.randint(-pw // 2, w, (), generator=gen).item() + pw / 2
        elif kind == 2:
            cy, cx = ph / 2 - 0.625, pw / 2 - 0.3125
        elif kind == 3:
            cy = torch.randint(-ph * 64, (h + ph) * 64, (), generator=gen).item() / 64
            cx = torch.randint(-pw * 64, (w + pw) * 64, (), generator=gen).item() / 64
        elif kind == 4:
            cy, cx = 0.0, float(w)
        else:
            cy, cx = h + ph + 0.25, -pw - 0.75
        rows.append((cy, cx))
    return torch.tensor(rows, dtype=torch.float32)


def _stats(c, dtype, gen):
    scale = 255.0 if dtype == torch.uint8 else 1.0
    mean = (torch.rand(c, generator=gen) * 0.5 + 0.25) * scale
    std = (torch.rand(c, generator=gen) * 0.3 + 0.2) * scale
    return mean, std


def _crop_grid_sample(images, centers, ph, pw, index=None, mean=None, std=None):
    """Independent float64 formulation: AdaFocusV2's affine theta + F.grid_sample(align_corners=False)."""
    src = images.double() if index is None else images.double()[index.long()]
    n, c, h, w = src.shape
    cy, cx = centers.double().unbind(1)
    theta = torch.zeros(n, 2, 3, dtype=torch.float64)
    theta[:, 0, 0] = pw / w
    theta[:, 0, 2] = 2 * cx / w - 1
    theta[:, 1, 1] = ph / h
    theta[:, 1, 2] = 2 * cy / h - 1
    grid = F.affine_grid(theta, [n, c, ph, pw], align_corners=False)
    out = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if mean is not None:
        out = out - mean.double().view(1, c, 1, 1)
    if std is not None:
        out = out / std.double().view(1, c, 1, 1)
    return out


def _assert_near_exact(actual, exact):
    """Within the dtype's tolerance of the float64 result, and at most twice the error of rounding
    that result to the same dtype (PyTorch's best same-dtype answer) plus the dtype's atol."""
    torch.testing.assert_close(actual.double(), exact, **tol(actual.dtype))
    err = (actual.double() - exact).abs().max()
    own = (exact.to(actual.dtype).double() - exact).abs().max()
    assert err <= 2 * own + tol(actual.dtype)["atol"]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_matches_reference_and_grid_sample(shape, dtype, variant):
    opts = VARIANTS[variant]
    gen = torch.Generator().manual_seed(0)
    n_src, c, h, w, size = shape
    ph, pw = _pair(size)
    images = _images(n_src, c, h, w, dtype, opts.get("layout"), gen)
    index = None
    if "index" in opts:  # repeats and one more patch than sources
        index = torch.randint(0, n_src, (n_src + 1,), generator=gen).to(opts["index"])
    n = n_src if index is None else index.numel()
    centers = _centers(n, h, w, ph, pw, gen)
    mean, std = _stats(c, dtype, gen) if opts.get("normalize") else (None, None)
    out_dtype = opts.get("out_dtype", dtype if dtype.is_floating_point else torch.float32)
    memory_format = torch.channels_last if opts.get("channels_last") else torch.contiguous_format
    kwargs = {"index": index, "mean": mean, "std": std, "out_dtype": opts.get("out_dtype"),
              "channels_last": opts.get("channels_last", False)}

    poisoned = torch.full((n, c, ph, pw), float("nan"), dtype=out_dtype).contiguous(memory_format=memory_format)
    out = crop_patches(images, centers, size, out=poisoned, **kwargs)
    ref = crop_patches_ref(images, centers, size, **kwargs)
    exact = _crop_grid_sample(images, centers, ph, pw, index, mean, std)

    assert out is poisoned
    assert ref.dtype == out_dtype and ref.is_contiguous(memory_format=memory_format)
    torch.testing.assert_close(out, ref, **tol(out_dtype))
    _assert_near_exact(out, exact)
    _assert_near_exact(ref, exact)


def test_kernel_allocates_the_requested_layout():
    gen = torch.Generator().manual_seed(1)
    images = _images(2, 3, 10, 12, torch.float32, "channels_last", gen)
    centers = _centers(2, 10, 12, 5, 7, gen)
    for channels_last, memory_format in ((False, torch.contiguous_format), (True, torch.channels_last)):
        out = crop_patches(images, centers, (5, 7), channels_last=channels_last)
        assert out.shape == (2, 3, 5, 7) and out.is_contiguous(memory_format=memory_format)
        torch.testing.assert_close(out, crop_patches_ref(images, centers, (5, 7)), **tol(torch.float32))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_integral_corner_is_an_exact_copy_of_the_slice(dtype, layout):
    gen = torch.Generator().manual_seed(2)
    ph, pw = 5, 6  # odd ph: the centre of an integral corner sits on a half pixel
    images = _images(3, 3, 11, 14, dtype, layout, gen)
    index = torch.tensor([0, 2, 1, 2])
    corners = torch.tensor([[0, 0], [3, 7], [-2, 10], [8, -3]])  # inside, inside, over top/right, over bottom/left
    centers = corners.float() + torch.tensor([ph / 2, pw / 2])
    padded = F.pad(images, (pw, pw, ph, ph))
    expected = torch.stack([padded[i, :, y + ph : y + 2 * ph, x + pw : x + 2 * pw]
                            for i, (y, x) in zip(index.tolist(), corners.tolist())])
    expected = expected.to(dtype if dtype.is_floating_point else torch.float32)

    assert torch.equal(crop_patches(images, centers, (ph, pw), index=index), expected)
    assert torch.equal(crop_patches_ref(images, centers, (ph, pw), index=index), expected)


@pytest.mark.parametrize("fn", [crop_patches, crop_patches_ref])
def test_an_empty_index_gives_no_patches(fn):
    images = torch.randn(2, 3, 8, 8)
    out = fn(images, torch.empty(0, 2), 3, index=torch.empty(0, dtype=torch.int64))
    assert out.shape == (0, 3, 3, 3) and out.dtype == torch.float32


BAD_ARGUMENTS = [
    ({"images": torch.randn(3, 8, 8)}, "images"),
    ({"images": torch.randint(0, 5, (2, 3, 8, 8), dtype=torch.int32)}, "images"),
    ({"size": 0}, "size"),
    ({"size": (3, 4, 5)}, "size"),
    ({"index": torch.tensor([0, 2])}, "index"),
    ({"index": torch.tensor([-1, 0])}, "index"),
    ({"index": torch.tensor([[0, 1]])}, "index"),
    ({"index": torch.tensor([0.0, 1.0])}, "index"),
    ({"centers": torch.full((3, 2), 4.0)}, "centers"),
    ({"centers": torch.full((2, 2), 4)}, "centers"),
    ({"mean": torch.rand(2)}, "mean"),
    ({"std": torch.rand(3, 1)}, "std"),
    ({"out_dtype": torch.int32}, "out_dtype"),
]
KERNEL_BAD_ARGUMENTS = [
    ({"images": torch.randn(2, 3, 8, 8, dtype=torch.float64)}, "images"),
    ({"out": torch.empty(2, 3, 4, 3)}, "out"),
    ({"out": torch.empty(2, 3, 3, 3, dtype=torch.float16)}, "out"),
    ({"out": torch.empty(2, 3, 3, 3), "channels_last": True}, "out"),
]


def _call(fn, changes):
    args = {"images": torch.randn(2, 3, 8, 8), "centers": torch.full((2, 2), 4.0), "size": 3, **changes}
    return fn(args.pop("images"), args.pop("centers"), args.pop("size"), **args)


@pytest.mark.parametrize("fn", [crop_patches, crop_patches_ref])
@pytest.mark.parametrize("changes,name", BAD_ARGUMENTS)
def test_bad_arguments_raise_value_error_naming_them(fn, changes, name):
    with pytest.raises(ValueError, match=f"^{name}"):
        _call(fn, changes)


@pytest.mark.parametrize("changes,name", KERNEL_BAD_ARGUMENTS)
def test_kernel_rejects_what_it_cannot_write(changes, name):
    with pytest.raises(ValueError, match=f"^{name}"):
        _call(crop_patches, changes)


def _op_samples():
    gen = torch.Generator().manual_seed(3)
    images = _images(3, 3, 12, 13, torch.float32, "contiguous", gen)
    frames = _images(3, 3, 12, 13, torch.uint8, "channels_last", gen)
    index = torch.tensor([2, 0, 2, 1])
    mean, std = _stats(3, torch.uint8, gen)
    return [
        ((images, _centers(3, 12, 13, 5, 7, gen), 5, 7), {}),
        ((frames, _centers(4, 12, 13, 6, 6, gen), 6, 6),
         {"index": index, "mean": mean, "std": std, "out_dtype": torch.float16, "channels_last": True}),
    ]


def test_registered_op_passes_opcheck():
    for args, kwargs in _op_samples():
        torch.library.opcheck(torch.ops.avgn_fast.crop_patches.default, args, kwargs)
    # with a gradient-requiring input: the autograd registration (whose backward refuses) is in place
    (images, *rest), kwargs = _op_samples()[0]
    torch.library.opcheck(torch.ops.avgn_fast.crop_patches.default, (images.requires_grad_(), *rest), kwargs,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


class _Crop(torch.nn.Module):
    def forward(self, images, centers, index, mean, std):
        return torch.ops.avgn_fast.crop_patches(images, centers, 6, 6, index, mean, std, torch.float16, True)


def test_export_keeps_the_op_as_one_node():
    (images, centers, _, _), kwargs = _op_samples()[1]
    args = (images, centers, kwargs["index"], kwargs["mean"], kwargs["std"])
    program = torch.export.export(_Crop(), args)
    calls = [node for node in program.graph.nodes if node.op == "call_function"]
    assert [node.target for node in calls] == [torch.ops.avgn_fast.crop_patches.default]
    expected = crop_patches_ref(images, centers, 6, **kwargs)
    torch.testing.assert_close(program.module()(*args), expected, **tol(torch.float16))


def test_compile_traces_the_op_into_the_reference_on_cpu():
    (images, centers, _, _), kwargs = _op_samples()[1]
    compiled = torch.compile(_Crop(), backend="aot_eager", fullgraph=True)
    out = compiled(images, centers, kwargs["index"], kwargs["mean"], kwargs["std"])
    torch.testing.assert_close(out, crop_patches_ref(images, centers, 6, **kwargs), **tol(torch.float16))


def test_backward_through_the_op_is_refused():
    (images, centers, ph, pw), _ = _op_samples()[0]
    out = torch.ops.avgn_fast.crop_patches(images.requires_grad_(), centers, ph, pw)
    with pytest.raises(RuntimeError, match="inference-only; use crop_patches_ref"):
        out.sum().backward()


def test_reference_is_differentiable_in_images_and_centers():
    gen = torch.Generator().manual_seed(4)
    images = torch.randn(2, 2, 7, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    centers = (torch.tensor([[3.3, 4.1], [5.7, 2.2]], dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, c: crop_patches_ref(x, c, (3, 4)), (images, centers))
