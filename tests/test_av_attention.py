"""av_attention (Triton, interpreted on CPU) and its op against an fp64 reference on random inputs."""

import pytest
import torch
from avgn_fast.kernels.av_attention import av_attention, av_attention_ref
from tolerances import tol

# (B, H, Lq, Lk, D): visual->audio (49 tokens to a few), audio->visual (1..8 to 49), odd and size-1
# lengths, and Lk > 128, which the kernel walks in key blocks with an online softmax
SHAPES = [
    (2, 2, 49, 8, 64),
    (2, 2, 1, 49, 16),
    (2, 2, 8, 49, 64),
    (3, 1, 17, 5, 16),
    (2, 2, 3, 13, 16),
    (1, 1, 1, 1, 16),
    (2, 1, 5, 150, 16),
]
DTYPES = [torch.float32, torch.float16]


def _qkv(b, h, lq, lk, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, generator=g).to(dtype) for n in (lq, lk, lk))
    return q, k, v


def _mask(b, lk, mode, seed=0):
    """None, or a (B, Lk) mask whose batch 0 is fully masked (B > 1) and the rest random or prefix-masked."""
    if mode is None:
        return None
    g = torch.Generator().manual_seed(seed + 1)
    mask = torch.rand(b, lk, generator=g) < 0.4
    if mode == "prefix":
        # all but the last 3 keys: with Lk > 128 the first key block is empty for every row
        mask[:] = True
        mask[:, -3:] = False
    if b > 1:
        mask[0] = True
    return mask


def _eager_same_dtype(q, k, v, mask, scale):
    """What PyTorch itself computes in the input dtype: matmul, softmax, matmul (empty rows -> 0)."""
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if mask is not None:
        s = s.masked_fill(mask[:, None, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return torch.matmul(p, v), p


def _assert_near_fp64(got, ref64, eager, dtype):
    """STYLE 7: error vs fp64 at most twice PyTorch's own same-dtype error, plus the table's atol."""
    assert not got.isnan().any()
    err = (got.double() - ref64).abs().max().item()
    torch_err = (eager.double() - ref64).abs().max().item()
    assert err <= 2 * torch_err + tol(dtype)["atol"], f"{err=} {torch_err=}"


def _poisoned(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype)


@pytest.mark.parametrize("mask_mode", [None, "random", "prefix"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_fp64_reference(shape, dtype, mask_mode):
    b, h, lq, lk, d = shape
    q, k, v = _qkv(*shape, dtype)
    mask = _mask(b, lk, mask_mode)
    out, weights = _poisoned((b, h, lq, d), dtype), _poisoned((b, h, lq, lk), dtype)
    got, got_w = av_attention(q, k, v, key_padding_mask=mask, return_weights=True, out=out, out_weights=weights)
    assert got is out and got_w is weights

    ref, ref_w = av_attention_ref(q.double(), k.double(), v.double(), key_padding_mask=mask, return_weights=True)
    eager, eager_w = _eager_same_dtype(q, k, v, mask, d**-0.5)
    _assert_near_fp64(got, ref, eager, dtype)
    _assert_near_fp64(got_w, ref_w, eager_w, dtype)
    if mask is not None:
        empty = mask.all(dim=-1)
        assert (got[empty] == 0).all() and (got_w[empty] == 0).all()
        assert (got_w.permute(0, 3, 1, 2)[mask] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_weights_sum_to_one_over_unmasked_keys(dtype):
    b, h, lq, lk, d = 3, 2, 7, 11, 32
    q, k, v = _qkv(b, h, lq, lk, d, dtype, seed=3)
    mask = _mask(b, lk, "random", seed=3)
    _, w = av_attention(q, k, v, key_padding_mask=mask, return_weights=True)
    sums = w.float().sum(dim=-1)  # (B, H, Lq)
    live = ~mask.all(dim=-1)
    torch.testing.assert_close(sums[live], torch.ones_like(sums[live]), atol=4 * tol(dtype)["atol"], rtol=0)
    assert (sums[~live] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_inputs_and_outputs(dtype):
    """q, k, v as head-transposed views of (B, L, H, D) tensors, v with a non-unit last stride, out strided."""
    b, h, lq, lk, d = 2, 3, 9, 6, 16
    g = torch.Generator().manual_seed(5)
    q = torch.randn(b, lq, h, d, generator=g).to(dtype).transpose(1, 2)
    k = torch.randn(b, lk, h, d, generator=g).to(dtype).transpose(1, 2)
    v = torch.randn(b, lk, h, 2 * d, generator=g).to(dtype).transpose(1, 2)[..., ::2]
    mask = (torch.rand(b, 2 * lk, generator=g) < 0.3)[:, ::2]
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous() or mask.is_contiguous())
    out = _poisoned((b, lq, h, d), dtype).transpose(1, 2)
    weights = _poisoned((b, h, lk, lq), dtype).transpose(2, 3)
    av_attention(q, k, v, key_padding_mask=mask, scale=0.37, return_weights=True, out=out, out_weights=weights)

    ref, ref_w = av_attention_ref(q.double(), k.double(), v.double(), key_padding_mask=mask, scale=0.37,
                                  return_weights=True)
    eager, eager_w = _eager_same_dtype(q, k, v, mask, 0.37)
    _assert_near_fp64(out, ref, eager, dtype)
    _assert_near_fp64(weights, ref_w, eager_w, dtype)


@pytest.mark.parametrize("shape", [(2, 1, 20, 3, 16), (2, 1, 5, 150, 16)], ids=["one-pass", "key-blocks"])
def test_out_only_equals_out_with_weights(shape):
    q, k, v = _qkv(*shape, torch.float16, seed=2)
    mask = _mask(shape[0], shape[3], "random", seed=2)
    out = av_attention(q, k, v, key_padding_mask=mask)
    assert isinstance(out, torch.Tensor)
    torch.testing.assert_close(out, av_attention(q, k, v, key_padding_mask=mask, return_weights=True)[0],
                               atol=0, rtol=0)


def test_empty_batch():
    q0, k0, v0 = _qkv(0, 2, 4, 3, 16, torch.float32)
    assert av_attention(q0, k0, v0).shape == (0, 2, 4, 16)


def _bad_calls():
    q, k, v = _qkv(2, 2, 4, 3, 16, torch.float32)
    yield "4-D", lambda: av_attention(q[0], k, v)
    yield "matching q", lambda: av_attention(q, k[:, :1], v)
    yield "share a dtype", lambda: av_attention(q, k.half(), v)
    yield "key_padding_mask", lambda: av_attention(q, k, v, key_padding_mask=torch.zeros(2, 4, dtype=torch.bool))
    yield "key_padding_mask", lambda: av_attention(q, k, v, key_padding_mask=torch.zeros(2, 3))
    yield "like q", lambda: av_attention(q, k.to("meta"), v)
    yield "head dim", lambda: av_attention(*(t[..., :12] for t in (q, k, v)))
    yield "float32/float16/bfloat16", lambda: av_attention(q.double(), k.double(), v.double())
    yield "no bfloat16", lambda: av_attention(q.bfloat16(), k.bfloat16(), v.bfloat16())
    yield "out must be", lambda: av_attention(q, k, v, out=torch.empty(2, 2, 4, 8))
    yield "out_weights must be", lambda: av_attention(q, k, v, return_weights=True, out_weights=torch.empty(2, 2, 4, 4))
    yield "return_weights=True", lambda: av_attention(q, k, v, out_weights=torch.empty(2, 2, 4, 3))


@pytest.mark.parametrize("match,call", list(_bad_calls()), ids=[m for m, _ in _bad_calls()])
def test_bad_arguments_raise_value_error(match, call):
    with pytest.raises(ValueError, match=match):
        call()


# ---- the op: reference on CPU


def _op_args(seed=0):
    q, k, v = _qkv(2, 2, 5, 7, 16, torch.float32, seed=seed)
    return q, k, v, _mask(2, 7, "random", seed=seed)


@pytest.mark.parametrize("return_weights", [False, True])
def test_cpu_op_is_the_reference_and_passes_opcheck(return_weights):
    q, k, v, mask = _op_args()
    out, w = torch.ops.avgn_fast.av_attention(q, k, v, mask, 0.5, return_weights)
    ref = av_attention_ref(q, k, v, key_padding_mask=mask, scale=0.5, return_weights=return_weights)
    if return_weights:
        torch.testing.assert_close((out, w), ref, atol=0, rtol=0)
    else:
        torch.testing.assert_close(out, ref, atol=0, rtol=0)
        assert w.shape == (0,)
    torch.library.opcheck(torch.ops.avgn_fast.av_attention.default, (q, k, v, mask, 0.5, return_weights))
    torch.library.opcheck(torch.ops.avgn_fast.av_attention.default, (q.transpose(2, 3).contiguous().transpose(2, 3),
                                                                     k, v, None, None, return_weights))


def test_export_keeps_one_op_node():
    class Attend(torch.nn.Module):
        def forward(self, q, k, v, mask):
            return torch.ops.avgn_fast.av_attention(q, k, v, mask, return_weights=True)

    args = _op_args(seed=1)
    ep = torch.export.export(Attend(), args)
    calls = [n.target for n in ep.graph.nodes if n.op == "call_function" and n.target.__name__ != "getitem"]
    assert calls == [torch.ops.avgn_fast.av_attention.default]
    torch.testing.assert_close(ep.module()(*args), Attend()(*args), atol=0, rtol=0)


def test_backward_raises_inference_only():
    q, k, v, mask = _op_args()
    out, _ = torch.ops.avgn_fast.av_attention(q.requires_grad_(), k, v, mask)
    with pytest.raises(RuntimeError, match="inference-only"):
        out.sum().backward()
