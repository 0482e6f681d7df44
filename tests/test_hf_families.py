"""Every supported model family on a tiny local config (CPU, float64): Llama, Mistral, Qwen2, Qwen3, Gemma3
(text) and Phi3, through transformers' own model classes.

Each test carries `@pytest.mark.support(feature)`: run with CAUSALATTN_SUPPORT_RESULTS=<file> (as
`tools/support_matrix.py` does), the outcomes become the cells of the support matrix (docs/support-matrix.md).
The references are transformers' sdpa (no adapters) and the test's own eager reading of the adapter
(`hf_helpers.independent_attention`, whose key path per family is written apart from causalattn's).
"""
import pytest
import torch

import causalattn.hf as cah
from causalattn import CausalMask
from hf_helpers import (FAMILY_CONFIGS, XG_READOUTS, assert_close_dicts, build, forward_backward, grads, labels_of,
                        padded_batch, randomize_gates, twin)

TIGHT = dict(rtol=1e-9, atol=1e-10)
FAMILIES = list(FAMILY_CONFIGS)
SLIDING = {  # the config of each family's sliding-window layers, the window shorter than the test batch
    "mistral": dict(sliding_window=6), "qwen2": dict(sliding_window=6, use_sliding_window=True, max_window_layers=0),
    "qwen3": dict(sliding_window=6, use_sliding_window=True, max_window_layers=0),
    "gemma3_text": dict(sliding_window=6), "phi3": dict(sliding_window=6)}
pytestmark = [pytest.mark.filterwarnings("ignore:xg_variance"), pytest.mark.parametrize("family", FAMILIES)]


def adapted(family, **adapter):
    model = build(FAMILY_CONFIGS[family]())
    cah.add_adapters(model, cah.AdapterConfig(**{"length": 5, "layers": 2, "xg_tokens": 2, **adapter}))
    randomize_gates(model)
    return model


def supervision_for(mask, seed=4):
    dense = torch.rand(mask.shape[0], mask.shape[1], mask.shape[1], generator=torch.Generator().manual_seed(seed)) < 0.3
    return CausalMask.from_dense(dense, mask.bool())


@pytest.mark.support("parity")
def test_logits_and_gradients_equal_sdpa(family):
    ids, mask = padded_batch()
    model = build(FAMILY_CONFIGS[family]())
    model.requires_grad_(True)
    logits, grad = forward_backward(model, ids, mask)
    sdpa_logits, sdpa_grad = forward_backward(twin(model, "sdpa"), ids, mask)
    real = mask.bool()
    torch.testing.assert_close(logits[real], sdpa_logits[real], **TIGHT)
    assert_close_dicts(grad, sdpa_grad, **TIGHT)


@pytest.mark.support("adapters")
def test_adapter_goes_through_the_family_key_path(family):
    """Zero-init changes nothing; with nonzero gates logits and gradients equal the independent eager
    adapter, whose keys come from the family's own projection (and key norm) without RoPE."""
    ids, mask = padded_batch()
    base = build(FAMILY_CONFIGS[family]())
    before = base(ids, attention_mask=mask).logits.detach()
    cah.add_adapters(base, cah.AdapterConfig(length=5, layers=2))
    assert torch.equal(base(ids, attention_mask=mask).logits, before)
    model = adapted(family)
    logits, grad = forward_backward(model, ids, mask)
    independent_logits, independent_grad = forward_backward(twin(model, "independent"), ids, mask)
    torch.testing.assert_close(logits, independent_logits, **TIGHT)
    assert len(grad) == 4 and all(g.abs().sum() > 0 for g in grad.values())
    assert_close_dicts(grad, independent_grad, **TIGHT)


def independent_statistics(model, ids, mask):
    """The independent eager forward's attention probabilities and XG read-outs."""
    XG_READOUTS.clear()
    independent = twin(model, "independent")
    probs = independent(ids, attention_mask=mask, output_attentions=True, real_tokens=mask.bool()).attentions
    return independent, probs


@pytest.mark.support("CAT")
def test_cat_loss_and_gradient_equal_the_independent_reading(family):
    from causalattn import cat_loss

    ids, mask = padded_batch()
    supervision = supervision_for(mask)
    model = adapted(family)
    with cah.collect(model) as stats:
        model(ids, attention_mask=mask, supervision=supervision)
    stats.cat_loss().backward()
    independent, probs = independent_statistics(model, ids, mask)
    dense = supervision.to_dense()[:, None].to(probs[0].dtype)
    expected = cat_loss([(p * dense).sum(-1) for p in probs], supervision)
    torch.testing.assert_close(stats.cat_loss(), expected, **TIGHT)
    expected.backward()
    assert_close_dicts(grads(model), grads(independent), **TIGHT)


@pytest.mark.support("XG")
def test_xg_loss_and_gradient_equal_the_independent_reading(family):
    ids, mask = padded_batch()
    model = adapted(family)
    with cah.collect(model) as stats:
        model(ids, attention_mask=mask)
    stats.xg_loss().backward()
    independent, _ = independent_statistics(model, ids, mask)
    expected = torch.stack([XG_READOUTS[i].var(0).mean() for i in sorted(XG_READOUTS)]).mean()
    torch.testing.assert_close(stats.xg_loss(), expected, **TIGHT)
    expected.backward()
    assert_close_dicts(grads(model), grads(independent), **TIGHT)


@pytest.mark.support("train")
def test_ce_cat_xg_training_lowers_the_loss(family):
    """Adam on CE + CAT + XG from the zero-init gates: every adapter parameter gets a gradient and the
    losses fall."""
    ids, mask = padded_batch()
    supervision = supervision_for(mask)
    model = build(FAMILY_CONFIGS[family]())
    cah.add_adapters(model, cah.AdapterConfig(length=5, layers=2, xg_tokens=2))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    curve = []
    for _ in range(6):
        with cah.collect(model) as stats:
            out = model(ids, attention_mask=mask, labels=labels_of(ids, mask), supervision=supervision)
        terms = torch.stack([out.loss, stats.cat_loss(), stats.xg_loss()])
        optimizer.zero_grad()
        terms.sum().backward()
        gates = [layer.gate for layer in cah.adapted_layers(model).values()]
        assert all(gate.grad is not None and bool(gate.grad.abs().sum() > 0) for gate in gates)
        optimizer.step()
        curve.append(terms.detach())
    assert curve[-1][0] < curve[0][0] and curve[-1][1] < curve[0][1]
    assert all(bool(step[2] >= 0) for step in curve)


@pytest.mark.support("generation")
def test_cached_generation_equals_full_recompute(family):
    ids, mask = padded_batch(length=8)
    model = adapted(family)
    settings = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, return_dict_in_generate=True,
                    output_scores=True)
    cached, full = model.generate(ids, **settings), model.generate(ids, use_cache=False, **settings)
    assert torch.equal(cached.sequences, full.sequences)
    torch.testing.assert_close(torch.stack(cached.scores), torch.stack(full.scores), **TIGHT)
    independent = twin(model, "independent").generate(ids, **settings)
    torch.testing.assert_close(torch.stack(cached.scores), torch.stack(independent.scores), **TIGHT)


@pytest.mark.support("save/load")
def test_save_load_round_trip(family, tmp_path):
    ids, mask = padded_batch()
    model = adapted(family, gate="raw")
    fresh = build(FAMILY_CONFIGS[family]())
    cah.load_adapters(fresh, cah.save_adapters(model, tmp_path / "adapter"))
    torch.testing.assert_close(fresh(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits,
                               rtol=0, atol=0)


@pytest.mark.support("routed")
def test_routed_adapters_train_with_vq_and_mi(family):
    """ICLM's routed adapters: the router reads the prompt tokens, every adapted layer reads the invariant
    and the routed domain prompt; CE + VQ + MI reaches the banks, the domain gates and the router."""
    ids, mask = padded_batch(length=9)
    model = build(FAMILY_CONFIGS[family]())
    torch.manual_seed(0)
    cah.add_adapters(model, cah.AdapterConfig(length=4, layers=2, domains=2, domain_length=3, route="vq",
                                              router_dim=6))
    randomize_gates(model)
    with torch.no_grad():  # zero-init domain gates would leave the banks without a gradient
        for layer in cah.adapted_layers(model).values():
            layer.domain_gate.fill_(0.5)
    with cah.collect(model) as stats:
        out = model(ids, attention_mask=mask, labels=labels_of(ids, mask), causalattn_label_rows=torch.full((3,), 7),
                    causalattn_route_tokens=mask.bool())
    loss = out.loss + 0.1 * stats.vq_loss() + 0.01 * stats.mi_loss()
    assert torch.isfinite(loss) and stats.route.index.shape == (3,)
    loss.backward()
    for layer in cah.adapted_layers(model).values():
        assert bool(layer.bank.grad.abs().sum() > 0) and bool(layer.domain_gate.grad.abs().sum() > 0)
    assert any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in cah.find_router(model).parameters())


@pytest.mark.support("sliding window", passed="exact within, refused past the window")
def test_sliding_window_past_the_window_is_refused(family):
    """Sliding layers compute exactly while the keys fit the window (then sliding == full attention) and
    raise, naming the family, past it: in the forward and when a cache starts dropping keys."""
    if family not in SLIDING:
        pytest.skip(f"{family}: no sliding-window layers")
    model = build(FAMILY_CONFIGS[family](**SLIDING[family]))
    ids, mask = padded_batch(length=6)
    torch.testing.assert_close(model(ids, attention_mask=mask).logits[mask.bool()],
                               twin(model, "sdpa")(ids, attention_mask=mask).logits[mask.bool()], **TIGHT)
    name = cah.families.FAMILIES[family]
    long_ids, long_mask = padded_batch(length=11)
    with pytest.raises(NotImplementedError, match=f"{name} sliding-window attention .*beyond the window"):
        model(long_ids, attention_mask=long_mask)
    with pytest.raises(NotImplementedError, match=f"{name} sliding-window attention .*past the window"):
        model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
