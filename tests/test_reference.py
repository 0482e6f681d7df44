"""The PyTorch reference (docs/math.md §1-§3, §5): dense vs chunked, independent formulas, SDPA, gradchecks."""
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from causalattn import Adapter, CausalMask, attention_chunked, attention_dense, cat_loss, xg_variance

DIM = 16
BACKENDS = {"dense": attention_dense, "chunked": lambda *args, **kw: attention_chunked(*args, rows_per_block=4, **kw)}


pytestmark = pytest.mark.usefixtures("single_thread")


# ---------------------------------------------------------------------- problem builders
def random_leaves(gen, dtype, *, batch=2, heads_q=4, heads_kv=2, n_q=21, n_k=None, adapter_tokens=0,
                  adapter_batched=False, gate_shape="head"):
    """Random leaf tensors (requires_grad) of one attention call: q, k, v and the adapter's keys/values/gate."""
    n_k = n_q if n_k is None else n_k

    def leaf(*shape):
        return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()

    leaves = {"q": leaf(batch, heads_q, n_q, DIM), "k": leaf(batch, heads_kv, n_k, DIM), "v": leaf(batch, heads_kv, n_k, DIM)}
    if adapter_tokens:
        shape = (batch, heads_kv, adapter_tokens, DIM) if adapter_batched else (heads_kv, adapter_tokens, DIM)
        leaves["adapter_keys"] = leaf(*shape)
        leaves["adapter_values"] = leaf(*shape)
        leaves["gate"] = leaf(*{"head": (heads_q,), "scalar": (), "one": (1,)}[gate_shape])
    return leaves


def call(fn, leaves, gate_mode="tanh", **options):
    adapter = None
    if "gate" in leaves:
        adapter = Adapter(leaves["adapter_keys"], leaves["adapter_values"], leaves["gate"], gate_mode)
    return fn(leaves["q"], leaves["k"], leaves["v"], adapter=adapter, **options)


def weighted_sum(result, seed=1):
    """A scalar reading every output (finite lse entries only) with fixed random weights, so autograd
    exercises each output's backward path."""
    gen = torch.Generator().manual_seed(seed)
    total = 0.0
    for value in result:
        if value is not None:
            weights = torch.randn(value.shape, generator=gen, dtype=torch.float64).to(value.dtype)
            total = total + (torch.where(torch.isfinite(value), value, 0.0) * weights).sum()
    return total


def random_supervision(gen, batch, n, key_mask=None, cu_seqlens=None):
    """A random causal mask; with packing, from_dense keeps causes inside each row's own sequence."""
    dense = torch.rand(batch, n, n, generator=gen) < 0.3
    return CausalMask.from_dense(dense, key_mask, cu_seqlens=cu_seqlens)


# Each scenario: shapes for random_leaves plus the options of the call. "padding" is turned into
# key_lengths (right padding) or key_mask (left padding, so early rows of sample 1 see no key).
SCENARIOS = {
    "causal-mha": dict(heads_q=2, heads_kv=2),
    "noncausal-gqa2": dict(causal=False),
    "causal-gqa4-nq<nk": dict(heads_q=4, heads_kv=1, n_q=9, n_k=23),
    "noncausal-nq<nk": dict(causal=False, n_q=7, n_k=19),
    "key-lengths": dict(padding="lengths"),
    "left-padding-adapter": dict(padding="left", adapter_tokens=5),
    "adapter-head-gate-tanh-mass-xg": dict(adapter_tokens=5, supervision=True, xg_tokens=2),
    "per-sample-adapter-scalar-gate-raw-xg-rows": dict(heads_kv=1, adapter_tokens=6, adapter_batched=True,
                                                       gate_shape="scalar", gate_mode="raw", xg_tokens=3, xg_pool="position"),
    "gate-one-raw-key-lengths-mass-xg": dict(adapter_tokens=3, gate_shape="one", gate_mode="raw", padding="lengths",
                                             supervision=True, xg_tokens=1),
    "noncausal-adapter-xg-rows": dict(causal=False, adapter_tokens=4, xg_tokens=4, xg_pool="position"),
    "left-padding-everything": dict(padding="left", adapter_tokens=5, adapter_batched=True, supervision=True, xg_tokens=2),
    "packed-everything": dict(batch=1, packing=(0, 7, 7, 18, 21), adapter_tokens=4, supervision=True, xg_tokens=2),
    "packed-noncausal-xg-rows": dict(batch=1, causal=False, packing=(0, 5, 21), adapter_tokens=4, xg_tokens=2,
                                     xg_pool="position"),
}


def build_scenario(name, dtype, seed=0):
    spec = dict(SCENARIOS[name])
    gen = torch.Generator().manual_seed(seed)
    options = {key: spec.pop(key) for key in ("causal", "xg_tokens", "xg_pool") if key in spec}
    gate_mode = spec.pop("gate_mode", "tanh")
    padding, packing, supervised = spec.pop("padding", None), spec.pop("packing", None), spec.pop("supervision", False)
    leaves = random_leaves(gen, dtype, **spec)
    batch, n = leaves["q"].shape[0], leaves["k"].shape[2]
    key_mask = None
    if padding == "lengths":
        options["key_lengths"] = torch.tensor([n - 5, n])
        key_mask = torch.arange(n) < options["key_lengths"][:, None]
    elif padding == "left":
        key_mask = torch.ones(batch, n, dtype=torch.bool)
        key_mask[1, :4] = False
        options["key_mask"] = key_mask
    if packing is not None:
        options["cu_seqlens"] = torch.tensor(packing)
    if supervised:
        options["supervision"] = random_supervision(gen, batch, n, key_mask, options.get("cu_seqlens"))
    return leaves, options, gate_mode


def detached_copy(leaves):
    return {name: t.detach().clone().requires_grad_() for name, t in leaves.items()}


# ---------------------------------------------------------------------- dense vs chunked
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_chunked_matches_dense(scenario, dtype):
    leaves, options, gate_mode = build_scenario(scenario, dtype)
    expected = call(attention_dense, leaves, gate_mode, **options)
    expected_grads = torch.autograd.grad(weighted_sum(expected), list(leaves.values()))
    atol, rtol = (1e-12, 1e-10) if dtype == torch.float64 else (2e-6, 2e-5)
    for rows_per_block in (1, 5, 8, 64, None):  # 5 and 8 do not divide 21; 64 is past the end
        chunked_leaves = detached_copy(leaves)
        result = call(attention_chunked, chunked_leaves, gate_mode, rows_per_block=rows_per_block, **options)
        for name, got, want in zip(expected._fields, result, expected):
            assert (got is None) == (want is None), name
            if want is not None:
                assert got.shape == want.shape and got.dtype == want.dtype, name
                torch.testing.assert_close(got, want, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")
        grads = torch.autograd.grad(weighted_sum(result), list(chunked_leaves.values()))
        for name, got, want in zip(leaves, grads, expected_grads):
            assert torch.isfinite(got).all() and got.abs().sum() > 0, name
            torch.testing.assert_close(got, want, atol=10 * atol, rtol=10 * rtol, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("rows_per_block", [0, -3, 2.5, "8"])
def test_chunked_rejects_bad_block(rows_per_block):
    leaves = random_leaves(torch.Generator().manual_seed(0), torch.float32)
    with pytest.raises(ValueError, match="rows_per_block"):
        call(attention_chunked, leaves, rows_per_block=rows_per_block)


# ---------------------------------------------------------------------- independent formulas (docs/math.md §1-§3)
def repeat_kv(t, group):
    """(B, Hkv, ...) or (Hkv, ...) adapter/KV tensor -> one copy per query head (B, Hq, ...)."""
    return t.repeat_interleave(group, dim=-3)


def visibility(n_q, n_k, causal, key_mask=None, batch=1):
    """(B, 1, Nq, Nk) bool: causal bottom-right aligned (j <= i + Nk - Nq), padding keys hidden."""
    rows, cols = torch.arange(n_q)[:, None], torch.arange(n_k)[None, :]
    visible = (cols <= rows + n_k - n_q) if causal else torch.ones(n_q, n_k, dtype=torch.bool)
    visible = visible.expand(batch, 1, n_q, n_k)
    if key_mask is not None:
        visible = visible & key_mask[:, None, None, :]
    return visible


def sequence_probs(q, k, visible, scale):
    """Softmax over visible keys; a row that sees no key gets all-zero probabilities."""
    group = q.shape[1] // k.shape[1]
    scores = (q @ repeat_kv(k, group).transpose(-1, -2) * scale).masked_fill(~visible, float("-inf"))
    return torch.softmax(scores, dim=-1).nan_to_num(0.0)


def adapter_readout(q, adapter_keys, adapter_values, gamma, scale):
    """(gamma_h * Pa va, Pa) per query head, Pa = softmax_m(scale q ka^T) over all adapter tokens."""
    group = q.shape[1] // adapter_keys.shape[-3]
    keys, values = repeat_kv(adapter_keys, group), repeat_kv(adapter_values, group)
    probs = torch.softmax(q @ keys.transpose(-1, -2) * scale, dim=-1)
    return gamma.expand(q.shape[1])[:, None, None] * (probs @ values), probs


def test_concatenated_formulation_equals_out():
    # The official LLaMA-Adapter form: one attention over [adapter; sequence] keys with weights
    # [gamma * Pa, P], the two softmaxes taken separately.
    gen = torch.Generator().manual_seed(3)
    leaves = random_leaves(gen, torch.float64, batch=2, heads_q=4, heads_kv=2, n_q=13, adapter_tokens=5, adapter_batched=True)
    key_mask = torch.ones(2, 13, dtype=torch.bool)
    key_mask[1, :3] = False
    scale = 0.3
    result = call(attention_dense, leaves, key_mask=key_mask, scale=scale)

    q, k, v = leaves["q"], leaves["k"], leaves["v"]
    probs = sequence_probs(q, k, visibility(13, 13, True, key_mask, batch=2), scale)
    _, adapter_probs = adapter_readout(q, leaves["adapter_keys"], leaves["adapter_values"], torch.tanh(leaves["gate"]), scale)
    gamma = torch.tanh(leaves["gate"])[:, None, None]
    weights = torch.cat([gamma * adapter_probs, probs], dim=-1)
    values = torch.cat([repeat_kv(leaves["adapter_values"], 2), repeat_kv(v, 2)], dim=-2)
    torch.testing.assert_close(result.out, weights @ values, atol=1e-12, rtol=1e-10)


def test_mass_is_probability_on_causes():
    gen = torch.Generator().manual_seed(4)
    leaves = random_leaves(gen, torch.float64, batch=2, heads_q=4, heads_kv=1, n_q=15, adapter_tokens=3)
    key_mask = torch.ones(2, 15, dtype=torch.bool)
    key_mask[0, :2] = False
    mask = random_supervision(gen, 2, 15, key_mask)
    result = call(attention_dense, leaves, key_mask=key_mask, supervision=mask)
    probs = sequence_probs(leaves["q"], leaves["k"], visibility(15, 15, True, key_mask, batch=2), DIM ** -0.5)
    expected = (probs * mask.to_dense()[:, None].double()).sum(-1)  # the adapter never counts
    assert (expected > 0).any()
    torch.testing.assert_close(result.mass, expected, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("xg_tokens", [1, 2, 5])
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_xg_pooled_is_mean_over_valid_rows(backend, xg_tokens):
    gen = torch.Generator().manual_seed(5)
    leaves = random_leaves(gen, torch.float64, batch=3, heads_q=4, heads_kv=2, n_q=11, adapter_tokens=5)
    key_mask = torch.ones(3, 11, dtype=torch.bool)
    key_mask[1, :4] = False  # left padding
    key_mask[2, 8:] = False  # right padding
    pooled = call(BACKENDS[backend], leaves, key_mask=key_mask, xg_tokens=xg_tokens).xg
    per_row = call(BACKENDS[backend], leaves, key_mask=key_mask, xg_tokens=xg_tokens, xg_pool="position").xg

    # z_i = gamma_h sum_{m < Hg} Pa_im va_m, head by head, straight from docs/math.md §3.
    q, gamma = leaves["q"], torch.tanh(leaves["gate"])
    z = torch.empty(3, 4, 11, DIM, dtype=torch.float64)
    for b in range(3):
        for h in range(4):
            keys, values = leaves["adapter_keys"][h // 2], leaves["adapter_values"][h // 2]
            adapter_probs = torch.softmax(q[b, h] @ keys.T / math.sqrt(DIM), dim=-1)
            z[b, h] = gamma[h] * adapter_probs[:, :xg_tokens] @ values[:xg_tokens]
    torch.testing.assert_close(per_row, z, atol=1e-12, rtol=1e-10)
    for b in range(3):
        torch.testing.assert_close(pooled[b], z[b][:, key_mask[b]].mean(1), atol=1e-12, rtol=1e-10)


# ---------------------------------------------------------------------- zero-init property (docs/math.md §1)
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_zero_gate_gives_zero_adapter_gradients(backend):
    gen = torch.Generator().manual_seed(6)
    leaves = random_leaves(gen, torch.float64, batch=2, heads_q=4, heads_kv=2, n_q=10, adapter_tokens=4)
    leaves["gate"] = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    result = call(BACKENDS[backend], leaves)
    out_grad = torch.randn(result.out.shape, generator=gen, dtype=torch.float64)
    keys_grad, values_grad, gate_grad = torch.autograd.grad((result.out * out_grad).sum(),
                                                            (leaves["adapter_keys"], leaves["adapter_values"], leaves["gate"]))
    assert torch.equal(keys_grad, torch.zeros_like(keys_grad))
    assert torch.equal(values_grad, torch.zeros_like(values_grad))
    # dgamma_h = sum_{b,i} dO_i . O^a_i, and tanh'(0) = 1 (docs/math.md §1).
    adapter_out, _ = adapter_readout(leaves["q"], leaves["adapter_keys"], leaves["adapter_values"],
                                     torch.ones(4, dtype=torch.float64), DIM ** -0.5)
    expected = (out_grad * adapter_out).sum(dim=(0, 2, 3))
    assert (gate_grad.abs() > 1e-3).all()
    torch.testing.assert_close(gate_grad, expected, atol=1e-12, rtol=1e-10)


# ---------------------------------------------------------------------- plain attention vs SDPA, empty rows
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("kv_layout", ["enable_gqa", "repeated"])
@pytest.mark.parametrize("padding", [None, "key_mask"])
@pytest.mark.parametrize("n_k", [12, 17], ids=["nq=nk", "nq<nk"])
def test_plain_attention_matches_sdpa(causal, kv_layout, padding, n_k):
    gen = torch.Generator().manual_seed(7)
    leaves = random_leaves(gen, torch.float64, batch=2, heads_q=4, heads_kv=2, n_q=12, n_k=n_k)
    q, k, v = leaves["q"], leaves["k"], leaves["v"]
    key_mask = None
    if padding:
        key_mask = torch.ones(2, n_k, dtype=torch.bool)
        key_mask[1, :3] = False
        key_mask[0, n_k - 2:] = False
    scale = 0.2
    result = attention_dense(q, k, v, causal=causal, key_mask=key_mask, scale=scale)

    visible = visibility(12, n_k, causal, key_mask, batch=2)
    if kv_layout == "enable_gqa":
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=scale, enable_gqa=True)
    else:
        expected = F.scaled_dot_product_attention(q, repeat_kv(k, 2), repeat_kv(v, 2), attn_mask=visible, scale=scale)
    scores = (q @ repeat_kv(k, 2).transpose(-1, -2) * scale).masked_fill(~visible, float("-inf"))
    seen = visible.any(-1).expand(2, 4, 12)
    torch.testing.assert_close(result.out[seen], expected[seen], atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(result.lse[seen], torch.logsumexp(scores, -1)[seen], atol=1e-12, rtol=1e-10)
    assert result.lse.dtype == torch.float64 and result.out.dtype == torch.float64
    assert torch.equal(result.out[~seen], torch.zeros_like(result.out[~seen]))
    assert torch.isinf(result.lse[~seen]).all() and (result.lse[~seen] > 0).all()


def test_plain_attention_without_mask_matches_sdpa_is_causal_float32():
    gen = torch.Generator().manual_seed(8)
    leaves = random_leaves(gen, torch.float32, batch=2, heads_q=4, heads_kv=1, n_q=20)
    result = attention_chunked(leaves["q"], leaves["k"], leaves["v"], rows_per_block=6)
    expected = F.scaled_dot_product_attention(leaves["q"], leaves["k"], leaves["v"], is_causal=True, enable_gqa=True)
    torch.testing.assert_close(result.out, expected, atol=2e-6, rtol=2e-5)
    assert result.lse.dtype == torch.float32


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_rows_without_visible_key(backend):
    # Left padding with causal: rows before the first real token see nothing. key_lengths 0: a whole
    # sample sees nothing. Zero sequence output, lse = +inf, finite gradients (no 0/0 anywhere).
    gen = torch.Generator().manual_seed(9)
    for options in ({"key_mask": torch.tensor([[False] * 3 + [True] * 7, [True] * 10])},
                    {"key_lengths": torch.tensor([0, 6]), "causal": False}):
        leaves = random_leaves(gen, torch.float64, batch=2, heads_q=2, heads_kv=1, n_q=10)
        mask = random_supervision(gen, 2, 10, options.get("key_mask")) if options.get("causal", True) else None
        result = call(BACKENDS[backend], leaves, supervision=mask, **options)
        blind = (slice(0, 1), slice(None), slice(0, 3) if "key_mask" in options else slice(None))
        assert torch.equal(result.out[blind], torch.zeros_like(result.out[blind]))
        assert torch.isposinf(result.lse[blind]).all()
        assert torch.isfinite(result.lse[1]).all()
        if mask is not None:
            assert torch.equal(result.mass[blind], torch.zeros_like(result.mass[blind]))
        grads = torch.autograd.grad(weighted_sum(result), list(leaves.values()))
        for grad in grads:
            assert torch.isfinite(grad).all()
        assert torch.equal(grads[0][blind], torch.zeros_like(grads[0][blind]))


# ---------------------------------------------------------------------- packed sequences
@pytest.mark.parametrize("xg_pool", ["sample", "position"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_packed_equals_separate_sequences(causal, xg_pool):
    gen = torch.Generator().manual_seed(10)
    bounds = [0, 6, 6, 15, 19, 19]  # an empty sequence in the middle and one at the end
    cu_seqlens = torch.tensor(bounds)
    leaves = random_leaves(gen, torch.float64, batch=1, heads_q=4, heads_kv=2, n_q=19, adapter_tokens=3, adapter_batched=True)
    mask = random_supervision(gen, 1, 19, cu_seqlens=cu_seqlens) if causal else None
    options = dict(causal=causal, xg_tokens=2, xg_pool=xg_pool)
    packed = call(attention_dense, leaves, cu_seqlens=cu_seqlens, supervision=mask, **options)
    assert packed.xg.shape == ((5, 4, DIM) if xg_pool == "sample" else (1, 4, 19, DIM))
    packed_grads = torch.autograd.grad(weighted_sum(packed, seed=2), list(leaves.values()))

    # The same weights as weighted_sum(packed) draws, sliced per sequence.
    gen_weights = torch.Generator().manual_seed(2)
    weights = [torch.randn(t.shape, generator=gen_weights, dtype=torch.float64) if t is not None else None for t in packed]
    separate_loss = 0.0
    for index, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        if start == end:
            if xg_pool == "sample":
                assert torch.equal(packed.xg[index], torch.zeros(4, DIM, dtype=torch.float64))
            continue
        part = {name: t[:, :, start:end] if name in ("q", "k", "v") else t for name, t in leaves.items()}
        part_mask = CausalMask.from_dense(mask.to_dense()[:, start:end, start:end]) if causal else None
        alone = call(attention_dense, part, supervision=part_mask, **options)
        torch.testing.assert_close(packed.out[:, :, start:end], alone.out, atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(packed.lse[:, :, start:end], alone.lse, atol=1e-12, rtol=1e-10)
        if causal:
            torch.testing.assert_close(packed.mass[:, :, start:end], alone.mass, atol=1e-12, rtol=1e-10)
        packed_xg = packed.xg[index : index + 1] if xg_pool == "sample" else packed.xg[:, :, start:end]
        torch.testing.assert_close(packed_xg, alone.xg, atol=1e-12, rtol=1e-10)
        separate_loss = separate_loss + (alone.out * weights[0][:, :, start:end]).sum() \
            + (alone.lse * weights[1][:, :, start:end]).sum() \
            + ((alone.mass * weights[2][:, :, start:end]).sum() if causal else 0.0) \
            + (alone.xg * (weights[3][index : index + 1] if xg_pool == "sample" else weights[3][:, :, start:end])).sum()
    separate_grads = torch.autograd.grad(separate_loss, list(leaves.values()))
    for name, got, want in zip(leaves, packed_grads, separate_grads):
        torch.testing.assert_close(got, want, atol=1e-11, rtol=1e-10, msg=lambda m: f"d{name}: {m}")


# ---------------------------------------------------------------------- finite differences (float64)
def gradcheck_problem(gen):
    """Small float64 problem with every feature on: GQA, left padding, adapter, supervision, XG."""
    leaves = random_leaves(gen, torch.float64, batch=2, heads_q=2, heads_kv=1, n_q=6, adapter_tokens=3)
    key_mask = torch.tensor([[True] * 6, [False] + [True] * 5])
    mask = random_supervision(gen, 2, 6, key_mask)
    assert mask.valid_rows().sum() >= 3  # the CAT loss needs rows to act on
    return leaves, key_mask, mask


def make_scalar_loss(kind, fn, key_mask, mask, gen):
    o_proj = torch.randn(8, 2 * DIM, generator=gen, dtype=torch.float64)
    out_weights = torch.randn(2, 2, 6, DIM, generator=gen, dtype=torch.float64)

    def loss(q, k, v, adapter_keys, adapter_values, gate):
        xg_pool = "position" if kind == "xg-rows-only" else "sample"
        result = fn(q, k, v, key_mask=key_mask, supervision=mask, adapter=Adapter(adapter_keys, adapter_values, gate),
                    xg_tokens=2, xg_pool=xg_pool)
        if kind == "every-output":
            return weighted_sum(result)
        if kind == "mass-only":  # the main loss switched off; alpha large so every valid row is active
            return cat_loss(result.mass, mask, alpha=1e3)
        if kind in ("xg-only", "xg-rows-only"):
            return xg_variance(result.xg, o_proj)
        return (result.out * out_weights).sum() + cat_loss(result.mass, mask, alpha=1e3) + 3.0 * xg_variance(result.xg, o_proj)

    return loss


@pytest.mark.parametrize("kind", ["every-output", "mass-only", "xg-only", "xg-rows-only", "combined"])
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_gradcheck(backend, kind):
    gen = torch.Generator().manual_seed(11)
    leaves, key_mask, mask = gradcheck_problem(gen)
    loss = make_scalar_loss(kind, BACKENDS[backend], key_mask, mask, gen)
    inputs = tuple(leaves.values())
    grads = torch.autograd.grad(loss(*inputs), inputs, allow_unused=True)
    # Every input the loss reads must get a gradient that is not trivially zero.
    for name, grad in zip(leaves, grads):
        if name in ("v", "adapter_keys", "adapter_values", "gate") and kind == "mass-only":
            assert grad is None or grad.abs().sum() == 0, name  # the mass is the sequence softmax alone
        elif name in ("k", "v") and kind.startswith("xg"):
            assert grad is None or grad.abs().sum() == 0, name  # XG reads the adapter only
        else:
            assert grad is not None and grad.abs().sum() > 0, name
    # The chunked path checks one random direction per input (fast_mode): its gradients already equal
    # the dense ones element by element (test_chunked_matches_dense), and its checkpointed blocks make
    # the element-by-element finite differences several times slower.
    assert torch.autograd.gradcheck(loss, inputs, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=backend == "chunked")


# ---------------------------------------------------------------------- argument validation (check_inputs)
def valid_arguments():
    """Arguments that pass check_inputs; each case below breaks exactly one thing."""
    gen = torch.Generator().manual_seed(12)
    leaves = {name: t.detach() for name, t in random_leaves(gen, torch.float32, batch=2, heads_q=4, heads_kv=2, n_q=6,
                                                             adapter_tokens=3).items()}
    adapter = Adapter(leaves["adapter_keys"], leaves["adapter_values"], leaves["gate"])
    return dict(q=leaves["q"], k=leaves["k"], v=leaves["v"], causal=True, adapter=adapter)


def with_adapter(arguments, **changes):
    arguments["adapter"] = dataclasses.replace(arguments["adapter"], **changes)


def qkv(batch=2, heads=(4, 2), n=(6, 6), dim=DIM):
    """Replacement q, k, v of the given sizes (random, float32)."""
    gen = torch.Generator().manual_seed(13)
    return dict(q=torch.randn(batch, heads[0], n[0], dim, generator=gen),
                k=torch.randn(batch, heads[1], n[1], dim, generator=gen),
                v=torch.randn(batch, heads[1], n[1], dim, generator=gen))


def supervision_for(batch, n):
    return CausalMask.from_dense(torch.ones(batch, n, n, dtype=torch.bool))


BAD_INPUTS = [
    # (id, change to the valid arguments, error type, the argument named at the start of the message)
    ("q-list", lambda a: a.update(q=a["q"].tolist()), TypeError, "q"),
    ("k-3-dims", lambda a: a.update(k=a["k"][0]), ValueError, "k"),
    ("v-int", lambda a: a.update(v=a["v"].int()), TypeError, "v"),
    ("k-dtype", lambda a: a.update(k=a["k"].double()), TypeError, "k, v"),
    ("v-device", lambda a: a.update(v=a["v"].to("meta")), ValueError, "k, v"),
    ("v-shape", lambda a: a.update(v=a["v"][:, :, :5]), ValueError, "v"),
    ("k-batch", lambda a: a.update(qkv(batch=2), q=qkv(batch=3)["q"]), ValueError, "k"),
    ("k-head-dim", lambda a: a.update(k=torch.randn(2, 2, 6, 32), v=torch.randn(2, 2, 6, 32)), ValueError, "k"),
    ("kv-heads-divide", lambda a: a.update(qkv(heads=(4, 3))), ValueError, "k"),
    ("kv-heads-zero", lambda a: a.update(qkv(heads=(4, 0)), adapter=None), ValueError, "k"),
    ("head-dim-small", lambda a: a.update(qkv(dim=8), adapter=None), ValueError, "q"),
    ("head-dim-large", lambda a: a.update(qkv(batch=1, heads=(1, 1), n=(1, 1), dim=512), adapter=None), ValueError, "q"),
    ("more-queries", lambda a: a.update(qkv(n=(7, 6))), ValueError, "q"),
    ("scale-negative", lambda a: a.update(scale=-0.5), ValueError, "scale"),
    ("scale-zero", lambda a: a.update(scale=0.0), ValueError, "scale"),
    ("scale-nan", lambda a: a.update(scale=float("nan")), ValueError, "scale"),
    ("scale-str", lambda a: a.update(scale="0.25"), ValueError, "scale"),
    ("two-key-masks", lambda a: a.update(key_lengths=torch.tensor([6, 6]), key_mask=torch.ones(2, 6, dtype=torch.bool)),
     ValueError, "key_lengths and key_mask"),
    ("key-lengths-list", lambda a: a.update(key_lengths=[6, 6]), TypeError, "key_lengths"),
    ("key-lengths-float", lambda a: a.update(key_lengths=torch.tensor([6.0, 6.0])), ValueError, "key_lengths"),
    ("key-lengths-bool", lambda a: a.update(key_lengths=torch.tensor([True, True])), ValueError, "key_lengths"),
    ("key-lengths-shape", lambda a: a.update(key_lengths=torch.tensor([6, 6, 6])), ValueError, "key_lengths"),
    ("key-lengths-device", lambda a: a.update(key_lengths=torch.tensor([6, 6], device="meta")), ValueError, "key_lengths"),
    ("key-lengths-negative", lambda a: a.update(key_lengths=torch.tensor([-1, 6])), ValueError, "key_lengths"),
    ("key-lengths-too-long", lambda a: a.update(key_lengths=torch.tensor([7, 6])), ValueError, "key_lengths"),
    ("key-mask-list", lambda a: a.update(key_mask=[[True] * 6] * 2), TypeError, "key_mask"),
    ("key-mask-int", lambda a: a.update(key_mask=torch.ones(2, 6, dtype=torch.int64)), ValueError, "key_mask"),
    ("key-mask-shape", lambda a: a.update(key_mask=torch.ones(2, 5, dtype=torch.bool)), ValueError, "key_mask"),
    ("key-mask-device", lambda a: a.update(key_mask=torch.ones(2, 6, dtype=torch.bool, device="meta")), ValueError, "key_mask"),
    ("cu-seqlens-list", lambda a: a.update(qkv(batch=1), cu_seqlens=[0, 6], adapter=None), TypeError, "cu_seqlens"),
    ("cu-seqlens-2d", lambda a: a.update(qkv(batch=1), cu_seqlens=torch.tensor([[0, 6]])), ValueError, "cu_seqlens"),
    ("cu-seqlens-one-offset", lambda a: a.update(qkv(batch=1), cu_seqlens=torch.tensor([6])), ValueError, "cu_seqlens"),
    ("cu-seqlens-float", lambda a: a.update(qkv(batch=1), cu_seqlens=torch.tensor([0.0, 6.0])), ValueError, "cu_seqlens"),
    ("cu-seqlens-batch", lambda a: a.update(cu_seqlens=torch.tensor([0, 6])), ValueError, "cu_seqlens"),
    ("cu-seqlens-nq<nk", lambda a: a.update(qkv(batch=1, n=(4, 6)), cu_seqlens=torch.tensor([0, 6])), ValueError, "cu_seqlens"),
    ("cu-seqlens-start", lambda a: a.update(qkv(batch=1), cu_seqlens=torch.tensor([1, 6])), ValueError, "cu_seqlens"),
    ("cu-seqlens-end", lambda a: a.update(qkv(batch=1), cu_seqlens=torch.tensor([0, 3, 5])), ValueError, "cu_seqlens"),
    ("cu-seqlens-decreasing", lambda a: a.update(qkv(batch=1), cu_seqlens=torch.tensor([0, 4, 2, 6])), ValueError, "cu_seqlens"),
    ("adapter-tuple", lambda a: a.update(adapter=tuple(dataclasses.astuple(a["adapter"]))), TypeError, "adapter"),
    ("adapter-keys-list", lambda a: with_adapter(a, keys=a["adapter"].keys.tolist()), TypeError, "adapter.keys"),
    ("adapter-values-device", lambda a: with_adapter(a, values=a["adapter"].values.to("meta")), ValueError, "adapter.values"),
    ("adapter-gate-int", lambda a: with_adapter(a, gate=torch.zeros(4, dtype=torch.int64)), TypeError, "adapter.gate"),
    ("adapter-dtype", lambda a: with_adapter(a, keys=a["adapter"].keys.double(), values=a["adapter"].values.double()),
     TypeError, "adapter.keys/values"),
    ("adapter-values-shape", lambda a: with_adapter(a, values=a["adapter"].values[:, :2]), ValueError, "adapter.values"),
    ("adapter-keys-heads", lambda a: with_adapter(a, keys=torch.randn(4, 3, DIM), values=torch.randn(4, 3, DIM)),
     ValueError, "adapter.keys"),
    ("adapter-keys-batch", lambda a: with_adapter(a, keys=torch.randn(3, 2, 3, DIM), values=torch.randn(3, 2, 3, DIM)),
     ValueError, "adapter.keys"),
    ("adapter-empty", lambda a: with_adapter(a, keys=torch.randn(2, 0, DIM), values=torch.randn(2, 0, DIM)),
     ValueError, "adapter.keys"),
    ("adapter-too-long", lambda a: with_adapter(a, keys=torch.randn(2, 65, DIM), values=torch.randn(2, 65, DIM)),
     ValueError, "adapter.keys"),
    ("adapter-gate-shape", lambda a: with_adapter(a, gate=torch.zeros(3)), ValueError, "adapter.gate"),
    ("adapter-gate-2d", lambda a: with_adapter(a, gate=torch.zeros(4, 1)), ValueError, "adapter.gate"),
    ("adapter-gate-mode", lambda a: with_adapter(a, gate_mode="sigmoid"), ValueError, "adapter.gate_mode"),
    ("supervision-not-causal", lambda a: a.update(causal=False, supervision=supervision_for(2, 6)), ValueError, "supervision"),
    ("supervision-nq<nk", lambda a: a.update(qkv(n=(4, 6)), supervision=supervision_for(2, 6)), ValueError, "supervision"),
    ("supervision-batch", lambda a: a.update(supervision=supervision_for(3, 6)), ValueError, "supervision"),
    ("supervision-length", lambda a: a.update(supervision=supervision_for(2, 7)), ValueError, "supervision"),
    ("supervision-device", lambda a: a.update(supervision=supervision_for(2, 6).to("meta")), ValueError, "supervision"),
    ("xg-negative", lambda a: a.update(xg_tokens=-1), ValueError, "xg_tokens"),
    ("xg-float", lambda a: a.update(xg_tokens=1.0), ValueError, "xg_tokens"),
    ("xg-no-adapter", lambda a: a.update(adapter=None, xg_tokens=1), ValueError, "xg_tokens"),
    ("xg-past-adapter", lambda a: a.update(xg_tokens=4), ValueError, "xg_tokens"),
    ("xg-nq<nk", lambda a: a.update(qkv(n=(4, 6)), xg_tokens=2), ValueError, "xg_tokens"),
    ("xg-pool", lambda a: a.update(xg_tokens=2, xg_pool="mean"), ValueError, "xg_pool"),
]


@pytest.mark.parametrize("change, error, name", [case[1:] for case in BAD_INPUTS], ids=[case[0] for case in BAD_INPUTS])
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_bad_inputs_are_named(backend, change, error, name):
    arguments = valid_arguments()
    BACKENDS[backend](**arguments)  # the unchanged arguments are accepted
    change(arguments)
    with pytest.raises(error) as raised:
        BACKENDS[backend](**arguments)
    assert str(raised.value).startswith(name + ":") or str(raised.value).startswith(name + " "), str(raised.value)
