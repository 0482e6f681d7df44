"""`causalattn.attention` under `torch.autocast`: inputs of mixed dtypes (as a bf16 LLaMA hands them
over: q, k fp32 after RoPE, v bf16) are taken in the autocast dtype, statistics stay fp32, and the
result equals the op run on inputs cast by hand outside autocast. On CPU the reference backend runs
bf16 and the Triton interpreter runs fp16 (its bf16 arithmetic is wrong, see TOOLCHAIN); a tiny
LlamaForCausalLM trains CE + CAT + XG under bf16 autocast.
"""
import pytest
import torch

import causalattn
import causalattn.hf as cah
from hf_helpers import build, llama_config, randomize_gates
from kernel_cases import Case, build_inputs

pytestmark = pytest.mark.filterwarnings("ignore:xg_variance")
CASE = Case(batch=2, heads_q=4, heads_kv=2, seq_len=40, head_dim=16, adapter_len=5, mask="random-0.2", xg_tokens=2,
            padding="left")
MIXED = {"q": torch.float32, "k": torch.float32, "v": torch.bfloat16, "adapter_keys": torch.float32,
         "adapter_values": torch.bfloat16, "gate": torch.float32}


def outputs_and_grads(leaves, kwargs, upstream, dtypes, backend, autocast_dtype=None):
    inputs = {name: t.detach().to(dtypes[name]).requires_grad_() for name, t in leaves.items()}
    adapter = causalattn.Adapter(inputs["adapter_keys"], inputs["adapter_values"], inputs["gate"])
    with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        result = causalattn.attention(inputs["q"], inputs["k"], inputs["v"], adapter=adapter, backend=backend,
                                      **kwargs)
    loss = (result.out.float() * upstream["out"].float()).sum() + (result.mass * upstream["mass"].float()).sum() \
        + 3.0 * (result.xg ** 2).sum()
    loss.backward()
    return result, {name: t.grad for name, t in inputs.items()}


@pytest.mark.parametrize("backend, dtype", [("reference", torch.bfloat16), ("triton", torch.float16)])
def test_op_follows_autocast(backend, dtype):
    leaves, kwargs, upstream = build_inputs(CASE, "cpu")
    mixed = {**MIXED, "v": dtype, "adapter_values": dtype}
    result, grads = outputs_and_grads(leaves, kwargs, upstream, mixed, backend, autocast_dtype=dtype)
    assert result.out.dtype == dtype
    assert result.lse.dtype == result.mass.dtype == result.xg.dtype == torch.float32
    assert all(grads[name].dtype == mixed[name] for name in grads)  # each leaf gets a grad of its own dtype
    # the same as casting by hand, outside autocast
    by_hand = {**{name: dtype for name in MIXED}, "gate": torch.float32}
    expected, expected_grads = outputs_and_grads(leaves, kwargs, upstream, by_hand, backend)
    for name in ("out", "lse", "mass", "xg"):
        torch.testing.assert_close(getattr(result, name), getattr(expected, name), rtol=0, atol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name].to(grad.dtype), rtol=0, atol=0)
    # and close to the float64 truth, at the precision of the dtype
    truth = causalattn.attention_dense(leaves["q"], leaves["k"], leaves["v"], **kwargs, adapter=causalattn.Adapter(
        leaves["adapter_keys"], leaves["adapter_values"], leaves["gate"]))
    torch.testing.assert_close(result.out.double(), truth.out, rtol=0, atol=5e-2)
    torch.testing.assert_close(result.mass.double(), truth.mass, rtol=0, atol=2e-2)


def test_fp64_inputs_are_left_alone_by_autocast():
    leaves, kwargs, _ = build_inputs(Case(batch=1, seq_len=16, head_dim=16), "cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        result = causalattn.attention(leaves["q"], leaves["k"], leaves["v"], **kwargs)
    assert result.out.dtype == torch.float64


def test_tiny_llama_trains_ce_cat_xg_under_bf16_autocast():
    model = build(llama_config(), dtype=torch.float32)
    cah.add_adapters(model, cah.AdapterConfig(length=4, layers=2, xg_tokens=2))
    randomize_gates(model)
    cah.set_backend(model, "reference")
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(2, 300, (3, 24), generator=gen)
    dense = torch.zeros(3, 24, 24, dtype=torch.bool)
    dense[:, 18:22, 2:9] = True
    supervision = causalattn.CausalMask.from_dense(dense)
    prompts = [p for layer in cah.adapted_layers(model).values() for p in layer.parameters()]
    with torch.autocast("cpu", dtype=torch.bfloat16), cah.collect(model) as stats:
        out = model(input_ids=ids, labels=ids, supervision=supervision, use_cache=False)
        loss = out.loss + stats.cat_loss() + stats.xg_loss()
    loss.backward()
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(loss)
    assert all(p.dtype == torch.float32 and p.grad is not None and torch.isfinite(p.grad).all()
               and float(p.grad.abs().max()) > 0 for p in prompts)
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits
    assert float((out.logits.detach().float() - full).abs().max()) < 0.1  # bf16 logits track the fp32 ones
