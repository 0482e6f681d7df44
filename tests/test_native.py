"""The fused C++ CPU kernel (`causalattn.native`) against the float64 reference.

Every output and every gradient, on random inputs, under FlashAttention's 2x rule (docs/math.md §5),
with every buffer the kernel allocates filled with NaN first (torch's deterministic mode fills
`at::empty`), so an element it forgets to write shows up. The cases are the kernel tests' matrix in
the supported subset (fp32, bf16 and fp16; no padding or packing; one adapter segment) plus lengths past one query
block (64 rows) and one key block (512 keys). Inputs outside the subset run the composed backend after
a warning; a missing compiler does the same. The whole module is skipped when the extension cannot be
built here (the first run compiles it, about a minute; later runs load it from the cache).
"""
import dataclasses
import warnings

import pytest
import torch

import causalattn
from causalattn import Adapter, native
from kernel_cases import Case, build_inputs, check_case
from test_kernels import CORE_CASES, SEGMENT_CASES, STAT_CASES

F32 = torch.float32


def _builds() -> bool:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return native.available()


pytestmark = [pytest.mark.skipif(not _builds(), reason="the C++ extension cannot be built here (no compiler?)"),
              pytest.mark.usefixtures("poisoned_empty", "single_thread")]


def _supported(case: Case) -> bool:
    return case.padding is None and case.cu_seqlens is None and case.segments is None


SUPPORTED = [c for c in CORE_CASES + STAT_CASES + SEGMENT_CASES[:1] if _supported(c)]
MATRIX = [dataclasses.replace(c, dtype=F32) for c in SUPPORTED]
# bf16/fp16 inputs are computed in fp32 inside; they are held to the 2x rule of their dtype.
LOW_PRECISION = [c for c in SUPPORTED if c.dtype == torch.float16] + \
    [dataclasses.replace(c, dtype=torch.bfloat16, seed=5) for c in SUPPORTED[::3]]
# Past one query block (128 rows) and one key block (512 keys): the online softmax's rescaling, the
# causal diagonal inside a block, the mass and its gradient across blocks, GQA, a ragged last block.
LONG_CASES = [
    Case(batch=1, heads_q=4, heads_kv=1, seq_len=600, head_dim=64, adapter_len=10, mask="random-0.3", xg_tokens=2),
    Case(batch=1, heads_q=2, heads_kv=1, seq_len=1100, head_dim=16, mask="rectangles", use_lse=True),
    Case(batch=1, seq_len=700, n_q=130, head_dim=64, adapter_len=10),
    Case(batch=1, heads_q=2, seq_len=530, head_dim=16, causal=False, adapter_len=4, gate="scalar", gate_mode="raw"),
    Case(batch=1, heads_q=2, seq_len=520, adapter_len=10, mask="word-edges", xg_tokens=2, xg_pool="position",
         use_out=False),
]


@pytest.fixture
def poisoned_empty():
    """Every `at::empty` starts as NaN (ints as their maximum) while the test runs."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(deterministic)
    torch.utils.deterministic.fill_uninitialized_memory = fill


def test_poison_reaches_the_kernel_allocations():
    """The fixture's premise: the kernel's own `at::empty` (here its mass buffer, which it writes only with
    supervision) comes out NaN when nothing writes it."""
    q, k, v = (torch.randn(1, 2, 40, 16) for _ in range(3))
    empty_bits, empty_counts = torch.zeros(1, 40, 2, dtype=torch.int32), torch.zeros(1, 40, dtype=torch.int32)
    out, lse, mass, _ = torch.ops.causalattn_native.forward(q, k, v, None, None, None, empty_bits, empty_counts,
                                                            0.25, True, 0)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert torch.equal(mass, torch.zeros_like(mass))  # every row written, as 0: no causes
    assert torch.isnan(torch.empty(4)).all()


@pytest.mark.parametrize("case", MATRIX + LONG_CASES + LOW_PRECISION, ids=str)
def test_native_matches_reference(case):
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no silent fallback to the composed backend
        check_case(case, "cpu", backend="native")


@pytest.mark.parametrize("case", [c for c in CORE_CASES + STAT_CASES if not _supported(c)][:3], ids=str)
def test_unsupported_inputs_warn_and_run_composed(case):
    """Padding and packing (fully masked rows among them) are refused by the kernel: one warning, then
    the composed backend's result, held to the same rule."""
    with pytest.warns(RuntimeWarning, match="composed backend runs"):
        check_case(dataclasses.replace(case, dtype=F32), "cpu", backend="native")


def test_a_failed_build_warns_once_and_runs_composed(monkeypatch):
    def no_compiler():
        raise RuntimeError("error: c++: command not found")

    monkeypatch.setattr(native, "_build", no_compiler)
    monkeypatch.setattr(native, "_library_state", {})
    q, k, v = (torch.randn(1, 2, 40, 16) for _ in range(3))
    with pytest.warns(RuntimeWarning, match="could not be built.*command not found"):
        got = native.attention_native(q, k, v)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        native.attention_native(q, k, v)  # the state is remembered: no second build, no second warning
    want = causalattn.attention(q, k, v, backend="composed")
    torch.testing.assert_close(got.out, want.out)


def test_zero_gate_keeps_adapter_gradients_zero():
    leaves, kwargs, upstream = build_inputs(Case(seq_len=150, adapter_len=10, gate="zero", mask="random-0.3",
                                                 xg_tokens=2), "cpu")
    inputs = {name: t.float().requires_grad_() for name, t in leaves.items()}
    adapter = Adapter(inputs["adapter_keys"], inputs["adapter_values"], inputs["gate"])
    result = causalattn.attention(inputs["q"], inputs["k"], inputs["v"], adapter=adapter, backend="native", **kwargs)
    ((result.out * upstream["out"].float()).sum() + result.xg.square().sum() + result.mass.sum()).backward()
    assert torch.count_nonzero(inputs["adapter_keys"].grad) == 0
    assert torch.count_nonzero(inputs["adapter_values"].grad) == 0
    assert inputs["gate"].grad.abs().min() > 0


def _run(q, k, v, adapter, mask, threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for t in (q, k, v, adapter.keys, adapter.values, adapter.gate):
            t.grad = None
        result = causalattn.attention(q, k, v, adapter=adapter, supervision=mask, xg_tokens=2, backend="native")
        (result.out.sum() + result.lse.sum() + result.mass.sum() + result.xg.sum()).backward()
        return [t.detach().clone() for t in result] + [t.grad.clone() for t in (q, k, v, adapter.keys, adapter.gate)]
    finally:
        torch.set_num_threads(before)


def test_strided_inputs_and_thread_counts():
    """Hugging Face hands (B, N, H, d) tensors transposed to (B, H, N, d): the kernel reads their strides
    as they are, bit for bit the contiguous result. Each work item runs on one thread whatever the
    count; outputs are bit-identical at 1 and 2 threads, gradients agree to rounding (the BLAS may take
    another code path outside a parallel region: 1.4e-6 apart here)."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 300, 4, 32, generator=gen).transpose(1, 2).requires_grad_() for _ in range(3))
    adapter = Adapter(torch.randn(4, 10, 32, generator=gen, requires_grad=True),
                      torch.randn(4, 10, 32, generator=gen, requires_grad=True),
                      torch.randn(4, generator=gen, requires_grad=True))
    mask = causalattn.CausalMask.from_dense(torch.rand(2, 300, 300, generator=gen) < 0.2)
    one = _run(q, k, v, adapter, mask, 1)
    two = _run(q, k, v, adapter, mask, 2)
    contiguous = [t.detach().contiguous().requires_grad_() for t in (q, k, v)]
    packed = _run(*contiguous, adapter, mask, 2)
    for index, (a, b, c) in enumerate(zip(one, two, packed)):
        assert torch.equal(b, c)
        if index < 4:
            assert torch.equal(a, b)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_an_infinite_score_gives_nan_rows_and_gradients():
    """A +inf score makes its row NaN (out, lse) as in a plain softmax, and the backward passes the NaN on
    to that row's query gradient, as the reference's autograd does."""
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, 150, 16, generator=gen, dtype=torch.float64) for _ in range(3))
    k[0, 0, 7, 3] = float("inf")
    found = []
    for run, dtype in ((causalattn.attention_dense, torch.float64),
                       (lambda *a: causalattn.attention(*a, backend="native"), F32)):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        result = run(*leaves)
        result.out.sum().backward()
        found.append((result.out.isnan().any(-1), result.lse.isnan(), leaves[0].grad.isnan().any(-1)))
    (want_out, want_lse, want_dq), (got_out, got_lse, got_dq) = found
    assert want_out.any() and (~want_out).any()
    assert torch.equal(got_out, want_out) and torch.equal(got_lse, want_lse)
    assert want_dq[want_out].all() and got_dq[want_out].all()


def test_auto_runs_native_on_cpu_where_it_takes_the_inputs_and_composed_elsewhere(monkeypatch):
    """`backend="auto"` on a CPU: the native kernel for inputs it takes, silently; the composed backend for
    padding, fp64 and after a failed build, with no warning of its own."""
    calls = []
    original = native.attention_native

    def spy(*args, **kwargs):
        calls.append("native")
        return original(*args, **kwargs)

    monkeypatch.setattr(native, "attention_native", spy)
    q, k, v = (torch.randn(2, 2, 40, 16) for _ in range(3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = causalattn.attention(q, k, v)
        assert calls == ["native"]
        causalattn.attention(q, k, v, key_lengths=torch.tensor([40, 30]))  # padding: composed, no warning
        causalattn.attention(q.double(), k.double(), v.double())  # fp64: composed
    assert calls == ["native"]
    torch.testing.assert_close(got.out, causalattn.attention(q, k, v, backend="composed").out)
    monkeypatch.setattr(native, "_library_state", {"ok": False})  # as after a failed build
    causalattn.attention(q, k, v)
    assert calls == ["native"]
