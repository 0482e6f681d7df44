"""The fused Triton kernels against the float64 reference: every output, every gradient.

On a CPU machine these run the real kernels through the Triton interpreter at small sizes (fp32 and
fp16; the interpreter's bf16 is wrong, see conftest). The `gpu` variants run compiled on CUDA at
realistic sizes, bf16 included.
"""
import dataclasses

import pytest
import torch

import causalattn
from kernel_cases import Case, build_inputs, check_case, poisoned_allocations

F16, F32, BF16 = torch.float16, torch.float32, torch.bfloat16

# The kernel-core matrix: masking modes, GQA ratios 1/2/4, ragged N, head dims 16/64/80/128,
# adapter lengths 1/10/33, gate shapes and modes, gamma = 0 and != 0.
CORE_CASES = [
    Case(heads_kv=4, seq_len=100, head_dim=64, adapter_len=10),
    Case(causal=False, seq_len=77, head_dim=16, adapter_len=1, gate="scalar", gate_mode="raw"),
    Case(heads_q=4, heads_kv=1, seq_len=130, head_dim=80, adapter_len=33, dtype=F16),
    Case(seq_len=96, head_dim=128, adapter_len=10, padding="lengths", dtype=F16),
    Case(seq_len=90, head_dim=64, adapter_len=10, padding="left"),
    Case(cu_seqlens=(0, 37, 38, 120), seq_len=120, head_dim=64, adapter_len=10),
    Case(n_q=20, seq_len=90, head_dim=64, adapter_len=10),
    Case(n_q=33, seq_len=70, head_dim=16, causal=False, padding="lengths"),
    Case(seq_len=100, head_dim=64, adapter_len=10, gate="zero"),
    Case(seq_len=64, head_dim=32, adapter_len=10, per_sample_adapter=True, gate_mode="raw"),
    Case(seq_len=129, head_dim=128, dtype=F16),
    Case(seq_len=50, head_dim=16, causal=False, padding="left", dtype=F16, adapter_len=10),
    Case(seq_len=80, head_dim=64, adapter_len=10, use_lse=True),
]

# CAT mass and XG statistic: mask shapes and densities, fold-ins alone and with the main loss,
# with GQA, padding and packing.
STAT_CASES = [
    Case(seq_len=100, adapter_len=10, mask="random-0.3", xg_tokens=2),
    Case(seq_len=100, mask="random-0.05", use_out=False),
    Case(seq_len=100, mask="full", use_out=False),
    Case(seq_len=100, mask="single", dtype=F16),
    Case(seq_len=130, mask="rectangles", adapter_len=10, xg_tokens=1),
    Case(seq_len=100, mask="word-edges", use_out=False),
    Case(seq_len=90, adapter_len=10, xg_tokens=2, use_out=False),
    Case(seq_len=90, adapter_len=10, xg_tokens=2, xg_pool="position", use_out=False),
    Case(seq_len=90, adapter_len=33, xg_tokens=33, xg_pool="position", dtype=F16),
    Case(heads_q=8, heads_kv=2, seq_len=90, adapter_len=10, mask="random-0.5", xg_tokens=2, padding="left"),
    Case(seq_len=90, adapter_len=10, mask="rectangles", xg_tokens=2, padding="lengths", dtype=F16),
    Case(cu_seqlens=(0, 40, 41, 110), seq_len=110, adapter_len=10, mask="random-0.3", xg_tokens=2),
    Case(seq_len=100, adapter_len=10, gate="zero", mask="random-0.3", xg_tokens=2),
    Case(seq_len=80, adapter_len=10, mask="random-0.3", xg_tokens=2, use_lse=True, use_out=False),
]

# Adapter segments (docs/math.md §7): 1, 2, 3 and 8 segments, gates per (segment, head), per segment, per
# sample and zero, with XG in the first segment, CAT, padding, packing, and the fold-ins alone.
SEGMENT_CASES = [
    Case(seq_len=64, adapter_len=10, gate="sample", xg_tokens=2, mask="random-0.3"),  # one segment, per-sample gate
    Case(seq_len=64, adapter_len=8, segments=(3, 5)),
    Case(seq_len=64, adapter_len=8, segments=(3, 5), per_sample_adapter=True, gate="sample", xg_tokens=2,
         mask="random-0.3"),
    Case(seq_len=64, adapter_len=12, segments=(4, 4, 4), gate="scalar", padding="left", xg_tokens=2,
         xg_pool="position", dtype=F16),
    Case(seq_len=64, adapter_len=7, segments=(2, 5), gate="zero", mask="rectangles", use_out=False, xg_tokens=1),
    Case(seq_len=100, adapter_len=10, segments=(6, 4), cu_seqlens=(0, 30, 31, 80, 100), gate="sample", xg_tokens=2,
         mask="random-0.3"),
    Case(seq_len=64, adapter_len=33, segments=(1, 2, 3, 4, 5, 6, 7, 5), heads_kv=4, gate_mode="raw",
         padding="lengths", use_lse=True),
]

# Realistic sizes for a CUDA device (N up to 8k, bf16), compiled.
GPU_CASES = [
    Case(**{**dict(batch=2, heads_q=32, heads_kv=8, seq_len=n, head_dim=d, dtype=dtype, adapter_len=10), **extra})
    for n, d, dtype, extra in [
        (1024, 128, BF16, {}),
        (2048, 64, F16, dict(padding="left")),
        (4096, 128, BF16, dict(mask="rectangles", xg_tokens=2)),
        (8192, 128, BF16, dict(mask="random-0.05", xg_tokens=2, batch=1)),
        (1000, 96, F32, dict(padding="lengths", mask="single", xg_tokens=2, xg_pool="position")),
        (3000, 128, BF16, dict(cu_seqlens=(0, 1000, 1001, 3000), mask="rectangles", xg_tokens=2)),
        (2048, 128, BF16, dict(segments=(4, 6), gate="sample", mask="rectangles", xg_tokens=2)),
    ]
] + [Case(batch=2, heads_q=32, heads_kv=32, seq_len=2048, head_dim=128, dtype=BF16, causal=False)]

needs_triton = pytest.mark.skipif(not (torch.cuda.is_available() or causalattn.ops._interpreting()),
                                  reason="needs CUDA or TRITON_INTERPRET=1")


@needs_triton
@pytest.mark.parametrize("case", CORE_CASES + STAT_CASES + SEGMENT_CASES, ids=str)
def test_fused_matches_reference(case, monkeypatch):
    poisoned_allocations(monkeypatch)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    check_case(case, device)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
def test_fused_matches_reference_gpu(case, monkeypatch):
    poisoned_allocations(monkeypatch)
    check_case(case, "cuda")


@needs_triton
def test_zero_gate_keeps_adapter_gradients_zero():
    """gamma = 0: dKa = dVa = 0 exactly while the gate still gets a gradient (docs/math.md §1)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    case = Case(seq_len=70, adapter_len=10, gate="zero", mask="random-0.3", xg_tokens=2)
    leaves, kwargs, upstream = build_inputs(case, device)
    inputs = {name: t.float().to(device).requires_grad_() for name, t in leaves.items()}
    adapter = causalattn.Adapter(inputs["adapter_keys"], inputs["adapter_values"], inputs["gate"])
    result = causalattn.attention(inputs["q"], inputs["k"], inputs["v"], adapter=adapter, backend="triton", **kwargs)
    ((result.out.double() * upstream["out"].to(device)).sum() + result.xg.square().sum()).backward()
    assert torch.count_nonzero(inputs["adapter_keys"].grad) == 0
    assert torch.count_nonzero(inputs["adapter_values"].grad) == 0
    assert inputs["gate"].grad.abs().min() > 0


@needs_triton
def test_sm90_query_extents(monkeypatch):
    """The sm_90 table's 32-query steps of the row and dK/dV kernels (the interpreter's own tiles are 64)."""
    poisoned_allocations(monkeypatch)
    monkeypatch.setenv("CAUSALATTN_TILES", "rows=32x64x4x1,dkdv=32x128x4x1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    check_case(Case(seq_len=100, adapter_len=10, segments=(4, 6), mask="random-0.3", xg_tokens=2, padding="left"),
               device)


@needs_triton
def test_zero_gate_of_one_segment_keeps_its_prompt_still():
    """Per segment (docs/math.md §7): gamma_1 = 0 gives dKa = dVa = 0 on segment 1's slots and a gate gradient,
    while segment 0 trains."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    case = Case(seq_len=64, adapter_len=10, segments=(4, 6), mask="random-0.3", xg_tokens=2)
    leaves, kwargs, upstream = build_inputs(case, device)
    leaves["gate"][1] = 0.0
    inputs = {name: t.float().to(device).requires_grad_() for name, t in leaves.items()}
    adapter = causalattn.Adapter(inputs["adapter_keys"], inputs["adapter_values"], inputs["gate"], "tanh", (4, 6))
    result = causalattn.attention(inputs["q"], inputs["k"], inputs["v"], adapter=adapter, backend="triton", **kwargs)
    ((result.out.double() * upstream["out"].to(device)).sum() + result.xg.square().sum()).backward()
    keys_grad, values_grad = inputs["adapter_keys"].grad, inputs["adapter_values"].grad
    assert torch.count_nonzero(keys_grad[:, 4:]) == 0 and torch.count_nonzero(values_grad[:, 4:]) == 0
    assert keys_grad[:, :4].abs().min() > 0 and values_grad[:, :4].abs().min() > 0
    assert inputs["gate"].grad[1].abs().min() > 0


@needs_triton
def test_backward_is_deterministic():
    """No atomics anywhere: two backward passes agree bit for bit."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    case = Case(seq_len=100, adapter_len=10, mask="random-0.3", xg_tokens=2, padding="left")
    leaves, kwargs, upstream = build_inputs(case, device)
    runs = []
    for _ in range(2):
        inputs = {name: t.float().to(device).requires_grad_() for name, t in leaves.items()}
        adapter = causalattn.Adapter(inputs["adapter_keys"], inputs["adapter_values"], inputs["gate"])
        result = causalattn.attention(inputs["q"], inputs["k"], inputs["v"], adapter=adapter, backend="triton", **kwargs)
        ((result.out * upstream["out"].float().to(device)).sum() + result.mass.sum() + result.xg.square().sum()).backward()
        runs.append([t.grad.clone() for t in inputs.values()])
    for first, second in zip(*runs):
        assert torch.equal(first, second)


@needs_triton
@pytest.mark.parametrize("segments", [None, (4, 6)])
def test_torch_compile_traces_without_graph_breaks(segments):
    """The op is a torch.library custom op with a fake implementation and registered autograd:
    torch.compile(fullgraph=True) must trace forward and backward through it."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    case = Case(seq_len=64, adapter_len=10, mask="random-0.3", xg_tokens=2, segments=segments)
    leaves, kwargs, upstream = build_inputs(case, device)

    def step(q, k, v, ka, va, gate):
        adapter = causalattn.Adapter(ka, va, gate, "tanh", segments)
        result = causalattn.attention(q, k, v, adapter=adapter, backend="triton", **kwargs)
        return result.out.sum() + causalattn.cat_loss(result.mass, kwargs["supervision"], alpha=50.0) + result.xg.square().sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    grads = []
    for fn in (step, compiled):
        inputs = [t.float().to(device).requires_grad_() for t in leaves.values()]
        fn(*inputs).backward()
        grads.append([t.grad for t in inputs])
    for eager, traced in zip(*grads):
        torch.testing.assert_close(traced, eager)


def test_backend_choice_and_errors():
    q = torch.randn(1, 2, 8, 16, dtype=torch.float64)
    assert causalattn.ops.resolve_backend("auto", q) == "composed"
    with pytest.raises(TypeError, match="q: the triton backend takes"):
        causalattn.ops.resolve_backend("triton", q)
    with pytest.raises(ValueError, match="backend: expected one of"):
        causalattn.ops.resolve_backend("cuda-graphs", q)
    k = torch.randn(1, 2, 8, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match="cu_seqlens: packed sequences need B == 1"):
        causalattn.attention(torch.randn(2, 2, 8, 16), torch.randn(2, 2, 8, 16), torch.randn(2, 2, 8, 16),
                             cu_seqlens=torch.tensor([0, 8]))
    out = causalattn.attention(q, k, k, backend="reference")
    assert out.out.shape == q.shape and out.mass is None and out.xg is None


def test_case_ids_are_unique():
    ids = [str(c) for c in CORE_CASES + STAT_CASES + GPU_CASES]
    assert len(ids) == len(set(ids))
    assert all(dataclasses.is_dataclass(c) for c in GPU_CASES)


def test_tile_summary_marks_tiles_with_cause_bits_and_is_reused_per_mask():
    """One summary per mask and tile shape (reused across layers), recomputed when the words change."""
    from causalattn.kernels.jit_helpers import tile_summary

    bits = torch.zeros(2, 100, 4, dtype=torch.int32)
    bits[0, 70, 3] = 1 << 5  # row tile 1 (rows 64..127), key tile 1 (words 2..3)
    bits[1, 3, 0] = -1
    summary = tile_summary(bits, 64, 64)
    expected = torch.zeros(2, 2, 2, dtype=torch.int8)
    expected[0, 1, 1] = expected[1, 0, 0] = 1
    assert torch.equal(summary, expected)
    assert tile_summary(bits, 64, 64) is summary
    assert torch.equal(tile_summary(bits, 128, 32), torch.tensor([[[0, 0, 0, 1]], [[1, 0, 0, 0]]], dtype=torch.int8))
    bits[1, 99, 1] = 1
    expected[1, 1, 0] = 1
    assert torch.equal(tile_summary(bits, 64, 64), expected)
