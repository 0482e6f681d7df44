"""Adapter segments (docs/math.md §7): each segment with its own softmax and its own zero-init gate, per
(segment, query head) or per (sample, segment, query head), in every backend that takes them.

The reference is checked against an independent construction (one adapter per segment, each through
the one-segment path docs/math.md §1 already tests), then the composed backend against the float64 reference
on random inputs with every output and gradient (kernel_cases' rule), including the fold-ins alone.
"""
import dataclasses

import pytest
import torch

import causalattn
from causalattn import Adapter
from causalattn.reference import attention_dense
from causalattn.routing import segment_outputs
from kernel_cases import Case, check_case

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("single_thread")


def _problem(batch=2, heads_q=4, heads_kv=2, n=24, d=16, sizes=(3, 5), seed=0, per_sample_keys=True):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(shape, generator=gen, dtype=F64)

    prefix = (batch,) if per_sample_keys else ()
    q, k, v = randn(batch, heads_q, n, d), randn(batch, heads_kv, n, d), randn(batch, heads_kv, n, d)
    keys, values = randn(*prefix, heads_kv, sum(sizes), d), randn(*prefix, heads_kv, sum(sizes), d)
    return q, k, v, keys, values, randn


def test_segments_are_separate_adapters():
    """out(segments) = out(no adapter) + sum_s [out(adapter of segment s alone) - out(no adapter)]."""
    sizes = (3, 5, 2)
    q, k, v, keys, values, randn = _problem(sizes=sizes)
    gate = randn(2, len(sizes), 4)  # per sample, segment and query head
    got = attention_dense(q, k, v, adapter=Adapter(keys, values, gate, "tanh", sizes)).out
    plain = attention_dense(q, k, v).out
    want = plain.clone()
    start = 0
    for index, size in enumerate(sizes):
        for b in range(2):
            alone = Adapter(keys[b, :, start:start + size], values[b, :, start:start + size], gate[b, index])
            want[b] += attention_dense(q[b:b + 1], k[b:b + 1], v[b:b + 1], adapter=alone).out[0] - plain[b]
        start += size
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_one_segment_is_todays_adapter_exactly():
    q, k, v, keys, values, randn = _problem(sizes=(8,), per_sample_keys=False)
    gate = randn(4)
    today = attention_dense(q, k, v, adapter=Adapter(keys, values, gate), xg_tokens=2)
    for as_segments in (Adapter(keys, values, gate, "tanh", (8,)), Adapter(keys, values, gate[None], "tanh", (8,)),
                        Adapter(keys, values, gate[None, None].expand(2, 1, 4), "tanh", (8,))):
        for backend in ("reference", "composed"):
            got = causalattn.attention(q, k, v, adapter=as_segments, xg_tokens=2, backend=backend)
            torch.testing.assert_close(got.out, today.out, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(got.xg, today.xg, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["reference", "composed"])
def test_zero_gate_of_one_segment_keeps_its_prompt_still(backend):
    """The zero-init property per segment: gamma_s = 0 gives dKa_s = dVa_s = 0 and d gate_s != 0, while
    the other segment trains."""
    sizes = (4, 6)
    q, k, v, keys, values, randn = _problem(sizes=sizes, per_sample_keys=False)
    gate = randn(2, 4)
    gate[1] = 0.0
    keys, values, gate = (t.clone().requires_grad_() for t in (keys, values, gate))
    result = causalattn.attention(q, k, v, adapter=Adapter(keys, values, gate, "tanh", sizes), backend=backend)
    (result.out * randn(*result.out.shape)).sum().backward()
    assert not keys.grad[:, 4:].any() and not values.grad[:, 4:].any()
    assert keys.grad[:, :4].abs().min() > 0 and values.grad[:, :4].abs().min() > 0
    assert gate.grad[1].abs().min() > 0


def test_xg_reads_the_first_segment():
    sizes = (4, 6)
    q, k, v, keys, values, randn = _problem(sizes=sizes, per_sample_keys=False)
    gate = randn(2, 4)
    segmented = attention_dense(q, k, v, adapter=Adapter(keys, values, gate, "tanh", sizes), xg_tokens=2, xg_pool="position")
    first_alone = attention_dense(q, k, v, adapter=Adapter(keys[:, :4], values[:, :4], gate[0]), xg_tokens=2,
                                  xg_pool="position")
    torch.testing.assert_close(segmented.xg, first_alone.xg, rtol=1e-12, atol=1e-12)


def test_segment_outputs_add_up_to_the_adapter_branch():
    sizes = (3, 5)
    q, k, v, keys, values, randn = _problem(sizes=sizes)
    adapter = Adapter(keys, values, randn(2, 2, 4), "tanh", sizes)
    rows = q[:, :, -3:]
    parts = segment_outputs(rows, adapter)
    assert parts.shape == (2, 2, 4, 3, 16)
    branch = attention_dense(q, k, v, adapter=adapter).out - attention_dense(q, k, v).out
    torch.testing.assert_close(parts.sum(1), branch[:, :, -3:], rtol=1e-12, atol=1e-12)


SEGMENT_CASES = [
    Case(adapter_len=8, segments=(3, 5)),
    Case(adapter_len=8, segments=(3, 5), per_sample_adapter=True, gate="sample", xg_tokens=2, mask="random-0.3"),
    Case(adapter_len=12, segments=(4, 4, 4), gate="scalar", padding="left", xg_tokens=2, xg_pool="position"),
    Case(adapter_len=7, segments=(2, 5), gate="zero", mask="rectangles", use_out=False, xg_tokens=1),
    Case(adapter_len=10, segments=(6, 4), cu_seqlens=(0, 30, 31, 80, 100), gate="sample", xg_tokens=2,
         mask="random-0.3"),
    Case(adapter_len=9, segments=(3, 6), per_sample_adapter=True, gate="sample", n_q=40, seq_len=100),
    Case(adapter_len=6, segments=(1, 5), heads_kv=4, gate_mode="raw", padding="lengths", use_lse=True),
]


@pytest.mark.parametrize("case", SEGMENT_CASES, ids=str)
def test_composed_segments_match_the_reference(case):
    check_case(case, "cpu", backend="composed")


@pytest.mark.parametrize("case", SEGMENT_CASES[:3], ids=str)
def test_chunked_reference_segments(case):
    check_case(dataclasses.replace(case, seq_len=100), "cpu", backend="reference")


def test_segments_float64_gradcheck():
    sizes = (2, 3)
    q, k, v, keys, values, randn = _problem(batch=1, heads_q=2, heads_kv=1, n=5, d=16, sizes=sizes)
    gate = randn(1, 2, 2)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, keys, values, gate)]

    def fn(q, k, v, keys, values, gate):
        r = causalattn.attention(q, k, v, adapter=Adapter(keys, values, gate, "tanh", sizes), xg_tokens=1,
                                 backend="composed")
        return r.out, r.xg

    assert torch.autograd.gradcheck(fn, leaves)


@pytest.mark.parametrize("adapter_kwargs, match", [
    (dict(segments=(3, 4)), "adapter.segments"),
    (dict(segments=(8, 0)), "adapter.segments"),
    (dict(segments=[3, 5]), "adapter.segments"),
    (dict(segments=(3, 5), gate=torch.zeros(4)), "adapter.gate"),
    (dict(segments=(3, 5), gate=torch.zeros(3, 4)), "adapter.gate"),
    (dict(segments=(3, 5), gate=torch.zeros(5, 2, 4)), "adapter.gate"),
])
def test_bad_segments_are_named(adapter_kwargs, match):
    q, k, v, keys, values, _ = _problem(per_sample_keys=False)
    kwargs = dict(gate=torch.zeros(2, 4, dtype=F64))
    kwargs.update(adapter_kwargs)
    adapter = Adapter(keys, values, kwargs.pop("gate").to(F64), "tanh", **kwargs)
    with pytest.raises(ValueError, match=match):
        causalattn.attention(q, k, v, adapter=adapter)


def test_xg_tokens_beyond_the_first_segment_are_refused():
    q, k, v, keys, values, randn = _problem(per_sample_keys=False)
    with pytest.raises(ValueError, match="xg_tokens.*first"):
        causalattn.attention(q, k, v, adapter=Adapter(keys, values, randn(2, 4), "tanh", (3, 5)), xg_tokens=4)


def test_triton_refuses_more_segments_than_its_kernels_unroll_and_auto_composes():
    q, k, v, keys, values, randn = _problem(per_sample_keys=False, sizes=(1,) * 9)
    adapter = Adapter(keys.float(), values.float(), randn(9, 4).float(), "tanh", (1,) * 9)
    assert not causalattn.ops.fused_kernels_take(adapter)
    assert causalattn.ops.fused_kernels_take(Adapter(keys.float(), values.float(), randn(8, 4).float(), "tanh",
                                                     (2,) + (1,) * 7))
    with pytest.raises(ValueError, match="at most 8 segments"):
        causalattn.ops.resolve_backend("triton", q.float().cuda() if torch.cuda.is_available() else q.float(),
                                       "adapter", 0.0, adapter)
    assert causalattn.ops.resolve_backend("auto", q.float(), "adapter", 0.0, adapter) == "composed"
