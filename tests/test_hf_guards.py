"""An adapted model refuses what would silently drop its adapters: switching to an attention
implementation that ignores them, and `save_pretrained` (which `from_pretrained` would bring back
without them). Llama, Qwen2 and Mistral tiny configs."""
import copy

import pytest
import torch

import causalattn.hf as cah
from hf_helpers import CONFIGS, build, padded_batch, randomize_gates


def adapted(arch):
    model = build(CONFIGS[arch](), dtype=torch.float64)
    cah.add_adapters(model, cah.AdapterConfig(length=3, layers=1))
    randomize_gates(model)
    return model


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_adapted_model_refuses_an_implementation_that_ignores_the_adapters(arch):
    model = adapted(arch)
    for name in ("sdpa", "eager", {"": "sdpa"}):
        with pytest.raises(ValueError, match="would silently ignore this model's causalattn adapters"):
            model.set_attn_implementation(name)
    assert model.config._attn_implementation == "causalattn"
    model.set_attn_implementation("causalattn")  # staying is fine
    copied = copy.deepcopy(model)  # the refusal follows a copy and acts on the copy
    with pytest.raises(ValueError, match="ignore"):
        copied.set_attn_implementation("sdpa")
    copied.set_attn_implementation("independent")  # declares that it reads the adapters
    assert copied.config._attn_implementation == "independent"
    assert model.config._attn_implementation == "causalattn"
    # a model without adapters switches freely
    plain = build(CONFIGS[arch](), dtype=torch.float64)
    plain.set_attn_implementation("sdpa")


def test_save_pretrained_refuses_and_points_to_save_adapters(tmp_path):
    model = adapted("llama")
    with pytest.raises(ValueError, match=r"causalattn\.hf\.save_adapters\(model, directory\)"):
        model.save_pretrained(tmp_path / "full")
    assert not (tmp_path / "full").exists()
    # the way that works: the adapters alone, loaded into a fresh base
    cah.save_adapters(model, tmp_path / "adapter")
    back = build(CONFIGS["llama"](), dtype=torch.float64)
    cah.load_adapters(back, tmp_path / "adapter")
    ids, mask = padded_batch()
    with torch.no_grad():
        torch.testing.assert_close(back(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits,
                                   rtol=0, atol=0)


def test_output_attentions_is_refused_rather_than_empty():
    model = adapted("llama")
    ids, mask = padded_batch()
    with pytest.raises(NotImplementedError, match="output_attentions=True is not supported"):
        model(ids, attention_mask=mask, output_attentions=True)
