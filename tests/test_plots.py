"""Training figures: curves and the attention row of the answer-predicting position."""
import copy

import pytest
import torch

pytest.importorskip("matplotlib")

import causalattn.hf as cah  # noqa: E402
from causalattn.lab.tasks import generate  # noqa: E402
from causalattn.lab.training.plots import answer_attention, plot_attention, plot_curves  # noqa: E402

CONFIG = dict(hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture
def adapted_model(tiny_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tiny_tokenizer), **copy.deepcopy(CONFIG))
    model = LlamaForCausalLM(config)
    cah.add_adapters(model, cah.AdapterConfig(length=4, layers=2))
    cah.set_backend(model, "reference")
    for prompt in cah.adapted_layers(model).values():
        torch.nn.init.normal_(prompt.gate)  # a live gate, so the probe must run the adapter too
    return model


def test_answer_attention_matches_the_model_and_marks_causes(tiny_tokenizer, adapted_model):
    example = generate(1, seed=0)[0]
    tokens, attention, causes = answer_attention(adapted_model, tiny_tokenizer, example)
    assert len(tokens) == attention.numel() == causes.numel()
    assert torch.isclose(attention.sum(), torch.tensor(1.0), atol=1e-5)  # a softmax row, head- and layer-mean
    cause_text = "".join(t for t, c in zip(tokens, causes.tolist()) if c)
    for cause in example.important[example.target]:
        assert cause.replace(" ", "") in cause_text.replace(" ", "")
    assert adapted_model.config._attn_implementation == "causalattn"  # restored after probing


def test_plots_are_written(tmp_path, tiny_tokenizer, adapted_model):
    history = [dict(run=run, step=s, loss=1.0 / (s + 1), ce=0.9 / (s + 1), cat=0.1, xg=0.0)
               for run in ("ce", "ce+cat") for s in range(5)]
    accuracy = [dict(run=run, epoch=e, split=split, accuracy=0.5 + 0.1 * e)
                for run in ("ce", "ce+cat") for e in range(3) for split in ("iid", "ood")]
    curves = plot_curves(history, accuracy, tmp_path / "curves.png")
    heat = plot_attention(adapted_model, tiny_tokenizer, generate(2, seed=1), tmp_path / "attention.png", "before")
    for path in (curves, heat):
        assert path.stat().st_size > 10_000 and path.read_bytes()[:4] == b"\x89PNG"
