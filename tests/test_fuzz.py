"""Seeded property test: random valid problems on every backend against the float64 dense reference.

Each run draws the same `FUZZ_CASES` random configurations (shapes, GQA, causal or not, fewer queries
than keys, key lengths, left padding, packed sequences with empty ones, shared or per-sample adapters,
gate shapes and modes, CAT masks, XG pooling, explicit scales, fp32 and fp16) and checks every output
and every gradient with the kernel tests' rule (`kernel_cases.check_case`). The sizes stay small
(N <= 96, one or two 64-wide tiles) so the Triton interpreter runs them in seconds; the hand-written
matrices of test_kernels.py cover the large and the word-boundary cases.
"""
import random

import pytest
import torch

from kernel_cases import Case, check_case, poisoned_allocations
from op_backends import DEVICE, OP_BACKENDS, op_backend

FUZZ_SEED = 9  # a draw that covers every option (test_fuzz_cases_cover_the_options)
FUZZ_CASES = 32
MAX_SEQ_LEN = 96
# (Hq, Hkv): GQA groups 1-4. The interpreter's cost grows with B x Hq programs: B x Hq <= 4 keeps a
# case near 1 s (8 programs took 2.5 s on a loaded 2-core machine).
HEADS = ((1, 1), (2, 1), (3, 1), (4, 1), (2, 2), (4, 2))
MASK_KINDS = ("random-0.3", "random-0.05", "full", "single", "rectangles", "word-edges")


def random_case(rng: random.Random, index: int) -> Case:
    """One valid problem: every option drawn within what `check_inputs` accepts."""
    heads_q, heads_kv = rng.choice(HEADS)
    seq_len = rng.randint(1, MAX_SEQ_LEN)
    packed = rng.random() < 0.3
    cu_seqlens = None
    if packed:  # repeated cuts make empty sequences, also at the ends
        cuts = sorted(rng.choices(range(seq_len + 1), k=rng.randint(0, 4)))
        cu_seqlens = (0, *cuts, seq_len)
    batch = 1 if packed or heads_q > 2 else rng.randint(1, 2)
    training = rng.random() < 0.6  # Nq == Nk and causal: the statistics are allowed
    causal = training or rng.random() < 0.6
    n_q = None if training or packed or rng.random() < 0.5 else rng.randint(1, seq_len)
    padding = None
    if not packed:
        padding = rng.choice((None, "left") + (("lengths",) if seq_len >= 3 * batch else ()))
    adapter_len = rng.choice((0, rng.randint(1, 40)))
    mask = None
    if training and seq_len >= 3 and rng.random() < 0.6:
        mask = rng.choice(MASK_KINDS)
    xg_tokens = rng.randint(0, adapter_len) if training and adapter_len else 0
    return Case(
        batch=batch, heads_q=heads_q, heads_kv=heads_kv, seq_len=seq_len, n_q=n_q,
        head_dim=rng.choice((16, 32)), causal=causal,
        scale=rng.choice((None, round(rng.uniform(0.05, 1.0), 3))),
        dtype=torch.float16 if rng.random() < 0.2 else torch.float32,
        adapter_len=adapter_len, per_sample_adapter=bool(adapter_len) and rng.random() < 0.4,
        gate=rng.choice(("head", "scalar", "zero")), gate_mode=rng.choice(("tanh", "raw")),
        padding=padding, cu_seqlens=cu_seqlens, mask=mask, xg_tokens=xg_tokens,
        xg_pool=rng.choice(("sample", "position")),
        use_out=mask is None and not xg_tokens or rng.random() < 0.7, use_lse=rng.random() < 0.3,
        seed=1000 * FUZZ_SEED + index)


_rng = random.Random(FUZZ_SEED)
CASES = [random_case(_rng, i) for i in range(FUZZ_CASES)]


def test_fuzz_cases_cover_the_options():
    """The draw reaches every feature, so a regression in any of them is caught."""
    assert len({str(c) for c in CASES}) == FUZZ_CASES
    for feature in ("cu_seqlens", "n_q", "mask", "xg_tokens", "scale"):
        assert any(getattr(c, feature) for c in CASES), feature
    for padding in ("left", "lengths"):
        assert any(c.padding == padding for c in CASES), padding
    assert any(not c.causal for c in CASES) and any(c.per_sample_adapter and c.cu_seqlens for c in CASES)
    assert any(c.dtype == torch.float16 for c in CASES)
    assert any(c.cu_seqlens and len(set(c.cu_seqlens)) < len(c.cu_seqlens) for c in CASES)  # empty sequences


@pytest.mark.parametrize("case", CASES, ids=[f"{i}-{c}" for i, c in enumerate(CASES)])
@pytest.mark.parametrize("backend", OP_BACKENDS)
def test_backend_matches_float64_reference(backend, case, monkeypatch):
    if op_backend(backend) == "triton":
        poisoned_allocations(monkeypatch)  # an element a kernel forgets to write shows up as NaN
    check_case(case, DEVICE, backend=backend)
