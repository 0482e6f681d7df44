"""causalattn.hf on tiny LLaMA, Mistral and Qwen2 models (CPU), against transformers' own attention, an
independent eager adapter implementation (tests/hf_helpers.py) and PEFT's AdaptionPrompt.

Models are float64 unless a test says otherwise: `backend="auto"` then runs the reference backend, and
parity holds to ~1e-12. One test trains with the Triton backend (the interpreter on CPU, compiled on
a GPU) and compares its loss curve with the reference backend's.
"""
import copy
import json
import os

import pytest
import torch
from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM
from transformers.masking_utils import AttentionMaskInterface

import causalattn.hf as cah
from causalattn import CausalMask, cat_loss, encode_with_causes
from hf_helpers import (
    CONFIGS, TINY, XG_READOUTS, assert_close_dicts, build, forward_backward, grads, labels_of, llama_config,
    mistral_config, padded_batch, randomize_gates, twin,
)

TIGHT = dict(rtol=1e-9, atol=1e-10)
pytestmark = pytest.mark.filterwarnings("ignore:xg_variance")


def adapted(config, dtype=torch.float64, seed=0, **adapter):
    """A causalattn model with adapters (nonzero gates, so the adapter branch matters)."""
    model = build(config, dtype=dtype, seed=seed)
    cah.add_adapters(model, cah.AdapterConfig(**{"length": 5, "layers": 2, **adapter}))
    randomize_gates(model)
    return model


# ------------------------------------------------------------------------------ plain attention backend
def test_registered_with_both_interfaces():
    assert AttentionInterface._global_mapping["causalattn"] is cah.attention_forward
    assert AttentionMaskInterface._global_mapping["causalattn"] is cah.key_padding_mask


@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_plain_attention_matches_sdpa_and_eager(arch, padding):
    ids, mask = padded_batch(padding=padding)
    real = mask.bool()
    model = build(CONFIGS[arch]())
    logits, grad = forward_backward(model, ids, mask)
    sdpa_logits, sdpa_grad = forward_backward(twin(model, "sdpa"), ids, mask)
    torch.testing.assert_close(logits[real], sdpa_logits[real], **TIGHT)
    assert_close_dicts(grad, sdpa_grad, **TIGHT)
    # eager softmaxes in fp32 (its fp64 mask overflows there), so compare it in fp32
    model32 = copy.deepcopy(model).float()
    cah.set_backend(model32, "reference")
    logits32, grad32 = forward_backward(model32, ids, mask)
    eager_logits, eager_grad = forward_backward(twin(model32, "eager"), ids, mask)
    torch.testing.assert_close(logits32[real], eager_logits[real], rtol=1e-4, atol=1e-5)
    assert_close_dicts(grad32, eager_grad, rtol=1e-3, atol=1e-5)


def test_packed_sequences_match_sdpa_and_separate_runs():
    model = build(llama_config())
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(2, 300, (2, 12), generator=gen)
    lengths = [(5, 7), (3, 9)]
    position_ids = torch.tensor([list(range(a)) + list(range(b)) for a, b in lengths])
    packed = model(ids, position_ids=position_ids, use_cache=False).logits
    sdpa = twin(model, "sdpa")
    torch.testing.assert_close(packed, sdpa(ids, position_ids=position_ids, use_cache=False).logits, **TIGHT)
    for row, (first, _) in enumerate(lengths):  # each packed sequence as if alone
        for part in (slice(0, first), slice(first, 12)):
            alone = sdpa(ids[row : row + 1, part], use_cache=False).logits[0]
            torch.testing.assert_close(packed[row, part], alone, **TIGHT)
    # the flash-attention keywords of a padding-free collator give the same result for one row
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    flash_style = model(ids[:1], position_ids=position_ids[:1], use_cache=False, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                        max_length_q=7, max_length_k=7).logits
    torch.testing.assert_close(flash_style, packed[:1], **TIGHT)


def test_packed_boundaries_are_found_once_per_forward(monkeypatch):
    """Every layer gets the same position_ids: the sequence boundaries (and their device-to-host
    syncs) are computed by the first layer and reused by the others, and again for a new tensor."""
    from causalattn.hf import packing

    calls = []
    find = packing._find_packed_sequences
    monkeypatch.setattr(packing, "_find_packed_sequences", lambda *a: calls.append(1) or find(*a))
    config = llama_config()
    model = build(config)
    ids = torch.randint(2, 300, (2, 12), generator=torch.Generator().manual_seed(4))
    position_ids = torch.tensor([list(range(5)) + list(range(7)), list(range(3)) + list(range(9))])
    first = model(ids, position_ids=position_ids, use_cache=False).logits
    assert config.num_hidden_layers > 1 and len(calls) == 1
    again = model(ids, position_ids=position_ids.clone(), use_cache=False).logits
    assert len(calls) == 2
    torch.testing.assert_close(again, first, rtol=0, atol=0)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_plain_generation_matches_sdpa(cache):
    ids, mask = padded_batch(length=8)
    model = build(mistral_config())
    settings = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, return_dict_in_generate=True,
                    output_scores=True, cache_implementation=cache)
    ours = model.generate(ids, **settings)
    theirs = twin(model, "sdpa").generate(ids, **settings)
    assert torch.equal(ours.sequences, theirs.sequences)
    torch.testing.assert_close(torch.stack(ours.scores), torch.stack(theirs.scores), **TIGHT)


# ------------------------------------------------------------------------------ adapters
def test_zero_init_adapter_changes_nothing_but_the_gate_learns():
    ids, mask = padded_batch()
    model = build(llama_config())
    before = model(ids, attention_mask=mask).logits.detach()
    summary = cah.add_adapters(model, cah.AdapterConfig(length=4, layers=1))
    assert summary.layer_indices == (1,)
    assert summary.adapter_params == summary.trainable_params == 4 * 64 + 4
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "model.layers.1.self_attn.causalattn_adapter.prompt", "model.layers.1.self_attn.causalattn_adapter.gate"}
    logits, grad = forward_backward(model, ids, mask)
    assert torch.equal(logits, before)
    prompt_grad, gate_grad = grad["model.layers.1.self_attn.causalattn_adapter.prompt"], \
        grad["model.layers.1.self_attn.causalattn_adapter.gate"]
    assert torch.count_nonzero(prompt_grad) == 0  # docs/math.md §1: at gamma = 0 the prompt gets exactly zero gradient
    assert torch.count_nonzero(gate_grad) == gate_grad.numel()


def test_llama_7b_shapes_train_1_2m_parameters():
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig())  # LLaMA-7B shapes: 32 layers, hidden 4096, 32 heads
    summary = cah.add_adapters(model, cah.AdapterConfig(length=10))
    assert summary.layer_indices == tuple(range(2, 32))  # the default: top min(30, layers)
    assert summary.adapter_params == summary.trainable_params == 30 * 10 * 4096 + 30 * 32 == 1_229_760
    assert summary.total_params == 6_738_415_616 + 1_229_760
    assert "trainable params: 1,229,760" in str(summary)


@pytest.mark.parametrize("arch, gate", [("llama", "tanh"), ("mistral", "raw"), ("qwen2", "tanh")])
def test_adapter_matches_independent_eager(arch, gate):
    ids, mask = padded_batch()
    model = adapted(CONFIGS[arch](), gate=gate)
    expected_gate_shape = (4,) if gate == "tanh" else (1,)
    assert all(p.gate.shape == expected_gate_shape for p in cah.adapted_layers(model).values())
    logits, grad = forward_backward(model, ids, mask)
    independent_logits, independent_grad = forward_backward(twin(model, "independent"), ids, mask)
    torch.testing.assert_close(logits, independent_logits, **TIGHT)  # padded rows too: both give 0 there
    assert len(grad) == 4 and all(g.abs().sum() > 0 for g in grad.values())
    assert_close_dicts(grad, independent_grad, **TIGHT)


def test_generation_with_adapter_matches_independent_eager():
    ids, mask = padded_batch(length=8)
    model = adapted(llama_config())
    settings = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, return_dict_in_generate=True,
                    output_scores=True)
    cached = model.generate(ids, **settings)
    independent = twin(model, "independent").generate(ids, **settings)
    uncached = model.generate(ids, use_cache=False, **settings)
    for other in (independent, uncached):
        assert torch.equal(cached.sequences, other.sequences)
        torch.testing.assert_close(torch.stack(cached.scores), torch.stack(other.scores), **TIGHT)
    # the adapter matters in every decode step: the base model scores differ at each of them
    base = twin(model, "causalattn")
    with torch.no_grad():
        for prompt in cah.adapted_layers(base).values():
            prompt.gate.zero_()
    base_scores = base.generate(ids, **settings).scores
    assert all((a - b).abs().max() > 1e-3 for a, b in zip(cached.scores, base_scores))


# ------------------------------------------------------------------------------ statistics and losses
def supervision_for(mask, seed=4):
    gen = torch.Generator().manual_seed(seed)
    dense = torch.rand(mask.shape[0], mask.shape[1], mask.shape[1], generator=gen) < 0.3
    return CausalMask.from_dense(dense, mask.bool())


@pytest.mark.parametrize("pool, space", [("sample", "output"), ("position", "head")])
def test_statistics_match_independent_eager(pool, space):
    ids, mask = padded_batch()
    supervision = supervision_for(mask)
    model = adapted(llama_config(), xg_tokens=2, xg_pool=pool, xg_space=space)
    with cah.collect(model) as stats:
        model(ids, attention_mask=mask, supervision=supervision)
    assert sorted(stats.mass) == [0, 1] and sorted(stats.xg) == [0, 1]
    ours = stats.cat_loss() + stats.xg_loss()
    ours.backward()
    ours_grad = grads(model)

    independent = twin(model, "independent")
    XG_READOUTS.clear()
    probs = independent(ids, attention_mask=mask, output_attentions=True, real_tokens=mask.bool()).attentions
    dense = supervision.to_dense()[:, None].to(probs[0].dtype)
    expected_cat = cat_loss([(p * dense).sum(-1) for p in probs], supervision)
    expected_xg = torch.stack([XG_READOUTS[i].var(0).mean() for i in (0, 1)]).mean()
    torch.testing.assert_close(stats.cat_loss(), expected_cat, **TIGHT)
    masses = [(p * dense).sum(-1) for p in probs]
    torch.testing.assert_close(stats.cat_loss(layers=[0]), cat_loss(masses[:1], supervision), **TIGHT)
    torch.testing.assert_close(stats.cat_loss(heads="each", layers=[1]),
                               cat_loss(masses[1:], supervision, heads="each"), **TIGHT)
    with pytest.raises(ValueError, match=r"layers: expected indices of layers that recorded a CAT mass \(\[0, 1\]\)"):
        stats.cat_loss(layers=[2])
    torch.testing.assert_close(stats.xg_loss(), expected_xg, **TIGHT)
    torch.testing.assert_close(stats.xg_loss(layers="last"), XG_READOUTS[1].var(0).mean(), **TIGHT)
    (expected_cat + expected_xg).backward()
    assert_close_dicts(ours_grad, grads(independent), **TIGHT)


def test_packed_sequences_with_adapter_match_independent_eager():
    model = adapted(llama_config(), xg_tokens=2)
    ids = torch.randint(2, 300, (2, 12), generator=torch.Generator().manual_seed(5))
    position_ids = torch.tensor([list(range(5)) + list(range(7)), list(range(12))])
    # no attention_mask: transformers' padding-free path keys on position_ids alone
    out = model(ids, position_ids=position_ids, labels=ids, use_cache=False)
    out.loss.backward()
    independent = twin(model, "independent")
    expected = independent(ids, position_ids=position_ids, labels=ids, use_cache=False)
    expected.loss.backward()
    torch.testing.assert_close(out.logits, expected.logits, **TIGHT)
    assert_close_dicts(grads(model), grads(independent), **TIGHT)
    with cah.collect(model) as stats:  # XG pools over each packed sequence: 3 of them
        model(ids, position_ids=position_ids, use_cache=False)
    assert stats.xg[1].shape == (3, 1, 64)


def test_gradient_checkpointing_records_each_layer_once():
    ids, mask = padded_batch()
    supervision = supervision_for(mask)
    results = {}
    for checkpointing in (False, True):
        model = adapted(llama_config(), xg_tokens=2)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        calls = []
        with cah.collect(model) as stats:
            record = stats.record
            stats.record = lambda layer, **kw: (calls.append(layer), record(layer, **kw))
            out = model(ids, attention_mask=mask, labels=labels_of(ids, mask), supervision=supervision)
        first = stats.mass
        loss = out.loss + stats.cat_loss() + stats.xg_loss()
        loss.backward()
        # after the recompute in backward the statistics are still the first forward's, once per layer
        assert all(stats.mass[i] is first[i] for i in (0, 1))
        torch.testing.assert_close(stats.cat_loss() + stats.xg_loss(), loss - out.loss, **TIGHT)
        results[checkpointing] = (loss.detach(), grads(model), sorted(calls))
    assert results[False][2] == [0, 1]
    assert results[True][2] == [0, 0, 1, 1]  # each layer ran twice, and counted once
    torch.testing.assert_close(results[True][0], results[False][0], **TIGHT)
    assert_close_dicts(results[True][1], results[False][1], **TIGHT)


def test_misuse_raises_clear_errors():
    ids, mask = padded_batch()
    model = adapted(llama_config())
    with pytest.raises(ValueError, match="collect"):
        model(ids, attention_mask=mask, supervision=supervision_for(mask))
    with pytest.raises(TypeError, match="CausalMask"):
        with cah.collect(model):
            model(ids, attention_mask=mask, supervision=mask)
    with cah.collect(model) as stats:
        model(ids, attention_mask=mask)
    with pytest.raises(RuntimeError, match="supervision"):
        stats.cat_loss()
    four_d = torch.ones(3, 1, 11, 11, dtype=torch.bool)
    with pytest.raises(ValueError, match="4D"):
        model(ids, attention_mask=four_d)
    with pytest.raises(ValueError, match="already has"):
        cah.add_adapters(model)
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(ValueError, match="use_reentrant"):
        with cah.collect(model):
            pass
    windowed = build(mistral_config(sliding_window=4))
    with pytest.raises(NotImplementedError, match="sliding-window"):
        windowed(ids, attention_mask=mask)
    with_dropout = build(llama_config(attention_dropout=0.1)).train()
    with pytest.raises(NotImplementedError, match="dropout"):
        with_dropout(ids, attention_mask=mask)
    with pytest.raises(NotImplementedError, match="overlays"):
        cah.key_padding_mask(3, 11, 11, use_vmap=True)
    with pytest.raises(ValueError, match="length"):
        cah.AdapterConfig(length=65)
    # a family whose key norm causalattn does not know (OLMo2 normalises the whole projection): refused, untouched
    from transformers import Olmo2Config

    olmo = build(Olmo2Config(**TINY))
    with pytest.raises(NotImplementedError, match="olmo2 layers normalise their keys"):
        cah.add_adapters(olmo)
    assert not cah.adapted_layers(olmo) and all(p.requires_grad for p in olmo.parameters())
    # attention logit soft-capping (Gemma2's layers pass `softcap`): refused, never computed without it
    from transformers import Gemma2Config

    capped = build(Gemma2Config(**TINY, head_dim=16, attn_logit_softcapping=50.0))
    with pytest.raises(NotImplementedError, match="gemma2 logit soft-capping"):
        capped(ids, attention_mask=mask)


# ------------------------------------------------------------------------------ save / load
def test_save_load_round_trip(tmp_path, monkeypatch):
    ids, mask = padded_batch()
    model = adapted(mistral_config(), gate="raw", gate_per_head=True, xg_tokens=1)
    directory = cah.save_adapters(model, tmp_path / "adapter")
    assert sorted(os.listdir(directory)) == ["adapter_model.safetensors", "causalattn_adapter.json",
                                             "causalattn_manifest.json"]  # no temp files left
    fresh = build(mistral_config())
    summary = cah.load_adapters(fresh, directory)
    assert summary == cah.summarize(model)
    assert fresh.config._attn_implementation == "causalattn"
    torch.testing.assert_close(fresh(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits,
                               rtol=0, atol=0)
    prompt = cah.adapted_layers(fresh)[1]
    assert (prompt.gate_mode, prompt.gate.shape, prompt.xg_tokens) == ("raw", (4,), 1)

    # a save that dies while writing leaves the previous files as they were, and no temporary file
    weights = directory / "adapter_model.safetensors"
    saved = weights.read_bytes()

    def dies_halfway(tensors, path, metadata):
        open(path, "wb").write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("causalattn.hf.io.save_file", dies_halfway)
    randomize_gates(model, seed=9)
    with pytest.raises(OSError, match="disk full"):
        cah.save_adapters(model, directory)
    assert weights.read_bytes() == saved
    assert sorted(os.listdir(directory)) == ["adapter_model.safetensors", "causalattn_adapter.json"]

    other = build(mistral_config())
    cah.add_adapters(other, cah.AdapterConfig(length=3, layers=2))
    with pytest.raises(ValueError, match="do not fit"):
        cah.load_adapters(other, directory)
    config_path = directory / "causalattn_adapter.json"
    description = json.loads(config_path.read_text())
    description["adapter"]["length"] = 6
    config_path.write_text(json.dumps(description))
    with pytest.raises(ValueError, match="disagree"):
        cah.load_adapters(build(mistral_config()), directory)


# ------------------------------------------------------------------------------ PEFT bridge
@pytest.mark.parametrize("arch, bias", [("llama", False), ("mistral", False), ("llama", True)])
def test_peft_bridge_matches_peft(arch, bias):
    from peft import AdaptionPromptConfig, get_peft_model

    # fp32: PEFT computes its adapter softmax in fp32 whatever the model dtype
    loose = dict(rtol=1e-4, atol=1e-5)
    ids, mask = padded_batch(length=8)
    base = build(CONFIGS[arch](attention_bias=bias), implementation="sdpa", dtype=torch.float32)
    peft_model = get_peft_model(base, AdaptionPromptConfig(adapter_len=4, adapter_layers=2, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if name.endswith("adaption_gate"):
                p.fill_(0.7)
    bridged = copy.deepcopy(peft_model)
    assert cah.bridge_adaption_prompt(bridged) == 2
    cah.set_backend(bridged, "reference")
    expected_logits, expected_grad = forward_backward(peft_model, ids, mask)
    logits, grad = forward_backward(bridged, ids, mask)
    real = mask.bool()
    torch.testing.assert_close(logits[real], expected_logits[real], **loose)
    assert len(grad) == 4
    assert_close_dicts(grad, expected_grad, **loose)
    settings = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, return_dict_in_generate=True,
                    output_scores=True)
    ours, theirs = bridged.generate(input_ids=ids, **settings), peft_model.generate(input_ids=ids, **settings)
    assert torch.equal(ours.sequences, theirs.sequences)
    torch.testing.assert_close(torch.stack(ours.scores), torch.stack(theirs.scores), **loose)


# ------------------------------------------------------------------------------ training end to end
def risk_annotation(sentence):
    """CAT annotation of a generated risk sentence: the answer is caused by its first two factors."""
    facts, answer = sentence.rsplit(". Answer: ", 1)
    causes = [fact.split(":")[0] for fact in facts.split(", ")[:2]]
    return {answer: causes}


def train_curve(model, tokenizer, sentences, steps, lam, lr=3e-2):
    """(steps, 3) curve of [CE, CAT, lam * XG] training the adapters with Adam on one batch."""
    enc, mask = encode_with_causes(tokenizer, sentences, [risk_annotation(s) for s in sentences])
    device = next(model.parameters()).device
    enc, mask = {k: v.to(device) for k, v in enc.items()}, mask.to(device)
    labels = labels_of(enc["input_ids"], enc["attention_mask"])
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    curve = []
    for _ in range(steps):
        with cah.collect(model) as stats:
            out = model(**enc, labels=labels, supervision=mask)
        parts = torch.stack([out.loss, stats.cat_loss(), lam * stats.xg_loss()])
        optimizer.zero_grad()
        parts.sum().backward()
        optimizer.step()
        curve.append(parts.detach().cpu())
    return torch.stack(curve)


@pytest.fixture
def one_thread():
    """Tiny tensors: handing them to a thread pool costs more than it saves (~30 % of this test's time)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_training_curves_reference_vs_triton(tiny_tokenizer, risk_sentences, one_thread):
    """30 Adam steps of CE + CAT + XG, same seed and batch, reference vs Triton backend (fp32). The tiny
    model's XG variance is ~1e-10, so lam = 1e5 lets its gradient take part; each loss is compared
    on its own scale."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sentences = list(risk_sentences[:2])  # B = 2 keeps the interpreter run short; XG needs B >= 2
    tiny_tokenizer.padding_side = "left"
    curves = {}
    for backend in ("reference", "triton"):
        model = build(llama_config(), dtype=torch.float32).to(device)
        cah.add_adapters(model, cah.AdapterConfig(length=6, layers=2, xg_tokens=2))
        cah.set_backend(model, backend)
        curves[backend] = train_curve(model, tiny_tokenizer, sentences, steps=30, lam=1e5)
    reference, triton = curves["reference"], curves["triton"]
    assert reference[-1, 0] < reference[0, 0] - 0.1  # it trains
    assert (reference[:, 1] < -0.9).all() and (reference[1:, 2] > 0).all()  # CAT and XG take part throughout
    torch.testing.assert_close(triton[:, :2], reference[:, :2], rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(triton[:, 2], reference[:, 2], rtol=1e-2, atol=1e-9)


def test_readme_example(tiny_tokenizer, risk_sentences, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # as on a user's CPU: backend "auto" runs the reference
    texts = list(risk_sentences[:3])
    annotations = [risk_annotation(s) for s in texts]
    tokenizer = tiny_tokenizer
    # --- the README snippet, verbatim ---
    import causalattn, causalattn.hf as cah, torch  # noqa: E401
    from transformers import AutoModelForCausalLM, LlamaConfig
    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)  # noqa: E501
    model = AutoModelForCausalLM.from_config(config, attn_implementation="causalattn")
    print(cah.add_adapters(model, cah.AdapterConfig(length=10, layers=2)))  # zero-init gated prompts, base frozen
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    enc, mask = causalattn.encode_with_causes(tokenizer, texts, annotations)  # CausalMask from {effect: [causes]}
    with cah.collect(model) as stats:
        out = model(**enc, labels=enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100), supervision=mask)
    (out.loss + stats.cat_loss() + 0.1 * stats.xg_loss()).backward(); optimizer.step()  # noqa: E702
    # --- end ---
    assert torch.isfinite(stats.cat_loss()) and torch.isfinite(stats.xg_loss())
    gates = [p for name, p in model.named_parameters() if name.endswith("causalattn_adapter.gate")]
    assert len(gates) == 2 and all(bool((g != 0).all()) for g in gates)  # the step moved the zero-init gates


def test_supervised_packed_row_matches_the_padded_batch():
    """CAT on a padding-free row: the mask is built over the row with the same cu_seqlens, and the loss
    equals the one of the same two sequences padded into a batch."""
    model = adapted(llama_config(), xg_tokens=2)
    gen = torch.Generator().manual_seed(7)
    first, second = torch.randint(2, 300, (9,), generator=gen), torch.randint(2, 300, (14,), generator=gen)
    causes = [((6, 8), [(1, 3)]), ((11, 13), [(2, 5), (7, 9)])]  # (effect, causes) in each sequence
    padded_ids = torch.stack([torch.cat([first, torch.zeros(5, dtype=torch.long)]), second])
    padding = torch.stack([torch.arange(14) < 9, torch.ones(14, dtype=torch.bool)])
    padded_mask = CausalMask.from_spans([[causes[0]], [causes[1]]], 14, key_mask=padding)
    with cah.collect(model) as padded_stats:
        model(padded_ids, attention_mask=padding.long(), supervision=padded_mask, use_cache=False)
    shift = lambda span, by: (span[0] + by, span[1] + by)  # noqa: E731
    row_spans = [causes[0], (shift(causes[1][0], 9), [shift(c, 9) for c in causes[1][1]])]
    cu = torch.tensor([0, 9, 23])
    row_mask = CausalMask.from_spans([row_spans], 23, cu_seqlens=cu)
    position_ids = torch.cat([torch.arange(9), torch.arange(14)])[None]
    with cah.collect(model) as packed_stats:
        model(torch.cat([first, second])[None], position_ids=position_ids, supervision=row_mask, use_cache=False)
    torch.testing.assert_close(packed_stats.cat_loss(), padded_stats.cat_loss(), **TIGHT)
    with cah.collect(model), pytest.raises(ValueError, match="same cu_seqlens"):
        model(torch.cat([first, second])[None], position_ids=position_ids, use_cache=False,
              supervision=CausalMask.from_spans([row_spans], 23))
