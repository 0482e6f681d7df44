"""Bad attention input never gives silently wrong numbers: each case raises a clear error naming the
argument, or gives the float64 reference's result, on every backend of `causalattn.attention` (and
the two references): packed-sequence bounds (`max_seqlen`), argument types (scale, causal,
xg_tokens, cu_seqlens, supervision), empty problems, non-finite keys, per-sample adapters with
packed sequences.
"""
import math

import pytest
import torch

from causalattn import Adapter, CausalMask, attention, attention_dense
from op_backends import DEVICE, ENTRY_POINTS, OP_BACKENDS, entry_point, op_backend, raises_named, random_qkv

# ---------------------------------------------------------------------- 1. max_seqlen
# Two sequences of 80 and 16 tokens: one 64-row tile does not cover the first one.
PACKED = torch.tensor([0, 80, 96])


@pytest.mark.parametrize("max_seqlen", [16, 64, 79, 0, -1, 97, 80.0, True, "80"])
@pytest.mark.parametrize("entry", [e for e in ENTRY_POINTS if e.startswith("op-")])
def test_max_seqlen_outside_the_packing_raises(entry, max_seqlen):
    q, k, v = random_qkv(1, n=(96, 96))
    message = raises_named(ValueError, "max_seqlen", entry_point(entry), *(t.float() for t in (q, k, v)),
                           cu_seqlens=PACKED.to(DEVICE), max_seqlen=max_seqlen)
    assert "(80)" in message and "(96)" in message  # the longest sequence and the token count


@pytest.mark.parametrize("max_seqlen", [None, 80, 96])
@pytest.mark.parametrize("backend", OP_BACKENDS)
def test_max_seqlen_covering_the_packing_is_exact(backend, max_seqlen):
    q, k, v = random_qkv(2, n=(96, 96))
    got = attention(*(t.float() for t in (q, k, v)), cu_seqlens=PACKED.to(DEVICE), max_seqlen=max_seqlen,
                    backend=op_backend(backend))
    want = attention_dense(q, k, v, cu_seqlens=PACKED.to(DEVICE))
    torch.testing.assert_close(got.out.double(), want.out, atol=2e-5, rtol=1e-4)


def test_max_seqlen_without_packing_raises():
    q, k, v = random_qkv(3)
    raises_named(ValueError, "max_seqlen", attention, q, k, v, max_seqlen=40)


def test_hf_max_length_q_is_checked():
    from hf_helpers import build, llama_config

    model = build(llama_config())
    ids = torch.randint(2, 300, (1, 12), generator=torch.Generator().manual_seed(4))
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    position_ids = torch.tensor([list(range(5)) + list(range(7))])
    with pytest.raises(ValueError, match="max_seqlen: expected an int from the longest packed sequence"):
        model(ids, position_ids=position_ids, use_cache=False, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
              max_length_q=5, max_length_k=5)


# ---------------------------------------------------------------------- 3, 6 and "also": argument types
BAD_ARGUMENTS = [
    ("scale-inf", dict(scale=math.inf), ValueError, "scale"),
    ("scale-minus-inf", dict(scale=-math.inf), ValueError, "scale"),
    ("scale-true", dict(scale=True), ValueError, "scale"),
    ("causal-str", dict(causal="no"), TypeError, "causal"),
    ("causal-int", dict(causal=1), TypeError, "causal"),
    ("causal-none", dict(causal=None), TypeError, "causal"),
    ("xg-tokens-true", dict(xg_tokens=True), ValueError, "xg_tokens"),
    ("supervision-dense", dict(supervision=torch.ones(1, 40, 40, dtype=torch.bool)), TypeError, "supervision"),
    ("supervision-tuple", dict(supervision=(1, 2)), TypeError, "supervision"),
    ("key-lengths-complex", dict(key_lengths=torch.tensor([40j])), ValueError, "key_lengths"),
]


@pytest.mark.parametrize("change, error, name", [c[1:] for c in BAD_ARGUMENTS], ids=[c[0] for c in BAD_ARGUMENTS])
@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_bad_argument_is_named(entry, change, error, name):
    q, k, v = (t.float() for t in random_qkv(7))
    gen = torch.Generator().manual_seed(8)
    adapter = Adapter(torch.randn(1, 4, 16, generator=gen), torch.randn(1, 4, 16, generator=gen), torch.zeros(2))
    fn = entry_point(entry)
    fn(q, k, v, adapter=_on_device(adapter), xg_tokens=1)  # the unchanged arguments are accepted
    raises_named(error, name, fn, q, k, v, adapter=_on_device(adapter), **{"xg_tokens": 1, **change})


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_bool_packing_offsets_are_not_integers(entry):
    """[False, True] would read as the offsets [0, 1] of one token."""
    q, k, v = (t.float() for t in random_qkv(14, n=(1, 1)))
    raises_named(ValueError, "cu_seqlens", entry_point(entry), q, k, v, cu_seqlens=torch.tensor([False, True]).to(DEVICE))


def _on_device(adapter: Adapter) -> Adapter:
    return Adapter(adapter.keys.to(DEVICE), adapter.values.to(DEVICE), adapter.gate.to(DEVICE), adapter.gate_mode)


# ---------------------------------------------------------------------- 5. empty problems
@pytest.mark.parametrize("n_q, n_k", [(0, 0), (0, 5)], ids=["N=0", "Nq=0"])
@pytest.mark.parametrize("backend", OP_BACKENDS)
def test_empty_problem_gives_empty_outputs(backend, n_q, n_k):
    q, k, v = (t.float().requires_grad_() for t in random_qkv(10, batch=2, n=(n_q, n_k)))
    gen = torch.Generator().manual_seed(11)
    keys, values = (torch.randn(1, 3, 16, generator=gen).to(DEVICE).requires_grad_() for _ in range(2))
    gate = torch.randn(2, generator=gen).to(DEVICE).requires_grad_()
    square = n_q == n_k
    options = dict(adapter=Adapter(keys, values, gate), xg_tokens=2 if square else 0)
    if square:
        options["supervision"] = CausalMask.from_dense(torch.zeros(2, 0, 0, dtype=torch.bool)).to(DEVICE)
    got = attention(q, k, v, backend=op_backend(backend), **options)
    want = attention_dense(*(t.detach().double() for t in (q, k, v)), **{
        **options, "adapter": Adapter(keys.detach().double(), values.detach().double(), gate.detach().double())})
    for name in ("out", "lse", "mass", "xg"):
        got_t, want_t = getattr(got, name), getattr(want, name)
        assert (got_t is None) == (want_t is None), name
        if got_t is not None:
            assert got_t.shape == want_t.shape, name
            torch.testing.assert_close(got_t.double(), want_t, msg=name)
    loss = got.out.sum() + (got.xg.square().sum() if got.xg is not None else 0)
    loss.backward()
    for t in (q, k, v, keys, values, gate):
        assert t.grad is None or (t.grad.shape == t.shape and not t.grad.any())


# ---------------------------------------------------------------------- "also": +inf in k
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's inf - inf
@pytest.mark.parametrize("backend", OP_BACKENDS)
def test_infinite_key_gives_nan_rows_on_every_backend(backend):
    """Key 7 gets k[..., 3] = +inf: its score is +inf for queries with q[..., 3] > 0 (those rows are NaN,
    out and lse, as inf - inf in softmax) and -inf for the others (the key drops out, as masked)."""
    q, k, v = random_qkv(13, n=(40, 40))
    k[0, 0, 7, 3] = math.inf
    got = attention(q.float(), k.float(), v.float(), backend=op_backend(backend))
    want = attention_dense(q, k, v)
    nan_rows = ((torch.arange(40, device=DEVICE) >= 7) & (q[0, :, :, 3] > 0))[None]
    assert nan_rows.any() and (~nan_rows).any()
    for result in (got, want):
        assert torch.equal(result.out.isnan().any(-1), nan_rows) and torch.equal(result.out.isnan().all(-1), nan_rows)
        assert torch.equal(result.lse.isnan(), nan_rows)
    torch.testing.assert_close(got.out.double()[~nan_rows], want.out[~nan_rows], atol=2e-5, rtol=1e-4)
    dropped = attention_dense(q, k, v, key_mask=(torch.arange(40, device=DEVICE) != 7)[None])
    torch.testing.assert_close(want.out[~nan_rows], dropped.out[~nan_rows])


# ---------------------------------------------------------------------- "also": per-sample adapter, packed
@pytest.mark.parametrize("xg_pool", ["sample", "position"])
@pytest.mark.parametrize("backend", OP_BACKENDS)
def test_per_sample_adapter_with_packed_sequences(backend, xg_pool, monkeypatch):
    """B == 1: the row's (1, Hkv, M, d) adapter serves each of its packed sequences; every output and
    gradient against the float64 reference."""
    from kernel_cases import Case, check_case, poisoned_allocations

    if op_backend(backend) == "triton":
        poisoned_allocations(monkeypatch)
    case = Case(cu_seqlens=(0, 30, 30, 70, 90), seq_len=90, adapter_len=10, per_sample_adapter=True,
                mask="random-0.3", xg_tokens=2, xg_pool=xg_pool, use_lse=True)
    check_case(case, DEVICE, backend=backend)
