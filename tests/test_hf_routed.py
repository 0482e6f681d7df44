"""Routed adapters (ICLM) on a tiny LLaMA (CPU, float64): the router hook, both routing paths, the MI
read-outs, invariant-only evaluation, save/load of the bank and the router."""
import copy

import pytest
import torch

import causalattn.hf as cah
from hf_helpers import build, llama_config, padded_batch

TIGHT = dict(rtol=1e-9, atol=1e-10)


def routed_model(route="vq", domains=2, seed=0, **overrides):
    model = build(llama_config(), seed=seed)
    torch.manual_seed(seed)
    cah.add_adapters(model, cah.AdapterConfig(length=4, layers=2, domains=domains, domain_length=3, route=route,
                                              router_dim=6, **overrides))
    return model


def randomize(model, seed=1):
    """Nonzero gates everywhere: at zero init the routed adapter changes nothing."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in cah.adapted_layers(model).values():
            for p in (layer.gate, layer.domain_gate):
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.7)


def with_gates_zeroed(model, *names):
    """A copy of `model` whose adapted layers have the named gates at zero."""
    copied = copy.deepcopy(model)
    with torch.no_grad():
        for layer in cah.adapted_layers(copied).values():
            for name in names:
                getattr(layer, name).zero_()
    return copied


def batch():
    ids, mask = padded_batch(batch=3, length=9)
    rows = mask.sum(1) * 0 + 7  # the row predicting the last token
    return ids, mask, rows


def test_zero_init_routed_adapters_change_nothing():
    ids, mask, _ = batch()
    base = build(llama_config())
    for route in ("vq", "soft", "oracle"):
        model = routed_model(route)
        with torch.no_grad():
            got = model(ids, attention_mask=mask, causalattn_domains=torch.tensor([0, 1, 1])).logits
            want = base(ids, attention_mask=mask).logits
        torch.testing.assert_close(got, want, **TIGHT)


def test_unrouted_configs_are_saved_as_before():
    assert "domains" not in cah.AdapterConfig().to_dict()
    assert cah.AdapterConfig(domains=2).to_dict()["domains"] == 2


def test_hard_route_matches_the_all_domains_path_with_one_hot_weights():
    """"vq" gathers each sample's domain prompt (per-sample keys); "vq-ste" reads every domain prompt in
    its own segment with the gate scaled by the one-hot weight: the same forward by two paths."""
    ids, mask, _ = batch()
    hard = routed_model("vq")
    randomize(hard)
    straight = copy.deepcopy(hard)
    straight.causalattn_router.mode = "vq-ste"
    with torch.no_grad():
        torch.testing.assert_close(hard(ids, attention_mask=mask).logits,
                                   straight(ids, attention_mask=mask).logits, **TIGHT)


def test_oracle_route_reads_the_given_domain_prompt():
    """Sample b with domain k computes what an unrouted two-segment adapter of (prompt, bank[k]) computes."""
    ids, mask, _ = batch()
    model = routed_model("oracle")
    randomize(model)
    domains = torch.tensor([1, 0, 1])
    with torch.no_grad():
        routed = model(ids, attention_mask=mask, causalattn_domains=domains).logits
        for k in (0, 1):
            swapped = copy.deepcopy(model)
            for layer in cah.adapted_layers(swapped).values():  # domain k in both bank slots
                layer.bank.copy_(layer.bank[k].expand_as(layer.bank))
                layer.domain_gate.copy_(layer.domain_gate[k].expand_as(layer.domain_gate))
            alone = swapped(ids, attention_mask=mask, causalattn_domains=torch.zeros(3, dtype=torch.long)).logits
            chosen = domains == k
            torch.testing.assert_close(routed[chosen], alone[chosen], **TIGHT)


def test_the_route_reads_only_the_marked_tokens():
    """Tokens outside `causalattn_route_tokens` (the answer, in training and in candidate scoring) do not
    move the route; without the mask they do."""
    ids, mask, _ = batch()
    model = routed_model("soft")
    prompt = mask.bool().clone()
    prompt[:, -2:] = False
    other = ids.clone()
    other[:, -2:] = (ids[:, -2:] + 7) % 300
    distances = []
    for tokens in (ids, other):
        with torch.no_grad(), cah.collect(model) as stats:
            model(tokens, attention_mask=mask, causalattn_route_tokens=prompt)
            masked = stats.route.distances
            model(tokens, attention_mask=mask)
            distances.append((masked, stats.route.distances))
    torch.testing.assert_close(distances[0][0], distances[1][0], **TIGHT)
    assert not torch.allclose(distances[0][1], distances[1][1])


def test_router_gradients_by_mode():
    ids, mask, rows = batch()
    for route, router_learns_from_ce in (("vq", False), ("vq-ste", True), ("soft", True)):
        model = routed_model(route)
        randomize(model)
        out = model(ids, attention_mask=mask, labels=ids, use_cache=False)
        out.loss.backward()
        router = model.causalattn_router
        got = router.codebook.grad is not None and bool(router.codebook.grad.abs().sum() > 0)
        assert got == router_learns_from_ce, route
        layer = cah.adapted_layers(model)[1]
        assert layer.bank.grad.abs().sum() > 0 and layer.domain_gate.grad.abs().sum() > 0


def test_statistics_carry_the_route_the_vq_loss_and_the_mi_read_outs():
    ids, mask, rows = batch()
    model = routed_model("vq")
    randomize(model)
    with cah.collect(model) as stats:
        out = model(ids, attention_mask=mask, labels=ids, causalattn_label_rows=rows, use_cache=False)
        assert stats.route.index.shape == (3,)
        assert sorted(stats.readouts) == [0, 1]
        u, w = stats.readouts[1]
        assert u.shape == w.shape == (3, 64)
        mi = stats.mi_loss(kind="textbook")
        assert torch.isfinite(mi) and mi >= 0
        (out.loss + 0.1 * stats.vq_loss() + 0.01 * stats.mi_loss()).backward()
    assert model.causalattn_router.codebook.grad.abs().sum() > 0
    assert cah.adapted_layers(model)[1].prompt.grad.abs().sum() > 0


def test_mi_read_outs_are_the_segments_contributions():
    """u is what the invariant segment adds to the label row's attention output and u + w what the whole
    adapter adds, both through o_proj (the first adapted layer: every variant sees the same input)."""
    ids, mask, rows = batch()
    model = routed_model("vq")
    randomize(model)
    off = with_gates_zeroed(model, "gate", "domain_gate")
    attention_inputs = []
    weight = cah.attention_modules(model)[0].o_proj.weight

    def o_proj_input(run):
        attention_inputs.clear()
        run()
        return attention_inputs[-1][torch.arange(3), rows]  # the layer's own call (B, N, Hq * d), at the label rows

    hooks = [cah.attention_modules(m)[0].o_proj.register_forward_pre_hook(
        lambda _m, args: attention_inputs.append(args[0])) for m in (model, off)]
    with torch.no_grad(), cah.collect(model) as stats:
        full = o_proj_input(lambda: model(ids, attention_mask=mask, causalattn_label_rows=rows))
        u, w = stats.readouts[0]
        with cah.invariant_only(model):
            invariant = o_proj_input(lambda: model(ids, attention_mask=mask, causalattn_label_rows=rows))
        assert not stats.readouts  # an invariant-only forward has one segment: nothing to compare
        base = o_proj_input(lambda: off(ids, attention_mask=mask))
    for hook in hooks:
        hook.remove()
    torch.testing.assert_close(u, (invariant - base) @ weight.T, **TIGHT)
    torch.testing.assert_close(u + w, (full - base) @ weight.T, **TIGHT)
    assert w.abs().sum() > 0


def test_invariant_only_is_the_model_with_domain_gates_zeroed():
    ids, mask, _ = batch()
    model = routed_model("soft")
    randomize(model)
    zeroed = with_gates_zeroed(model, "domain_gate")
    with torch.no_grad():
        with cah.invariant_only(model):
            invariant = model(ids, attention_mask=mask).logits
        torch.testing.assert_close(invariant, zeroed(ids, attention_mask=mask).logits, **TIGHT)
        assert not torch.allclose(invariant, model(ids, attention_mask=mask).logits)


def test_cached_generation_keeps_the_prompt_route():
    ids, mask, _ = batch()
    model = routed_model("vq")
    randomize(model)
    model.eval()
    with torch.no_grad():
        cached = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, use_cache=True)
        uncached = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    """The recomputed first adapted layer routes again; the loss and every gradient stay those without it."""
    ids, mask, rows = batch()
    results = []
    for checkpointing in (False, True):
        model = routed_model("vq-ste")
        randomize(model)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        with cah.collect(model) as stats:
            out = model(ids, attention_mask=mask, labels=ids, causalattn_label_rows=rows, use_cache=False)
            loss = out.loss + stats.vq_loss() + stats.mi_loss()
        loss.backward()
        results.append((loss.detach(), model.causalattn_router.codebook.grad, cah.adapted_layers(model)[1].bank.grad))
    for plain, recomputed in zip(*results):
        torch.testing.assert_close(recomputed, plain, **TIGHT)


def test_oracle_routes_train_no_router_weights():
    model = routed_model("oracle")
    assert not any(p.requires_grad for p in model.causalattn_router.parameters())
    summary = cah.summarize(model)
    assert summary.adapter_params > summary.trainable_params


def test_save_load_round_trip(tmp_path):
    ids, mask, _ = batch()
    model = routed_model("vq", domains=3)
    randomize(model)
    model.train()
    with torch.no_grad():
        model(ids, attention_mask=mask)  # batch-norm running statistics move away from their init
    directory = cah.save_adapters(model, tmp_path / "adapter")
    fresh = build(llama_config())
    summary = cah.load_adapters(fresh, directory)
    assert summary.adapter_params == cah.summarize(model).adapter_params
    for name, value in model.causalattn_router.state_dict().items():
        torch.testing.assert_close(fresh.causalattn_router.state_dict()[name], value)
    model.eval(), fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits,
                                   **TIGHT)
    with pytest.raises(ValueError, match="do not fit"):
        cah.load_adapters(routed_model("vq", domains=2), directory)


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="domains"):
        cah.AdapterConfig(domains=1)
    with pytest.raises(ValueError, match="route"):
        cah.AdapterConfig(domains=2, route="argmax")
    with pytest.raises(ValueError, match="domain_length"):
        cah.AdapterConfig(length=10, domains=6, domain_length=10, route="soft")
    ids, mask, _ = batch()
    with pytest.raises(ValueError, match="domain_ids"):
        routed_model("oracle")(ids, attention_mask=mask)
    with pytest.raises(ValueError, match="causalattn_label_rows"), cah.collect(model := routed_model("vq")):
        model(ids, attention_mask=mask, causalattn_label_rows=torch.tensor([0, 99, 1]))
    with pytest.raises(ValueError, match="invariant_only"), cah.invariant_only(build(llama_config())):
        pass
    with pytest.raises(NotImplementedError, match="packed"):  # one route per row would mix packed sequences
        routed_model("vq")(ids[:1], position_ids=torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4, 5]]))


@pytest.mark.parametrize("route", ["vq", "soft"])
def test_the_fused_kernels_train_routed_adapters_as_the_composed_path(route):
    """Both routing paths through the Triton kernels (per-sample keys and gates for "vq", one segment per
    domain for "soft"; the interpreter on CPU) against the composed backend, fp32: logits and the
    gradients of every prompt, bank, gate and the router."""
    ids, mask, _ = batch()
    results = {}
    for backend in ("composed", "triton"):
        model = build(llama_config(), dtype=torch.float32)
        torch.manual_seed(0)
        cah.add_adapters(model, cah.AdapterConfig(length=4, layers=2, domains=2, domain_length=3, route=route,
                                                  router_dim=6))
        randomize(model)
        cah.set_backend(model, backend)
        logits = model(ids, attention_mask=mask).logits
        (logits.square().mean()).backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad and p.grad is not None}
        results[backend] = logits.detach(), grads
    (want, want_grads), (got, got_grads) = results["composed"], results["triton"]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert set(got_grads) == set(want_grads) and any("bank" in name for name in got_grads)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-3, atol=1e-5, msg=name)
