"""PEFT interop: our adapter folders are never mistaken for PEFT's, old folders still load, and the export
to PEFT's AdaptionPrompt format loads with `PeftModel.from_pretrained` and computes the same logits."""
import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

import causalattn.hf as cah
from causalattn.checkpoint_files import MANIFEST_NAME
from hf_helpers import FAMILY_CONFIGS, build, llama_config, padded_batch, randomize_gates

PEFT_FAMILIES = ("llama", "mistral")
LOOSE = dict(rtol=1e-4, atol=1e-5)  # fp32: PEFT takes its adapter softmax in fp32 whatever the model dtype


def adapted(family="llama", dtype=torch.float32, **adapter):
    model = build(FAMILY_CONFIGS[family](), dtype=dtype)
    cah.add_adapters(model, cah.AdapterConfig(**{"length": 4, "layers": 2, **adapter}))
    randomize_gates(model)
    return model


def test_our_folders_are_not_taken_for_peft_adapters(tmp_path):
    directory = cah.save_adapters(adapted(), tmp_path / "ours")
    assert not (directory / "adapter_config.json").exists()
    with pytest.raises(ValueError, match="adapter_config.json"):  # PEFT: no adapter here, not a KeyError
        PeftModel.from_pretrained(build(llama_config(), implementation="sdpa"), str(directory))
    with pytest.raises((OSError, ValueError), match="config.json"):  # transformers: no model here, not a PEFT adapter
        AutoModelForCausalLM.from_pretrained(str(directory))


def test_old_folders_still_load(tmp_path):
    """Folders written before the rename hold our config under PEFT's name; PEFT's own config is refused."""
    ids, mask = padded_batch()
    model = adapted()
    directory = cah.save_adapters(model, tmp_path / "old")
    (directory / "causalattn_adapter.json").rename(directory / "adapter_config.json")
    (directory / MANIFEST_NAME).unlink()  # old folders predate the manifests too
    fresh = build(llama_config(), dtype=torch.float32)
    cah.load_adapters(fresh, directory)
    torch.testing.assert_close(fresh(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits,
                               rtol=0, atol=0)
    peft_folder = cah.export_adaption_prompt(adapted(gate="raw"), tmp_path / "peft")
    with pytest.raises(ValueError, match="a PEFT adapter, not a causalattn one"):
        cah.load_adapters(build(llama_config()), peft_folder)
    assert cah.export_adaption_prompt(adapted(gate="raw"), peft_folder) == peft_folder  # PEFT's folder: rewritable


@pytest.mark.support("PEFT export")
@pytest.mark.parametrize("family", PEFT_FAMILIES)
def test_export_loads_in_peft_with_the_same_logits(family, tmp_path):
    """Raw and tanh scalar gates (a tanh gate goes out as its value): PEFT's model computes ours."""
    ids, mask = padded_batch(length=8)
    real = mask.bool()
    for gate in ("raw", "tanh"):
        model = adapted(family, gate=gate, gate_per_head=False)
        directory = cah.export_adaption_prompt(model, tmp_path / gate)
        config = json.loads((directory / "adapter_config.json").read_text())
        assert (config["peft_type"], config["adapter_len"], config["adapter_layers"]) == ("ADAPTION_PROMPT", 4, 2)
        base = build(FAMILY_CONFIGS[family](), implementation="sdpa", dtype=torch.float32)
        peft_model = PeftModel.from_pretrained(base, str(directory))
        with torch.no_grad():
            ours, theirs = model(ids, attention_mask=mask).logits, peft_model(ids, attention_mask=mask).logits
        torch.testing.assert_close(theirs[real], ours[real], **LOOSE)
        base_logits = build(FAMILY_CONFIGS[family]())(ids, attention_mask=mask).logits[real].float()
        assert (ours[real] - base_logits).abs().max() > 1e-3  # the adapters matter


@pytest.mark.support("PEFT export", passed="refused (not in PEFT)")
@pytest.mark.parametrize("family", [family for family in FAMILY_CONFIGS if family not in PEFT_FAMILIES])
def test_export_refuses_families_peft_lacks(family, tmp_path):
    with pytest.raises(ValueError, match=f"supports Llama and Mistral, not {cah.families.FAMILIES[family]}"):
        cah.export_adaption_prompt(adapted(family, gate="raw"), tmp_path / "peft")


def test_export_refuses_what_peft_would_compute_differently(tmp_path):
    with pytest.raises(ValueError, match="one gate per head"):
        cah.export_adaption_prompt(adapted(), tmp_path / "a")  # the default: tanh, one gate per head
    with pytest.raises(ValueError, match="routed adapters"):
        cah.export_adaption_prompt(adapted(gate="raw", domains=2, domain_length=2), tmp_path / "b")
    biased = build(llama_config(attention_bias=True), dtype=torch.float32)
    cah.add_adapters(biased, cah.AdapterConfig(length=4, layers=2, gate="raw"))
    with pytest.raises(ValueError, match="o_proj has a bias"):
        cah.export_adaption_prompt(biased, tmp_path / "c")
    ours = cah.save_adapters(adapted(gate="raw"), tmp_path / "ours")
    with pytest.raises(ValueError, match="holds a causalattn adapter"):
        cah.export_adaption_prompt(adapted(gate="raw"), ours)
